"""``diki push``, ``diki watch`` and ``diki datasets``: drop datasets, learn them as they arrive, see their state."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from pipelines.cli.config import ConfigOption, load_settings

__all__ = ["datasets", "push", "register", "watch"]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


def push(
    path: Annotated[
        Path,
        typer.Argument(
            help="A dataset folder (manifest.json + train/ test/ Parquet) or an ImageFolder tree "
            "(train/<class>/*.png, test/<class>/...; a manifest.json beside them gives the name, classes and template).",
            exists=True,
            file_okay=False,
            dir_okay=True,
        ),
    ],
    name: Annotated[str, typer.Option("--name", "-n", help="Dataset name: the folder under incoming/.")],
    template: Annotated[
        str | None,
        typer.Option(
            "--template",
            help="Prompt template for an ImageFolder tree without manifest.json (one '{}'; default 'a photo of a {}.').",
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Upload a dataset to incoming/NAME/: every file first, the _SUCCESS marker last. The watcher learns it.

    An ImageFolder tree is checked whole first (every problem named, with its file) and converted here.
    """
    from diki_model.data import DatasetError, read_manifest
    from pipelines.flows import mlflow_ui
    from pipelines.imagefolder import check_image_folder, is_image_folder, write_image_folder
    from pipelines.learning import serve_url
    from pipelines.prefect_runtime import prefect_ui_url
    from services.storage import StorageError, open_storage, validate_dataset_name
    from services.training.inputs import MAX_IMAGE_BYTES, MIN_IMAGES_PER_CLASS, MIN_TRAIN_IMAGES

    try:
        validate_dataset_name(name)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    settings = load_settings(config)
    storage = open_storage(settings)
    dst = f"{settings.storage.incoming_prefix}/{name}"
    with tempfile.TemporaryDirectory(prefix="diki-push-") as tmp:
        if is_image_folder(path):
            # Class folders under train/ (with or without a manifest.json beside them): checked whole, converted.
            check = check_image_folder(
                path,
                name,
                template,
                min_images_per_class=MIN_IMAGES_PER_CLASS,
                min_train_images=MIN_TRAIN_IMAGES,
                max_image_bytes=MAX_IMAGE_BYTES,
                workers=settings.train.workers,
            )
            if not check.ok:
                typer.secho(f"error: {path} cannot be pushed: {len(check.problems)} problem(s)", fg="red", err=True)
                for problem in check.problems:
                    typer.echo(f"  {problem}", err=True)
                typer.echo("Nothing was uploaded. Fix them and push again.", err=True)
                raise typer.Exit(2)
            for note in check.notes:
                typer.echo(f"note: {note}")
            src = Path(tmp) / name
            manifest = write_image_folder(check, src)
            kind = (
                "ImageFolder tree with manifest.json, converted"
                if check.from_manifest
                else "ImageFolder tree, converted"
            )
        elif (path / "manifest.json").is_file():
            src, kind = path, "dataset"
            try:
                manifest = read_manifest(path)
            except DatasetError as exc:
                raise _fail(f"{path}: {exc}", 2) from None
            if manifest.name != name:
                typer.echo(f"note: the task will be named {manifest.name!r} (manifest.json), the drop {name!r}")
            if template is not None:
                typer.echo("note: --template applies to ImageFolder trees; this dataset's template is in manifest.json")
        elif (path / "train").is_dir():
            raise _fail(f"{path}/train holds neither Parquet shards nor class folders (train/<class>/*.png)", 2)
        else:
            raise _fail(f"{path} holds neither manifest.json (a dataset) nor train/<class>/ (an ImageFolder tree)", 2)
        try:
            if storage.exists(dst):  # replace an earlier upload entirely (its marker goes first)
                storage.delete_tree(dst)
            files = storage.copy_tree(src, dst, marker=settings.storage.success_marker)
        except (StorageError, OSError) as exc:
            raise _fail(f"upload to {storage.uri(dst)} failed: {exc}") from None
        size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    typer.echo(
        f"Uploaded {name!r} ({kind}: {len(manifest.classes)} classes, {files} files, {_size(size)}) to "
        f"{storage.uri(dst)}/; {settings.storage.success_marker} written last."
    )
    prefect = prefect_ui_url(settings)
    typer.echo("Watch it:")
    typer.echo("  diki datasets                  its state (waiting -> learning -> served)")
    if prefect:
        typer.echo(f"  Prefect UI   {prefect}   the watcher deployment and each learning run")
    else:
        typer.echo("  diki watch                     learns it (embedded mode: no Prefect server configured)")
    typer.echo(f"  MLflow       {mlflow_ui(settings)}")
    typer.echo(f"  endpoint     {serve_url(settings)}/v1/classify")


def watch(
    once: Annotated[bool, typer.Option("--once", help="Process what is there, then exit.")] = False,
    config: ConfigOption = None,
) -> None:
    """Learn each new complete dataset in incoming/, polling every pipeline.poll_interval_s. Ctrl-C stops."""
    from pipelines.prefect_runtime import configure_prefect

    settings = load_settings(config)
    mode = configure_prefect(settings)  # before anything imports Prefect
    from pipelines.watcher import run_watcher
    from services.storage import open_storage

    every = "once" if once else f"every {settings.pipeline.poll_interval_s:g} s; Ctrl-C stops"
    typer.echo(
        f"Watching {open_storage(settings).uri(settings.storage.incoming_prefix)}/ ({every}) with {mode.describe()}"
    )
    try:
        problems = run_watcher(settings, config=str(config) if config else None, once=once, echo=typer.echo)
    except KeyboardInterrupt:
        typer.echo("Stopped. A dataset interrupted mid-way is finished by the next `diki watch`.")
        raise typer.Exit(130) from None
    if once and problems:
        raise typer.Exit(1)


_STYLES = {
    "served": "green",
    "registered": "cyan",
    "candidate": "yellow",
    "learning": "bold blue",
    "interrupted": "magenta",
    "waiting": "blue",
    "incomplete": "dim",
    "duplicate": "dim",
    "quarantined": "red",
    "failed": "red",
    "ignored": "dim",
}


def datasets(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    config: ConfigOption = None,
) -> None:
    """Every dataset with its state: waiting, incomplete, learning, served, candidate, quarantined..."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from pipelines.state import overview
    from services.storage import StorageError, open_storage

    settings = load_settings(config)
    storage = open_storage(settings)
    try:
        rows = overview(settings, storage)
    except (StorageError, OSError) as exc:
        raise _fail(f"cannot read {storage.uri()}: {exc}") from None
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    console = Console(width=max(Console().width, 160))
    if not rows:
        console.print(f"No dataset yet. Drop one with `diki push PATH --name NAME` ({storage.uri()}).")
        return
    table = Table(title=f"Datasets in {storage.uri()}")
    for column in ("dataset", "state", "detail", "fingerprint", "updated"):
        table.add_column(column, overflow="fold")
    for row in rows:
        style = _STYLES.get(row.state, "")
        table.add_row(
            escape(row.name),
            f"[{style}]{row.state}[/{style}]" if style else row.state,
            escape(row.detail),
            (row.fingerprint or "")[:12],
            (row.updated or "")[:19].replace("T", " "),
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add the commands of this module to the ``diki`` app."""
    app.command("push")(push)
    app.command("watch")(watch)
    app.command("datasets")(datasets)
