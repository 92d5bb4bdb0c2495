"""The Ray Train job that learns one task, and the flow that evaluates, registers and gates it.

``run_training_job`` learns one dataset (the project's format, in a local folder or on S3) as the
next task of a base bundle, with ``ray.train.torch.TorchTrainer``:

1. Before any compute the driver validates the dataset (manifest, every shard and image, labels,
   class counts), fingerprints it and resolves the base bundle (the production version, else the
   latest, unless told otherwise). Bad input raises ``TrainingInputError`` naming file and row.
2. Each worker builds the frozen backbone, loads the base bundle's tasks and adds the new task
   (its index is the next one). It streams its part of the training Parquet shards through
   pyarrow (whole shards per worker, or every N-th row when there are fewer shards than workers),
   decodes and preprocesses the images with the model's own ``preprocess`` and accumulates the
   frozen-feature ``TaskStatistics`` of its part. The statistics of all workers are merged exactly
   (an all-gather of their state dicts over ``torch.distributed``, merged in rank order).
3. ``diki_model.train_task`` trains the task's residual K/V; gradients are averaged across workers
   with ``torch.distributed.all_reduce`` (gloo on CPU). Every worker runs the same number of
   equal-sized steps per epoch (a worker with fewer images wraps around its shuffled part).
4. After each epoch rank 0 reports a checkpoint (adapter, best adapter, optimizer and scheduler
   state, epoch, history, merged statistics: safetensors + JSON, never pickles) to
   ``<storage root>/<artifacts prefix>/ray-train/<run>``; a restarted worker group resumes from
   ``ray.train.get_checkpoint()`` (``FailureConfig(max_failures)``).
5. Rank 0 writes the result bundle (base bundle + the new task, ``diki_model.extend_bundle``) into
   the final checkpoint; the driver copies it to a local folder.

``learn_dataset`` is the whole step the CLI and the pipelines run: train, evaluate (accuracy
matrix), track the run in MLflow, register the bundle as a new version (``candidate``) and move
``production`` to it when the promotion gate passes.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from diki_model import (
    DikiConfig,
    EpochResult,
    TaskStatistics,
    TrainConfig,
    TrainState,
    adapter_lr,
    apply_statistics,
    collect_statistics,
    extend_bundle,
    load_bundle,
    read_bundle_manifest,
    train_task,
)
from diki_model.data import (
    DatasetError,
    Manifest,
    dataset_fingerprint,
    decode_image,
    iter_records,
    list_shards,
    read_manifest,
    validate_dataset,
)
from services.evaluation import create_model, dataset_location
from services.settings import Settings

if TYPE_CHECKING:
    from services.evaluation import AccuracyMatrix
    from services.registry import GateDecision, Registry

__all__ = [
    "CURRENT",
    "LearnOutcome",
    "TrainJobResult",
    "TrainingError",
    "TrainingInputError",
    "check_dataset",
    "evaluate_new_version",
    "learn_dataset",
    "run_training_job",
    "train_config",
]

CURRENT: Final = "current"  # base version: the production version, else the latest one
CHECKPOINT_FORMAT = "diki-train-checkpoint"
CHECKPOINT_VERSION = 1
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
RESULT_JSON = "result.json"
BUNDLE_DIR = "bundle"
MIN_TRAIN_IMAGES = 16
EpochHook = Callable[[int, int], None]  # (finished epoch, world rank), called in every worker


class TrainingInputError(ValueError):
    """The dataset or the request cannot be trained on; raised before any compute."""


class TrainingError(RuntimeError):
    """The Ray Train job failed (after its retries); nothing was registered."""


@dataclass
class TrainJobResult:
    """What one training job produced."""

    bundle_dir: Path  # local bundle folder: base tasks + the new one
    task_name: str
    task_index: int
    tasks: list[str]  # every task of the bundle, in order
    history: list[dict[str, Any]]  # one EpochResult (as a dict) per epoch
    best_epoch: int
    train_seconds: float  # fitting statistics + training, in the workers (last attempt)
    job_seconds: float  # the whole job, seen from the driver
    startup_seconds: float  # from submitting the job to the first training step
    ray_run_id: str  # the Ray Train run name (its folder under the checkpoint storage)
    ray_job_id: str
    dataset_uri: str
    dataset_fingerprint: str
    checkpoint_path: str  # URI of the final checkpoint
    base_version: int | None
    workers: int
    use_gpu: bool
    train_config: dict[str, Any]
    num_train_images: int
    num_val_images: int
    images_per_second: float  # training throughput over all workers (last attempt)
    resumed_from_epoch: int | None = None  # set when a restarted worker group resumed from a checkpoint
    steps_per_epoch: int = 0  # equal on every worker
    batch_per_worker: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # seconds: to_worker, stats, to_first_step, train, finish
    # Per epoch of the last attempt: wall and process-CPU seconds since its training started, checkpoint included.
    epoch_marks: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bundle_dir"] = str(self.bundle_dir)
        return d


# --- input checks (driver) ---------------------------------------------------------------------


def check_dataset(
    settings: Settings, dataset_uri: str, workers: int = 1, *, require_test: bool = False
) -> tuple[pafs.FileSystem, str, Manifest]:
    """Validate a dataset for training; raise ``TrainingInputError`` listing every problem found.

    Checks the manifest (class names, template), that every shard opens and every image decodes,
    labels are in range, every class has training images and there are enough of them.
    """
    try:
        fs, path = dataset_location(settings, dataset_uri)
    except ValueError as exc:
        raise TrainingInputError(str(exc)) from exc
    try:
        report = validate_dataset(path, fs, min_images_per_class=1)
    except OSError as exc:
        raise TrainingInputError(f"dataset {dataset_uri}: cannot be read ({exc})") from exc
    problems = [str(e) for e in report.errors]
    holdout_every = DikiConfig().holdout_every
    needed = max(MIN_TRAIN_IMAGES, 2 * holdout_every, workers)
    if report.num_train < needed:
        problems.append(f"train/: {report.num_train} training images, too few to learn a task (need >= {needed})")
    if report.ok and require_test and report.num_test == 0:
        problems.append("test/: no test split, so the new version cannot be evaluated or gated")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise TrainingInputError(f"dataset {dataset_uri} cannot be trained on:\n  {shown}")
    return fs, path, read_manifest(path, fs)


def _bundle_files(bundle_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(bundle_dir).as_posix(): p.read_bytes() for p in sorted(bundle_dir.rglob("*")) if p.is_file()}


def _write_files(files: dict[str, bytes], dst: Path) -> Path:
    for rel, data in files.items():
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return dst


# --- checkpoints: safetensors + JSON -----------------------------------------------------------


def _json_ready(obj: Any, where: str) -> Any:
    try:
        json.dumps(obj)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{where} cannot be stored as JSON: {exc}") from exc
    return obj


def write_checkpoint(directory: Path, state: TrainState, stats: TaskStatistics, meta: dict[str, Any]) -> None:
    """Write a resumable training state: tensors to safetensors, everything else to JSON."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in state.adapter.items():
        tensors[f"adapter.{k}"] = v.detach().cpu().contiguous()
    if state.best_adapter is not None:
        for k, v in state.best_adapter.items():
            tensors[f"best_adapter.{k}"] = v.detach().cpu().clone().contiguous()  # may share the adapter's memory
    for k, v in stats.state_dict().items():
        tensors[f"stats.{k}"] = v.detach().cpu().contiguous()
    optim_state: dict[str, dict[str, Any]] = {}
    for pid, entry in state.optimizer.get("state", {}).items():
        out: dict[str, Any] = {}
        for name, value in entry.items():
            if torch.is_tensor(value):
                key = f"optimizer.{pid}.{name}"
                tensors[key] = value.detach().cpu().contiguous()
                out[name] = {"tensor": key}
            else:
                out[name] = {"value": value}
        optim_state[str(pid)] = out
    doc = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "epoch": state.epoch,
        "best_val": state.best_val,
        "best_epoch": state.best_epoch,
        "has_best_adapter": state.best_adapter is not None,
        "history": [asdict(h) for h in state.history],
        "optimizer": {"param_groups": state.optimizer.get("param_groups", []), "state": optim_state},
        "scheduler": state.scheduler,
        "meta": meta,
    }
    save_file(tensors, str(directory / STATE_TENSORS), metadata={"format": CHECKPOINT_FORMAT})
    (directory / STATE_JSON).write_text(json.dumps(_json_ready(doc, "training state"), indent=1, sort_keys=True))


