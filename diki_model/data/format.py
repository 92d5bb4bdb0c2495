"""The dataset format every part of the system ingests: its manifest, its files, and how to find them.

A dataset is a folder (local, or on any ``pyarrow.fs.FileSystem`` such as S3) holding::

    manifest.json         {"name", "classes", "template", "description", "format_version"}
    train/part-00000.parquet, part-00001.parquet, ...
    test/part-00000.parquet, ...            (optional)

Each Parquet shard has two columns: ``image`` (binary, PNG or JPEG bytes) and ``label``
(int64 in ``[0, len(classes))``). Shards are read in name order; a record's position in that
order is its identity (the fingerprint depends on it, not on where the shard boundaries fall).

Reading lives in :mod:`.reading`, writing in :mod:`.writing`, checking and the fingerprint in
:mod:`.validation`, image decoding in :mod:`.images`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "test")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
IMAGE_FORMATS = ("PNG", "JPEG")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_TEMPLATE = "a photo of a {}."
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
    fingerprint: str | None = None  # the dataset's identity (``dataset_fingerprint``), set when it is valid
    images_decoded: int = 0  # images decoded by the check (each at most once)

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


# --- locating files ---------------------------------------------------------------------------------


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
