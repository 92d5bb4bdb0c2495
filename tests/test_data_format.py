"""The dataset format: writing, reading, converting, validating and fingerprinting."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageFile

from diki_model.data import (
    DatasetError,
    DatasetReport,
    ImageDecodeError,
    Manifest,
    convert_image_folder,
    dataset_fingerprint,
    decode_image,
    decode_rgb,
    encode_png,
    header_size,
    iter_records,
    list_shards,
    load_split_tensors,
    read_manifest,
    validate_dataset,
    write_dataset,
)
from tests.test_images import png_header_only


def png(seed: int, size: tuple[int, int] = (8, 8)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png(seed))).save(buf, format="JPEG")
    return buf.getvalue()


MANIFEST = Manifest(name="toy", classes=["cat", "dog", "bird"], template="a photo of a {}.")
TRAIN = [(png(i), i % 3) for i in range(7)]
TEST = [(jpeg(100 + i), (i + 1) % 3) for i in range(4)]


def read_all(path, split, **kwargs) -> list[tuple[bytes, int]]:
    out = []
    for images, labels in iter_records(path, split, **kwargs):
        assert labels.dtype == np.int64
        out.extend(zip(images, labels.tolist(), strict=True))
    return out


@pytest.fixture
def toy(tmp_path) -> Path:
    path = tmp_path / "toy"
    write_dataset(path, MANIFEST, TRAIN, TEST, shard_rows=3)
    return path


def test_round_trip_keeps_records_order_and_shards(toy):
    assert read_manifest(toy) == MANIFEST
    assert list_shards(toy, "train") == [f"train/part-0000{i}.parquet" for i in range(3)]
    assert list_shards(toy, "test") == ["test/part-00000.parquet", "test/part-00001.parquet"]
    assert read_all(toy, "train") == TRAIN
    assert read_all(toy, "test") == TEST
    assert read_all(toy, "train", batch_rows=2) == TRAIN
    # a worker reads only its shards
    assert read_all(toy, "train", shards=["train/part-00001.parquet"]) == TRAIN[3:6]
    assert read_all(toy, "train", shards=["part-00002.parquet"]) == TRAIN[6:]
    schema = pq.read_schema(toy / "train" / "part-00000.parquet")
    assert schema.field("image").type == pa.binary() and schema.field("label").type == pa.int64()


def test_rewrite_leaves_no_stale_shards_and_test_is_optional(toy):
    write_dataset(toy, MANIFEST, TRAIN[:2], shard_rows=1)
    assert list_shards(toy, "train") == ["train/part-00000.parquet", "train/part-00001.parquet"]
    assert list_shards(toy, "test") == []
    assert read_all(toy, "train") == TRAIN[:2]


def test_write_rejects_bad_records_with_location(tmp_path):
    with pytest.raises(DatasetError) as err:
        write_dataset(tmp_path / "d", MANIFEST, [(png(0), 0), (png(1), 3)], shard_rows=10)
    assert (err.value.file, err.value.row) == ("train/part-00000.parquet", 1)
    assert "label 3 out of range [0, 3)" in str(err.value)
    with pytest.raises(DatasetError, match="no training records"):
        write_dataset(tmp_path / "e", MANIFEST, [])


def test_filesystem_argument_is_used(tmp_path):
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    write_dataset("bucket/toy", MANIFEST, TRAIN, TEST, filesystem=fs, shard_rows=4)
    assert (tmp_path / "bucket" / "toy" / "manifest.json").is_file()
    assert read_manifest("bucket/toy", filesystem=fs) == MANIFEST
    assert list_shards("bucket/toy", "train", filesystem=fs) == ["train/part-00000.parquet", "train/part-00001.parquet"]
    assert read_all("bucket/toy", "test", filesystem=fs) == TEST
    assert validate_dataset("bucket/toy", fs).ok
    assert dataset_fingerprint("bucket/toy", fs) == dataset_fingerprint(tmp_path / "bucket" / "toy")


def test_dataset_error_message():
    err = DatasetError("label 12 out of range [0, 10)", file="train/part-00000.parquet", row=17)
    assert str(err) == "train/part-00000.parquet row 17: label 12 out of range [0, 10)"
    assert isinstance(err, ValueError)
    assert str(DatasetError("not valid JSON", file="manifest.json")) == "manifest.json: not valid JSON"


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"name": "Bad Name"}, "must match"),
        ({"name": ""}, "must match"),
        ({"classes": ["only"]}, "at least 2 classes"),
        ({"classes": ["a", "a", "b"]}, "duplicate classes ['a']"),
        ({"classes": ["a", " "]}, "empty"),
        ({"template": "a photo"}, "exactly one '{}'"),
        ({"template": "{} and {}"}, "exactly one '{}'"),
        ({"template": "a {} of {x}"}, "no other braces"),
        ({"format_version": 2}, "format_version 2"),
    ],
)
def test_manifest_validation(fields, problem):
    data = {"name": "ok", "classes": ["a", "b"]} | fields
    with pytest.raises(DatasetError, match="manifest.json") as err:
        Manifest.from_json(json.dumps(data))
    assert problem in err.value.reason


def test_manifest_json_round_trip():
    m = Manifest(name="flowers-2.v1", classes=["rose", "tulip"], template="a photo of a {}, a flower.", description="x")
    assert Manifest.from_json(m.to_json()) == m
    assert m.prompts() == ["a photo of a rose, a flower.", "a photo of a tulip, a flower."]
    with pytest.raises(DatasetError, match="not valid JSON"):
        Manifest.from_json("{")


def test_decode_image_accepts_png_and_jpeg_as_rgb():
    grey = io.BytesIO()
    Image.new("L", (5, 4), 7).save(grey, format="PNG")
    for data in (png(1), jpeg(2), grey.getvalue()):
        img = decode_image(data)
        assert img.mode == "RGB"
    assert decode_image(grey.getvalue()).size == (5, 4)


def test_decode_image_errors():
    with pytest.raises(DatasetError, match="not a PNG or JPEG"):
        decode_image(b"definitely not an image")
    with pytest.raises(DatasetError, match="empty"):
        decode_image(b"")
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        decode_image(png(3, (64, 64))[:300])
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    with pytest.raises(DatasetError, match="unsupported image format GIF"):
        decode_image(gif.getvalue())
    with pytest.raises(DatasetError, match="more than 10"):
        decode_image(png(4), max_pixels=10)


def test_decode_image_checks_pixels_before_decoding():
    # 9000 x 9000 one-bit pixels compress to a few kB but would decode to 81 M pixels
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 200_000
    with pytest.raises(DatasetError, match="81000000 pixels, more than 64000000"):
        decode_image(buf.getvalue())


def _write_table(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def test_validate_reports_every_problem_with_file_and_row(tmp_path):
    root = tmp_path / "bad"
    write_dataset(root, Manifest(name="bad", classes=["a", "b", "c"]), [(png(0), 0), (png(1), 0)], shard_rows=10)
    _write_table(root / "train/part-00001.parquet",
                 pa.table({"image": pa.array([png(2), b"garbage", png(3)], pa.binary()),
                           "label": pa.array([1, 0, 12], pa.int64())}))  # fmt: skip
    _write_table(root / "train/part-00002.parquet",
                 pa.table({"image": pa.array([png(4), None], pa.binary()), "label": pa.array([None, 1], pa.int64())}))  # fmt: skip
    _write_table(root / "train/part-00003.parquet", pa.table({"image": pa.array([png(5)], pa.binary())}))
    _write_table(root / "test/part-00000.parquet",
                 pa.table({"image": pa.array([png(6)], pa.binary()), "label": pa.array([0.5], pa.float64())}))  # fmt: skip
    (root / "train/part-00004.parquet").write_bytes(b"this is not parquet")

    report = validate_dataset(root)
    found = {(e.file, e.row): e.reason for e in report.errors}
    assert not report.ok
    assert "not a PNG or JPEG" in found[("train/part-00001.parquet", 1)]
    assert found[("train/part-00001.parquet", 2)] == "label 12 out of range [0, 3)"
    assert found[("train/part-00002.parquet", 0)] == "label is null"
    assert found[("train/part-00002.parquet", 1)] == "image is null"
    assert "missing column 'label'" in found[("train/part-00003.parquet", None)]
    assert "unreadable Parquet file" in found[("train/part-00004.parquet", None)]
    assert "column 'label' must be an integer type" in found[("test/part-00000.parquet", None)]
    assert "class 2 ('c') has 0 training images" in found[("train/", None)]
    assert len(report.errors) == 8
    assert report.num_train == 2 + 3 + 2
    assert report.class_counts == {"a": 3, "b": 2, "c": 0}
    md = report.to_markdown()
    assert "8 problem(s)" in md and "| train/part-00001.parquet | 2 | label 12 out of range [0, 3) |" in md


def test_validate_manifest_problems_and_limits(tmp_path):
    root = tmp_path / "d"
    write_dataset(root, MANIFEST, TRAIN, shard_rows=100)
    (root / "manifest.json").write_text(json.dumps({"name": "UPPER", "classes": ["x"], "template": "no braces"}))
    reasons = [e.reason for e in validate_dataset(root).errors if e.file == "manifest.json"]
    assert len(reasons) == 3
    assert any("must match" in r for r in reasons) and any("at least 2" in r for r in reasons)

    (root / "manifest.json").unlink()
    report = validate_dataset(root)
    assert [(e.file, "missing" in e.reason) for e in report.errors] == [("manifest.json", True)]
    assert report.num_train == 7

    write_dataset(root, MANIFEST, TRAIN, TEST)
    report = validate_dataset(root, min_images_per_class=3, max_images=10, max_image_bytes=100)
    reasons = [str(e) for e in report.errors]
    assert sum("bytes, more than 100" in r for r in reasons) == 11
    assert any("class 1 ('dog') has 2 training images, fewer than 3" in r for r in reasons)
    assert any("11 images, more than the limit of 10" in r for r in reasons)

    assert validate_dataset(tmp_path / "nowhere").errors[0].file == "manifest.json"


def test_valid_dataset_report(toy):
    report = validate_dataset(toy)
    assert report.ok and report.errors == []
    assert (report.num_train, report.num_test, report.name) == (7, 4, "toy")
    assert report.class_counts == {"cat": 3, "dog": 2, "bird": 2}
    assert "valid" in report.to_markdown()


def test_iter_records_raises_on_out_of_range_label(tmp_path):
    root = tmp_path / "d"
    write_dataset(root, MANIFEST, TRAIN, shard_rows=100)
    _write_table(root / "train/part-00000.parquet",
                 pa.table({"image": pa.array([png(0)] * 3, pa.binary()), "label": pa.array([0, 1, 5], pa.int64())}))  # fmt: skip
    with pytest.raises(DatasetError) as err:
        read_all(root, "train")
    assert str(err.value) == "train/part-00000.parquet row 2: label 5 out of range [0, 3)"


def test_fingerprint_ignores_folder_and_sharding_but_sees_content(tmp_path, toy):
    base = dataset_fingerprint(toy)
    resharded = tmp_path / "another-name"
    write_dataset(resharded, MANIFEST, TRAIN, TEST, shard_rows=5)
    assert list_shards(resharded, "train") != list_shards(toy, "train")
    assert dataset_fingerprint(resharded) == base
    copied = tmp_path / "copy"
    shutil.copytree(toy, copied)
    assert dataset_fingerprint(copied) == base

    changed_label = [*TRAIN[:-1], (TRAIN[-1][0], (TRAIN[-1][1] + 1) % 3)]
    write_dataset(tmp_path / "l", MANIFEST, changed_label, TEST)
    assert dataset_fingerprint(tmp_path / "l") != base
    write_dataset(tmp_path / "i", MANIFEST, [(png(99), 0), *TRAIN[1:]], TEST)
    assert dataset_fingerprint(tmp_path / "i") != base
    write_dataset(tmp_path / "c", Manifest(name="toy", classes=["cat", "dog", "owl"]), TRAIN, TEST)
    assert dataset_fingerprint(tmp_path / "c") != base
    write_dataset(tmp_path / "t", MANIFEST, TRAIN + TEST)  # same records, none in test
    assert dataset_fingerprint(tmp_path / "t") != base


def test_convert_image_folder(tmp_path):
    src = tmp_path / "tree"
    files = {
        "train/cat_dog/1.png": png(1),
        "train/cat_dog/2.JPG": jpeg(2),
        "train/bird/a.jpeg": jpeg(3),
        "train/bird/notes.txt": b"ignored",
        "test/bird/b.png": png(4),
    }
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    manifest = convert_image_folder(src, tmp_path / "out", "pets", template="a photo of a {}, a pet.")
    assert manifest.classes == ["bird", "cat dog"]
    assert read_manifest(tmp_path / "out") == manifest
    assert read_all(tmp_path / "out", "train") == [(jpeg(3), 0), (png(1), 1), (jpeg(2), 1)]
    assert read_all(tmp_path / "out", "test") == [(png(4), 0)]
    assert validate_dataset(tmp_path / "out").ok

    (src / "train/bird/broken.png").write_bytes(png(5)[:40])
    with pytest.raises(DatasetError) as err:
        convert_image_folder(src, tmp_path / "out2", "pets")
    assert err.value.file == "train/bird/broken.png"
    (src / "train/bird/broken.png").unlink()
    (src / "test/fish").mkdir()
    with pytest.raises(DatasetError, match=r"test classes \['fish'\] have no train/ folder"):
        convert_image_folder(src, tmp_path / "out3", "pets")
    with pytest.raises(DatasetError, match="no train/ folder"):
        convert_image_folder(tmp_path / "empty", tmp_path / "out4", "pets")


def test_load_split_tensors(toy):
    def to_tensor(img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).float()

    images, labels = load_split_tensors(toy, "train", to_tensor)
    assert images.shape == (7, 3, 8, 8) and labels.dtype == torch.int64
    assert labels.tolist() == [label for _, label in TRAIN]
    assert torch.equal(images[4], to_tensor(Image.open(io.BytesIO(TRAIN[4][0])).convert("RGB")))
    images, labels = load_split_tensors(toy, "train", to_tensor, limit=4)
    assert images.shape[0] == 4 and labels.tolist() == [0, 1, 2, 0]
    with pytest.raises(DatasetError, match="no Parquet shards"):
        write_dataset(toy, MANIFEST, TRAIN)
        load_split_tensors(toy, "test", to_tensor)


def test_decode_error_in_split_points_at_the_record(tmp_path):
    root = tmp_path / "d"
    write_dataset(root, MANIFEST, [(png(0), 0), (b"\x89PNG\r\n\x1a\n" + zlib.compress(b"x"), 1)], shard_rows=10)
    with pytest.raises(DatasetError) as err:
        load_split_tensors(root, "train", lambda img: torch.zeros(1))
    assert (err.value.file, err.value.row) == ("train/part-00000.parquet", 1)


def _dataset_with_train_labels(root: Path, labels: list[int]) -> Path:
    write_dataset(root, MANIFEST, TRAIN, shard_rows=100)  # three classes: valid labels are 0, 1, 2
    _write_table(root / "train/part-00000.parquet",
                 pa.table({"image": pa.array([png(i) for i in range(len(labels))], pa.binary()),
                           "label": pa.array(labels, pa.int64())}))  # fmt: skip
    return root


def test_reader_refuses_a_label_equal_to_the_number_of_classes(tmp_path):
    root = _dataset_with_train_labels(tmp_path / "d", [0, 2, 3, 1])
    with pytest.raises(DatasetError) as err:
        read_all(root, "train")
    assert (err.value.file, err.value.row) == ("train/part-00000.parquet", 2)
    assert err.value.reason == "label 3 out of range [0, 3)"
    # The edges of the range itself are valid labels.
    edges = _dataset_with_train_labels(tmp_path / "e", [0, 2])
    assert [label for _, label in read_all(edges, "train")] == [0, 2]
    negative = _dataset_with_train_labels(tmp_path / "n", [1, -1])
    with pytest.raises(DatasetError, match=r"row 1: label -1 out of range \[0, 3\)"):
        read_all(negative, "train")


def test_validator_refuses_a_label_equal_to_the_number_of_classes(tmp_path):
    root = _dataset_with_train_labels(tmp_path / "d", [0, 1, 2, 3, 2])
    report = validate_dataset(root)
    assert [(e.file, e.row, e.reason) for e in report.errors] == [
        ("train/part-00000.parquet", 3, "label 3 out of range [0, 3)")
    ]
    assert report.class_counts == {"cat": 1, "dog": 1, "bird": 2}
    assert report.num_train == 5
    edges = validate_dataset(_dataset_with_train_labels(tmp_path / "e", [0, 2, 1]))
    assert edges.ok and edges.class_counts == {"cat": 1, "dog": 1, "bird": 1}
    negative = validate_dataset(_dataset_with_train_labels(tmp_path / "n", [0, 1, 2, -1]))
    assert [(e.row, e.reason) for e in negative.errors] == [(3, "label -1 out of range [0, 3)")]


def test_validator_checks_test_labels_against_the_number_of_classes(tmp_path):
    # The test split keeps no class counts, so a wrong bound there shows only in the report.
    root = _dataset_with_train_labels(tmp_path / "d", [0, 1, 2])
    _write_table(root / "test/part-00000.parquet",
                 pa.table({"image": pa.array([png(7), png(8), png(9)], pa.binary()),
                           "label": pa.array([2, 3, 0], pa.int64())}))  # fmt: skip
    report = validate_dataset(root)
    assert [(e.file, e.row, e.reason) for e in report.errors] == [
        ("test/part-00000.parquet", 1, "label 3 out of range [0, 3)")
    ]
    assert (report.num_train, report.num_test) == (3, 3)


# --- exact errors, their locations, the report and the fingerprint --------------------------------


def spec_fingerprint(manifest: Manifest, splits: dict[str, list[tuple[bytes, int]]]) -> str:
    """The fingerprint as docs/datasets.md defines it, computed here from the records themselves."""
    content = {"classes": manifest.classes, "template": manifest.template, "format_version": 1}
    h = hashlib.sha256(b"diki-dataset-v1\0")
    h.update(json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    for split in ("train", "test"):
        records = splits.get(split, [])
        h.update(b"\0split:" + split.encode() + b"\0")
        for image, label in records:
            h.update(struct.pack("<Q", len(image)) + image + struct.pack("<q", label))
        h.update(struct.pack("<Q", len(records)))
    return h.hexdigest()


def test_fingerprint_follows_the_documented_definition(toy, tmp_path):
    want = spec_fingerprint(MANIFEST, {"train": TRAIN, "test": TEST})
    assert dataset_fingerprint(toy) == want
    report = validate_dataset(toy)
    assert report.ok and report.fingerprint == want
    # No test split, and a manifest with nothing else: every split still counts (0 records).
    write_dataset(tmp_path / "t", MANIFEST, TRAIN)
    assert dataset_fingerprint(tmp_path / "t") == validate_dataset(tmp_path / "t").fingerprint
    assert dataset_fingerprint(tmp_path / "t") == spec_fingerprint(MANIFEST, {"train": TRAIN})
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text(MANIFEST.to_json())
    assert dataset_fingerprint(tmp_path / "m") == spec_fingerprint(MANIFEST, {})
    # An invalid dataset's report carries no fingerprint.
    assert validate_dataset(tmp_path / "m").fingerprint is None


def test_validate_counts_decoded_images_and_checks_the_test_split_too(tmp_path, toy):
    assert validate_dataset(toy).images_decoded == 11
    assert validate_dataset(toy, check_images=False).images_decoded == 0
    # An image of exactly the byte limit is allowed (and decoded); one byte less is not.
    size = len(TRAIN[0][0])
    write_dataset(tmp_path / "one", MANIFEST, [TRAIN[0], (png(1), 1), (png(2), 2)])
    sizes = [len(png(i)) for i in range(3)]
    report = validate_dataset(tmp_path / "one", max_image_bytes=max(sizes))
    assert report.ok and report.images_decoded == 3
    report = validate_dataset(tmp_path / "one", max_image_bytes=size - 1)
    big = [(e.file, e.row, e.reason) for e in report.errors]
    assert ("train/part-00000.parquet", 0, f"image is {size} bytes, more than {size - 1}") in big
    # A corrupt test image is found like a train one.
    write_dataset(tmp_path / "bad", MANIFEST, TRAIN[:3], [(png(5), 0), (png(6, (64, 64))[:300], 1)])
    report = validate_dataset(tmp_path / "bad")
    [(file, row, reason)] = [(e.file, e.row, e.reason) for e in report.errors]
    assert (file, row) == ("test/part-00000.parquet", 1)
    assert reason.startswith("PNG image is truncated or corrupt (")


def test_validate_keeps_checking_the_records_after_a_null_image(tmp_path):
    root = tmp_path / "d"
    write_dataset(root, MANIFEST, TRAIN[:3], shard_rows=10)
    _write_table(root / "train/part-00001.parquet",
                 pa.table({"image": pa.array([None, png(1), png(2)], pa.binary()), "label": pa.array([0, 7, 1], pa.int64())}))  # fmt: skip
    report = validate_dataset(root)
    assert [(e.file, e.row, e.reason) for e in report.errors] == [
        ("train/part-00001.parquet", 0, "image is null"),
        ("train/part-00001.parquet", 1, "label 7 out of range [0, 3)"),
    ]
    assert report.num_train == 6 and report.class_counts == {"cat": 2, "dog": 2, "bird": 1}


def test_validate_limits_and_messages_exactly(tmp_path, toy):
    report = validate_dataset(toy, max_images=11)
    assert report.ok and report.path == str(toy)
    report = validate_dataset(toy, max_images=10)
    assert [(e.file, e.row, e.reason) for e in report.errors] == [(None, None, "11 images, more than the limit of 10")]
    report = validate_dataset(toy, min_images_per_class=3)
    assert [(e.file, e.reason) for e in report.errors] == [
        ("train/", "class 1 ('dog') has 2 training images, fewer than 3"),
        ("train/", "class 2 ('bird') has 2 training images, fewer than 3"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert [(e.file, e.row, e.reason) for e in validate_dataset(empty).errors] == [
        ("manifest.json", None, "missing: every dataset needs a manifest.json"),
        ("train/", None, "no Parquet shards (train/part-*.parquet)"),
    ]
    (empty / "manifest.json").write_text("{nope")
    [err, _] = validate_dataset(empty).errors
    assert err.file == "manifest.json" and err.row is None and err.reason.startswith("not valid JSON (Expecting")


def corrupt_data_pages(path: Path) -> None:
    """Overwrite the middle of a shard's first data page, keeping its footer (schema) readable."""
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))


