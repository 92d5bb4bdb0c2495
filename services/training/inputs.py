"""What a dataset must be to be learned, checked in one pass before any compute.

:func:`inspect_dataset` runs the dataset format's validation once (every shard opened, every image
decoded once, the fingerprint computed in the same pass) and adds the learning rules: enough
training images for the validation hold-out and the workers, every class represented, a test split
to evaluate the new version on. Its result, a :class:`LearnableDataset`, is what the training job
and the learning step trust afterwards: nothing downstream validates the data again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from diki_model import DikiConfig
from diki_model.data import DatasetReport, Manifest, read_manifest, validate_dataset
from services.settings import Settings
from services.storage import dataset_location, normalise_dataset_uri
from services.training.result import TrainingInputError

__all__ = [
    "MAX_IMAGES",
    "MAX_IMAGE_BYTES",
    "MIN_IMAGES_PER_CLASS",
    "MIN_TRAIN_IMAGES",
    "DatasetCheck",
    "LearnableDataset",
    "check_dataset",
    "inspect_dataset",
]

MIN_TRAIN_IMAGES: Final = 16
MIN_IMAGES_PER_CLASS: Final = 2
MAX_IMAGES: Final = 2_000_000
MAX_IMAGE_BYTES: Final = 20 * 1024 * 1024


@dataclass(frozen=True)
class LearnableDataset:
    """A dataset that passed :func:`inspect_dataset`: where it is, what it is, and its identity."""

    uri: str
    fingerprint: str
    manifest: Manifest
    num_train: int
    num_test: int


@dataclass
class DatasetCheck:
    """The one validation pass over a dataset: the format's report, the learning rules' verdict."""

    report: DatasetReport
    problems: list[str] = field(default_factory=list)
    dataset: LearnableDataset | None = None

    @property
    def ok(self) -> bool:
        return self.dataset is not None

    def summary(self, uri: str, limit: int = 20) -> str:
        shown = "\n  ".join(self.problems[:limit])
        if len(self.problems) > limit:
            shown += f"\n  ... and {len(self.problems) - limit} more"
        return f"dataset {uri} cannot be trained on:\n  {shown}"


def inspect_dataset(
    settings: Settings, uri: str, *, workers: int | None = None, require_test: bool = True
) -> DatasetCheck:
    """Validate ``uri`` once and apply the learning rules; never raises for a bad dataset.

    Raises:
        TrainingInputError: the location itself is not usable (unsupported scheme, bad bucket).
    """
    uri = normalise_dataset_uri(uri)
    try:
        fs, path = dataset_location(settings, uri)
    except ValueError as exc:
        raise TrainingInputError(str(exc)) from exc
    workers = workers or settings.train.workers
    try:
        report = validate_dataset(
            path,
            fs,
            min_images_per_class=MIN_IMAGES_PER_CLASS,
            max_images=MAX_IMAGES,
            max_image_bytes=MAX_IMAGE_BYTES,
        )
    except OSError as exc:
        raise TrainingInputError(f"dataset {uri}: cannot be read ({exc})") from exc
    check = DatasetCheck(report, [str(e) for e in report.errors])
    needed = max(MIN_TRAIN_IMAGES, 2 * DikiConfig().holdout_every, workers)
    if report.num_train < needed:
        check.problems.append(f"train/: {report.num_train} training images, too few to learn a task (need >= {needed})")
    if report.ok and require_test and report.num_test == 0:
        check.problems.append("test/: no test split, so the new version cannot be evaluated or promoted")
    if not check.problems and report.fingerprint is not None:
        manifest = read_manifest(path, fs)
        check.dataset = LearnableDataset(uri, report.fingerprint, manifest, report.num_train, report.num_test)
    return check


def check_dataset(
    settings: Settings, uri: str, workers: int | None = None, *, require_test: bool = True
) -> LearnableDataset:
    """:func:`inspect_dataset`, raising ``TrainingInputError`` that lists every problem found."""
    check = inspect_dataset(settings, uri, workers=workers, require_test=require_test)
    if check.dataset is None:
        raise TrainingInputError(check.summary(normalise_dataset_uri(uri)))
    return check.dataset
