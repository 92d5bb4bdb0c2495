"""``diki stack``: run the real services on loopback (S3, MLflow, Prefect, a Ray head, Serve, the watcher)."""

from __future__ import annotations

import os

import typer
from rich.console import Console
from rich.table import Table

from pipelines.cli.config import ConfigOption, load_settings
from services.settings import CONFIG_ENV
from services.stack import STACK_SERVICES, ServiceStatus, Stack, StackError

stack_app = typer.Typer(
    help=(
        "Start, stop and inspect the local stack on 127.0.0.1: S3, MLflow, Prefect, a Ray head, the Serve "
        "application and the served watcher (data stays in the stack home)."
    ),
    no_args_is_help=True,
)

_console = Console(highlight=False)
_errors = Console(stderr=True, highlight=False)


def _stack(config: ConfigOption) -> Stack:
    settings = load_settings(config)
    if config is not None:
        # The stack's own services (Serve, the watcher) read the same file.
        os.environ[CONFIG_ENV] = str(config.expanduser().resolve())
    return Stack(settings, extra_services=STACK_SERVICES)


def _fail(exc: Exception) -> typer.Exit:
    _errors.print(f"[red]error:[/red] {exc}", markup=True, soft_wrap=True)
    return typer.Exit(1)


def _table(rows: list[ServiceStatus]) -> Table:
    table = Table(title="diki stack")
    for column in ("service", "state", "health", "pid", "port"):
        table.add_column(column)
    table.add_column("url", overflow="fold")
    for row in rows:
        state = "[green]running[/green]" if row.running else "[dim]stopped[/dim]"
        health = "[green]healthy[/green]" if row.healthy else ("[red]unhealthy[/red]" if row.running else "-")
        table.add_row(
            row.name,
            state,
            health,
            str(row.pid) if row.pid else "-",
            str(row.port) if row.port else "-",
            row.url or "-",
        )
    return table


def _show(stack: Stack, rows: list[ServiceStatus]) -> None:
    _console.print(_table(rows))
    _console.print(f"logs: {stack.logs_dir}")


@stack_app.command()
def up(config: ConfigOption = None) -> None:
    """Start every service that is not running and wait until all are healthy."""
    stack = _stack(config)
    try:
        result = stack.up(progress=lambda msg: _console.print(f"  {msg}"))
    except StackError as exc:
        raise _fail(exc) from None
    if result.was_already_up:
        _console.print(f"The stack in {stack.home} is already up; nothing started.")
    _show(stack, stack.status())
    _console.print(
        f"Point the CLI at it with: [bold]set -a; . {result.env_file}; set +a[/bold] (the file holds credentials)"
    )
    from services.serving.keys import admin_key_path

    _console.print(f"The Serve admin key (X-Admin-Key, for /v1/admin/reload) is in {admin_key_path(stack.settings)}")


@stack_app.command()
def down(config: ConfigOption = None) -> None:
    """Stop the services `up` started (by their pid files); data stays in place."""
    stack = _stack(config)
    try:
        stopped = stack.down(progress=lambda msg: _console.print(f"  {msg}"))
    except StackError as exc:
        raise _fail(exc) from None
    if stopped:
        _console.print(f"Stopped {', '.join(stopped)}; data kept in {stack.data_dir}.")
    else:
        _console.print(f"Nothing was running in {stack.home}.")


@stack_app.command()
def status(config: ConfigOption = None) -> None:
    """Show each service with its port, URL and health."""
    stack = _stack(config)
    try:
        rows = stack.status()
    except StackError as exc:
        raise _fail(exc) from None
    _show(stack, rows)