def test_unreadable_parquet_data_is_located_by_file(tmp_path):
    root = tmp_path / "d"
    write_dataset(root, MANIFEST, TRAIN, shard_rows=4)
    corrupt_data_pages(root / "train/part-00001.parquet")
    with pytest.raises(DatasetError) as err:
        read_all(root, "train")
    assert err.value.file == "train/part-00001.parquet" and err.value.row is None
    assert err.value.reason.startswith("unreadable Parquet data near row 0 (")
    [found] = validate_dataset(root).errors
    assert found.file == "train/part-00001.parquet" and found.row is None
    assert found.reason.startswith("unreadable Parquet data near row 0 (")


def test_read_streams_in_batches_and_locates_errors_in_later_batches(tmp_path, toy):
    batches = list(iter_records(toy, "train", batch_rows=1))
    assert [len(images) for images, _ in batches] == [1] * 7
    assert [len(images) for images, _ in iter_records(toy, "train", batch_rows=2)] == [2, 1, 2, 1, 1]
    with pytest.raises(ValueError, match=r"^batch_rows must be >= 1, got 0$"):
        list(iter_records(toy, "train", batch_rows=0))
    root = _dataset_with_train_labels(tmp_path / "d", [0, 1, 2, 0, 9, 1])
    with pytest.raises(DatasetError) as err:
        read_all(root, "train", batch_rows=2)
    assert (err.value.file, err.value.row, err.value.reason) == (
        "train/part-00000.parquet",
        4,
        "label 9 out of range [0, 3)",
    )


