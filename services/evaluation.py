"""Evaluation of a bundle: the accuracy matrix of the MTIL protocol, from test splits in storage.

Row ``t`` of the matrix is the model after learning its first ``t`` tasks (row 0 is the frozen
backbone, zero-shot); column ``i`` is the test split of a dataset: first every learned task's
dataset in learning order, then the held-out datasets (never trained on) that measure how much
zero-shot ability the model keeps. DIKI never changes a task's parameters after learning it, so
the model after step ``t`` is exactly the bundle's first ``t`` tasks: every row is computed from
the one bundle, loading tasks one by one into a single backbone. Cells already known from the
previous version's matrix (same row, same dataset fingerprint) are reused, so a new step costs
one new row and one new column.

Only ``diki_model``'s public API does the model work (``load_task``, ``evaluate``,
``stream_metrics``, ``plot_heatmap``); this module finds the data and keeps the bookkeeping.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow.fs as pafs
import torch

from diki_model import DikiCLIP, DikiConfig, create_diki_model, evaluate, load_task, plot_heatmap, read_bundle_manifest
from diki_model import stream_metrics as _stream_metrics
from diki_model.data import DatasetError, dataset_fingerprint, list_shards, load_split_tensors, read_manifest
from services.settings import Settings, split_s3_uri
from services.storage import open_storage

__all__ = [
    "HELDOUT_PREFIX",
    "ZERO_SHOT_ROW",
    "AccuracyMatrix",
    "EvalColumn",
    "build_accuracy_matrix",
    "create_model",
    "dataset_location",
    "discover_heldout",
]

MATRIX_FORMAT = "diki-accuracy-matrix"
MATRIX_VERSION = 1
ZERO_SHOT_ROW = "zero-shot"
# Held-out datasets (never trained on) live in <storage root>/<HELDOUT_PREFIX>/<name>/.
HELDOUT_PREFIX = "heldout"


# --- locations and models ----------------------------------------------------------------------


def dataset_location(settings: Settings, uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path of a dataset: ``s3://bucket/prefix``, ``file:///abs`` or a local path.

    S3 uses the endpoint and credentials of ``settings.s3`` (the ``AWS_*`` variables), never the URI.
    """
    text = str(uri)
    if text.startswith("s3://"):
        bucket, prefix = split_s3_uri(text)
        bucket_settings = settings.model_copy(
            update={"storage": settings.storage.model_copy(update={"root": f"s3://{bucket}"})}
        )
        storage = open_storage(bucket_settings)
        return storage.filesystem, f"{bucket}/{prefix}".rstrip("/")
    if text.startswith("file://"):
        return pafs.LocalFileSystem(), str(Path(unquote(urlsplit(text).path)).absolute())
    if "://" in text:
        raise ValueError(f"dataset location {text!r}: only s3://, file:// and local paths are supported")
    return pafs.LocalFileSystem(), str(Path(text).expanduser().absolute())


def create_model(settings: Settings, config: DikiConfig | None = None, device: str | torch.device = "cpu") -> DikiCLIP:
    """The configured frozen backbone with an empty adapter pool (``settings.backbone``).

    A backbone without weights (a test config) is initialised from ``settings.train.seed``, so every
    process that builds it gets the same fingerprint.
    """
    return create_diki_model(
        settings.backbone.name, settings.backbone.pretrained, config, device=device, seed=settings.train.seed
    )


def discover_heldout(settings: Settings) -> list[str]:
    """URIs of the held-out datasets in ``<storage root>/heldout/*`` (folders with a manifest), sorted."""
    storage = open_storage(settings)
    out = []
    for name in storage.list_dir(HELDOUT_PREFIX):
        rel = f"{HELDOUT_PREFIX}/{name}"
        if storage.is_file(f"{rel}/manifest.json"):
            out.append(storage.uri(rel) if not storage.is_local else storage.path(rel))
    return out


