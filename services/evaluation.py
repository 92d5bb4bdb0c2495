"""Evaluation of a bundle: the accuracy matrix (:mod:`services.accuracy`) from test splits in storage.

DIKI never changes a task's parameters after learning it, so the model after step ``t`` is exactly
the bundle's first ``t`` tasks: every row is computed from the one bundle, loading tasks one by one
into a single backbone. Cells already known from the previous version's matrix (same row, same
dataset fingerprint) are reused, so a new step costs one new row and one new column.

The frozen pass of a test set never changes for a given backbone, so each test set's frozen
features are computed once per evaluation (not once per row) and kept in storage under
``<artifacts>/feature-cache/<backbone fingerprint>/<dataset fingerprint>-<limit>`` (safetensors +
JSON, never pickles), keyed by both fingerprints; the next version's evaluation loads them and runs
only the gated pass. A cache entry that is corrupted or does not match (fingerprints, image count,
labels, feature width, checksum) is ignored and rebuilt.

Only ``diki_model``'s public API does the model work (``load_task``, ``evaluate``,
``frozen_features``); this module finds the data and keeps the bookkeeping.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from diki_model import (
    DikiCLIP,
    DikiConfig,
    evaluate,
    frozen_features,
    load_task,
    read_bundle_manifest,
    tensor_batches,
)
from diki_model.data import DatasetError, dataset_fingerprint, list_shards, load_split_tensors, read_manifest
from services.accuracy import ZERO_SHOT_ROW, AccuracyMatrix, EvalColumn
from services.backbone import create_model
from services.settings import Settings
from services.storage import Storage, dataset_location, open_storage

__all__ = ["FEATURE_CACHE_DIR", "HELDOUT_PREFIX", "FeatureCache", "build_accuracy_matrix", "discover_heldout"]

log = logging.getLogger(__name__)

# Held-out datasets (never trained on) live in <storage root>/<HELDOUT_PREFIX>/<name>/.
HELDOUT_PREFIX = "heldout"
# Frozen features of test sets live in <storage root>/<artifacts prefix>/<FEATURE_CACHE_DIR>/.
FEATURE_CACHE_DIR: Final = "feature-cache"
FEATURE_CACHE_FORMAT: Final = "diki-frozen-features"
FEATURE_CACHE_VERSION: Final = 1
EVAL_BATCH: Final = 256  # one batch size for the frozen pass and the gated pass


class FeatureCache:
    """Frozen features of test sets in storage, keyed by backbone fingerprint and dataset fingerprint.

    An entry is two files: ``<key>.safetensors`` (``features`` (N, D) float32, ``labels`` (N,) int64)
    and ``<key>.json`` (format, both fingerprints, the image limit, N, D and the sha256 of the
    safetensors file), written in that order so the JSON commits the entry. ``load`` returns None
    for a missing entry and for one that is corrupted or does not match what is asked; ``store``
    overwrites it. Failures to write are logged, never raised: the cache only saves time.
    """

    def __init__(self, storage: Storage, prefix: str) -> None:
        self.storage, self.prefix = storage, prefix.strip("/")

    @classmethod
    def of(cls, settings: Settings) -> FeatureCache:
        return cls(open_storage(settings), f"{settings.storage.artifacts_prefix}/{FEATURE_CACHE_DIR}")

    def key(self, backbone_fp: str, dataset_fp: str, limit: int | None) -> str:
        for name, fp in (("backbone", backbone_fp), ("dataset", dataset_fp)):
            if not fp or not all(c.isalnum() or c in "-_" for c in fp):
                raise ValueError(f"{name} fingerprint {fp!r} cannot key the feature cache")
        return f"{self.prefix}/{backbone_fp}/{dataset_fp}-{'all' if limit is None else int(limit)}"

    def load(self, backbone_fp: str, dataset_fp: str, limit: int | None, labels: torch.Tensor) -> torch.Tensor | None:
        """The cached features of these test images (N, D), or None (missing, corrupted or mismatched)."""
        key = self.key(backbone_fp, dataset_fp, limit)
        try:
            meta = json.loads(self.storage.read_bytes(f"{key}.json"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("feature cache %s: unreadable entry, rebuilding (%s)", key, exc)
            return None
        try:
            expected = {
                "format": FEATURE_CACHE_FORMAT,
                "version": FEATURE_CACHE_VERSION,
                "backbone_fingerprint": backbone_fp,
                "dataset_fingerprint": dataset_fp,
                "limit": limit,
                "count": int(labels.shape[0]),
            }
            wrong = {k: meta.get(k) for k, v in expected.items() if meta.get(k) != v}
            if wrong:
                raise ValueError(f"does not match: {wrong}")
            data = self.storage.read_bytes(f"{key}.safetensors")
            if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
                raise ValueError("checksum mismatch")
            tensors = load_safetensors(data)
            feats, cached_labels = tensors["features"], tensors["labels"]
            if feats.dtype != torch.float32 or tuple(feats.shape) != (expected["count"], int(meta["dim"])):
                raise ValueError(f"features of shape {tuple(feats.shape)} {feats.dtype}")
            if not torch.equal(cached_labels, labels.to(torch.int64).cpu()):
                raise ValueError("labels differ")
        except Exception as exc:  # noqa: BLE001 - any bad entry is rebuilt
            log.warning("feature cache %s: ignored, rebuilding (%s)", key, exc)
            return None
        return feats

    def store(
        self, backbone_fp: str, dataset_fp: str, limit: int | None, features: torch.Tensor, labels: torch.Tensor
    ) -> None:
        key = self.key(backbone_fp, dataset_fp, limit)
        feats = features.detach().to("cpu", torch.float32).contiguous()
        data = save_safetensors({"features": feats, "labels": labels.detach().to("cpu", torch.int64).contiguous()})
        meta = {
            "format": FEATURE_CACHE_FORMAT,
            "version": FEATURE_CACHE_VERSION,
            "backbone_fingerprint": backbone_fp,
            "dataset_fingerprint": dataset_fp,
            "limit": limit,
            "count": int(feats.shape[0]),
            "dim": int(feats.shape[1]),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        try:
            self.storage.write_bytes(f"{key}.safetensors", data)
            self.storage.write_bytes(f"{key}.json", json.dumps(meta, indent=1, sort_keys=True).encode("utf-8"))
        except OSError as exc:
            log.warning("feature cache %s: not written (%s)", key, exc)


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
    features: torch.Tensor | None = None  # frozen features, computed or loaded once


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
    feature_cache: FeatureCache | bool = True,
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
        feature_cache: where test sets' frozen features are kept between evaluations (True: the
            settings' storage; False: not kept, each set's frozen pass still runs once).

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
    cache = FeatureCache.of(settings) if feature_cache is True else (feature_cache or None)
    backbone_fp = model.backbone_info.fingerprint
    for r in range(len(rows)):
        if r > 0:
            load_task(model, bundle_dir / manifest.tasks[r - 1]["path"])
        for j, ts in enumerate(sets):
            if math.isnan(acc[r][j]):
                if ts.features is None:
                    ts.features = _frozen(model, ts, cache, backbone_fp, limit)
                res = evaluate(
                    model,
                    ts.images,
                    ts.labels,
                    ts.classes,
                    ts.template,
                    batch_size=EVAL_BATCH,
                    frozen_features=ts.features,
                )
                acc[r][j] = float(res.accuracy)
    return AccuracyMatrix(
        rows=rows,
        columns=[ts.column for ts in sets],
        acc=acc,
        backbone_fingerprint=model.backbone_info.fingerprint,
    )


def _frozen(
    model: DikiCLIP, ts: _TestSet, cache: FeatureCache | None, backbone_fp: str, limit: int | None
) -> torch.Tensor:
    """The test set's frozen features: from the cache when a valid entry exists, else computed and stored."""
    fp = ts.column.fingerprint
    if cache is not None:
        hit = cache.load(backbone_fp, fp, limit, ts.labels)
        if hit is not None:
            log.info("frozen features of %s (%d images) from the feature cache", ts.column.name, len(hit))
            return hit
    feats, _ = frozen_features(model, tensor_batches(ts.images, ts.labels, EVAL_BATCH, shuffle=False)(0))
    if cache is not None:
        cache.store(backbone_fp, fp, limit, feats, ts.labels)
    return feats
