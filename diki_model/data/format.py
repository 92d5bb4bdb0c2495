"""The dataset format every part of the system ingests.

A dataset is a folder (local, or on any ``pyarrow.fs.FileSystem`` such as S3) holding::

    manifest.json         {"name", "classes", "template", "description", "format_version"}
    train/part-00000.parquet, part-00001.parquet, ...
    test/part-00000.parquet, ...            (optional)

Each Parquet shard has two columns: ``image`` (binary, PNG or JPEG bytes) and ``label``
(int64 in ``[0, len(classes))``). Shards are read in name order; a record's position in that
order is its identity (the fingerprint depends on it, not on where the shard boundaries fall).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "test")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
IMAGE_FORMATS = ("PNG", "JPEG")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_TEMPLATE = "a photo of a {}."
DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_IMAGES = 2_000_000
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
SCHEMA = pa.schema([pa.field("image", pa.binary()), pa.field("label", pa.int64())])


class DatasetError(ValueError):
    """A problem with a dataset, located as precisely as known: file (relative to the dataset root) and row."""

    def __init__(self, reason: str, file: str | None = None, row: int | None = None) -> None:
        self.reason = reason
        self.file = file
        self.row = row
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file or ""
        if self.row is not None:
            where = f"{where} row {self.row}".strip()
        return f"{where}: {self.reason}" if where else self.reason

    def __reduce__(self):  # keeps the error picklable across process boundaries (Ray workers)
        return (DatasetError, (self.reason, self.file, self.row))


def manifest_problems(data: object) -> list[str]:
    """Every problem with a manifest's fields (empty when valid)."""
    if not isinstance(data, dict):
        return [f"manifest must be a JSON object, got {type(data).__name__}"]
    problems = []
    known = {"name", "classes", "template", "description", "format_version"}
    unknown = sorted(set(data) - known)
    if unknown:
        problems.append(f"unknown manifest fields {unknown}")
    name = data.get("name")
    if not isinstance(name, str):
        problems.append("field 'name' is missing or not a string")
    elif not NAME_PATTERN.match(name):
        problems.append(f"name {name!r} must match {NAME_PATTERN.pattern} (lowercase letters, digits, '_', '.', '-')")
    classes = data.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        problems.append("field 'classes' is missing or not a list of strings")
    else:
        if len(classes) < 2:
            problems.append(f"at least 2 classes are needed, got {len(classes)}")
        blank = [i for i, c in enumerate(classes) if not c.strip()]
        if blank:
            problems.append(f"classes at positions {blank} are empty")
        seen: set[str] = set()
        duplicates = sorted({c for c in classes if c in seen or seen.add(c)})
        if duplicates:
            problems.append(f"duplicate classes {duplicates}")
    template = data.get("template", DEFAULT_TEMPLATE)
    if not isinstance(template, str):
        problems.append("field 'template' is not a string")
    elif template.count("{}") != 1 or "{" in template.replace("{}", "") or "}" in template.replace("{}", ""):
        problems.append(f"template {template!r} must contain exactly one '{{}}' and no other braces")
    if not isinstance(data.get("description", ""), str):
        problems.append("field 'description' is not a string")
    version = data.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION or isinstance(version, bool):
        problems.append(f"format_version {version!r} is not supported (this reader knows {FORMAT_VERSION})")
    return problems


@dataclass
class Manifest:
    """What a dataset is: its name, its class names (label i is ``classes[i]``) and its prompt template."""

    name: str
    classes: list[str]
    template: str = DEFAULT_TEMPLATE
    description: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.classes = list(self.classes)
        problems = manifest_problems(asdict(self))
        if problems:
            raise DatasetError("; ".join(problems), file=MANIFEST_FILE)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def prompts(self) -> list[str]:
        """One text prompt per class, in label order."""
        return [self.template.format(c) for c in self.classes]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"

    def canonical_json(self) -> str:
        """The fields that define the task (not its name or description), in a byte-stable form."""
        content = {"classes": self.classes, "template": self.template, "format_version": self.format_version}
        return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetError(f"not valid JSON ({err})", file=MANIFEST_FILE) from err
        problems = manifest_problems(data)
        if problems:
            raise DatasetError("; ".join(problems), file=MANIFEST_FILE)
        return cls(**data)


