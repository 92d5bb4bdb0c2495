"""The job driver: one dataset learned as the next task of a base bundle, on ``ray.train.torch.TorchTrainer``.

The driver knows nothing of the registry: it takes a validated dataset (:class:`LearnableDataset`,
or a URI it validates once) and an optional local base bundle folder, starts the worker group
(:func:`services.training.worker.train_loop`) with checkpoints on the configured storage, and
returns a :class:`TrainJobResult` whose ``bundle_dir`` is the base bundle plus the new task.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from diki_model import TrainConfig, adapter_lr, read_bundle_manifest
from services.settings import Settings
from services.storage import open_storage
from services.training.checkpoint import BUNDLE_DIR, RESULT_JSON
from services.training.inputs import LearnableDataset, check_dataset
from services.training.result import TrainingError, TrainingInputError, TrainJobResult
from services.training.worker import EpochHook, JobSpec, train_loop

__all__ = ["run_training_job", "train_config"]


def train_config(settings: Settings, epochs: int | None = None) -> TrainConfig:
    """The TrainConfig of a job: ``settings.train``, with the backbone's measured rate when ``train.lr`` is unset."""
    train = settings.train
    return TrainConfig(
        lr=train.lr if train.lr is not None else adapter_lr(settings.backbone.name, settings.backbone.pretrained),
        epochs=epochs or train.epochs,
        batch_size=train.batch_size,
        seed=train.seed,
    )


def _bundle_files(bundle_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(bundle_dir).as_posix(): p.read_bytes() for p in sorted(bundle_dir.rglob("*")) if p.is_file()}


def _checkpoint_storage(settings: Settings) -> tuple[str, pafs.FileSystem | None, str]:
    """(storage_path, storage_filesystem, URI prefix) of the Ray Train checkpoints on the configured storage."""
    storage = open_storage(settings)
    rel = f"{settings.storage.artifacts_prefix}/ray-train"
    if storage.is_local:
        path = storage.path(rel)
        Path(path).mkdir(parents=True, exist_ok=True)
        return path, None, "file://"
    return storage.path(rel), storage.filesystem, "s3://"


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
    dataset: LearnableDataset | str,
    *,
    base_bundle: str | Path | None = None,
    workers: int | None = None,
    use_gpu: bool | None = None,
    epochs: int | None = None,
    output_dir: str | Path | None = None,
    max_failures: int = 2,
    cpus_per_worker: float = 1.0,
    cache_mb: int = 1024,
    epoch_hook: EpochHook | None = None,
) -> TrainJobResult:
    """Learn ``dataset`` as the next task of the bundle in ``base_bundle`` (None: the bare backbone), on Ray Train.

    Args:
        settings: training defaults (``settings.train``), backbone, storage and Ray locations.
        dataset: a dataset that passed ``inspect_dataset``, or its URI (local path, ``file://``,
            ``s3://bucket/prefix``), which is then validated once here.
        base_bundle: a local bundle folder whose tasks come first.
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
    from services.ray_runtime import ensure_ray

    workers = workers or settings.train.workers
    if workers < 1:
        raise TrainingInputError(f"workers must be >= 1, got {workers}")
    if epochs is not None and epochs < 1:
        raise TrainingInputError(f"epochs must be >= 1, got {epochs}")
    if not isinstance(dataset, LearnableDataset):
        dataset = check_dataset(settings, dataset, workers, require_test=False)
    elif dataset.num_train < workers:
        raise TrainingInputError(f"dataset {dataset.uri}: {dataset.num_train} training images for {workers} workers")
    manifest = dataset.manifest
    use_gpu = settings.train.use_gpu if use_gpu is None else use_gpu
    cfg = train_config(settings, epochs)
    run_name = f"train-{manifest.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    base_files: dict[str, bytes] = {}
    if base_bundle is not None:
        names = read_bundle_manifest(base_bundle).task_names
        if manifest.name in names:
            raise TrainingInputError(
                f"dataset {dataset.uri}: a task named {manifest.name!r} is already task {names.index(manifest.name)} "
                "of the base bundle; give the dataset a new name to learn it as a new task"
            )
        base_files = _bundle_files(Path(base_bundle))

    ensure_ray(settings)
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_path, storage_fs, scheme = _checkpoint_storage(settings)
    spec = JobSpec(
        settings=settings,
        dataset_uri=dataset.uri,
        fingerprint=dataset.fingerprint,
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
        train_loop,
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
        raise TrainingError(f"training job {run_name} on {dataset.uri} failed: {_failure_reason(exc)}") from exc
    job_seconds = time.time() - t0
    if result.checkpoint is None:
        raise TrainingError(f"training job {run_name} finished without a final checkpoint")
    out = Path(output_dir) if output_dir is not None else settings.home / "bundles" / run_name
    with result.checkpoint.as_directory() as ckdir:
        summary: dict[str, Any] = json.loads((Path(ckdir) / RESULT_JSON).read_text())
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
        dataset_uri=dataset.uri,
        dataset_fingerprint=dataset.fingerprint,
        checkpoint_path=f"{scheme}{result.checkpoint.path}",
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
        learnability=summary.get("learnability"),
        timings={
            "to_worker": float(summary["worker_start_unix"]) - t0,
            "stats": float(summary["stats_seconds"]),
            "to_first_step": float(summary["first_step_unix"]) - t0,
            "train": float(summary["train_seconds"]),
            "finish": t0 + job_seconds - float(summary["train_end_unix"]),
        },
    )