def test_read_locates_null_records(tmp_path):
    root = tmp_path / "d"
    write_dataset(root, MANIFEST, TRAIN[:2], shard_rows=10)
    cases = [
        ([png(0), png(1), None, png(3)], [0, 1, 2, 0], 2, "image is null"),
        ([png(0), png(1), png(2), png(3)], [0, 1, None, 0], 2, "label is null"),
        ([png(0), png(1), None, png(3)], [0, 1, 2, None], 2, "image is null"),
        ([png(0), png(1), png(2), None], [0, 1, None, 1], 2, "label is null"),
        ([png(0), png(1), None, png(3)], [0, 1, None, 1], 2, "image is null"),
    ]
    for images, labels, row, reason in cases:
        _write_table(root / "train/part-00000.parquet",
                     pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64())}))  # fmt: skip
        for batch_rows in (512, 2):
            with pytest.raises(DatasetError) as err:
                read_all(root, "train", batch_rows=batch_rows)
            assert (err.value.file, err.value.row, err.value.reason) == ("train/part-00000.parquet", row, reason)


def test_shards_named_for_a_worker_must_be_parquet_files_of_the_split(toy):
    assert read_all(toy, "test", shards=["test/part-00001.parquet"]) == TEST[3:]
    for shard in ("test/part-00000.parquet", "part-00000.csv", "train/part-00000.csv", ".part-00000.parquet",
                  "train/.part-00000.parquet", "x/train/part-00000.parquet"):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(f"shard {shard!r} is not a Parquet file of split 'train'")):
            list(iter_records(toy, "train", shards=[shard]))


