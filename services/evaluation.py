"""Evaluation of a bundle: the accuracy matrix (:mod:`services.accuracy`) from test splits in storage.

DIKI never changes a task's parameters after learning it, so the model after step ``t`` is exactly
the bundle's first ``t`` tasks: every row is computed from the one bundle, loading tasks one by one
into a single backbone. Cells already known from the previous version's matrix (same row, same
dataset fingerprint) are reused, so a new step costs one new row and one new column.

Only ``diki_model``'s public API does the model work (``load_task``, ``evaluate``); this module
finds the data and keeps the bookkeeping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diki_model import DikiCLIP, DikiConfig, evaluate, load_task, read_bundle_manifest
from diki_model.data import DatasetError, dataset_fingerprint, list_shards, load_split_tensors, read_manifest
from services.accuracy import ZERO_SHOT_ROW, AccuracyMatrix, EvalColumn
from services.backbone import create_model
from services.settings import Settings
from services.storage import dataset_location, open_storage

__all__ = ["HELDOUT_PREFIX", "build_accuracy_matrix", "discover_heldout"]

# Held-out datasets (never trained on) live in <storage root>/<HELDOUT_PREFIX>/<name>/.
HELDOUT_PREFIX = "heldout"


def discover_heldout(settings: Settings) -> list[str]:
    """URIs of the held-out datasets in ``<storage root>/heldout/*`` (folders with a manifest), sorted."""
    storage = open_storage(settings)
    return [
        storage.dataset_uri(f"{HELDOUT_PREFIX}/{name}")
        for name in storage.list_dir(HELDOUT_PREFIX)
        if storage.is_file(f"{HELDOUT_PREFIX}/{name}/manifest.json")
    ]


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