# --- the matrix --------------------------------------------------------------------------------


@dataclass
class EvalColumn:
    """One evaluated dataset: a learned task's or a held-out one's test split."""

    name: str
    kind: str  # "task" or "heldout"
    uri: str
    fingerprint: str
    count: int = 0  # test images evaluated

    def key(self) -> tuple[str, str]:
        return self.kind, self.fingerprint


@dataclass
class AccuracyMatrix:
    """Accuracies in % (rows: zero-shot then after each learned task; columns: datasets)."""

    rows: list[str]
    columns: list[EvalColumn]
    acc: list[list[float]]
    backbone_fingerprint: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.acc) != len(self.rows) or any(len(r) != len(self.columns) for r in self.acc):
            raise ValueError(f"accuracy matrix is not {len(self.rows)} x {len(self.columns)}")

    # -- views --
    @property
    def task_names(self) -> list[str]:
        return self.rows[1:]

    def task_columns(self) -> list[int]:
        return [i for i, c in enumerate(self.columns) if c.kind == "task"]

    def heldout_columns(self) -> list[int]:
        return [i for i, c in enumerate(self.columns) if c.kind == "heldout"]

    def column(self, kind: str, fingerprint: str) -> int | None:
        for i, c in enumerate(self.columns):
            if c.key() == (kind, fingerprint):
                return i
        return None

    def task_matrix(self) -> np.ndarray:
        """The N x N protocol matrix: rows after each step, columns the learned tasks' datasets."""
        cols = self.task_columns()
        return np.asarray([[self.acc[r][c] for c in cols] for r in range(1, len(self.rows))], dtype=np.float64)

    def stream_metrics(self) -> dict[str, float | None]:
        """Transfer / Average / Last (``None`` where undefined, e.g. Transfer after one task)."""
        if len(self.rows) < 2:
            return {"transfer": None, "average": None, "last": None}
        values = _stream_metrics(self.task_matrix()).as_dict()
        return {k: (None if math.isnan(v) else float(v)) for k, v in values.items()}

    def zero_shot_retention(self) -> float | None:
        """Mean held-out accuracy of the last row over that of the zero-shot row (None without held-out sets)."""
        cols = self.heldout_columns()
        if not cols or len(self.rows) < 2:
            return None
        base = float(np.mean([self.acc[0][c] for c in cols]))
        now = float(np.mean([self.acc[-1][c] for c in cols]))
        return 1.0 if base <= 0 else now / base

    def heatmap(self, path: str | Path) -> Path:
        names = [c.name if c.kind == "task" else f"{c.name} (held-out)" for c in self.columns]
        rows = [ZERO_SHOT_ROW] + [f"after {n}" for n in self.task_names]
        return plot_heatmap(np.asarray(self.acc), names, path, row_names=rows)

    # -- JSON --
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MATRIX_FORMAT,
            "format_version": MATRIX_VERSION,
            "rows": self.rows,
            "columns": [asdict(c) for c in self.columns],
            "acc": self.acc,
            "backbone_fingerprint": self.backbone_fingerprint,
            "metrics": self.stream_metrics(),
            "zero_shot_retention": self.zero_shot_retention(),
            "meta": self.meta,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "accuracy matrix") -> AccuracyMatrix:
        if data.get("format") != MATRIX_FORMAT:
            raise ValueError(f"{where}: not an accuracy matrix (format {data.get('format')!r})")
        try:
            return cls(
                rows=list(data["rows"]),
                columns=[EvalColumn(**c) for c in data["columns"]],
                acc=[[float(x) for x in row] for row in data["acc"]],
                backbone_fingerprint=str(data.get("backbone_fingerprint", "")),
                meta=dict(data.get("meta", {})),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{where}: malformed accuracy matrix ({exc})") from exc

    @classmethod
    def from_json(cls, text: str, where: str = "accuracy matrix") -> AccuracyMatrix:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, where)


# --- building it -------------------------------------------------------------------------------


