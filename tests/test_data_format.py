"""The dataset format: writing, reading, converting, validating and fingerprinting."""

from __future__ import annotations

import io
import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diki_model.data import (
    DatasetError,
    Manifest,
    convert_image_folder,
    dataset_fingerprint,
    decode_image,
    iter_records,
    list_shards,
    load_split_tensors,
    read_manifest,
    validate_dataset,
    write_dataset,
)


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
    assert [(e.file, e.row, e.reason) for e in report.errors] == [("test/part-00000.parquet", 1, "label 3 out of range [0, 3)")]
    assert (report.num_train, report.num_test) == (3, 3)