def read_checkpoint(directory: Path) -> tuple[TrainState, TaskStatistics, dict[str, Any]]:
    """Read what ``write_checkpoint`` wrote (raises ValueError naming the folder when it is not one)."""
    try:
        doc = json.loads((directory / STATE_JSON).read_text())
        tensors = load_file(str(directory / STATE_TENSORS))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{directory}: not a readable training checkpoint ({exc})") from exc
    if doc.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory}: not a training checkpoint (format {doc.get('format')!r})")

    def prefixed(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    optimizer = {"param_groups": doc["optimizer"]["param_groups"], "state": {}}
    for pid, entry in doc["optimizer"]["state"].items():
        optimizer["state"][int(pid)] = {
            name: tensors[v["tensor"]] if "tensor" in v else v["value"] for name, v in entry.items()
        }
    state = TrainState(
        epoch=int(doc["epoch"]),
        adapter=prefixed("adapter."),
        optimizer=optimizer,
        scheduler=doc["scheduler"],
        best_val=float(doc["best_val"]),
        best_epoch=int(doc["best_epoch"]),
        best_adapter=prefixed("best_adapter.") if doc["has_best_adapter"] else None,
        history=[EpochResult(**h) for h in doc["history"]],
    )
    return state, TaskStatistics.from_state_dict(prefixed("stats.")), doc.get("meta", {})


# --- the worker ----------------------------------------------------------------------------------


@dataclass
class _JobSpec:
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
        return f"_JobSpec(run={self.run_name!r}, task={self.task_name!r}, dataset={self.dataset_uri!r})"


def _is_val(index: int, seed: int, fraction: float) -> bool:
    """Deterministic train/validation membership of a record, by its global position in the split."""
    if fraction <= 0:
        return False
    h = (index * 0x9E3779B97F4A7C15 + seed * 0xBF58476D1CE4E5B9 + 1) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 31
    h = (h * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 29
    return (h >> 11) / float(1 << 53) < fraction


class _WorkerData:
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
        if self.cache is not None:
            x, y = self.cache["val"]
            for s in range(0, len(y), 256):
                yield x[s : s + 256], y[s : s + 256]
            return
        yield from _batched(((x, y) for is_val, x, y in self.records() if is_val), 256)


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


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    x = t.detach().to(_collective_device()).clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    x /= dist.get_world_size()
    return x.to(t.device)


def _all_reduce_int(value: int, op: str) -> int:
    import torch.distributed as dist

    x = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    ops = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}
    dist.all_reduce(x, op=ops[op])
    return int(x.item())


def _all_gather_statistics(local: TaskStatistics, world: int) -> TaskStatistics:
    """Exact merge of every worker's statistics: all-gather the state dicts, merge in rank order."""
    import torch.distributed as dist

    if world == 1:
        return local
    dev = _collective_device()
    state = local.state_dict()
    gathered: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    for key in sorted(state):
        tensor = state[key].to(dev).contiguous()
        # Tensors may differ in their first dimension (held-out features): gather sizes, pad, trim.
        size = torch.tensor([tensor.shape[0] if tensor.ndim else 1], dtype=torch.int64, device=dev)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        longest = max(int(s.item()) for s in sizes)
        if tensor.ndim:
            padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=dev)
            padded[: tensor.shape[0]] = tensor
        else:
            padded = tensor
        parts = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        for rank, (part, n) in enumerate(zip(parts, sizes, strict=True)):
            gathered[rank][key] = (part[: int(n.item())] if tensor.ndim else part).cpu()
    merged = TaskStatistics.from_state_dict(gathered[0])
    for rank in range(1, world):
        merged.merge(TaskStatistics.from_state_dict(gathered[rank]))
    return merged