def test_missing_manifest_and_missing_train_shards(tmp_path):
    with pytest.raises(DatasetError) as err:
        read_manifest(tmp_path)
    assert (err.value.file, err.value.reason) == ("manifest.json", f"not found in {tmp_path}")
    (tmp_path / "manifest.json").write_text(MANIFEST.to_json())
    with pytest.raises(DatasetError) as err:
        list(iter_records(tmp_path, "train"))
    assert (err.value.file, err.value.row, err.value.reason) == ("train/", None, "no Parquet shards")
    assert list(iter_records(tmp_path, "test")) == []  # the test split is optional
    with pytest.raises(DatasetError) as err:
        load_split_tensors(tmp_path, "test", lambda img: torch.zeros(1))
    assert (err.value.file, err.value.reason) == ("test/", "split 'test' has no Parquet shards")
    for text, reason in (
        ("{", "not valid JSON ("),
        (json.dumps({"name": "X", "classes": ["a"]}), "name 'X' must match"),
    ):
        (tmp_path / "manifest.json").write_text(text)
        with pytest.raises(DatasetError) as err:
            read_manifest(tmp_path)
        assert err.value.file == "manifest.json" and err.value.reason.startswith(reason)
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "X", "classes": ["a"]}))
    with pytest.raises(DatasetError) as err:
        read_manifest(tmp_path)
    assert err.value.reason == (
        "name 'X' must match ^[a-z0-9][a-z0-9_.-]{0,63}$ (lowercase letters, digits, '_', '.', '-'); "
        "at least 2 classes are needed, got 1"
    )


