"""An ImageFolder tree checked whole, then converted to the dataset format: what ``diki push`` uploads.

A tree is ``train/<class>/*.png|jpg|jpeg`` and ``test/<class>/...``, optionally with a
``manifest.json`` at its root that gives the dataset's name, class names (in label order), prompt
template and description; each class folder is then named after its class (the class name, or the
name with spaces written as ``_``). Without a manifest, the classes are the sorted folder names of
``train/`` with ``_`` read as a space, exactly as :func:`diki_model.data.convert_image_folder` does.

:func:`check_image_folder` looks at the whole tree before anything is written and names every
problem with its file and reason, as the quarantine report of a raw drop does: class folders that
match no class of the manifest (and classes without a folder), files that do not decode (not an
image, truncated, too many pixels, too large), classes with too few training images (an empty
folder), a missing test split, too few training images. :func:`write_image_folder` then writes the
dataset (shards first, manifest last), the images byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from diki_model import DikiConfig
from diki_model.data import DatasetError, Manifest, decode_image, read_manifest, write_dataset

__all__ = ["TreeCheck", "check_image_folder", "is_image_folder", "write_image_folder"]

MANIFEST: Final = "manifest.json"
IMAGE_SUFFIXES: Final = (".png", ".jpg", ".jpeg")
DEFAULT_TEMPLATE: Final = "a photo of a {}."


@dataclass
class TreeCheck:
    """What :func:`check_image_folder` found: the manifest to write, the files per label, every problem."""

    root: Path
    manifest: Manifest | None = None
    from_manifest: bool = False  # the tree's own manifest.json gave the name, classes and template
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: dict[str, list[tuple[Path, int]]] = field(default_factory=lambda: {"train": [], "test": []})
    skipped: int = 0  # files that are not .png/.jpg/.jpeg (left out, as the format's converter does)

    @property
    def ok(self) -> bool:
        return not self.problems and self.manifest is not None


def is_image_folder(path: Path) -> bool:
    """A tree of class folders under ``train/`` (and no Parquet shards there)."""
    train = path / "train"
    if not train.is_dir() or any(train.glob("*.parquet")):
        return False
    return any(p.is_dir() and not p.name.startswith(".") for p in train.iterdir())


def _folders(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        return []
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_of_folders(folders: list[str], manifest: Manifest | None, check: TreeCheck) -> dict[str, int]:
    """Folder name -> label: the manifest's class it names, else (no manifest) the sorted folder order."""
    if manifest is None:
        return {f: i for i, f in enumerate(folders)}
    labels: dict[str, int] = {}
    claimed: dict[int, str] = {}
    for folder in folders:
        matches = [i for i, c in enumerate(manifest.classes) if folder in (c, c.replace(" ", "_"))]
        if not matches:
            check.problems.append(
                f"train/{folder}/: names no class of manifest.json (its classes: {manifest.classes}); "
                "rename the folder after its class, or add the class to the manifest"
            )
            continue
        label = matches[0]
        if label in claimed:
            check.problems.append(
                f"train/{folder}/: class {manifest.classes[label]!r} already has the folder train/{claimed[label]}/"
            )
            continue
        labels[folder], claimed[label] = label, folder
    for label, name in enumerate(manifest.classes):
        if label not in claimed:
            check.problems.append(
                f"train/{name.replace(' ', '_')}/: missing; class {name!r} of manifest.json has no training folder"
            )
    return labels


def _check_file(path: Path, rel: str, max_bytes: int, check: TreeCheck) -> bool:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            check.problems.append(f"{rel}: image is {size} bytes, more than {max_bytes}")
            return False
        decode_image(path.read_bytes())
    except DatasetError as err:
        check.problems.append(f"{rel}: {err.reason}")
        return False
    except OSError as err:
        check.problems.append(f"{rel}: cannot be read ({err.strerror or err})")
        return False
    return True


