"""``diki data``: build the offline domains, list them, check a dataset, pre-train the small backbone."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

DEFAULT_DATA_DIR = Path(".diki/data")
DEFAULT_CHECKPOINT_DIR = Path(".diki/checkpoints")

data_app = typer.Typer(
    help="Datasets: build the offline domains, list them, check a dataset, pre-train the small backbone.",
    no_args_is_help=True,
)
console = Console()


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


@data_app.command("list")
def list_domains() -> None:
    """Show every offline domain with its role (pretrain, stream, heldout) and size."""
    from diki_model.datasets import DEFAULT_STREAM, DOMAINS, STREAM_ORDERS

    table = Table(title="Offline domains")
    for column in ("domain", "role", "classes", "train", "test", "what"):
        table.add_column(column, overflow="fold")
    for spec in DOMAINS.values():
        table.add_row(spec.name, spec.role, str(spec.num_classes), str(spec.train_size), str(spec.test_size),
                      spec.description)  # fmt: skip
    console.print(table)
    for name, order in STREAM_ORDERS.items():
        default = " (default)" if order == DEFAULT_STREAM else ""
        console.print(f"stream {name}{default}: {' -> '.join(order)}")


@data_app.command()
def build(
    domains: list[str] = typer.Argument(None, help="Domains to build (default: all); see `diki data list`."),
    out: Path = typer.Option(DEFAULT_DATA_DIR, "--out", help="Folder that receives one dataset folder per domain."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random choice: the same seed gives the same data."),
) -> None:
    """Build offline domains in the dataset format."""
    from diki_model.datasets import DOMAINS, MissingSourceError, build_domain

    names = domains or list(DOMAINS)
    unknown = [n for n in names if n not in DOMAINS]
    if unknown:
        _fail(f"unknown domain(s) {', '.join(unknown)}; known: {', '.join(DOMAINS)}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("building", total=len(names))
        for name in names:
            progress.update(task, description=f"building {name}")
            try:
                build_domain(name, out, seed)
            except MissingSourceError as err:
                progress.stop()
                _fail(f"{name}: {err}")
            progress.advance(task)
        progress.update(task, description="built")
    console.print(f"{len(names)} domain(s) written under {out}")


@data_app.command()
def validate(
    path: str = typer.Argument(..., help="A dataset folder (local path or s3://bucket/prefix)."),
    min_images_per_class: int = typer.Option(1, help="Fewest training images a class may have."),
    no_images: bool = typer.Option(False, "--no-images", help="Skip decoding the images (faster)."),
) -> None:
    """Check a dataset and print every problem found, as Markdown. Exits 1 when it is not valid."""
    from diki_model.data import validate_dataset

    report = validate_dataset(path, min_images_per_class=min_images_per_class, check_images=not no_images)
    typer.echo(report.to_markdown())
    if not report.ok:
        raise typer.Exit(1)


@data_app.command()
def pretrain(
    out: Path = typer.Option(None, "--out", help="Checkpoint folder (default: .diki/checkpoints/<model>)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialisation, batches and captions."),
    data: Path = typer.Option(DEFAULT_DATA_DIR, "--data", help="Where the domains are (built there when missing)."),
    model: str = typer.Option("diki-small", "--model", help="A config of diki_model/model_configs."),
    steps: int = typer.Option(None, "--steps", help="Optimisation steps (default: the recipe's)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Images per step (default: the recipe's)."),
    threads: int = typer.Option(2, "--threads", help="CPU threads for torch."),
    device: str = typer.Option("cpu", "--device", help="Where to train: cpu, or cuda when a GPU is there."),
    full_precision: bool = typer.Option(False, "--fp32", help="Store float32 weights (default: float16)."),
) -> None:
    """Pre-train a small CLIP from scratch on the pre-training domains and write a `local-dir:` checkpoint."""
    from diki_model.datasets import MissingSourceError
    from diki_model.pretrain import PretrainConfig
    from diki_model.pretrain import pretrain as run_pretrain

    out = out or DEFAULT_CHECKPOINT_DIR / model
    overrides = {k: v for k, v in {"steps": steps, "batch_size": batch_size}.items() if v is not None}
    try:
        cfg = PretrainConfig(model=model, seed=seed, threads=threads, **overrides)
    except (KeyError, ValueError) as err:
        _fail(str(err))
    command = f"diki data pretrain --out {out} --seed {seed}"
    if data != DEFAULT_DATA_DIR:
        command += f" --data {data}"
    if model != "diki-small":
        command += f" --model {model}"
    command += "".join(f" --{k.replace('_', '-')} {v}" for k, v in overrides.items())
    if threads != 2:
        command += f" --threads {threads}"
    if device != "cpu":
        command += f" --device {device}"
    if full_precision:
        command += " --fp32"
    try:
        recipe = run_pretrain(cfg, data, out, command=command, half=not full_precision, device=device)
    except MissingSourceError as err:
        _fail(str(err))
    table = Table(title=f"Zero-shot accuracy of {out}")
    for column in ("domain", "role", "classes", "accuracy", "chance"):
        table.add_column(column)
    for name, row in recipe["zero_shot"].items():
        table.add_row(name, row["role"], str(row["classes"]), f"{100 * row['accuracy']:.1f}%",
                      f"{100 * row['chance']:.1f}%")  # fmt: skip
    console.print(table)
    console.print(f"trained in {recipe['train_seconds']:.0f} s ({recipe['wall_seconds']:.0f} s in all); "
                  f"checkpoint: local-dir:{Path(out).absolute()}")  # fmt: skip


@data_app.command()
def reference(
    out: Path = typer.Option(..., "--out", help="Folder to write (reference.safetensors + reference.json)."),
    backbone: str = typer.Option("diki-small", "--backbone", help="The backbone whose frozen features are fitted."),
    pretrained: str = typer.Option(None, "--pretrained", help="Its weights (default: the shipped checkpoint)."),
    domains: str = typer.Option(
        "mnist,fashion-mnist,shapes", "--domains", help="Comma-separated offline domains, one component each."
    ),
    data: Path = typer.Option(DEFAULT_DATA_DIR, "--data", help="Where the domains are (built there when missing)."),
    per_domain: int = typer.Option(600, "--per-domain", help="Training images taken from each domain."),
    seed: int = typer.Option(0, "--seed", help="Seed of the domain builds."),
) -> None:
    """Fit a reference density (the images the likelihood-ratio gate protects) on offline domains' train splits.

    Only training images are used, so the reference shares no image with any evaluation set.
    """
    from diki_model import create_diki_model, fit_reference_from_datasets, save_reference
    from diki_model.datasets import DOMAINS, build_domain

    names = [d.strip() for d in domains.split(",") if d.strip()]
    unknown = [n for n in names if n not in DOMAINS]
    if unknown:
        _fail(f"unknown domain(s) {', '.join(unknown)}; known: {', '.join(DOMAINS)}")
    for name in names:
        if not (data / name / "manifest.json").exists():
            build_domain(name, data, seed)
    model = create_diki_model(backbone, pretrained, reference=None)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("frozen features", total=per_domain * len(names))
        ref = fit_reference_from_datasets(
            model,
            [(n, data / n) for n in names],
            limit=per_domain,
            progress=lambda n: progress.advance(bar, n),
        )
    ref.source["command"] = (
        f"diki data reference --out {out} --backbone {backbone} --domains {','.join(names)} --per-domain {per_domain}"
    )
    ref.source["datasets"] = {n: f"offline domain {n}, train split" for n in names}
    save_reference(ref, out)
    for name, acc in sorted(ref.components.items()):
        console.print(f"  {name}: {acc.count} images")
    console.print(f"reference density of {ref.count} images written to {out}")