def test_load_split_tensors_on_another_filesystem_and_its_limits(tmp_path):
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    write_dataset("d", MANIFEST, TRAIN, filesystem=fs, shard_rows=3)
    images, labels = load_split_tensors("d", "train", lambda img: torch.zeros(1), filesystem=fs)
    assert images.shape == (7, 1) and labels.tolist() == [label for _, label in TRAIN]
    # A limit reached at a shard's end reads no further: a broken later shard is never opened.
    (tmp_path / "d" / "train" / "part-00002.parquet").write_bytes(b"broken")
    images, labels = load_split_tensors("d", "train", lambda img: torch.zeros(1), filesystem=fs, limit=6)
    assert labels.tolist() == [label for _, label in TRAIN[:6]]


def test_load_split_tensors_stops_at_the_limit_within_a_shard(tmp_path):
    # 514 records in one shard, a bad label in the second batch of 512: a limit of 512 never reads it.
    root = tmp_path / "d"
    write_dataset(root, MANIFEST, [(TRAIN[0][0], i % 3) for i in range(514)])
    _write_table(root / "train/part-00000.parquet",
                 pa.table({"image": pa.array([TRAIN[0][0]] * 514, pa.binary()),
                           "label": pa.array([0] * 513 + [5], pa.int64())}))  # fmt: skip
    images, labels = load_split_tensors(root, "train", lambda img: torch.zeros(1), limit=512)
    assert images.shape[0] == 512 and labels.tolist() == [0] * 512
    with pytest.raises(DatasetError, match="row 513: label 5 out of range"):
        load_split_tensors(root, "train", lambda img: torch.zeros(1))


def test_load_split_tensors_locates_a_broken_image_in_a_later_batch(tmp_path):
    broken = png(3, (64, 64))[:300]
    records = [(TRAIN[0][0], 0)] * 1100
    root = tmp_path / "d"
    write_dataset(root, MANIFEST, records)
    _write_table(root / "train/part-00000.parquet",
                 pa.table({"image": pa.array([TRAIN[0][0]] * 1050 + [broken] + [TRAIN[0][0]] * 49, pa.binary()),
                           "label": pa.array([0] * 1100, pa.int64())}))  # fmt: skip
    with pytest.raises(DatasetError) as err:
        load_split_tensors(root, "train", lambda img: torch.zeros(1))
    assert (err.value.file, err.value.row) == ("train/part-00000.parquet", 1050)
    with pytest.raises(DatasetError) as direct:
        decode_image(broken)
    assert err.value.reason == direct.value.reason and err.value.reason.startswith("PNG image is truncated or corrupt")


def test_write_rejects_records_of_the_wrong_type_with_their_location(tmp_path):
    cases = [
        ([(png(0), 0), ("not bytes", 1)], 10, ("train/part-00000.parquet", 1, "image must be bytes, got str")),
        ([(png(0), 0), (png(1), True)], 10, ("train/part-00000.parquet", 1, "label must be an int, got bool")),
        ([(png(0), 0), (png(1), 1.0)], 10, ("train/part-00000.parquet", 1, "label must be an int, got float")),
        (
            [(png(0), 0), (png(1), 1), (png(2), 2), (png(3), -1)],
            3,
            ("train/part-00001.parquet", 0, "label -1 out of range [0, 3)"),
        ),
    ]
    for records, shard_rows, where in cases:
        with pytest.raises(DatasetError) as err:
            write_dataset(tmp_path / "d", MANIFEST, records, shard_rows=shard_rows)
        assert (err.value.file, err.value.row, err.value.reason) == where
    with pytest.raises(DatasetError) as err:
        write_dataset(tmp_path / "e", MANIFEST, [])
    assert (err.value.file, err.value.reason) == ("train/", "no training records")
    with pytest.raises(ValueError, match=r"^shard_rows must be >= 1, got 0$"):
        write_dataset(tmp_path / "e", MANIFEST, TRAIN, shard_rows=0)
    with pytest.raises(TypeError, match=r"^manifest must be a Manifest, got dict$"):
        write_dataset(tmp_path / "e", {"name": "toy"}, TRAIN)
    # bytearray images and numpy integer labels are accepted, and stored as bytes and int64.
    write_dataset(tmp_path / "f", MANIFEST, [(bytearray(png(0)), np.int64(2)), (png(1), np.int32(0))])
    assert read_all(tmp_path / "f", "train") == [(png(0), 2), (png(1), 0)]


def test_a_failed_rewrite_leaves_no_manifest(toy):
    # The manifest is what marks a dataset complete: a rewrite removes it first.
    with pytest.raises(DatasetError, match="out of range"):
        write_dataset(toy, MANIFEST, [(png(0), 0), (png(1), 5)])
    assert not (toy / "manifest.json").exists()


def test_written_shards_use_zstd_and_the_default_shard_size(tmp_path):
    write_dataset(tmp_path / "d", MANIFEST, [(TRAIN[0][0], i % 3) for i in range(2049)])
    assert list_shards(tmp_path / "d", "train") == ["train/part-00000.parquet", "train/part-00001.parquet"]
    meta = pq.ParquetFile(tmp_path / "d" / "train" / "part-00000.parquet").metadata
    assert meta.num_rows == 2048 and meta.row_group(0).column(0).compression == "ZSTD"


def test_encode_png_is_plain_zlib_level_6(tmp_path):
    # Built domains are fingerprinted by their bytes: the encoding must not drift.
    img = Image.open(io.BytesIO(png(9, (16, 16)))).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    assert encode_png(img) == buf.getvalue()
    for other in ({"optimize": True, "compress_level": 6}, {"optimize": False, "compress_level": 7}, {}):
        alt = io.BytesIO()
        img.save(alt, format="PNG", **other)
        assert alt.getvalue() != buf.getvalue() or other == {}, other
    assert decode_image(encode_png(img)).tobytes() == img.tobytes()


