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


DEFAULT_STREAM_METHODS = ("zero-shot", "diki", "diki-standardized", "diki-paper", "iki", "true-task")


@bench_app.command("stream")
def stream(
    order: str = typer.Option(
        "order-1,order-2", help="Stream orders (order-1, order-2, comma-separated), or one comma-separated domain list."
    ),
    seeds: str = typer.Option("0,1,2", help="Seeds to run (comma-separated); tables give mean ± std over runs."),
    data: Path = typer.Option(Path(".diki/data"), help="Folder of built domains (missing ones are built)."),
    out: Path = typer.Option(Path(".diki/bench/stream"), help="Where results, heatmaps and the table go."),
    methods: str = typer.Option(",".join(DEFAULT_STREAM_METHODS), help="Methods (also: prefix, finetune)."),
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
    doc: Path | None = typer.Option(None, help="Also write the tables into this Markdown page (between markers)."),
    device: str = typer.Option("cpu", help="cpu or cuda"),
) -> None:
    """Run task streams (each order, each seed), evaluate every set after every step, report the paper's metrics.

    Hyperparameters are fixed before the run or chosen on validation splits (the learning rate by
    `benchmarks/bench_adapter_lr.py`, the learning check on each task's validation split); test
    images are only ever scored.
    """
    import json

    from diki_model import TrainConfig, adapter_lr
    from diki_model.bench.offline import offline_stream
    from diki_model.bench.report import aggregate_markdown, aggregate_runs, write_doc_section, write_report
    from diki_model.bench.stream import StreamBenchmark

    tokens = [s.strip() for s in order.split(",") if s.strip()]
    orders: list[str | list[str]] = tokens if all(t.startswith("order-") for t in tokens) else [tokens]  # type: ignore[list-item]
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError as err:
        raise typer.BadParameter(
            f"seeds must be comma-separated integers, got {seeds!r}", param_hint="--seeds"
        ) from err
    if not seed_list:
        raise typer.BadParameter("give at least one seed", param_hint="--seeds")
    t_all = time.perf_counter()
    roles = [r.strip() for r in extra_roles.split(",") if r.strip()]
    lr = lr if lr is not None else adapter_lr(backbone, pretrained)
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    single = len(orders) * len(seed_list) == 1
    runs = {}
    for order_arg in orders:
        order_name = order_arg if isinstance(order_arg, str) else "custom"
        for seed in seed_list:
            t0 = time.perf_counter()
            typer.echo(f"== {order_name}, seed {seed} ==")
            stream_tasks, extras = offline_stream(data, order_arg, extra_roles=roles, seed=0)
            cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
            bench = StreamBenchmark(
                backbone, pretrained, stream_tasks, extras, method_list, cfg, device=device,
                train_limit=train_limit, test_limit=test_limit, seed=seed, log=typer.echo,
            )  # fmt: skip
            results = bench.run()
            meta = {
                "command": "diki bench stream " + " ".join(
                    f"--{k.replace('_', '-')} {v}" for k, v in dict(
                        order=order_name if isinstance(order_arg, str) else ",".join(order_arg), seeds=seed,
                        methods=",".join(method_list), backbone=backbone, epochs=epochs, batch_size=batch_size,
                        lr=lr, train_limit=train_limit, test_limit=test_limit).items()
                ),
                "stream": [t.name for t in stream_tasks],
                "extra": [t.name for t in extras],
                "train_config": cfg.to_dict(),
                "seconds": round(time.perf_counter() - t0, 1),
            }  # fmt: skip
            run_out = out if single else out / order_name / f"seed-{seed}"
            paths = write_report(results, run_out, meta)
            _print_results(results, run_out, paths)
            runs[f"{order_name}/seed-{seed}"] = results
    seconds = time.perf_counter() - t_all
    if not single:
        agg = aggregate_runs(runs)
        command = (
            f"diki bench stream --order {order} --seeds {seeds} --methods {','.join(method_list)} "
            f"--backbone {backbone} --epochs {epochs} --batch-size {batch_size} --lr {lr} "
            f"--train-limit {train_limit} --test-limit {test_limit}"
        )
        table = aggregate_markdown(agg)
        body = f"```\n{command}\n```\n\n{table}\n\n({len(runs)} runs in {seconds:.0f} s.)"
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.md").write_text(body + "\n")
        (out / "aggregate.json").write_text(json.dumps({"command": command, "seconds": round(seconds, 1), **agg},
                                                       indent=2))  # fmt: skip
        typer.echo(table)
        if doc is not None:
            write_doc_section(doc, "bench-stream", body)
            typer.echo(f"tables written into {doc}")
    typer.echo(f"finished in {seconds:.0f}s")


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
