"""`diki push` of ImageFolder trees: a manifest.json beside the class folders, and a tree checked whole.

Real files, a real local storage root (embedded mode) and the real CLI; nothing is faked.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from services.settings import STANDARD_ENV


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("DIKI_") or name in STANDARD_ENV:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def png(seed: int, colour: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(colour, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def tree(root: Path, folders: dict[str, int], n_train: int = 10, n_test: int = 3) -> Path:
    """train/<folder>/*.png and test/<folder>/*.png, each class its own colour level."""
    for split, n in (("train", n_train), ("test", n_test)):
        for k, (folder, colour) in enumerate(folders.items()):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (root / split / folder / f"{i:03d}.png").write_bytes(
                    png(1000 * k + i + (500 if split == "test" else 0), colour)
                )
    return root


def config(tmp_path: Path) -> Path:
    path = tmp_path / "diki.yaml"
    path.write_text(f"home: {tmp_path / 'home'}\n")
    return path


def push(tmp_path: Path, src: Path, name: str, *extra: str):
    from pipelines.cli import app

    return CliRunner().invoke(app, ["push", str(src), "--name", name, "--config", str(config(tmp_path)), *extra])


def uploaded(tmp_path: Path, name: str) -> Path:
    return tmp_path / "home" / "storage" / "incoming" / name


def test_a_manifest_beside_an_image_folder_tree_names_the_classes_and_the_tree_is_converted(tmp_path: Path) -> None:
    from diki_model.data import iter_records, read_manifest
    from services.settings import Settings
    from services.training import inspect_dataset

    src = tree(tmp_path / "pets", {"cat": 40, "golden_retriever": 200})
    manifest = {
        "name": "pets",
        # Not the folders' sorted order: label 0 is the dog.
        "classes": ["golden retriever", "cat"],
        "template": "a photo of a {}, a type of pet.",
        "description": "cats and dogs",
    }
    (src / "manifest.json").write_text(json.dumps(manifest))

    result = push(tmp_path, src, "pets-drop")

    assert result.exit_code == 0, result.output
    assert "ImageFolder tree with manifest.json, converted" in result.output and "2 classes" in result.output
    assert "named 'pets'" in result.output  # the task's name is the manifest's
    dst = uploaded(tmp_path, "pets-drop")
    files = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    assert files == ["_SUCCESS", "manifest.json", "test/part-00000.parquet", "train/part-00000.parquet"]
    written = read_manifest(dst)
    assert (written.name, written.classes, written.template, written.description) == (
        "pets",
        ["golden retriever", "cat"],
        "a photo of a {}, a type of pet.",
        "cats and dogs",
    )
    # Labels follow the manifest: the bright (dog) images are label 0.
    images, labels = next(iter_records(str(dst), "train"))
    means = {int(y): [] for y in labels}
    for data, y in zip(images, labels, strict=True):
        means[int(y)].append(np.asarray(Image.open(io.BytesIO(data))).mean())
    assert np.mean(means[0]) > 150 > np.mean(means[1])
    assert sorted(labels.tolist()).count(0) == 10
    # What the watcher checks first: the drop is learnable as it is (no "no Parquet shards").
    check = inspect_dataset(Settings.load(config(tmp_path)), str(dst))
    assert check.ok, check.problems


def test_folders_that_do_not_match_the_manifest_classes_are_refused_at_push_time(tmp_path: Path) -> None:
    src = tree(tmp_path / "pets", {"cat": 40, "dog": 200})
    (src / "manifest.json").write_text(json.dumps({"name": "pets", "classes": ["cat", "golden retriever"]}))

    result = push(tmp_path, src, "pets")

    assert result.exit_code == 2, result.output
    assert "train/dog/: names no class of manifest.json" in result.output
    assert "class 'golden retriever' of manifest.json has no training folder" in result.output
    assert "Nothing was uploaded" in result.output
    assert not uploaded(tmp_path, "pets").exists()


def test_a_tree_with_several_bad_files_names_every_problem_before_uploading(tmp_path: Path) -> None:
    src = tree(tmp_path / "shapes", {"circle": 40, "square": 120, "triangle": 220})
    (src / "train" / "circle" / "000.jpg").write_text("this is a text file, not a JPEG")
    good = (src / "train" / "square" / "003.png").read_bytes()
    (src / "train" / "square" / "003.png").write_bytes(good[: len(good) // 2])
    for path in (src / "train" / "triangle").iterdir():
        path.unlink()  # an empty class folder
    (src / "train" / "square" / "notes.txt").write_text("not an image: left out")

    result = push(tmp_path, src, "shapes")

    assert result.exit_code == 2, result.output
    out = result.output
    assert "train/circle/000.jpg: not a PNG or JPEG image" in out
    assert "train/square/003.png: PNG image is truncated or corrupt" in out
    assert "train/triangle/: no images; each class needs at least 2 training images" in out
    assert "3 problem(s)" in out, out
    assert not uploaded(tmp_path, "shapes").exists()


def test_a_tree_without_manifest_converts_as_the_format_converter_does(tmp_path: Path) -> None:
    """Same records, same labels, same fingerprint as diki_model.data.convert_image_folder."""
    from diki_model.data import convert_image_folder, dataset_fingerprint, read_manifest

    src = tree(tmp_path / "colours", {"dark_red": 30, "light_blue": 210})
    result = push(tmp_path, src, "colours", "--template", "a {} square.")
    assert result.exit_code == 0 and "ImageFolder tree, converted" in result.output, result.output
    reference = convert_image_folder(src, tmp_path / "reference", "colours", "a {} square.")
    dst = uploaded(tmp_path, "colours")
    assert read_manifest(dst) == reference
    assert dataset_fingerprint(str(dst)) == dataset_fingerprint(str(tmp_path / "reference"))


def test_a_template_given_twice_is_refused(tmp_path: Path) -> None:
    src = tree(tmp_path / "pets", {"cat": 40, "dog": 200})
    (src / "manifest.json").write_text(json.dumps({"name": "pets", "classes": ["cat", "dog"], "template": "a {}."}))
    result = push(tmp_path, src, "pets", "--template", "a photo of a {}.")
    assert result.exit_code == 2 and "differs from --template" in result.output, result.output