def test_convert_image_folder_options_and_what_it_skips(tmp_path):
    src = tmp_path / "tree"
    files = {
        "train/bird/0-readme.txt": b"not an image, sorted before the images",
        "train/bird/a.png": png(1),
        "train/cat_dog/b.png": png(2),
        "train/notes.txt": b"a file, not a class",
        "train/.cache/c.png": png(3),
        "test/cat_dog/d.png": png(4),  # no test/bird: the folder is skipped, not the rest
    }
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    manifest = convert_image_folder(src, "out", "pets", "a {} pet.", description="pets!", filesystem=fs, shard_rows=1)
    assert manifest == Manifest(name="pets", classes=["bird", "cat dog"], template="a {} pet.", description="pets!")
    out = tmp_path / "out"
    assert read_manifest(out) == manifest
    assert read_all(out, "train") == [(png(1), 0), (png(2), 1)]
    assert list_shards(out, "train") == ["train/part-00000.parquet", "train/part-00001.parquet"]
    assert read_all(out, "test") == [(png(4), 1)]
    plain = convert_image_folder(src, tmp_path / "plain", "pets")
    assert (plain.template, plain.description) == ("a photo of a {}.", "")
    with pytest.raises(DatasetError) as err:
        convert_image_folder(src, tmp_path / "tiny", "pets", max_pixels=10)
    assert err.value.file == "train/bird/a.png" and err.value.reason == "image has 8x8 = 64 pixels, more than 10"
    shutil.rmtree(src / "test")
    convert_image_folder(src, tmp_path / "notest", "pets")
    assert not (tmp_path / "notest" / "test").exists()
    with pytest.raises(DatasetError) as err:
        convert_image_folder(tmp_path / "nowhere", tmp_path / "x", "pets")
    assert (err.value.file, err.value.reason) == ("train/", f"no train/ folder in {tmp_path / 'nowhere'}")
    (src / "test" / "fish").mkdir(parents=True)
    with pytest.raises(DatasetError) as err:
        convert_image_folder(src, tmp_path / "y", "pets")
    assert (err.value.file, err.value.reason) == ("test/", "test classes ['fish'] have no train/ folder")


def test_report_markdown_exactly():
    report = DatasetReport(path="s3://bucket/incoming/toy", num_train=5, num_test=2)
    assert report.to_markdown() == (
        "# Dataset `s3://bucket/incoming/toy`: valid\n\n- location: `s3://bucket/incoming/toy`\n"
        "- train images: 5\n- test images: 2\n"
    )
    report.name = "toy"
    report.class_counts = {"cat": 3, "dog": 2}
    report.errors = [
        DatasetError("label 12 out of range [0, 2)", "train/part-00000.parquet", 0),
        DatasetError("a | b\nc", None, None),
        DatasetError("third", "train/", None),
    ]
    assert report.to_markdown(max_errors=2) == "\n".join([
        "# Dataset `toy`: 3 problem(s)",
        "",
        "- location: `s3://bucket/incoming/toy`",
        "- train images: 5",
        "- test images: 2",
        "",
        "## Problems",
        "",
        "| file | row | problem |",
        "|---|---|---|",
        "| train/part-00000.parquet | 0 | label 12 out of range [0, 2) |",
        "|  |  | a \\| b c |",
        "| | | ... and 1 more |",
        "",
        "## Train images per class",
        "",
        "| label | class | images |",
        "|---|---|---|",
        "| 0 | cat | 3 |",
        "| 1 | dog | 2 |",
    ]) + "\n"  # fmt: skip
    assert report.to_markdown(max_errors=3).count("\n| ") == 3 + 2 + 2 and "more |" not in report.to_markdown(
        max_errors=3
    )
    assert report.to_markdown() == report.to_markdown(max_errors=200)


def test_report_lists_at_most_200_problems_by_default():
    report = DatasetReport(path="d", errors=[DatasetError(f"problem {i}", "train/", i) for i in range(201)])
    md = report.to_markdown()
    assert "| train/ | 199 | problem 199 |" in md and "problem 200 |" not in md
    assert md.endswith("| | | ... and 1 more |\n")
    assert "more |" not in DatasetReport(path="d", errors=report.errors[:200]).to_markdown()


def test_canonical_manifest_json_keeps_unicode_as_is(tmp_path):
    m = Manifest(name="drinks", classes=["café", "thé"], template="a cup of {}.", description="ignored")
    assert m.canonical_json() == '{"classes":["café","thé"],"format_version":1,"template":"a cup of {}."}'
    records = [(png(0), 0), (png(1), 1)]
    write_dataset(tmp_path / "d", m, records)
    assert dataset_fingerprint(tmp_path / "d") == spec_fingerprint(m, {"train": records})


def test_load_split_tensors_with_a_limit_of_zero_finds_nothing(toy):
    with pytest.raises(DatasetError) as err:
        load_split_tensors(toy, "train", lambda img: torch.zeros(1), limit=0)
    assert (err.value.file, err.value.reason) == ("train/", "split 'train' is empty")


def test_validate_locates_a_problem_in_a_later_batch(tmp_path):
    broken = png(3, (64, 64))[:300]
    root = tmp_path / "d"
    write_dataset(root, MANIFEST, [(TRAIN[0][0], 0)] * 3)
    _write_table(root / "train/part-00000.parquet",
                 pa.table({"image": pa.array([TRAIN[0][0]] * 1050 + [broken] + [TRAIN[0][0]] * 49, pa.binary()),
                           "label": pa.array([i % 3 for i in range(1099)] + [4], pa.int64())}))  # fmt: skip
    report = validate_dataset(root)
    assert [(e.file, e.row) for e in report.errors] == [
        ("train/part-00000.parquet", 1050),
        ("train/part-00000.parquet", 1099),
    ]
    assert report.errors[1].reason == "label 4 out of range [0, 3)" and report.num_train == 1100


# --- the image decoder's conversions and messages -------------------------------------------------


def _encoded(img: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **params)
    return buf.getvalue()


def test_transparent_pixels_are_composited_on_white():
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (40, 0))  # fully transparent
    la.putpixel((1, 0), (40, 255))  # opaque grey
    assert list(decode_rgb(_encoded(la)).getdata()) == [(255, 255, 255), (40, 40, 40)]
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (200, 10, 10, 0))
    rgba.putpixel((1, 0), (200, 10, 10, 255))
    assert list(decode_rgb(_encoded(rgba)).getdata()) == [(255, 255, 255), (200, 10, 10)]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 255, 0, 128, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    assert list(decode_rgb(_encoded(palette)).getdata()) == [(0, 0, 255), (0, 128, 0)]
    # Palette index 0 made transparent (a tRNS chunk): composited on white like an alpha channel.
    assert list(decode_rgb(_encoded(palette, transparency=0)).getdata()) == [(255, 255, 255), (0, 128, 0)]
    rgb = decode_rgb(_encoded(Image.new("RGB", (1, 1), (1, 2, 3))))
    assert rgb.mode == "RGB" and list(rgb.getdata()) == [(1, 2, 3)]