@dataclass
class DatasetReport:
    """Everything found wrong with a dataset (``errors``), and what it holds."""

    path: str
    errors: list[DatasetError] = field(default_factory=list)
    num_train: int = 0
    num_test: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    name: str | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_markdown(self, max_errors: int = 200) -> str:
        title = self.name or self.path
        status = "valid" if self.ok else f"{len(self.errors)} problem(s)"
        lines = [f"# Dataset `{title}`: {status}", "", f"- location: `{self.path}`"]
        lines += [f"- train images: {self.num_train}", f"- test images: {self.num_test}"]
        if self.errors:
            lines += ["", "## Problems", "", "| file | row | problem |", "|---|---|---|"]
            for err in self.errors[:max_errors]:
                row = "" if err.row is None else str(err.row)
                reason = err.reason.replace("|", "\\|").replace("\n", " ")
                lines.append(f"| {err.file or ''} | {row} | {reason} |")
            if len(self.errors) > max_errors:
                lines.append(f"| | | ... and {len(self.errors) - max_errors} more |")
        if self.class_counts:
            lines += ["", "## Train images per class", "", "| label | class | images |", "|---|---|---|"]
            for i, (name, count) in enumerate(self.class_counts.items()):
                lines.append(f"| {i} | {name} | {count} |")
        return "\n".join(lines) + "\n"


# --- storage ---------------------------------------------------------------------------------


