"""What a training job produced, and how it fails."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrainJobResult", "TrainingError", "TrainingInputError"]


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
    # The task's validation accuracies: with its branch, zero-shot, linear probe (diki_model.Learnability).
    learnability: dict[str, Any] | None = None
    # Per epoch of the last attempt: wall and process-CPU seconds since its training started, checkpoint included.
    epoch_marks: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bundle_dir"] = str(self.bundle_dir)
        return d