def test_decoder_messages_name_the_accepted_formats():
    for formats, names in (
        (("PNG",), "PNG"),
        (("PNG", "JPEG"), "PNG or JPEG"),
        (("PNG", "JPEG", "GIF"), "PNG, JPEG or GIF"),
    ):
        with pytest.raises(ImageDecodeError) as err:
            decode_rgb(b"definitely not an image", formats=formats)
        assert (err.value.code, err.value.message) == (
            "not_an_image",
            f"not a {names} image (cannot identify the image data)",
        )
    gif = io.BytesIO()
    Image.new("RGB", (2, 2)).save(gif, format="GIF")
    with pytest.raises(ImageDecodeError) as err:
        decode_rgb(gif.getvalue(), formats=("PNG", "JPEG", "WEBP"))
    assert err.value.message == "unsupported image format GIF: only PNG, JPEG or WEBP are accepted"
    assert err.value.status == 415


def test_broken_images_say_what_broke(monkeypatch):
    truncated = png(3, (64, 64))[:300]
    with pytest.raises(ImageDecodeError) as err:
        decode_rgb(truncated)
    assert err.value.code == "truncated_image"
    assert err.value.message.startswith("PNG image is truncated or corrupt (OSError: image file is truncated")
    with pytest.raises(ImageDecodeError) as err:
        decode_rgb(truncated, where="file")
    assert err.value.message.startswith("file: PNG image is truncated or corrupt (")

    def raising(error):
        def fail(*args, **kwargs):
            raise error

        return fail

    # Errors without a message, or whose kind (EOFError) says truncated, from the header or the decode.
    for where, error, code, detail in (
        (Image, OSError(), "corrupt_image", "OSError"),
        (Image, OSError("bad CRC"), "corrupt_image", "OSError: bad CRC"),
        (ImageFile.ImageFile, EOFError(), "truncated_image", "EOFError"),
        (ImageFile.ImageFile, ValueError("Truncated data"), "truncated_image", "ValueError: Truncated data"),
    ):
        with monkeypatch.context() as patch:
            patch.setattr(where, "open" if where is Image else "load", raising(error))
            with pytest.raises(ImageDecodeError) as err:
                decode_rgb(png(1))
        assert (err.value.code, err.value.message) == (code, f"PNG image is truncated or corrupt ({detail})")


def test_header_size_reads_only_the_header_of_allowed_formats():
    import warnings

    assert header_size(png(1, (7, 5)), ("PNG",)) == (7, 5)
    assert header_size(png(1, (7, 5)), ("JPEG",)) is None
    assert header_size(b"\x89PNG\r\n\x1a\n broken", ("PNG",)) is None
    header = png_header_only(10_000, 9_000)  # 90 M pixels: above PIL's warning limit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert header_size(header, ("PNG",)) == (10_000, 9_000)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_decode_errors_survive_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(ImageDecodeError("image_too_large", "too big", 413)))
    assert type(err) is ImageDecodeError and (err.code, err.message, err.status) == ("image_too_large", "too big", 413)
    back = pickle.loads(pickle.dumps(DatasetError("label 3 out of range [0, 3)", "train/part-00000.parquet", 4)))
    assert (type(back), back.reason, back.file, back.row) == (
        DatasetError,
        "label 3 out of range [0, 3)",
        "train/part-00000.parquet",
        4,
    )


def test_sixteen_bit_grey_is_scaled_to_eight_bits():
    grey = Image.fromarray(np.array([[0, 1000, 32768, 65535]], dtype=np.uint16))  # mode I;16
    got = np.asarray(decode_rgb(_encoded(grey)))
    assert got.shape == (1, 4, 3)
    assert got[0, :, 0].tolist() == [0, 3, 127, 255] and (got[..., 0] == got[..., 2]).all()


def test_decoder_limits_codes_and_statuses():
    with pytest.raises(ImageDecodeError) as err:
        decode_rgb("not bytes")
    assert (err.value.code, err.value.message, err.value.status) == (
        "not_an_image",
        "image must be bytes, got str",
        400,
    )
    # A header naming 400 M pixels: PIL's own bomb guard fires while opening; it is reported as ours.
    head = png_header_only(20_000, 20_000)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageDecodeError) as err:
            decode_rgb(head, max_pixels=1000)
    assert (err.value.code, err.value.status) == ("image_too_many_pixels", 413)
    assert err.value.message == "image has more than 1000 pixels"
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    with pytest.raises(ImageDecodeError) as err:
        decode_rgb(png(1, (40, 8)), max_aspect_ratio=4)
    assert (err.value.code, err.value.status) == ("image_aspect_ratio", 422)
    assert err.value.message == "image is 40x8; its long side may be at most 4 times its short side"
    assert decode_rgb(png(1, (32, 8)), max_aspect_ratio=4).size == (32, 8)
    # verify() finds a broken checksum that a plain decode does not look at.
    data = bytearray(png(2, (8, 8)))
    data[29:33] = b"\x00\x00\x00\x00"  # the IHDR chunk's CRC
    with pytest.raises(ImageDecodeError) as err:
        decode_rgb(bytes(data), verify=True, where="items[0]")
    assert err.value.code == "corrupt_image"
    assert err.value.message.startswith("items[0]: PNG image is truncated or corrupt (")


def test_resolve_handles_uris_and_trailing_slashes(toy, tmp_path):
    assert read_manifest(f"file://{toy}/") == MANIFEST
    assert list_shards(f"file://{toy}", "test") == ["test/part-00000.parquet", "test/part-00001.parquet"]
    fs = pafs.SubTreeFileSystem(str(toy.parent), pafs.LocalFileSystem())
    assert read_manifest("toy/", filesystem=fs) == MANIFEST and read_all("toy///", "test", filesystem=fs) == TEST
    root_fs = pafs.SubTreeFileSystem(str(toy), pafs.LocalFileSystem())
    assert read_manifest("/", filesystem=root_fs) == MANIFEST and read_manifest("", filesystem=root_fs) == MANIFEST


def test_listing_ignores_nested_and_non_parquet_files(toy):
    (toy / "train" / "nested").mkdir()
    write_dataset(toy / "train" / "nested" / "inner", MANIFEST, TRAIN[:1])
    (toy / "train" / "notes.txt").write_text("x")
    (toy / "train" / "zzz.parquet.tmp").write_text("x")
    assert list_shards(toy, "train") == [f"train/part-0000{i}.parquet" for i in range(3)]
    with pytest.raises(DatasetError) as err:
        list(iter_records(toy, "train", shards=["part-00009.parquet"]))
    assert (err.value.file, err.value.row, err.value.reason) == ("train/part-00009.parquet", None, "shard not found")