@dataclass
class _TestSet:
    column: EvalColumn
    classes: list[str]
    template: str
    images: torch.Tensor
    labels: torch.Tensor


def _load_test_set(
    settings: Settings, uri: str, kind: str, preprocess: Any, limit: int | None, fingerprint: str | None
) -> _TestSet:
    fs, path = dataset_location(settings, uri)
    manifest = read_manifest(path, fs)
    if not list_shards(path, "test", fs):
        raise DatasetError(f"dataset {uri} has no test split: it cannot be evaluated", file="test/")
    images, labels = load_split_tensors(path, "test", preprocess, fs, limit=limit)
    fp = fingerprint or dataset_fingerprint(path, fs)
    column = EvalColumn(name=manifest.name, kind=kind, uri=str(uri), fingerprint=fp, count=int(labels.shape[0]))
    return _TestSet(column, list(manifest.classes), manifest.template, images, labels)


def build_accuracy_matrix(
    settings: Settings,
    bundle_dir: str | Path,
    task_datasets: Sequence[str],
    heldout: Sequence[str] = (),
    *,
    previous: AccuracyMatrix | None = None,
    fingerprints: Sequence[str] | None = None,
    model: DikiCLIP | None = None,
    limit: int | None = None,
) -> AccuracyMatrix:
    """Evaluate every prefix of the bundle's task list on every dataset's test split.

    Args:
        bundle_dir: a local bundle folder.
        task_datasets: the URI of each bundle task's dataset, in the bundle's order.
        heldout: URIs of held-out datasets (never trained on).
        previous: the matrix of the base version; its cells are reused where row and dataset match.
        fingerprints: known dataset fingerprints of ``task_datasets`` (skips re-hashing them).
        model: a backbone without tasks to reuse; built from ``settings`` otherwise.
        limit: evaluate at most this many test images per dataset.

    Raises:
        DatasetError: a dataset is missing, has no test split, or is malformed (the message names it).
        ValueError: ``task_datasets`` does not match the bundle's tasks.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_bundle_manifest(bundle_dir)
    names = manifest.task_names
    if len(task_datasets) != len(names):
        raise ValueError(f"{bundle_dir}: bundle holds {len(names)} tasks {names}, got {len(task_datasets)} datasets")
    if model is None:
        model = create_model(settings, DikiConfig.from_dict(manifest.config))
    if model.num_tasks:
        raise ValueError("build_accuracy_matrix needs a model without tasks")
    known = list(fingerprints) if fingerprints is not None else [None] * len(names)
    sets: list[_TestSet] = []
    for uri, fp, entry in zip(task_datasets, known, manifest.tasks, strict=True):
        ts = _load_test_set(settings, uri, "task", model.preprocess, limit, fp or entry.get("dataset_fingerprint"))
        sets.append(ts)
    for uri in heldout:
        sets.append(_load_test_set(settings, uri, "heldout", model.preprocess, limit, None))

    rows = [ZERO_SHOT_ROW, *names]
    acc = [[float("nan")] * len(sets) for _ in rows]
    if previous is not None and previous.rows == rows[: len(previous.rows)]:
        for j, ts in enumerate(sets):
            pj = previous.column(*ts.column.key())
            if pj is not None and previous.columns[pj].count == ts.column.count:
                for r in range(len(previous.rows)):
                    acc[r][j] = previous.acc[r][pj]
    for r in range(len(rows)):
        if r > 0:
            load_task(model, bundle_dir / manifest.tasks[r - 1]["path"])
        for j, ts in enumerate(sets):
            if math.isnan(acc[r][j]):
                res = evaluate(model, ts.images, ts.labels, ts.classes, ts.template)
                acc[r][j] = float(res.accuracy)
    return AccuracyMatrix(
        rows=rows,
        columns=[ts.column for ts in sets],
        acc=acc,
        backbone_fingerprint=model.backbone_info.fingerprint,
    )
