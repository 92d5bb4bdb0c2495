"""``diki train``, ``diki tasks``, ``diki promote`` and ``diki rollback``: learn datasets, manage versions."""

from __future__ import annotations

from typing import Annotated

import typer

from pipelines.cli.config import ConfigOption, load_settings

__all__ = ["promote", "register", "rollback", "tasks", "train"]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def train(
    dataset_uri: Annotated[str, typer.Argument(help="Dataset folder: local path or s3://bucket/prefix.")],
    workers: Annotated[int | None, typer.Option("--workers", "-w", min=1, help="Ray Train workers.")] = None,
    gpu: Annotated[bool, typer.Option("--gpu", help="Train on GPUs (one per worker).")] = False,
    epochs: Annotated[int | None, typer.Option("--epochs", "-e", min=1, help="Epochs (default: settings).")] = None,
    heldout: Annotated[
        list[str] | None,
        typer.Option(
            "--heldout", help="Held-out dataset for the zero-shot check (repeat; default: <storage>/heldout/*)."
        ),
    ] = None,
    base: Annotated[
        int | None, typer.Option("--base", min=1, help="Version to extend (default: production, else latest).")
    ] = None,
    wait: Annotated[
        float,
        typer.Option("--wait", min=0, help="Seconds to wait while another process (e.g. the watcher) is learning."),
    ] = 3600.0,
    config: ConfigOption = None,
) -> None:
    """Learn DATASET_URI as a new task: the watcher's learning step (train, evaluate, register, promote, reload)."""
    from rich.console import Console
    from rich.table import Table

    from pipelines.learning import CURRENT, LearningBusyError, TaskNotLearnedError, learn_dataset
    from services.registry import RegistryError
    from services.training import TrainingError, TrainingInputError

    settings = load_settings(config)
    console = Console()
    try:
        outcome = learn_dataset(
            settings,
            dataset_uri,
            workers=workers,
            use_gpu=True if gpu else None,
            epochs=epochs,
            heldout=heldout or None,
            base_version=base if base is not None else CURRENT,
            lock_wait_s=wait,
        )
    except TrainingInputError as exc:
        raise _fail(str(exc), 2) from None
    except LearningBusyError as exc:
        raise _fail(f"{exc} (waited {wait:.0f} s)", 3) from None
    except TaskNotLearnedError as exc:
        raise _fail(str(exc), 4) from None
    except (TrainingError, RegistryError) as exc:
        raise _fail(str(exc)) from None
    if outcome.reused:
        console.print(
            f"Dataset already learned: version [bold]{outcome.version}[/bold] holds it "
            f"({'production' if outcome.promoted else 'not production'}). Nothing was trained."
        )
        return
    job, matrix, decision = outcome.job, outcome.matrix, outcome.decision
    assert job is not None and matrix is not None and decision is not None
    console.print(
        f"Learned task [bold]{job.task_name}[/bold] (index {job.task_index}) -> version [bold]{outcome.version}[/bold]"
        f" with tasks {job.tasks}" + (f" (extends version {outcome.base_version})" if outcome.base_version else "")
    )
    last = job.history[-1] if job.history else {}
    console.print(
        f"  training: {len(job.history)} epochs on {job.workers} worker(s), {job.num_train_images} images, "
        f"{job.train_seconds:.1f} s ({job.images_per_second:.1f} img/s), job {job.job_seconds:.1f} s, "
        f"final loss {last.get('train_loss', float('nan')):.3f}, best epoch {job.best_epoch}"
    )
    table = Table(title="Accuracy (%) after each step")
    table.add_column("model")
    for col in matrix.columns:
        table.add_column(col.name + (" (held-out)" if col.kind == "heldout" else ""), justify="right")
    for name, row in zip(matrix.rows, matrix.acc, strict=True):
        table.add_row(name if name == "zero-shot" else f"after {name}", *[f"{v:.1f}" for v in row])
    console.print(table)
    metrics = ", ".join(f"{k} {v:.1f}" for k, v in outcome.metrics.items() if v is not None)
    if metrics:
        console.print(f"  {metrics}")
    verdict = "[green]passed[/green]: now production" if outcome.promoted else "[yellow]refused[/yellow]: candidate"
    console.print(f"Promotion {verdict}")
    for reason in decision.reasons:
        console.print(f"  - {reason}")


def tasks(config: ConfigOption = None) -> None:
    """List registered versions with their tasks and aliases."""
    from rich.console import Console
    from rich.table import Table

    from services.registry import Registry

    settings = load_settings(config)
    versions = Registry(settings).list_versions()
    console = Console()
    if not versions:
        console.print(f"No version of {settings.mlflow.registry_model_name!r} is registered yet.")
        return
    table = Table(title=f"Registered model {settings.mlflow.registry_model_name!r}")
    for name in ("version", "aliases", "tasks", "new task dataset", "promotion", "created"):
        table.add_column(name)
    for v in versions:
        table.add_row(
            str(v.version),
            ", ".join(v.aliases),
            " > ".join(v.tasks),
            v.tags.get("dataset_fingerprint", "")[:12],
            v.tags.get("promotion", v.tags.get("gate", "")),
            v.created.strftime("%Y-%m-%d %H:%M:%S"),
        )
    console.print(table)


def promote(
    version: Annotated[int, typer.Argument(min=1, help="The version to serve.")],
    config: ConfigOption = None,
) -> None:
    """Point the production alias at VERSION (an operator's override: the promotion policy is not applied)."""
    from services.registry import Registry, RegistryError

    registry = Registry(load_settings(config))
    before = registry.get_alias("production")
    try:
        registry.promote(version)
    except RegistryError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"production: {before if before is not None else '-'} -> {version}")


def rollback(config: ConfigOption = None) -> None:
    """Move the production alias back to the previous production version."""
    from services.registry import Registry, RegistryError

    registry = Registry(load_settings(config))
    before = registry.get_alias("production")
    try:
        after = registry.rollback()
    except RegistryError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"production: {before} -> {after}")


def register(app: typer.Typer) -> None:
    """Add the commands of this module to the ``diki`` app."""
    app.command("train")(train)
    app.command("tasks")(tasks)
    app.command("promote")(promote)
    app.command("rollback")(rollback)