def test_schema_accepts_large_binary_and_names_a_wrong_image_type(tmp_path):
    root = _dataset_with_train_labels(tmp_path / "d", [0, 1, 2])
    _write_table(root / "train/part-00000.parquet",
                 pa.table({"image": pa.array([png(0)], pa.large_binary()), "label": pa.array([1], pa.int32())}))  # fmt: skip
    assert read_all(root, "train") == [(png(0), 1)]
    _write_table(root / "train/part-00000.parquet",
                 pa.table({"image": pa.array(["x"], pa.string()), "label": pa.array([1], pa.int64())}))  # fmt: skip
    [err] = [e for e in validate_dataset(root).errors if e.file != "train/"]
    assert (err.file, err.reason) == ("train/part-00000.parquet", "column 'image' must be binary, got string")
    _write_table(root / "train/part-00000.parquet", pa.table({"label": pa.array([1], pa.int64())}))
    [err] = [e for e in validate_dataset(root).errors if e.file != "train/"]
    assert err.reason == "missing column 'image' (columns: ['label'])"


def test_manifest_problems_word_for_word():
    def problems(data) -> list[str]:
        with pytest.raises(DatasetError) as err:
            Manifest.from_json(json.dumps(data))
        assert err.value.file == "manifest.json"
        return err.value.reason.split("; ")

    assert problems(["a"]) == ["manifest must be a JSON object, got list"]
    assert problems({"name": "ok", "classes": ["a", "b"], "extra": 1, "more": 2}) == [
        "unknown manifest fields ['extra', 'more']"
    ]
    assert problems({"classes": ["a", "b"]}) == ["field 'name' is missing or not a string"]
    assert problems({"name": "ok", "classes": "ab"}) == ["field 'classes' is missing or not a list of strings"]
    assert problems({"name": "ok", "classes": ["a", 2]}) == ["field 'classes' is missing or not a list of strings"]
    assert problems({"name": "ok", "classes": ["a", "b"], "template": 3}) == ["field 'template' is not a string"]
    for template in ("a {} {", "a {} }", "{x} {}"):
        assert problems({"name": "ok", "classes": ["a", "b"], "template": template}) == [
            f"template {template!r} must contain exactly one '{{}}' and no other braces"
        ]
    assert problems({"name": "ok", "classes": ["a", "b"], "description": 1}) == ["field 'description' is not a string"]
    assert problems({"name": "ok", "classes": ["a", "b"], "format_version": True}) == [
        "format_version True is not supported (this reader knows 1)"
    ]
    with pytest.raises(DatasetError) as err:
        Manifest(name="Bad", classes=["a"])
    assert err.value.file == "manifest.json"
    assert err.value.reason.endswith("; at least 2 classes are needed, got 1")


def test_manifest_json_text_and_error_strings():
    m = Manifest(name="drinks", classes=["café", "thé"], template="a cup of {}.")
    assert m.to_json() == (
        '{\n  "name": "drinks",\n  "classes": [\n    "café",\n    "thé"\n  ],\n  "template": "a cup of {}.",\n'
        '  "description": "",\n  "format_version": 1\n}\n'
    )
    err = DatasetError("bad", row=3)
    assert str(err) == "row 3: bad" and err.args == ("row 3: bad",)
    assert str(DatasetError("bad")) == "bad" and DatasetError("bad").args == ("bad",)


def test_paths_with_trailing_slashes_on_an_object_store_like_filesystem():
    # The mock filesystem, like S3, refuses empty path components ("a//b"): roots must be stripped.
    fs = pafs._MockFileSystem()
    write_dataset("bucket/dataX", MANIFEST, TRAIN, filesystem=fs)
    assert read_manifest("bucket/dataX/", filesystem=fs) == MANIFEST
    assert read_all("bucket/dataX//", "train", filesystem=fs) == TRAIN
    assert validate_dataset("bucket/dataX/", fs).ok


def test_a_local_folder_ending_in_x_through_a_file_uri(tmp_path):
    write_dataset(tmp_path / "dataX", MANIFEST, TRAIN)
    assert read_manifest(f"file://{tmp_path / 'dataX'}/") == MANIFEST


def test_sixteen_bit_grey_uses_the_full_16_bit_range_not_the_image_maximum():
    grey = Image.fromarray(np.array([[0, 1000, 32768]], dtype=np.uint16))
    assert np.asarray(decode_rgb(_encoded(grey)))[0, :, 0].tolist() == [0, 3, 127]


def test_verify_finds_a_broken_data_checksum():
    data = bytearray(png(2, (8, 8)))
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4 : idat])[0]
    crc = idat + 4 + length
    data[crc : crc + 4] = bytes(b ^ 0xFF for b in data[crc : crc + 4])
    assert decode_rgb(bytes(data)).size == (8, 8)  # the plain decode does not check it
    with pytest.raises(ImageDecodeError) as err:
        decode_rgb(bytes(data), verify=True)
    assert err.value.code == "corrupt_image" and err.value.message.startswith("PNG image is truncated or corrupt (")


def test_pil_warns_nothing_when_our_pixel_limit_refuses():
    import warnings

    data = png_header_only(10_000, 9_000)  # 90 M pixels: PIL warns, does not refuse
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageDecodeError) as err:
            decode_rgb(data)
    assert err.value.message == "image has 10000x9000 = 90000000 pixels, more than 64000000"
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_sniff_format_names_modern_containers():
    from diki_model.data import sniff_format

    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBP") == "WEBP"  # exactly 12 bytes
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEB") is None
    assert sniff_format(b"RIFX\x00\x00\x00\x00WEBP") is None
    assert sniff_format(b"RIFF\x00\x00\x00\x00WAVE") is None
    for brand, name in ((b"avif", "AVIF"), (b"avis", "AVIF"), (b"heic", "HEIF"), (b"mif1", "HEIF")):
        assert sniff_format(b"\x00\x00\x00\x18ftyp" + brand) == name
    assert sniff_format(b"\x00\x00\x00\x18ftypavi") is None  # 11 bytes: too short for a brand
    assert sniff_format(b"\x00\x00\x00\x18FTYPavif") is None
    assert sniff_format(b"\x00\x00\x00\x18ftypXavif") == "HEIF"  # the brand is bytes 8..12 exactly
    with pytest.raises(ImageDecodeError, match="^unsupported image format AVIF: only PNG or JPEG are accepted$"):
        decode_rgb(b"\x00\x00\x00\x18ftypavif" + b"\x00" * 20)
