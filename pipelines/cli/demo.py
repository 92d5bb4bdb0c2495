"""`diki demo`: the whole pipeline end to end on embedded defaults."""

from __future__ import annotations

from pathlib import Path

import typer

from pipelines.demo import DEMO_TASKS


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)


def demo_command(
    home: Path = typer.Option(Path(".diki/demo"), help="Where the demo keeps its storage, MLflow and results."),
    data: Path = typer.Option(Path(".diki/data"), help="Built offline domains (missing ones are built)."),
    tasks: str = typer.Option(",".join(DEMO_TASKS), help="Demo tasks, dropped in this order."),
    epochs: int = typer.Option(3, help="Epochs per task."),
    port: int = typer.Option(8000, help="Port of the Serve endpoint on 127.0.0.1."),
    backbone: str = typer.Option("diki-small", help="Frozen backbone (the shipped small pre-trained one)."),
    resume: bool = typer.Option(False, help="Keep the state of an earlier demo run instead of starting clean."),
) -> None:
    """Drop the demo datasets one by one and watch them get learned, registered and served."""
    from pipelines.demo import run_demo

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    try:
        run_demo(home, data, names, epochs=epochs, port=port, backbone=backbone, fresh=not resume, echo=typer.echo)
    except KeyboardInterrupt:
        typer.echo("stopped: everything the demo started has been shut down")
        raise typer.Exit(130) from None
    except TimeoutError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
