"""Checking a dataset and naming it: one pass over every record yields the report and the fingerprint.

A drop is read once: :func:`validate_dataset` opens each shard once, decodes each image at most
once, and hashes each record as it goes, so a valid dataset's report carries its fingerprint
(equal to :func:`dataset_fingerprint`) and nothing downstream needs to read the data again to
trust it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from diki_model.data.format import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGES,
    IMAGE_FORMATS,
    MANIFEST_FILE,
    SPLITS,
    DatasetError,
    DatasetReport,
    Manifest,
    _exists,
    _open_shard,
    _read_bytes,
    list_shards,
    manifest_problems,
    read_manifest,
    resolve,
)
from diki_model.data.images import ImageDecodeError, decode_rgb
from diki_model.data.reading import iter_records

__all__ = ["dataset_fingerprint", "validate_dataset"]

_FINGERPRINT_SALT = b"diki-dataset-v1\0"


def _hash_record(h: hashlib._Hash, image: bytes, label: int) -> None:
    h.update(len(image).to_bytes(8, "little"))
    h.update(image)
    h.update(int(label).to_bytes(8, "little", signed=True))


def _validate_split(
    report: DatasetReport,
    fs: pafs.FileSystem,
    root: str,
    split: str,
    num_classes: int | None,
    counts: np.ndarray | None,
    max_image_bytes: int,
    check_images: bool,
    h: hashlib._Hash,
) -> int:
    h.update(b"\0split:" + split.encode() + b"\0")
    total = 0
    for relpath in list_shards(root, split, fs):
        try:
            pfile = _open_shard(fs, root, relpath)
        except DatasetError as err:
            report.errors.append(err)
            continue
        row = 0
        try:
            for batch in pfile.iter_batches(batch_size=512, columns=["image", "label"]):
                images = batch.column("image").to_pylist()
                labels = batch.column("label").to_pylist()
                for offset, (image, label) in enumerate(zip(images, labels, strict=True)):
                    r = row + offset
                    if label is None:
                        report.errors.append(DatasetError("label is null", relpath, r))
                    elif num_classes is not None and not 0 <= label < num_classes:
                        report.errors.append(DatasetError(f"label {label} out of range [0, {num_classes})", relpath, r))
                    elif counts is not None:
                        counts[label] += 1
                    if image is None:
                        report.errors.append(DatasetError("image is null", relpath, r))
                        continue
                    if label is not None:
                        _hash_record(h, image, label)
                    if len(image) > max_image_bytes:
                        report.errors.append(
                            DatasetError(f"image is {len(image)} bytes, more than {max_image_bytes}", relpath, r)
                        )
                    elif check_images:
                        report.images_decoded += 1
                        try:
                            decode_rgb(image, formats=IMAGE_FORMATS)
                        except ImageDecodeError as err:
                            report.errors.append(DatasetError(err.message, relpath, r))
                row += len(labels)
        except (pa.ArrowException, OSError) as err:
            report.errors.append(DatasetError(f"unreadable Parquet data near row {row} ({err})", relpath))
        total += row
    h.update(total.to_bytes(8, "little"))
    return total


def validate_dataset(
    path: str | Path,
    filesystem: pafs.FileSystem | None = None,
    *,
    min_images_per_class: int = 1,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    check_images: bool = True,
) -> DatasetReport:
    """Check a whole dataset in one pass and report every problem found (not just the first).

    A valid dataset's report carries its fingerprint (``report.fingerprint``), computed in the same
    pass; an invalid one has none.
    """
    fs, root = resolve(path, filesystem)
    report = DatasetReport(path=str(path))
    manifest: Manifest | None = None
    manifest_path = f"{root}/{MANIFEST_FILE}"
    if not _exists(fs, manifest_path, pafs.FileType.File):
        report.errors.append(DatasetError("missing: every dataset needs a manifest.json", MANIFEST_FILE))
    else:
        try:
            data = json.loads(_read_bytes(fs, manifest_path))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            report.errors.append(DatasetError(f"not valid JSON ({err})", MANIFEST_FILE))
        else:
            problems = manifest_problems(data)
            report.errors.extend(DatasetError(p, MANIFEST_FILE) for p in problems)
            if not problems:
                manifest = Manifest(**data)
                report.name = manifest.name
    num_classes = manifest.num_classes if manifest else None
    counts = np.zeros(num_classes, dtype=np.int64) if num_classes else None

    h = hashlib.sha256(_FINGERPRINT_SALT)
    h.update(manifest.canonical_json().encode() if manifest else b"")
    if not list_shards(root, "train", fs):
        report.errors.append(DatasetError("no Parquet shards (train/part-*.parquet)", "train/"))
    report.num_train = _validate_split(report, fs, root, "train", num_classes, counts, max_image_bytes, check_images, h)
    report.num_test = _validate_split(report, fs, root, "test", num_classes, None, max_image_bytes, check_images, h)

    if manifest is not None and counts is not None:
        report.class_counts = {c: int(n) for c, n in zip(manifest.classes, counts, strict=True)}
        for label, (cls, n) in enumerate(report.class_counts.items()):
            if n < min_images_per_class:
                report.errors.append(
                    DatasetError(f"class {label} ({cls!r}) has {n} training images, fewer than {min_images_per_class}",
                                 "train/")
                )  # fmt: skip
    if report.num_train + report.num_test > max_images:
        report.errors.append(
            DatasetError(f"{report.num_train + report.num_test} images, more than the limit of {max_images}")
        )
    if report.ok:
        report.fingerprint = h.hexdigest()
    return report


def dataset_fingerprint(path: str | Path, filesystem: pafs.FileSystem | None = None) -> str:
    """sha256 over the manifest's content fields and every record (image bytes, label) in order.

    Independent of the folder's name or location and of how records are split into shards; the
    manifest's ``name`` and ``description`` are labels, not content, and are left out. Reads the
    records without decoding images; a valid ``validate_dataset`` report carries the same value.
    """
    fs, root = resolve(path, filesystem)
    manifest = read_manifest(root, fs)
    h = hashlib.sha256(_FINGERPRINT_SALT)
    h.update(manifest.canonical_json().encode())
    for split in SPLITS:
        h.update(b"\0split:" + split.encode() + b"\0")
        count = 0
        for images, labels in iter_records(root, split, fs) if list_shards(root, split, fs) else ():
            for image, label in zip(images, labels.tolist(), strict=True):
                _hash_record(h, image, label)
            count += len(images)
        h.update(count.to_bytes(8, "little"))
    return h.hexdigest()