def check_image_folder(
    root: Path,
    name: str,
    template: str | None = None,
    *,
    min_images_per_class: int,
    min_train_images: int,
    max_image_bytes: int,
    workers: int = 1,
) -> TreeCheck:
    """Look at the whole tree (every image decoded once) and name every problem; writes nothing.

    Args:
        root: the tree (``train/<class>/``, ``test/<class>/``, optional ``manifest.json``).
        name: the dataset's name when the tree has no manifest.
        template: the prompt template when the tree has no manifest (None: ``a photo of a {}.``); given
            beside a manifest with another template, it is a problem (which one is meant?).
        min_images_per_class / min_train_images / max_image_bytes / workers: the learning rules the
            pipeline applies (``services.training.inputs``), so a pushed tree is not quarantined later.
    """
    root = Path(root)
    check = TreeCheck(root)
    folders = _folders(root / "train")
    manifest: Manifest | None = None
    if (root / MANIFEST).is_file():
        check.from_manifest = True
        try:
            manifest = read_manifest(root)
        except DatasetError as err:
            check.problems.append(str(err) if err.file else f"{MANIFEST}: {err.reason}")
        else:
            if template is not None and template != manifest.template:
                check.problems.append(
                    f"{MANIFEST}: its template {manifest.template!r} differs from --template {template!r}; "
                    "give the template in one place"
                )
            if manifest.name != name:
                check.notes.append(f"the task will be named {manifest.name!r} (manifest.json), the drop {name!r}")
    else:
        try:
            manifest = Manifest(
                name=name, classes=[f.replace("_", " ") for f in folders], template=template or DEFAULT_TEMPLATE
            )
        except DatasetError as err:
            check.problems.append(f"train/: the class folders do not make a dataset ({err.reason})")
    if not folders:
        check.problems.append("train/: no class folders (train/<class>/*.png)")
    # Without a usable manifest the folders keep their sorted order, so every image is still checked.
    labels = _class_of_folders(folders, manifest, check)
    num_classes = max([*labels.values(), (manifest.num_classes - 1) if manifest is not None else -1]) + 1
    test_folders = _folders(root / "test")
    for folder in test_folders:
        if folder not in labels and folder in folders:
            continue  # its train/ folder is already reported
        if folder not in labels:
            check.problems.append(f"test/{folder}/: no training folder train/{folder}/ for this class")
    counts = {"train": [0] * num_classes, "test": [0] * num_classes}
    for split in ("train", "test"):
        for folder in folders if split == "train" else test_folders:
            if folder not in labels:
                continue
            for path in sorted((root / split / folder).iterdir()):
                if not path.is_file() or path.name.startswith("."):
                    continue
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    check.skipped += 1
                    continue
                rel = path.relative_to(root).as_posix()
                if _check_file(path, rel, max_image_bytes, check):
                    check.files[split].append((path, labels[folder]))
                    counts[split][labels[folder]] += 1
    folder_of = {label: folder for folder, label in labels.items()}
    for label, folder in sorted(folder_of.items()):
        n = counts["train"][label]
        if n < min_images_per_class:
            what = "no images" if n == 0 else f"{n} usable image{'s' if n != 1 else ''}"
            check.problems.append(
                f"train/{folder}/: {what}; each class needs at least {min_images_per_class} training images"
            )
    needed = max(min_train_images, 2 * DikiConfig().holdout_every, workers)
    if folders and len(check.files["train"]) < needed:
        check.problems.append(
            f"train/: {len(check.files['train'])} usable training images, too few to learn a task (need >= {needed})"
        )
    if not test_folders or not check.files["test"]:
        check.problems.append(
            "test/: no test images (test/<class>/*.png): the pipeline needs a test split to evaluate the new version"
        )
    if check.skipped:
        check.notes.append(f"left out {check.skipped} file(s) that are not .png, .jpg or .jpeg")
    check.manifest = manifest
    return check


def write_image_folder(check: TreeCheck, dst: Path, shard_rows: int = 2048) -> Manifest:
    """Write a checked tree in the dataset format: the image bytes as they are, labels in the manifest's order."""
    if not check.ok:
        raise ValueError(f"{check.root} has {len(check.problems)} problem(s); check it first")
    assert check.manifest is not None

    def records(split: str):
        # By label, then file name: the order convert_image_folder gives (and so the same fingerprint).
        for path, label in sorted(check.files[split], key=lambda item: (item[1], item[0].name)):
            yield path.read_bytes(), label

    write_dataset(dst, check.manifest, records("train"), records("test"), shard_rows=shard_rows)
    return check.manifest
