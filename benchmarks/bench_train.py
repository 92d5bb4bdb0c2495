"""Training benchmark: Ray Train (1 worker) against the plain single-process loop on the same data.

    python benchmarks/bench_train.py                       # diki-small, 1024 images, 4 epochs, CPU
    python benchmarks/bench_train.py --images 256 --epochs 3 --backbone diki-test-tiny

Both paths learn the same task from the same Parquet dataset with the same TrainConfig (the
validation split and its per-epoch evaluation included): the plain loop decodes the split into
tensors and calls ``diki_model.train_task``; the Ray path is ``services.training.run_training_job``
(workers cache their preprocessed part in memory; ``--streaming`` also times re-reading the
Parquet shards every epoch). Throughput is training images per second over the warm epochs (from
the end of the first epoch to the end of the last, per-epoch checkpoints of the Ray path included),
by wall time and by CPU time of the training process. Each side runs twice and the better run
counts, since other processes may share the machine; the CPU-time rate hardly moves with load. The fixed cost of a job is the time from submitting it to its first
training step, split into Ray start-up (worker running), loading + statistics, and the rest.
Target: 1 Ray worker within 80% of the plain loop once warm.

Writes benchmarks/results/train.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diki_model import (  # noqa: E402
    EpochResult,
    TrainConfig,
    TrainState,
    apply_statistics,
    collect_statistics,
    create_diki_model,
    num_batches,
    split_train_val,
    tensor_batches,
    train_task,
)
from diki_model.data import Manifest, encode_png, load_split_tensors, write_dataset  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CLASSES = ["north west", "north east", "south west", "south east"]


def records(n: int, seed: int) -> Iterator[tuple[bytes, int]]:
    rng = np.random.default_rng(seed)
    for _ in range(n):
        label = int(rng.integers(len(CLASSES)))
        img = rng.normal(90, 25, (32, 32, 3))
        r, c = divmod(label, 2)
        img[r * 16 : r * 16 + 16, c * 16 : c * 16 + 16] += 100
        yield encode_png(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))), label


def warm_rates(marks: list[dict[str, float]], images_per_epoch: int) -> dict[str, float]:
    """Images per wall second and per CPU second of the process, after the first epoch.

    ``marks`` are cumulative seconds at the end of each epoch.
    """
    first, last = marks[0], marks[-1]
    epochs = len(marks) - 1
    if epochs < 1:
        raise ValueError("need at least 2 epochs to leave the first one out")
    return {
        "wall": images_per_epoch * epochs / (last["wall"] - first["wall"]),
        "cpu": images_per_epoch * epochs / (last["cpu"] - first["cpu"]),
    }


def plain_loop(dataset: str, backbone: str, cfg: TrainConfig) -> dict:
    t0 = time.perf_counter()
    model = create_diki_model(backbone, seed=cfg.seed)
    x, y = load_split_tensors(dataset, "train", model.preprocess)
    t_loaded = time.perf_counter()
    task = model.add_task("bench", CLASSES, seed=cfg.seed)
    apply_statistics(model, task, collect_statistics(model, tensor_batches(x, y, 256, shuffle=False)(0)))
    tr, va = split_train_val(len(y), cfg.val_fraction, cfg.seed)
    val = tensor_batches(x[va], y[va], 256, shuffle=False)
    t_first = time.perf_counter()
    cpu_first = time.process_time()
    marks: list[dict[str, float]] = []

    def mark(result: EpochResult, state: TrainState) -> None:
        now = {"wall": time.perf_counter() - t_first, "cpu": time.process_time() - cpu_first}
        marks.append({"epoch": result.epoch, **now})

    result = train_task(
        model,
        task,
        tensor_batches(x[tr], y[tr], cfg.batch_size, seed=cfg.seed),
        num_batches(len(tr), cfg.batch_size),
        cfg,
        lambda: val(0),
        on_epoch_end=mark,
        progress=False,
    )
    rates = warm_rates(marks, len(tr))
    return {
        "images_per_epoch": len(tr),
        "epoch_seconds": [h.seconds for h in result.history],
        "warm_images_per_second": rates["wall"],
        "warm_images_per_cpu_second": rates["cpu"],
        "load_seconds": t_loaded - t0,
        "to_first_step_seconds": t_first - t0,
        "total_seconds": time.perf_counter() - t0,
        "final_train_loss": result.history[-1].train_loss,
        "torch_threads": torch.get_num_threads(),
    }


def ray_job(dataset: str, home: Path, backbone: str, cfg: TrainConfig, cache_mb: int) -> dict:
    from services.settings import Settings
    from services.training import run_training_job

    settings = Settings.load(
        home=str(home),
        backbone={"name": backbone},
        train={"epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed, "workers": 1},
        ray={"num_cpus": 2},
    )
    t0 = time.perf_counter()
    job = run_training_job(settings, dataset, workers=1, cache_mb=cache_mb)
    per_epoch = job.steps_per_epoch * job.batch_per_worker * job.workers
    rates = warm_rates(job.epoch_marks, per_epoch)
    return {
        "images_per_epoch": per_epoch,
        "epoch_seconds": [h["seconds"] for h in job.history],
        "warm_images_per_second": rates["wall"],
        "warm_images_per_cpu_second": rates["cpu"],
        "startup_seconds": job.startup_seconds,
        "timings": job.timings,
        "job_seconds": job.job_seconds,
        "call_seconds": time.perf_counter() - t0,
        "final_train_loss": job.history[-1]["train_loss"],
        "ray_run_id": job.ray_run_id,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="diki-small")
    parser.add_argument("--images", type=int, default=1024, help="training images (32x32 PNG)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--streaming", action="store_true", help="also time a job that re-reads Parquet every epoch")
    parser.add_argument("--out", type=Path, default=RESULTS / "train.json")
    args = parser.parse_args()

    from services.ray_runtime import ensure_ray, shutdown_ray
    from services.settings import Settings

    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch, seed=0)
    with tempfile.TemporaryDirectory(prefix="diki-bench-train-") as tmp:
        dataset = str(Path(tmp) / "bench")
        shard_rows = max(1, -(-args.images // args.shards))
        write_dataset(
            dataset,
            Manifest(name="bench", classes=CLASSES),
            records(args.images, 0),
            records(64, 1),
            shard_rows=shard_rows,
        )
        plain_runs = [plain_loop(dataset, args.backbone, cfg)]
        t0 = time.perf_counter()
        ensure_ray(Settings.load(home=tmp, ray={"num_cpus": 2}))
        ray_init = time.perf_counter() - t0
        try:
            ray_runs = [ray_job(dataset, Path(tmp) / "home", args.backbone, cfg, cache_mb=1024) for _ in range(2)]
            streaming = ray_job(dataset, Path(tmp) / "home", args.backbone, cfg, cache_mb=0) if args.streaming else None
        finally:
            shutdown_ray()
        plain_runs.append(plain_loop(dataset, args.backbone, cfg))

    def best(runs: list[dict], key: str) -> float:
        return max(r[key] for r in runs)

    wall = {"plain": best(plain_runs, "warm_images_per_second"), "ray": best(ray_runs, "warm_images_per_second")}
    cpu = {"plain": best(plain_runs, "warm_images_per_cpu_second"), "ray": best(ray_runs, "warm_images_per_cpu_second")}
    ratio, cpu_ratio = wall["ray"] / wall["plain"], cpu["ray"] / cpu["plain"]
    second = ray_runs[1]
    result = {
        "benchmark": "train",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python benchmarks/bench_train.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "load_average_1m_at_end": os.getloadavg()[0],
        "config": {
            "backbone": args.backbone,
            "images": args.images,
            "shards": args.shards,
            "epochs": args.epochs,
            "batch_size": args.batch,
            "device": "cpu",
        },
        "warm_images_per_second": wall,
        "warm_images_per_cpu_second": cpu,
        "ray_over_plain_throughput": ratio,
        "ray_over_plain_per_cpu_second": cpu_ratio,
        "target": "ray_over_plain_throughput >= 0.8",
        "target_met": ratio >= 0.8,
        "ray_init_seconds": ray_init,
        "job_fixed_cost_seconds": second["startup_seconds"],
        "plain_runs": plain_runs,
        "ray_runs": ray_runs,
        "ray_streaming": streaming,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    print(f"train benchmark ({args.backbone}, {args.images} images, batch {args.batch}, {args.epochs} epochs, CPU)")
    print(f"  plain loop          : {wall['plain']:8.1f} img/s warm, {cpu['plain']:8.1f} img/cpu-s")
    print(f"  Ray Train, 1 worker : {wall['ray']:8.1f} img/s warm, {cpu['ray']:8.1f} img/cpu-s")
    print(f"  Ray / plain         : {ratio:.0%} by wall time, {cpu_ratio:.0%} by CPU time (target 80%)")
    if streaming:
        print(f"  streaming Parquet each epoch: {streaming['warm_images_per_second']:.1f} img/s warm")
    t = second["timings"]
    print(
        f"  fixed cost of a job : {second['startup_seconds']:.1f} s submit -> first step (worker running after "
        f"{t['to_worker']:.1f} s, data + statistics {t['stats']:.1f} s); ray.init {ray_init:.1f} s once"
    )
    print(f"  plain loop, load + statistics: {plain_runs[-1]['to_first_step_seconds']:.1f} s")
    print(f"  wrote {args.out}")


if __name__ == "__main__":
    main()
