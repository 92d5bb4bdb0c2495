"""The Ray Train worker: one per worker process, started by the job driver (:mod:`.job`).

Each worker builds the frozen backbone, loads the base bundle's tasks and adds the new task (its
index is the next one). It streams its part of the training Parquet shards through pyarrow (whole
shards per worker, or every N-th row when there are fewer shards than workers), decodes and
preprocesses the images with the model's own ``preprocess`` and accumulates the frozen-feature
``TaskStatistics`` of its part; the statistics of all workers are merged exactly. Then
``diki_model.train_task`` trains the task's residual K/V with gradients averaged across workers;
every worker runs the same number of equal-sized steps per epoch. After each epoch rank 0 reports a
checkpoint (:mod:`.checkpoint`); a restarted worker group resumes from it. At the end rank 0 writes
the result bundle (base bundle + the new task) into the final checkpoint.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from diki_model import (
    DikiConfig,
    EpochResult,
    Learnability,
    TaskStatistics,
    TrainConfig,
    TrainState,
    apply_statistics,
    collect_statistics,
    extend_bundle,
    frozen_features,
    linear_probe_accuracy,
    load_bundle,
    read_bundle_manifest,
    task_counts,
    train_task,
)
from diki_model.data import DatasetError, decode_image, iter_records, list_shards
from services.backbone import create_model
from services.settings import Settings
from services.storage import dataset_location
from services.training.checkpoint import BUNDLE_DIR, RESULT_JSON, read_checkpoint, write_checkpoint
from services.training.collectives import (
    all_gather_rows,
    all_gather_statistics,
    all_reduce_int,
    all_reduce_mean,
    all_reduce_sum,
)

__all__ = ["EpochHook", "JobSpec", "WorkerData", "train_loop"]

EpochHook = Callable[[int, int], None]  # (finished epoch, world rank), called in every worker


def _write_files(files: dict[str, bytes], dst: Path) -> Path:
    for rel, data in files.items():
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return dst


@dataclass
class JobSpec:
    """Everything a worker needs; travels inside ``train_loop_config``."""

    settings: Settings
    dataset_uri: str
    fingerprint: str
    task_name: str
    classes: list[str]
    template: str
    train_config: dict[str, Any]
    base_files: dict[str, bytes]
    use_gpu: bool
    cache_bytes: int
    run_name: str
    epoch_hook: EpochHook | None = None

    def __repr__(self) -> str:  # keep settings (and any secret in them) out of logs
        return f"JobSpec(run={self.run_name!r}, task={self.task_name!r}, dataset={self.dataset_uri!r})"


def _is_val(index: int, seed: int, fraction: float) -> bool:
    """Deterministic train/validation membership of a record, by its global position in the split."""
    if fraction <= 0:
        return False
    h = (index * 0x9E3779B97F4A7C15 + seed * 0xBF58476D1CE4E5B9 + 1) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 31
    h = (h * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 29
    return (h >> 11) / float(1 << 53) < fraction


class WorkerData:
    """One worker's part of the training split, streamed from Parquet (cached in memory when it fits)."""

    def __init__(
        self,
        fs: pafs.FileSystem,
        root: str,
        rank: int,
        world: int,
        preprocess: Callable[[Any], torch.Tensor],
        val_fraction: float,
        seed: int,
        cache_bytes: int,
    ) -> None:
        self.fs, self.root, self.preprocess = fs, root, preprocess
        self.rank, self.world = rank, world
        self.val_fraction, self.seed, self.cache_bytes = val_fraction, seed, cache_bytes
        shards = list_shards(root, "train", fs)
        offsets, start = {}, 0
        for rel in shards:
            offsets[rel] = start
            with fs.open_input_file(f"{root}/{rel}") as f:
                start += pq.ParquetFile(f).metadata.num_rows
        self.offsets = offsets
        if len(shards) >= world:  # whole shards per worker
            self.shards, self.by_row = shards[rank::world], False
        else:  # fewer shards than workers: every world-th row
            self.shards, self.by_row = shards, True
        self.num_train = self.num_val = 0
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def records(self, shard_order: list[str] | None = None) -> Iterator[tuple[bool, torch.Tensor, int]]:
        """(is validation, preprocessed image, label) for every record of this worker's part."""
        for rel in shard_order or self.shards:
            row = self.offsets[rel]
            local = 0
            for images, labels in iter_records(self.root, "train", self.fs, shards=[rel], batch_rows=256):
                for image, label in zip(images, labels.tolist(), strict=True):
                    index = row
                    row += 1
                    local += 1
                    if self.by_row and index % self.world != self.rank:
                        continue
                    try:
                        tensor = self.preprocess(decode_image(image))
                    except DatasetError as exc:
                        raise DatasetError(exc.reason, file=rel, row=local - 1) from exc
                    yield _is_val(index, self.seed, self.val_fraction), tensor, int(label)

    def scan(self, model: Any | None) -> TaskStatistics | None:
        """Count (and cache) this worker's records; with a model, accumulate its frozen-feature statistics."""
        cache: dict[str, list[Any]] = {"train_x": [], "train_y": [], "val_x": [], "val_y": []}
        caching, used = True, 0
        self.num_train = self.num_val = 0

        def items() -> Iterator[tuple[torch.Tensor, int]]:
            nonlocal caching, used
            for is_val, x, y in self.records():
                if is_val:
                    self.num_val += 1
                else:
                    self.num_train += 1
                if caching:
                    used += x.numel() * x.element_size()
                    if used > self.cache_bytes:
                        caching = False
                        cache.clear()
                    else:
                        part = "val" if is_val else "train"
                        cache[f"{part}_x"].append(x)
                        cache[f"{part}_y"].append(y)
                yield x, y

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            return _batched(items(), 64)

        stats = None
        if model is not None:
            stats = collect_statistics(model, batches())
        else:
            for _ in batches():
                pass
        if caching:

            def stack(part: str) -> tuple[torch.Tensor, torch.Tensor]:
                xs = cache[f"{part}_x"]
                x = torch.stack(xs) if xs else torch.zeros(0)
                return x, torch.tensor(cache[f"{part}_y"], dtype=torch.int64)

            self.cache = {"train": stack("train"), "val": stack("val")}
        return stats

    def train_batches(self, batch: int, steps: int) -> Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
        """Exactly ``steps`` batches of ``batch`` images per epoch, reshuffled each epoch."""

        def source(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 7919 + self.rank)
            if self.cache is not None:
                x, y = self.cache["train"]
                needed = steps * batch
                order = torch.cat([torch.randperm(len(y), generator=gen) for _ in range(math.ceil(needed / len(y)))])
                for s in range(steps):
                    idx = order[s * batch : (s + 1) * batch]
                    yield x[idx], y[idx]
                return
            yield from self._stream_batches(gen, batch, steps)

        return source

    def _stream_batches(
        self, gen: torch.Generator, batch: int, steps: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return itertools.islice(_batched(self._shuffled_records(gen, max(4 * batch, 256)), batch, whole=True), steps)

    def _shuffled_records(self, gen: torch.Generator, buffer_size: int) -> Iterator[tuple[torch.Tensor, int]]:
        """Training records without end: shards in a new order each pass, through a shuffle buffer."""
        while True:
            buffer: list[tuple[torch.Tensor, int]] = []
            order = [self.shards[int(i)] for i in torch.randperm(len(self.shards), generator=gen)]
            for is_val, x, y in self.records(order):
                if is_val:
                    continue
                buffer.append((x, y))
                if len(buffer) >= buffer_size:
                    yield buffer.pop(int(torch.randint(len(buffer), (1,), generator=gen)))
            perm = torch.randperm(len(buffer), generator=gen).tolist()
            yield from (buffer[i] for i in perm)

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from self._part_batches("val")

    def train_eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The training part once, in order (for frozen features, not for training)."""
        yield from self._part_batches("train")

    def _part_batches(self, part: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.cache is not None:
            x, y = self.cache[part]
            for s in range(0, len(y), 256):
                yield x[s : s + 256], y[s : s + 256]
            return
        want_val = part == "val"
        yield from _batched(((x, y) for is_val, x, y in self.records() if is_val == want_val), 256)


def _batched(
    items: Iterable[tuple[torch.Tensor, int]], size: int, whole: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stack (image, label) items into batches of ``size``; the last one may be smaller unless ``whole``."""
    xs: list[torch.Tensor] = []
    ys: list[int] = []
    for x, y in items:
        xs.append(x)
        ys.append(y)
        if len(xs) == size:
            yield torch.stack(xs), torch.tensor(ys)
            xs, ys = [], []
    if xs and not whole:
        yield torch.stack(xs), torch.tensor(ys)


def _measure_learnability(model: Any, task: int, data: WorkerData, world: int) -> dict[str, Any] | None:
    """The task's validation accuracy with its branch, zero-shot, and for a linear probe (rank 0 fits it).

    Counts are summed over workers; the frozen features of every worker's part are gathered on
    rank 0, in rank order, for the probe.
    """
    branch = task_counts(model, task, data.val_batches(), gate=1.0)
    zero_shot = task_counts(model, task, data.val_batches(), gate=0.0)
    train_x, train_y = frozen_features(model, data.train_eval_batches())
    val_x, val_y = frozen_features(model, data.val_batches())
    if world > 1:
        branch = all_reduce_sum(branch)
        zero_shot = all_reduce_sum(zero_shot)
        train_x, train_y = all_gather_rows(train_x), all_gather_rows(train_y)
        val_x, val_y = all_gather_rows(val_x), all_gather_rows(val_y)
    if branch[1] <= 0:
        return None
    num_classes = len(model.tasks[task].classes)
    probe = linear_probe_accuracy(train_x, train_y, val_x, val_y, num_classes) if len(train_y) else None
    return Learnability(
        val_images=int(branch[1]),
        num_classes=num_classes,
        branch_acc=float(branch[0] / branch[1]),
        zero_shot_acc=float(zero_shot[0] / zero_shot[1]),
        probe_acc=probe,
    ).to_dict()


def train_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker function (one per worker)."""
    import ray.train

    spec: JobSpec = config["spec"]
    worker_start = time.time()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = TrainConfig(**spec.train_config)
    if spec.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())))

    work = Path(tempfile.mkdtemp(prefix=f"diki-train-{rank}-"))
    try:
        base_dir = _write_files(spec.base_files, work / "base") if spec.base_files else None
        diki_config = DikiConfig.from_dict(read_bundle_manifest(base_dir).config) if base_dir else DikiConfig()
        model = create_model(spec.settings, diki_config, device=device)
        if base_dir is not None:
            load_bundle(base_dir, model=model)
        task = model.add_task(spec.task_name, spec.classes, spec.template, seed=cfg.seed)
        model.tasks[task].dataset_fingerprint = spec.fingerprint

        fs, root = dataset_location(spec.settings, spec.dataset_uri)
        data = WorkerData(fs, root, rank, world, model.preprocess, cfg.val_fraction, cfg.seed, spec.cache_bytes)
        start_state: TrainState | None = None
        resumed_from: int | None = None
        checkpoint = ray.train.get_checkpoint()
        t_stats = time.perf_counter()
        if checkpoint is not None:
            with checkpoint.as_directory() as ckdir:
                start_state, stats, _ = read_checkpoint(Path(ckdir))
            resumed_from = start_state.epoch
            data.scan(None)
        else:
            local = data.scan(model)
            assert local is not None
            stats = all_gather_statistics(local, world)
        apply_statistics(model, task, stats)
        stats_seconds = time.perf_counter() - t_stats

        per_worker_batch = max(1, math.ceil(cfg.batch_size / world))
        counts = torch.tensor([data.num_train, data.num_val], dtype=torch.int64)
        if world > 1:
            n_max, n_min = all_reduce_int(data.num_train, "max"), all_reduce_int(data.num_train, "min")
            counts = torch.tensor([all_reduce_int(int(c), "sum") for c in counts.tolist()])
        else:
            n_max = n_min = data.num_train
        if n_min == 0:
            raise DatasetError(f"a worker got no training images: too few images for {world} workers", file="train/")
        steps = max(1, math.ceil(n_max / per_worker_batch))
        num_train, num_val = int(counts[0]), int(counts[1])

        first_step: list[float] = []
        batches = data.train_batches(per_worker_batch, steps)

        def timed(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for item in batches(epoch):
                if not first_step:
                    first_step.append(time.time())
                yield item

        meta = {
            "task_name": spec.task_name,
            "dataset_fingerprint": spec.fingerprint,
            "run_name": spec.run_name,
            "steps_per_epoch": steps,
            "batch_per_worker": per_worker_batch,
            "world_size": world,
        }

        def on_epoch_end(result: EpochResult, state: TrainState) -> None:
            metrics = {k: v for k, v in asdict(result).items() if v is not None}
            metrics["resumed_from_epoch"] = -1 if resumed_from is None else resumed_from
            if rank == 0:
                with tempfile.TemporaryDirectory(prefix="diki-ckpt-") as tmp:
                    write_checkpoint(Path(tmp), state, stats, meta)
                    ray.train.report(
                        metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=None
                    )
            else:
                ray.train.report(metrics, checkpoint=None)
            marks.append(
                {
                    "epoch": result.epoch,
                    "wall": time.perf_counter() - t_train,
                    "cpu": time.process_time() - cpu_train,
                }
            )
            if spec.epoch_hook is not None:
                spec.epoch_hook(result.epoch, rank)

        final_state: list[TrainState] = []
        marks: list[dict[str, float]] = []

        def keep_state(result: EpochResult, state: TrainState) -> None:
            final_state[:] = [state]
            on_epoch_end(result, state)

        t_train, cpu_train = time.perf_counter(), time.process_time()
        train_result = train_task(
            model,
            task,
            timed,
            steps,
            cfg,
            (lambda: data.val_batches()) if cfg.val_fraction > 0 else None,
            all_reduce_mean=all_reduce_mean if world > 1 else None,
            start_state=start_state,
            on_epoch_end=keep_state,
            progress=False,
        )
        train_seconds = time.perf_counter() - t_train
        learnability = _measure_learnability(model, task, data, world) if cfg.val_fraction > 0 else None
        epochs_run = cfg.epochs - (start_state.epoch if start_state is not None else 0)
        images = epochs_run * steps * per_worker_batch * world
        state = final_state[0] if final_state else start_state
        assert state is not None
        summary = {
            "task_name": spec.task_name,
            "task_index": task,
            "tasks": [t.name for t in model.tasks],
            "history": [asdict(h) for h in train_result.history],
            "best_epoch": train_result.best_epoch,
            "stats_seconds": stats_seconds,
            "train_seconds": train_seconds,
            "images_per_second": images / train_seconds if train_seconds > 0 and images else 0.0,
            "worker_start_unix": worker_start,
            "first_step_unix": first_step[0] if first_step else time.time(),
            "num_train_images": num_train,
            "num_val_images": num_val,
            "resumed_from_epoch": resumed_from,
            "statistics_count": stats.count,
            "steps_per_epoch": steps,
            "batch_per_worker": per_worker_batch,
            "train_end_unix": time.time(),
            "epoch_marks": marks,
            "learnability": learnability,
        }
        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="diki-final-") as tmp:
                write_checkpoint(Path(tmp), state, stats, meta)
                extend_bundle(base_dir, model, task, Path(tmp) / BUNDLE_DIR)
                (Path(tmp) / RESULT_JSON).write_text(json.dumps(summary, indent=1, sort_keys=True))
                ray.train.report({"done": 1, "epoch": cfg.epochs}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report({"done": 1, "epoch": cfg.epochs}, checkpoint=None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
