"""``diki config``: inspect the effective settings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml

from services.settings import Settings, SettingsError

config_app = typer.Typer(
    help="Inspect the effective settings (defaults, config file, environment).", no_args_is_help=True
)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML settings file (default: $DIKI_CONFIG).", dir_okay=False),
]


def load_settings(config: Path | None) -> Settings:
    """Load the settings for a command, turning a settings error into a clear message and exit code 2."""
    try:
        return Settings.load(config)
    except SettingsError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


@config_app.command("show")
def show(config: ConfigOption = None) -> None:
    """Print the effective settings as YAML, secrets masked."""
    settings = load_settings(config)
    typer.echo(yaml.safe_dump(settings.masked_dict(), sort_keys=False, default_flow_style=False), nl=False)
