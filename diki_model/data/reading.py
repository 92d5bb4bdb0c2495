"""Reading datasets: streaming records, decoding their images, and loading small splits as tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
from PIL import Image

from diki_model.data.format import (
    IMAGE_FORMATS,
    DatasetError,
    _batch_records,
    _check_split,
    _open_shard,
    _shard_relpath,
    list_shards,
    read_manifest,
    resolve,
)
from diki_model.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_rgb

__all__ = ["decode_image", "iter_records", "load_split_tensors"]


def iter_records(
    path: str | Path,
    split: str,
    filesystem: pafs.FileSystem | None = None,
    shards: list[str] | None = None,
    batch_rows: int = 512,
) -> Iterator[tuple[list[bytes], np.ndarray]]:
    """Stream ``(image bytes, int64 labels)`` batches of a split, shard by shard (all shards, or just ``shards``).

    Labels are checked against the manifest's classes; a bad record raises ``DatasetError`` with its file and row.
    """
    _check_split(split)
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    fs, root = resolve(path, filesystem)
    num_classes = read_manifest(root, fs).num_classes
    relpaths = list_shards(root, split, fs) if shards is None else [_shard_relpath(split, s) for s in shards]
    if shards is None and not relpaths and split == "train":
        raise DatasetError("no Parquet shards", file="train/")
    for relpath in relpaths:
        pfile = _open_shard(fs, root, relpath)
        row = 0
        try:
            for batch in pfile.iter_batches(batch_size=batch_rows, columns=["image", "label"]):
                images, labels = _batch_records(batch, relpath, row)
                bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
                if bad.size:
                    i = int(bad[0])
                    raise DatasetError(f"label {labels[i]} out of range [0, {num_classes})", file=relpath, row=row + i)
                yield images, labels
                row += len(labels)
        except (pa.ArrowException, OSError) as err:
            raise DatasetError(f"unreadable Parquet data near row {row} ({err})", file=relpath) from err


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a dataset record's PNG or JPEG bytes into an RGB image (``DatasetError`` when it cannot be used)."""
    try:
        return decode_rgb(data, formats=IMAGE_FORMATS, max_pixels=max_pixels)
    except ImageDecodeError as err:
        raise DatasetError(err.message) from err


def load_split_tensors(
    path: str | Path,
    split: str,
    preprocess: Callable[[Image.Image], torch.Tensor],
    filesystem: pafs.FileSystem | None = None,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split (or its first ``limit`` records) as ``(images (N, ...), labels (N,) int64)``, for small datasets."""
    fs, root = resolve(path, filesystem)
    if not list_shards(root, split, fs):
        raise DatasetError(f"split {split!r} has no Parquet shards", file=f"{split}/")
    tensors: list[torch.Tensor] = []
    labels_out: list[np.ndarray] = []
    for relpath in list_shards(root, split, fs):
        row = 0
        for images, labels in iter_records(root, split, fs, shards=[relpath]):
            if limit is not None:
                images, labels = images[: limit - len(tensors)], labels[: limit - len(tensors)]
            for i, image in enumerate(images):
                try:
                    tensors.append(preprocess(decode_image(image)))
                except DatasetError as err:
                    raise DatasetError(err.reason, file=relpath, row=row + i) from err
            labels_out.append(labels)
            row += len(images)
            if limit is not None and len(tensors) >= limit:
                break
        if limit is not None and len(tensors) >= limit:
            break
    if not tensors:
        raise DatasetError(f"split {split!r} is empty", file=f"{split}/")
    return torch.stack(tensors), torch.from_numpy(np.concatenate(labels_out).astype(np.int64))
