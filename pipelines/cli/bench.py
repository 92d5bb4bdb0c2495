"""`diki bench`: the continual-learning benchmark, offline stream or the paper's MTIL protocol."""

from __future__ import annotations

import time
from pathlib import Path

import typer

bench_app = typer.Typer(help="Continual-learning benchmarks with the paper's metrics.", no_args_is_help=True)


def _print_results(results, out: Path, paths: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from diki_model.bench.report import summary_rows

    console = Console()
    table = Table(title="Transfer / Average / Last over the stream; change vs zero-shot after the last step")
    for col in ("method", "Transfer", "Average", "Last", "held-out", "pre-training", "routing %", "train s"):
        table.add_column(col, justify="left" if col == "method" else "right")

    def f(v, sign=False):
        return "-" if v is None else (f"{v:+.1f}" if sign else f"{v:.1f}")

    for r in summary_rows(results):
        table.add_row(
            r["method"], f(r["transfer"]), f(r["average"]), f(r["last"]), f(r["heldout_change"], True),
            f(r["pretrain_change"], True), f(r["routing_last"]), f(r["train_seconds"]),
        )  # fmt: skip
    console.print(table)
    console.print(f"results: {paths['json']}")
    console.print(f"table:   {paths['summary']}")
    console.print("heatmaps: " + ", ".join(str(p) for k, p in paths.items() if k.startswith("heatmap-")))


@bench_app.command("stream")
def stream(
    order: str = typer.Option("order-1", help="Stream order: order-1, order-2, or a comma-separated domain list."),
    data: Path = typer.Option(Path(".diki/data"), help="Folder of built domains (missing ones are built)."),
    out: Path = typer.Option(Path(".diki/bench/stream"), help="Where results, heatmaps and the table go."),
    methods: str = typer.Option(
        ",".join(("zero-shot", "diki", "diki-paper", "iki", "true-task", "prefix", "finetune"))
    ),
    backbone: str = typer.Option("diki-small", help="open_clip model name, project config, or local-dir:PATH."),
    pretrained: str | None = typer.Option(None, help="open_clip pretrained tag or weights path."),
    epochs: int = typer.Option(10, min=1, help="Epochs per task (the authors' 10)."),
    batch_size: int = typer.Option(64, min=1, help="Training batch size."),
    lr: float | None = typer.Option(
        None,
        min=1e-9,
        help="SGD learning rate of the residual K/V (default: the backbone's measured rate, else 5 as the authors).",
    ),
    train_limit: int | None = typer.Option(600, help="At most this many training images per task."),
    test_limit: int | None = typer.Option(200, help="At most this many test images per evaluation set."),
    extra_roles: str = typer.Option("heldout,pretrain", help="Roles of the extra evaluation sets (comma-separated)."),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu", help="cpu or cuda"),
) -> None:
    """Run a task stream, evaluate every set after every step, and report the paper's metrics."""
    from diki_model import TrainConfig, adapter_lr
    from diki_model.bench.offline import offline_stream
    from diki_model.bench.report import write_report
    from diki_model.bench.stream import StreamBenchmark

    order_arg: str | list[str] = order if order.startswith("order-") else [s.strip() for s in order.split(",")]
    t0 = time.perf_counter()
    roles = [r.strip() for r in extra_roles.split(",") if r.strip()]
    stream_tasks, extras = offline_stream(data, order_arg, extra_roles=roles, seed=seed)
    lr = lr if lr is not None else adapter_lr(backbone, pretrained)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    bench = StreamBenchmark(
        backbone, pretrained, stream_tasks, extras, method_list, cfg, device=device,
        train_limit=train_limit, test_limit=test_limit, seed=seed, log=typer.echo,
    )  # fmt: skip
    results = bench.run()
    meta = {
        "command": "diki bench stream " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in dict(
                order=order, methods=methods, backbone=backbone, epochs=epochs, batch_size=batch_size, lr=lr,
                train_limit=train_limit, test_limit=test_limit, seed=seed).items()
        ),
        "stream": [t.name for t in stream_tasks],
        "extra": [t.name for t in extras],
        "train_config": cfg.to_dict(),
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    paths = write_report(results, out, meta)
    _print_results(results, out, paths)
    typer.echo(f"finished in {meta['seconds']:.0f}s")


@bench_app.command("mtil")
def mtil(
    data_root: Path = typer.Option(..., help="Folder holding the 11 MTIL datasets (see docs/mtil.md)."),
    order: str = typer.Option("I", help="MTIL order: I (alphabetical) or II."),
    shots: int | None = typer.Option(None, help="Few-shot: images per class (16 as DIKI, 5 as MoE-Adapters)."),
    out: Path = typer.Option(Path(".diki/bench/mtil"), help="Where results, heatmaps and the table go."),
    methods: str = typer.Option("zero-shot,diki,diki-paper,true-task"),
    backbone: str = typer.Option("ViT-B-16"),
    pretrained: str | None = typer.Option("openai", help="open_clip pretrained tag or weights path."),
    epochs: int = typer.Option(10, min=1),
    batch_size: int = typer.Option(128, min=1),
    lr: float | None = typer.Option(
        None, min=1e-9, help="SGD learning rate (default: the backbone's measured rate, else 5)."
    ),
    workers: int = typer.Option(4, help="DataLoader workers."),
    seed: int = typer.Option(0),
    device: str = typer.Option("cuda", help="cpu or cuda"),
) -> None:
    """The paper's MTIL protocol (11 datasets, orders I/II, full- or few-shot) on real data."""
    from diki_model import TrainConfig, adapter_lr
    from diki_model.bench.mtil import mtil_tasks
    from diki_model.bench.report import write_report
    from diki_model.bench.stream import StreamBenchmark

    t0 = time.perf_counter()
    tasks = mtil_tasks(data_root, order=order, shots=shots, seed=seed)
    lr = lr if lr is not None else adapter_lr(backbone, pretrained)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    bench = StreamBenchmark(
        backbone, pretrained, tasks, [], method_list, cfg, device=device, seed=seed, workers=workers, log=typer.echo
    )
    results = bench.run()
    meta = {
        "protocol": "MTIL",
        "order": order,
        "shots": shots,
        "backbone": backbone,
        "pretrained": pretrained,
        "train_config": cfg.to_dict(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    paths = write_report(results, out, meta)
    _print_results(results, out, paths)