def _train_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker function (one per worker)."""
    import ray.train

    spec: _JobSpec = config["spec"]
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
        data = _WorkerData(fs, root, rank, world, model.preprocess, cfg.val_fraction, cfg.seed, spec.cache_bytes)
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
            stats = _all_gather_statistics(local, world)
        apply_statistics(model, task, stats)
        stats_seconds = time.perf_counter() - t_stats

        per_worker_batch = max(1, math.ceil(cfg.batch_size / world))
        counts = torch.tensor([data.num_train, data.num_val], dtype=torch.int64)
        if world > 1:
            n_max, n_min = _all_reduce_int(data.num_train, "max"), _all_reduce_int(data.num_train, "min")
            counts = torch.tensor([_all_reduce_int(int(c), "sum") for c in counts.tolist()])
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
            all_reduce_mean=_all_reduce_mean if world > 1 else None,
            start_state=start_state,
            on_epoch_end=keep_state,
            progress=False,
        )
        train_seconds = time.perf_counter() - t_train
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


# --- the driver --------------------------------------------------------------------------------


def _checkpoint_storage(settings: Settings) -> tuple[str, pafs.FileSystem | None, str]:
    """(storage_path, storage_filesystem, URI prefix) of the Ray Train checkpoints on the configured storage."""
    from services.storage import open_storage

    storage = open_storage(settings)
    rel = f"{settings.storage.artifacts_prefix}/ray-train"
    if storage.is_local:
        path = storage.path(rel)
        Path(path).mkdir(parents=True, exist_ok=True)
        return path, None, "file://"
    return storage.path(rel), storage.filesystem, "s3://"


def _resolve_base(settings: Settings, base_version: int | Literal["current"] | None) -> int | None:
    if base_version is None:
        return None
    from services.registry import Registry

    registry = Registry(settings)
    if base_version == CURRENT:
        return registry.get_alias("production") or registry.latest_version()
    if not isinstance(base_version, int) or base_version < 1:
        raise TrainingInputError(f"base version must be a positive version number, got {base_version!r}")
    if base_version not in {v.version for v in registry.list_versions()}:
        raise TrainingInputError(f"base version {base_version} is not registered as {registry.model_name!r}")
    return base_version


def _failure_reason(exc: BaseException) -> str:
    failures = getattr(exc, "worker_failures", None)
    if failures:
        rank, err = sorted(failures.items())[0]
        cause = getattr(err, "cause", None) or err
        lines = [line for line in str(cause).strip().splitlines() if line.strip()]
        return f"worker {rank}: {type(cause).__name__}: {(lines[0] if lines else '')[:500]}"
    return f"{type(exc).__name__}: {str(exc).strip()[:500]}"


def run_training_job(
    settings: Settings,
    dataset_uri: str,
    *,
    base_version: int | Literal["current"] | None = CURRENT,
    workers: int | None = None,
    use_gpu: bool | None = None,
    epochs: int | None = None,
    output_dir: str | Path | None = None,
    max_failures: int = 2,
    cpus_per_worker: float = 1.0,
    cache_mb: int = 1024,
    epoch_hook: EpochHook | None = None,
) -> TrainJobResult:
    """Learn the dataset at ``dataset_uri`` as the next task of ``base_version``'s bundle, on Ray Train.

    Args:
        settings: training defaults (``settings.train``), backbone, storage, Ray and MLflow locations.
        dataset_uri: a dataset folder: local path, ``file://`` or ``s3://bucket/prefix``.
        base_version: the registered version to extend; ``"current"`` = production, else the latest;
            None starts from the bare backbone.
        workers, use_gpu, epochs: override ``settings.train``.
        output_dir: where the result bundle goes (default ``<home>/bundles/<run>``).
        max_failures: restarts from the last checkpoint allowed when a worker fails.
        cpus_per_worker: logical CPUs each worker reserves (leave room for Serve replicas).
        cache_mb: a worker keeps its preprocessed images in memory when they fit, else streams each epoch.
        epoch_hook: called in every worker as ``hook(epoch, rank)`` after each epoch's checkpoint.

    Raises:
        TrainingInputError: bad dataset or request, before any compute.
        TrainingError: the job failed after its retries.
    """
    workers = workers or settings.train.workers
    if workers < 1:
        raise TrainingInputError(f"workers must be >= 1, got {workers}")
    fs, path, manifest = check_dataset(settings, dataset_uri, workers)
    return _run_job(
        settings,
        dataset_uri,
        manifest,
        dataset_fingerprint(path, fs),
        base_version=base_version,
        workers=workers,
        use_gpu=use_gpu,
        epochs=epochs,
        output_dir=output_dir,
        max_failures=max_failures,
        cpus_per_worker=cpus_per_worker,
        cache_mb=cache_mb,
        epoch_hook=epoch_hook,
    )


def _run_job(
    settings: Settings,
    dataset_uri: str,
    manifest: Manifest,
    fingerprint: str,
    *,
    base_version: int | Literal["current"] | None,
    workers: int,
    use_gpu: bool | None,
    epochs: int | None,
    output_dir: str | Path | None,
    max_failures: int,
    cpus_per_worker: float,
    cache_mb: int,
    epoch_hook: EpochHook | None,
) -> TrainJobResult:
    from services.ray_runtime import ensure_ray

    use_gpu = settings.train.use_gpu if use_gpu is None else use_gpu
    if epochs is not None and epochs < 1:
        raise TrainingInputError(f"epochs must be >= 1, got {epochs}")
    cfg = train_config(settings, epochs)
    base = _resolve_base(settings, base_version)
    run_name = f"train-{manifest.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    base_files: dict[str, bytes] = {}
    if base is not None:
        from services.registry import Registry

        with tempfile.TemporaryDirectory(prefix="diki-base-") as tmp:
            base_dir = Registry(settings).download_bundle(base, Path(tmp) / "bundle")
            names = read_bundle_manifest(base_dir).task_names
            if manifest.name in names:
                raise TrainingInputError(
                    f"dataset {dataset_uri}: a task named {manifest.name!r} is already task {names.index(manifest.name)} "
                    f"of version {base}; give the dataset a new name to learn it as a new task"
                )
            base_files = _bundle_files(base_dir)

    ensure_ray(settings)
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_path, storage_fs, scheme = _checkpoint_storage(settings)
    spec = _JobSpec(
        settings=settings,
        dataset_uri=str(dataset_uri),
        fingerprint=fingerprint,
        task_name=manifest.name,
        classes=list(manifest.classes),
        template=manifest.template,
        train_config=cfg.to_dict(),
        base_files=base_files,
        use_gpu=use_gpu,
        cache_bytes=int(cache_mb) * 1024 * 1024,
        run_name=run_name,
        epoch_hook=epoch_hook,
    )
    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1.0
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"spec": spec},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    t0 = time.time()
    try:
        result = trainer.fit()
    except Exception as exc:
        raise TrainingError(f"training job {run_name} on {dataset_uri} failed: {_failure_reason(exc)}") from exc
    job_seconds = time.time() - t0
    if result.checkpoint is None:
        raise TrainingError(f"training job {run_name} finished without a final checkpoint")
    out = Path(output_dir) if output_dir is not None else settings.home / "bundles" / run_name
    with result.checkpoint.as_directory() as ckdir:
        summary = json.loads((Path(ckdir) / RESULT_JSON).read_text())
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(Path(ckdir) / BUNDLE_DIR, out)
    try:
        job_id = ray.get_runtime_context().get_job_id()
    except Exception:
        job_id = ""
    return TrainJobResult(
        bundle_dir=out,
        task_name=summary["task_name"],
        task_index=int(summary["task_index"]),
        tasks=list(summary["tasks"]),
        history=list(summary["history"]),
        best_epoch=int(summary["best_epoch"]),
        train_seconds=float(summary["stats_seconds"] + summary["train_seconds"]),
        job_seconds=job_seconds,
        startup_seconds=max(0.0, float(summary["first_step_unix"]) - t0),
        ray_run_id=run_name,
        ray_job_id=str(job_id),
        dataset_uri=str(dataset_uri),
        dataset_fingerprint=fingerprint,
        checkpoint_path=f"{scheme}{result.checkpoint.path}",
        base_version=base,
        workers=workers,
        use_gpu=use_gpu,
        train_config=cfg.to_dict(),
        num_train_images=int(summary["num_train_images"]),
        num_val_images=int(summary["num_val_images"]),
        images_per_second=float(summary["images_per_second"]),
        resumed_from_epoch=summary.get("resumed_from_epoch"),
        steps_per_epoch=int(summary["steps_per_epoch"]),
        batch_per_worker=int(summary["batch_per_worker"]),
        epoch_marks=list(summary.get("epoch_marks", [])),
        timings={
            "to_worker": float(summary["worker_start_unix"]) - t0,
            "stats": float(summary["stats_seconds"]),
            "to_first_step": float(summary["first_step_unix"]) - t0,
            "train": float(summary["train_seconds"]),
            "finish": t0 + job_seconds - float(summary["train_end_unix"]),
        },
    )


# --- the whole step: train, evaluate, track, register, gate -------------------------------------


@dataclass
class LearnOutcome:
    """What ``learn_dataset`` did."""

    version: int  # the registered version holding the dataset's task
    reused: bool  # True: the dataset was already learned (nothing was trained)
    promoted: bool  # True: the gate passed and ``production`` now points at ``version``
    job: TrainJobResult | None = None
    matrix: AccuracyMatrix | None = None
    decision: GateDecision | None = None
    run_id: str | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)


def _normalise_uri(uri: str) -> str:
    text = str(uri)
    return text if "://" in text else str(Path(text).expanduser().absolute())


def learn_dataset(
    settings: Settings,
    dataset_uri: str,
    *,
    workers: int | None = None,
    use_gpu: bool | None = None,
    epochs: int | None = None,
    heldout: list[str] | None = None,
    base_version: int | Literal["current"] | None = CURRENT,
    eval_limit: int | None = None,
    **job_options: Any,
) -> LearnOutcome:
    """Learn one dataset end to end: train on Ray, evaluate, track, register as ``candidate``, gate.

    Idempotent: a dataset whose fingerprint a version already learned returns that version.
    ``heldout`` lists held-out dataset URIs (default: ``<storage>/heldout/*``). Extra keyword
    arguments go to the training job (``max_failures``, ``epoch_hook``, ...).

    Raises:
        TrainingInputError: before any compute, for a bad dataset (it also needs a test split).
        TrainingError: the job failed; nothing was registered.
        RegistryError: registration failed; nothing was left registered.
    """
    from services.evaluation import discover_heldout
    from services.registry import TAG_BASE, Registry, promotion_gate

    dataset_uri = _normalise_uri(dataset_uri)
    workers = workers or settings.train.workers
    registry = Registry(settings)
    fs, path, manifest = check_dataset(settings, dataset_uri, workers, require_test=True)
    fingerprint = dataset_fingerprint(path, fs)
    existing = registry.find_version_by_dataset(fingerprint)
    if existing is not None:
        production = registry.get_alias("production")
        return LearnOutcome(version=existing, reused=True, promoted=production == existing)
    heldout = discover_heldout(settings) if heldout is None else [_normalise_uri(h) for h in heldout]
    job = _run_job(
        settings,
        dataset_uri,
        manifest,
        fingerprint,
        base_version=base_version,
        workers=workers,
        use_gpu=use_gpu,
        epochs=epochs,
        output_dir=job_options.pop("output_dir", None),
        max_failures=job_options.pop("max_failures", 2),
        cpus_per_worker=job_options.pop("cpus_per_worker", 1.0),
        cache_mb=job_options.pop("cache_mb", 1024),
        epoch_hook=job_options.pop("epoch_hook", None),
    )
    if job_options:
        raise TypeError(f"unknown options {sorted(job_options)}")
    matrix, task_datasets = evaluate_new_version(
        settings,
        job.bundle_dir,
        job.base_version,
        dataset_uri,
        fingerprint,
        heldout,
        registry=registry,
        limit=eval_limit,
    )
    run_id = registry.log_training_run(job, matrix)
    try:
        version = registry.register_bundle(
            job.bundle_dir,
            run_id=run_id,
            tags={TAG_BASE: "" if job.base_version is None else str(job.base_version), "ray_run_id": job.ray_run_id},
            datasets=task_datasets,
        )
    except Exception:
        registry.end_run(run_id, ok=False)
        raise
    production = registry.get_alias("production")
    decision = promotion_gate(registry.get_matrix(production) if production else None, matrix, settings.promotion)
    promoted = registry.apply_gate(version, decision)
    registry.end_run(run_id, ok=True)
    return LearnOutcome(
        version=version,
        reused=False,
        promoted=promoted,
        job=job,
        matrix=matrix,
        decision=decision,
        run_id=run_id,
        metrics=matrix.stream_metrics(),
    )


def evaluate_new_version(
    settings: Settings,
    bundle_dir: str | Path,
    base_version: int | None,
    dataset_uri: str,
    fingerprint: str,
    heldout: list[str],
    *,
    registry: Registry | None = None,
    limit: int | None = None,
) -> tuple[AccuracyMatrix, list[str]]:
    """The accuracy matrix of a bundle = ``base_version`` + the task learned from ``dataset_uri``.

    Every task's test set (the base version's datasets, then the new one) and the held-out sets are
    scored; the base version's own matrix supplies the earlier rows. Returns the matrix and the
    task dataset URIs in task order.
    """
    from services.evaluation import build_accuracy_matrix
    from services.registry import Registry

    registry = registry or Registry(settings)
    previous = None
    base_datasets: list[str] = []
    base_fps: list[str] = []
    if base_version is not None:
        base_info = registry.get_version(base_version)
        previous = registry.get_matrix(base_version)
        base_fps = base_info.dataset_fingerprints
        base_datasets = base_info.datasets
        if len(base_datasets) != len(base_info.tasks) and previous is not None:
            base_datasets = [previous.columns[c].uri for c in previous.task_columns()]
        if len(base_datasets) != len(base_info.tasks):
            raise TrainingError(
                f"version {base_version} does not record the datasets of its tasks, so the new version "
                "cannot be evaluated on them"
            )
    task_datasets = [*base_datasets, dataset_uri]
    matrix = build_accuracy_matrix(
        settings,
        bundle_dir,
        task_datasets,
        heldout,
        previous=previous,
        fingerprints=[*base_fps, fingerprint] if len(base_fps) == len(base_datasets) else None,
        limit=limit,
    )
    return matrix, task_datasets


def train_config(settings: Settings, epochs: int | None = None) -> TrainConfig:
    """The TrainConfig of a job: ``settings.train``, with the backbone's measured rate when ``train.lr`` is unset."""
    train = settings.train
    return TrainConfig(
        lr=train.lr if train.lr is not None else adapter_lr(settings.backbone.name, settings.backbone.pretrained),
        epochs=epochs or train.epochs,
        batch_size=train.batch_size,
        seed=train.seed,
    )