def resolve(path: str | Path, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path within it: URIs (``s3://...``) resolve themselves, plain paths are local."""
    path = str(path)
    if filesystem is not None:
        return filesystem, path.rstrip("/") or "/"
    if "://" in path:
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs, inner.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(path).expanduser().absolute())


def _exists(fs: pafs.FileSystem, path: str, kind: pafs.FileType) -> bool:
    return fs.get_file_info(path).type == kind


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def read_manifest(path: str | Path, filesystem: pafs.FileSystem | None = None) -> Manifest:
    fs, root = resolve(path, filesystem)
    manifest_path = f"{root}/{MANIFEST_FILE}"
    if not _exists(fs, manifest_path, pafs.FileType.File):
        raise DatasetError(f"not found in {root}", file=MANIFEST_FILE)
    return Manifest.from_json(_read_bytes(fs, manifest_path))


def list_shards(path: str | Path, split: str, filesystem: pafs.FileSystem | None = None) -> list[str]:
    """The split's Parquet shards, as paths relative to the dataset root (``train/part-00000.parquet``), in order."""
    _check_split(split)
    fs, root = resolve(path, filesystem)
    split_dir = f"{root}/{split}"
    if not _exists(fs, split_dir, pafs.FileType.Directory):
        return []
    infos = fs.get_file_info(pafs.FileSelector(split_dir, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))
    return [f"{split}/{n}" for n in names]


def _shard_relpath(split: str, shard: str) -> str:
    name = shard.split("/")[-1]
    if shard not in (name, f"{split}/{name}") or not name.endswith(".parquet") or name.startswith("."):
        raise ValueError(f"shard {shard!r} is not a Parquet file of split {split!r}")
    return f"{split}/{name}"


def _schema_problems(schema: pa.Schema) -> list[str]:
    problems = []
    names = schema.names
    if "image" not in names:
        problems.append(f"missing column 'image' (columns: {names})")
    elif not (pa.types.is_binary(schema.field("image").type) or pa.types.is_large_binary(schema.field("image").type)):
        problems.append(f"column 'image' must be binary, got {schema.field('image').type}")
    if "label" not in names:
        problems.append(f"missing column 'label' (columns: {names})")
    elif not pa.types.is_integer(schema.field("label").type):
        problems.append(f"column 'label' must be an integer type (int64), got {schema.field('label').type}")
    return problems


def _open_shard(fs: pafs.FileSystem, root: str, relpath: str) -> pq.ParquetFile:
    try:
        pfile = pq.ParquetFile(fs.open_input_file(f"{root}/{relpath}"))
    except FileNotFoundError as err:
        raise DatasetError("shard not found", file=relpath) from err
    except (pa.ArrowException, OSError) as err:
        raise DatasetError(f"unreadable Parquet file ({err})", file=relpath) from err
    problems = _schema_problems(pfile.schema_arrow)
    if problems:
        raise DatasetError("; ".join(problems), file=relpath)
    return pfile


def _batch_records(batch: pa.RecordBatch, relpath: str, first_row: int) -> tuple[list[bytes], np.ndarray]:
    images_col, labels_col = batch.column("image"), batch.column("label")
    if images_col.null_count or labels_col.null_count:
        images_null = np.asarray(images_col.is_null())
        labels_null = np.asarray(labels_col.is_null())
        bad = int(np.flatnonzero(images_null | labels_null)[0])
        what = "image" if images_null[bad] else "label"
        raise DatasetError(f"{what} is null", file=relpath, row=first_row + bad)
    return images_col.to_pylist(), labels_col.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


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


# --- images ----------------------------------------------------------------------------------


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode PNG or JPEG bytes into an RGB image, checking the pixel count before decoding the pixels."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DatasetError(f"image must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise DatasetError("image is empty (0 bytes)")
    with warnings.catch_warnings():
        # the pixel limit is checked here, against max_pixels, not PIL's global one
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:
            raise DatasetError(f"image too large ({err})") from err
        except (OSError, ValueError, SyntaxError) as err:
            raise DatasetError("not a PNG or JPEG image (cannot identify the image data)") from err
        if img.format not in IMAGE_FORMATS:
            raise DatasetError(f"unsupported image format {img.format}: only PNG and JPEG are accepted")
        width, height = img.size
        if width < 1 or height < 1:
            raise DatasetError(f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise DatasetError(f"image has {width}x{height} = {width * height} pixels, more than {max_pixels}")
        try:
            img.load()
        except Image.DecompressionBombError as err:
            raise DatasetError(f"image too large ({err})") from err
        except (OSError, ValueError, SyntaxError) as err:
            raise DatasetError(f"{img.format} image is truncated or corrupt ({err})") from err
    return img if img.mode == "RGB" else img.convert("RGB")


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


# --- writing ---------------------------------------------------------------------------------


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


# --- checking and identity -------------------------------------------------------------------


def _validate_split(
    report: DatasetReport,
    fs: pafs.FileSystem,
    root: str,
    split: str,
    num_classes: int | None,
    counts: np.ndarray | None,
    max_image_bytes: int,
    check_images: bool,
) -> int:
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
                    elif len(image) > max_image_bytes:
                        report.errors.append(
                            DatasetError(f"image is {len(image)} bytes, more than {max_image_bytes}", relpath, r)
                        )
                    elif check_images:
                        try:
                            decode_image(image)
                        except DatasetError as err:
                            report.errors.append(DatasetError(err.reason, relpath, r))
                row += len(labels)
        except (pa.ArrowException, OSError) as err:
            report.errors.append(DatasetError(f"unreadable Parquet data near row {row} ({err})", relpath))
        total += row
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
    """Check a whole dataset and report every problem found (not just the first)."""
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

    if not list_shards(root, "train", fs):
        report.errors.append(DatasetError("no Parquet shards (train/part-*.parquet)", "train/"))
    report.num_train = _validate_split(report, fs, root, "train", num_classes, counts, max_image_bytes, check_images)
    report.num_test = _validate_split(report, fs, root, "test", num_classes, None, max_image_bytes, check_images)

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
    return report


def dataset_fingerprint(path: str | Path, filesystem: pafs.FileSystem | None = None) -> str:
    """sha256 over the manifest's content fields and every record (image bytes, label) in order.

    Independent of the folder's name or location and of how records are split into shards; the
    manifest's ``name`` and ``description`` are labels, not content, and are left out.
    """
    fs, root = resolve(path, filesystem)
    manifest = read_manifest(root, fs)
    h = hashlib.sha256(b"diki-dataset-v1\0")
    h.update(manifest.canonical_json().encode())
    for split in SPLITS:
        h.update(b"\0split:" + split.encode() + b"\0")
        count = 0
        for images, labels in iter_records(root, split, fs) if list_shards(root, split, fs) else ():
            for image, label in zip(images, labels.tolist(), strict=True):
                h.update(len(image).to_bytes(8, "little"))
                h.update(image)
                h.update(int(label).to_bytes(8, "little", signed=True))
            count += len(images)
        h.update(count.to_bytes(8, "little"))
    return h.hexdigest()


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
