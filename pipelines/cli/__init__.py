"""The ``diki`` command line. Each group of commands lives in its own module of this package."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="diki",
    help="Continual learning for CLIP classifiers: learn each new labelled dataset without forgetting.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root() -> None:
    """Continual learning for CLIP classifiers: learn each new labelled dataset without forgetting."""


@app.command()
def version() -> None:
    """Print the version of the diki package."""
    from importlib.metadata import version as _version

    typer.echo(_version("diki"))


def main() -> None:
    app()
