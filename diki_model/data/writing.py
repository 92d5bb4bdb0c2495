"""Writing datasets: records to Parquet shards plus a manifest, and ImageFolder trees converted to the format."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from diki_model.data.format import (
    DEFAULT_TEMPLATE,
    IMAGE_SUFFIXES,
    MANIFEST_FILE,
    SCHEMA,
    DatasetError,
    Manifest,
    _exists,
    resolve,
)
from diki_model.data.images import DEFAULT_MAX_PIXELS
from diki_model.data.reading import decode_image

__all__ = ["convert_image_folder", "encode_png", "write_dataset"]


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _write_split(
    fs: pafs.FileSystem, root: str, split: str, records: Iterable[tuple[bytes, int]], num_classes: int, shard_rows: int
) -> int:
    split_dir = f"{root}/{split}"
    if _exists(fs, split_dir, pafs.FileType.Directory):
        fs.delete_dir_contents(split_dir)  # a rewrite must not leave stale shards behind
    else:
        fs.create_dir(split_dir, recursive=True)
    images: list[bytes] = []
    labels: list[int] = []
    shard = total = 0

    def flush() -> None:
        nonlocal shard, images, labels
        table = pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64())}, SCHEMA)
        pq.write_table(table, f"{split_dir}/part-{shard:05d}.parquet", filesystem=fs, compression="zstd")
        shard += 1
        images, labels = [], []

    for image, label in records:
        relpath, row = f"{split}/part-{shard:05d}.parquet", len(images)
        if not isinstance(image, bytes | bytearray):
            raise DatasetError(f"image must be bytes, got {type(image).__name__}", file=relpath, row=row)
        if isinstance(label, bool) or not isinstance(label, int | np.integer):
            raise DatasetError(f"label must be an int, got {type(label).__name__}", file=relpath, row=row)
        if not 0 <= int(label) < num_classes:
            raise DatasetError(f"label {label} out of range [0, {num_classes})", file=relpath, row=row)
        images.append(bytes(image))
        labels.append(int(label))
        total += 1
        if len(images) >= shard_rows:
            flush()
    if images:
        flush()
    return total


def write_dataset(
    path: str | Path,
    manifest: Manifest,
    train: Iterable[tuple[bytes, int]],
    test: Iterable[tuple[bytes, int]] | None = None,
    *,
    filesystem: pafs.FileSystem | None = None,
    shard_rows: int = 2048,
) -> None:
    """Write a dataset: the shards first, the manifest last (a folder with a manifest is complete)."""
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    if not isinstance(manifest, Manifest):
        raise TypeError(f"manifest must be a Manifest, got {type(manifest).__name__}")
    fs, root = resolve(path, filesystem)
    fs.create_dir(root, recursive=True)
    manifest_path = f"{root}/{MANIFEST_FILE}"
    if _exists(fs, manifest_path, pafs.FileType.File):
        fs.delete_file(manifest_path)
    if _write_split(fs, root, "train", train, manifest.num_classes, shard_rows) == 0:
        raise DatasetError("no training records", file="train/")
    if test is not None:
        _write_split(fs, root, "test", test, manifest.num_classes, shard_rows)
    elif _exists(fs, f"{root}/test", pafs.FileType.Directory):
        fs.delete_dir(f"{root}/test")
    with fs.open_output_stream(manifest_path) as f:
        f.write(manifest.to_json().encode())


def convert_image_folder(
    src: str | Path,
    dst: str | Path,
    name: str,
    template: str = DEFAULT_TEMPLATE,
    *,
    description: str = "",
    filesystem: pafs.FileSystem | None = None,
    shard_rows: int = 2048,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Manifest:
    """Convert a local ImageFolder tree (``train/<class>/*.png|jpg|jpeg``, optional ``test/<class>/...``).

    Labels follow the sorted folder names of ``train/``; class names are the folder names with
    ``_`` read as a space. Image bytes are stored as they are, after checking that each decodes.
    """
    src = Path(src)
    train_dir = src / "train"
    if not train_dir.is_dir():
        raise DatasetError(f"no train/ folder in {src}", file="train/")
    folders = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    manifest = Manifest(name=name, classes=[f.replace("_", " ") for f in folders], template=template,
                        description=description)  # fmt: skip
    index = {f: i for i, f in enumerate(folders)}
    test_dir = src / "test"
    if test_dir.is_dir():
        unknown = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in index)
        if unknown:
            raise DatasetError(f"test classes {unknown} have no train/ folder", file="test/")

    def records(split_dir: Path) -> Iterator[tuple[bytes, int]]:
        for folder in folders:
            class_dir = split_dir / folder
            if not class_dir.is_dir():
                continue
            for file in sorted(class_dir.iterdir()):
                if not file.is_file() or file.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                data = file.read_bytes()
                try:
                    decode_image(data, max_pixels)
                except DatasetError as err:
                    raise DatasetError(err.reason, file=str(file.relative_to(src))) from err
                yield data, index[folder]

    write_dataset(
        dst,
        manifest,
        records(train_dir),
        records(test_dir) if test_dir.is_dir() else None,
        filesystem=filesystem,
        shard_rows=shard_rows,
    )
    return manifest
