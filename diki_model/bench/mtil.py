"""The MTIL benchmark (ZSCL, ICCV'23) on the 11 real datasets, the way DIKI (ECCV'24) runs it.

``mtil_tasks(root, order="I")`` returns the 11 datasets as :class:`TaskData` in the order's sequence.
Each dataset is read from a folder under ``root`` in one of two layouts, and nothing is ever downloaded:

- CoOp's layout (what DIKI uses): the images plus ``split_zhou_<Name>.json`` with ``train`` / ``val`` /
  ``test`` lists of ``[relative path, label, class name]``, in CoOp's folders or dropped into the folder
  torchvision's download made. Preferred whenever the split file is there.
- torchvision's layout: the folder ``torchvision.datasets.X(root, download=False)`` reads. Where the
  dataset has an official train/test split it is used; Caltech101, EuroSAT and SUN397 have none, so a
  fixed per-class 50% train / 20% held out / 30% test split is drawn (CoOp's proportions, not CoOp's
  draw: use the split files to compare with published numbers).

MNIST, CIFAR100 and FGVC-Aircraft also load from the folders DIKI's own instructions produce
(``mnist/``, ``cifar100/``, ``fgvc_aircraft/``). ``docs/mtil.md`` lists every expected path.

Labels always index the dataset's CoOp class list (:mod:`diki_model.bench.mtil_classnames`): the names a
loader finds on disk are matched to it, so a label and the prompt built from it name the same class.
"""

from __future__ import annotations

import functools
import json
import pickle
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.datasets as tvd
from PIL import Image
from torch.utils.data import Dataset

from diki_model.bench.mtil_classnames import (
    CALTECH101_FOLDER_NAMES,
    CALTECH101_IGNORED_FOLDERS,
    CLASSNAMES,
    EUROSAT_FOLDER_NAMES,
    name_key,
)
from diki_model.bench.stream import TaskData

MTIL_DATASETS = (
    "Aircraft",
    "Caltech101",
    "CIFAR100",
    "DTD",
    "EuroSAT",
    "Flowers",
    "Food",
    "MNIST",
    "OxfordPet",
    "StanfordCars",
    "SUN397",
)
MTIL_ORDERS: dict[str, tuple[str, ...]] = {
    "I": MTIL_DATASETS,  # alphabetical
    "II": (
        "StanfordCars",
        "Food",
        "MNIST",
        "OxfordPet",
        "Flowers",
        "SUN397",
        "Aircraft",
        "Caltech101",
        "DTD",
        "EuroSAT",
        "CIFAR100",
    ),
}
# One prompt per dataset, as ZSCL and DIKI prompt CLIP.
MTIL_TEMPLATES: dict[str, str] = {
    "Aircraft": "a photo of a {}, a type of aircraft.",
    "Caltech101": "a photo of a {}.",
    "CIFAR100": "a photo of a {}.",
    "DTD": "a photo of a {} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "Flowers": "a photo of a {}, a type of flower.",
    "Food": "a photo of {}, a type of food.",
    "MNIST": 'a photo of the number: "{}".',
    "OxfordPet": "a photo of a {}, a type of pet.",
    "StanfordCars": "a photo of a {}.",
    "SUN397": "a photo of a {}.",
}
# DIKI's few-shot runs leave out EuroSAT, MNIST and OxfordPet (in order I's sequence otherwise).
DIKI_FEW_SHOT_DATASETS = ("Aircraft", "Caltech101", "CIFAR100", "DTD", "Flowers", "Food", "StanfordCars", "SUN397")

DOCS = "docs/mtil.md"
SPLITS = ("train", "test")


# ----------------------------------------------------------------------------------- samples
@dataclass
class _Split:
    """Items ``source[indices[k]]`` (each an ``(image, anything)`` pair) with MTIL labels ``labels[k]``."""

    source: Any
    indices: list[int]
    labels: list[int]

    def subset(self, positions: Sequence[int]) -> _Split:
        return _Split(self.source, [self.indices[p] for p in positions], [self.labels[p] for p in positions])


class _Files:
    """Image files as an indexable source."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Image.Image, None]:
        return Image.open(self.paths[i]), None


class _Arrays:
    """In-memory uint8 images (N, H, W) or (N, H, W, C) as an indexable source."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Image.Image, None]:
        return Image.fromarray(self.images[i]), None


class MTILDataset(Dataset):
    """One split of one MTIL dataset: ``(preprocess(RGB image), label)``; ``labels`` lists every label."""

    def __init__(self, name: str, split: _Split, preprocess: Callable[[Image.Image], torch.Tensor]) -> None:
        self.name = name
        self._split = split
        self.preprocess = preprocess
        self.labels = list(split.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, _ = self._split.source[self._split.indices[i]]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        return self.preprocess(image.convert("RGB")), self.labels[i]


# ------------------------------------------------------------------------------ class names
def _canonical(dataset: str) -> dict[tuple[str, ...], int]:
    return {name_key(c): i for i, c in enumerate(CLASSNAMES[dataset])}


def _labels_from_names(dataset: str, names: Sequence[str], where: Path) -> list[int]:
    canon = _canonical(dataset)
    unknown = sorted({n for n in names if name_key(n) not in canon})
    if unknown:
        raise ValueError(
            f"{dataset}: {where} names classes that are not among the {len(canon)} MTIL classes of {dataset}: "
            f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''} (see {DOCS} for the expected files)"
        )
    return [canon[name_key(n)] for n in names]


def _remap(
    dataset: str,
    where: Path,
    source: Any,
    native_labels: Sequence[int],
    native_names: dict[int, str],
    aliases: dict[str, str] | None = None,
    ignored: Sequence[str] = (),
) -> _Split:
    """Keep the items whose native class is an MTIL class, relabelled into the MTIL class list."""
    aliases = aliases or {}
    kept = {lab: aliases.get(n, n) for lab, n in native_names.items() if n not in ignored}
    mapped = dict(zip(kept, _labels_from_names(dataset, list(kept.values()), where), strict=True))
    indices = [i for i, y in enumerate(native_labels) if int(y) in mapped]
    return _Split(source, indices, [mapped[int(native_labels[i])] for i in indices])


# ----------------------------------------------------------------------------- split helpers
def few_shot_indices(labels: Sequence[int], shots: int, seed: int = 0, salt: str = "") -> list[int]:
    """Positions of a ``shots``-per-class subset of ``labels`` (every item of a smaller class), sorted.

    Deterministic in (labels, shots, seed, salt); the salt (the dataset name) keeps datasets independent.
    """
    if shots < 1:
        raise ValueError(f"shots must be a positive number of images per class, got {shots}")
    rng = random.Random(f"{salt}:{seed}:{shots}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for pos, y in enumerate(labels):
        by_class[int(y)].append(pos)
    chosen: list[int] = []
    for y in sorted(by_class):
        members = by_class[y]
        chosen.extend(members if len(members) <= shots else rng.sample(members, shots))
    return sorted(chosen)


def _per_class_split(split: _Split, keys: Sequence[Any], salt: str) -> dict[str, _Split]:
    """A fixed 50% train / 20% held out / 30% test split per class, for datasets without an official one.

    ``keys`` (one per item, e.g. file paths) fix the order before shuffling, so the split does not depend
    on the order the files were listed in.
    """
    rng = random.Random(f"{salt}:per-class-split")
    by_class: dict[int, list[int]] = defaultdict(list)
    for pos in sorted(range(len(split.labels)), key=lambda p: keys[p]):
        by_class[split.labels[pos]].append(pos)
    train: list[int] = []
    test: list[int] = []
    for y in sorted(by_class):
        members = by_class[y]
        rng.shuffle(members)
        n = len(members)
        n_test = max(1, round(0.3 * n)) if n > 1 else 0
        n_val = max(0, min(round(0.2 * n), n - n_test - 1))
        train.extend(members[: n - n_test - n_val])
        test.extend(members[n - n_test :])
    return {"train": split.subset(train), "test": split.subset(test)}


def _coop(dataset: str, split_file: Path, image_dir: Path) -> dict[str, _Split]:
    """CoOp's ``split_zhou_*.json``: {"train"|"val"|"test": [[relative path, label, class name], ...]}."""
    try:
        data = json.loads(split_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{dataset}: cannot read the CoOp split file {split_file}: {exc}") from exc
    out: dict[str, _Split] = {}
    for split in SPLITS:
        items = data.get(split) if isinstance(data, dict) else None
        if not items:
            raise ValueError(f"{dataset}: {split_file} has no {split!r} list of [path, label, class name] items")
        paths = [image_dir / str(item[0]) for item in items]
        if not paths[0].is_file():
            raise FileNotFoundError(
                f"{dataset}: {split_file} lists {items[0][0]!r} but {paths[0]} does not exist; "
                f"the images are expected under {image_dir} (see {DOCS} for the layout)"
            )
        labels = _labels_from_names(dataset, [str(item[2]) for item in items], split_file)
        out[split] = _Split(_Files(paths), list(range(len(paths))), labels)
    return out


def _torchvision(dataset: str, where: Path, make: Callable[[], Any]) -> Any:
    """Build a torchvision dataset (never downloading), turning its generic error into one that says where."""
    try:
        return make()
    except RuntimeError as exc:
        raise RuntimeError(
            f"{dataset}: torchvision rejected the files under {where}: {exc} "
            f"(an incomplete or different copy? see {DOCS} for the layout)"
        ) from exc


# ---------------------------------------------------------------------------- the datasets
def _aircraft_tv(root: Path) -> dict[str, _Split]:
    out = {}
    for split in SPLITS:
        ds = _torchvision(
            "Aircraft",
            root / "fgvc-aircraft-2013b",
            lambda split=split: tvd.FGVCAircraft(str(root), split=split, annotation_level="variant", download=False),
        )
        out[split] = _remap("Aircraft", root / "fgvc-aircraft-2013b", ds, ds._labels, dict(enumerate(ds.classes)))
    return out


def _aircraft_files(root: Path) -> dict[str, _Split]:
    """``fgvc_aircraft/`` as DIKI/CoOp keep it: the archive's ``data/`` folder, same files as torchvision reads."""
    data_dir = root / "fgvc_aircraft"
    out = {}
    for split in SPLITS:
        listing = data_dir / f"images_variant_{split}.txt"
        rows = [line.strip().split(" ", 1) for line in listing.read_text().splitlines() if line.strip()]
        paths = [data_dir / "images" / f"{image_id}.jpg" for image_id, _ in rows]
        labels = _labels_from_names("Aircraft", [name for _, name in rows], listing)
        out[split] = _Split(_Files(paths), list(range(len(paths))), labels)
    return out


def _caltech_tv(root: Path) -> dict[str, _Split]:
    where = root / "caltech101"
    ds = _torchvision("Caltech101", where, lambda: tvd.Caltech101(str(root), target_type="category", download=False))
    names = dict(enumerate(ds.categories))
    split = _remap(
        "Caltech101", where, ds, ds.y, names, aliases=CALTECH101_FOLDER_NAMES, ignored=CALTECH101_IGNORED_FOLDERS
    )
    return _per_class_split(split, [(ds.y[i], ds.index[i]) for i in split.indices], "Caltech101")


def _cifar_tv(root: Path) -> dict[str, _Split]:
    out = {}
    for split in SPLITS:
        ds = _torchvision(
            "CIFAR100",
            root / "cifar-100-python",
            lambda split=split: tvd.CIFAR100(str(root), train=split == "train", download=False),
        )
        out[split] = _remap("CIFAR100", root / "cifar-100-python", ds, ds.targets, dict(enumerate(ds.classes)))
    return out


def _cifar_pickles(root: Path) -> dict[str, _Split]:
    """``cifar100/{train,test,meta}``: the python pickles of the CIFAR-100 archive (DIKI's layout)."""
    folder = root / "cifar100"
    with open(folder / "meta", "rb") as f:
        names = dict(enumerate(pickle.load(f, encoding="latin1")["fine_label_names"]))
    out = {}
    for split in SPLITS:
        with open(folder / split, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        out[split] = _remap("CIFAR100", folder / split, _Arrays(images), entry["fine_labels"], names)
    return out


def _dtd_tv(root: Path) -> dict[str, _Split]:
    out = {}
    for split in SPLITS:
        ds = _torchvision(
            "DTD",
            root / "dtd" / "dtd",
            lambda split=split: tvd.DTD(str(root), split=split, partition=1, download=False),
        )
        out[split] = _remap("DTD", root / "dtd" / "dtd", ds, ds._labels, dict(enumerate(ds.classes)))
    return out


def _eurosat_tv(root: Path) -> dict[str, _Split]:
    where = root / "eurosat" / "2750"
    ds = _torchvision("EuroSAT", where, lambda: tvd.EuroSAT(str(root), download=False))
    split = _remap("EuroSAT", where, ds, ds.targets, dict(enumerate(ds.classes)), aliases=EUROSAT_FOLDER_NAMES)
    return _per_class_split(split, [ds.samples[i][0] for i in split.indices], "EuroSAT")


def _flowers_tv(root: Path) -> dict[str, _Split]:
    out = {}
    for split in SPLITS:
        ds = _torchvision(
            "Flowers", root / "flowers-102", lambda split=split: tvd.Flowers102(str(root), split=split, download=False)
        )
        out[split] = _remap("Flowers", root / "flowers-102", ds, ds._labels, dict(enumerate(tvd.Flowers102.classes)))
    return out


def _food_tv(root: Path) -> dict[str, _Split]:
    out = {}
    for split in SPLITS:
        ds = _torchvision(
            "Food", root / "food-101", lambda split=split: tvd.Food101(str(root), split=split, download=False)
        )
        out[split] = _remap("Food", root / "food-101", ds, ds._labels, dict(enumerate(ds.classes)))
    return out


def _mnist_tv(root: Path) -> dict[str, _Split]:
    out = {}
    for split in SPLITS:
        ds = _torchvision(
            "MNIST",
            root / "MNIST" / "raw",
            lambda split=split: tvd.MNIST(str(root), train=split == "train", download=False),
        )
        out[split] = _remap("MNIST", root / "MNIST" / "raw", ds, ds.targets.tolist(), dict(enumerate(ds.classes)))
    return out


def _mnist_idx(root: Path) -> dict[str, _Split]:
    """``mnist/`` holding the four uncompressed IDX files (DIKI's layout)."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    folder = root / "mnist"
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_image_file(str(folder / f"{prefix}-images-idx3-ubyte")).numpy()
        labels = read_label_file(str(folder / f"{prefix}-labels-idx1-ubyte")).tolist()
        out[split] = _remap("MNIST", folder, _Arrays(images), labels, dict(enumerate(CLASSNAMES["MNIST"])))
    return out


def _pets_tv(root: Path) -> dict[str, _Split]:
    out = {}
    for split, tv_split in (("train", "trainval"), ("test", "test")):
        ds = _torchvision(
            "OxfordPet",
            root / "oxford-iiit-pet",
            lambda tv_split=tv_split: tvd.OxfordIIITPet(str(root), split=tv_split, download=False),
        )
        # The breed is the image name without its number ("american_bulldog_12"); label ids are 1..37 on disk.
        names = {y: Path(p).stem.rsplit("_", 1)[0] for p, y in zip(ds._images, ds._labels, strict=True)}
        out[split] = _remap("OxfordPet", root / "oxford-iiit-pet", ds, ds._labels, names)
    return out


def _cars_tv(root: Path) -> dict[str, _Split]:
    out = {}
    for split in SPLITS:
        ds = _torchvision(
            "StanfordCars",
            root / "stanford_cars",
            lambda split=split: tvd.StanfordCars(str(root), split=split, download=False),
        )
        labels = [target for _, target in ds._samples]
        out[split] = _remap("StanfordCars", root / "stanford_cars", ds, labels, dict(enumerate(ds.classes)))
    return out


def _sun_tv(parent: Path) -> dict[str, _Split]:
    where = parent / "SUN397"
    ds = _torchvision("SUN397", where, lambda: tvd.SUN397(str(parent), download=False))
    split = _remap("SUN397", where, ds, ds._labels, dict(enumerate(ds.classes)))
    return _per_class_split(split, [str(ds._image_files[i]) for i in split.indices], "SUN397")


# ----------------------------------------------------------------------------- the layouts
@dataclass(frozen=True)
class _Layout:
    """One way a dataset can sit under the data root: present when every ``required`` path exists."""

    required: tuple[str, ...]  # relative to the data root
    label: str  # whose layout it is
    build: Callable[[Path], dict[str, _Split]]

    def present(self, root: Path) -> bool:
        return all((root / r).exists() for r in self.required)

    def describe(self, root: Path) -> str:
        return f"{' + '.join(str(root / r) for r in self.required)} ({self.label})"


def _coop_layout(dataset: str, folder: str, split_name: str, images: str) -> _Layout:
    split_file = f"{folder}/split_zhou_{split_name}.json"
    image_dir = f"{folder}/{images}" if images else folder
    return _Layout(
        (split_file, image_dir),
        "CoOp's split file and the images it lists",
        lambda root: _coop(dataset, root / split_file, root / image_dir),
    )


_LAYOUTS: dict[str, tuple[_Layout, ...]] = {
    "Aircraft": (
        _Layout(
            ("fgvc-aircraft-2013b/data/images_variant_train.txt",),
            "torchvision FGVCAircraft",
            _aircraft_tv,
        ),
        _Layout(
            ("fgvc_aircraft/images_variant_train.txt", "fgvc_aircraft/images_variant_test.txt"),
            "the archive's data/ folder renamed, as CoOp and DIKI keep it",
            _aircraft_files,
        ),
    ),
    "Caltech101": (
        _coop_layout("Caltech101", "caltech-101", "Caltech101", "101_ObjectCategories"),
        _coop_layout("Caltech101", "caltech101", "Caltech101", "101_ObjectCategories"),
        _Layout(("caltech101/101_ObjectCategories",), "torchvision Caltech101", _caltech_tv),
    ),
    "CIFAR100": (
        _Layout(("cifar-100-python/meta",), "torchvision CIFAR100", _cifar_tv),
        _Layout(
            ("cifar100/train", "cifar100/test", "cifar100/meta"),
            "the python pickles, as DIKI keeps them",
            _cifar_pickles,
        ),
    ),
    "DTD": (
        _coop_layout("DTD", "dtd", "DescribableTextures", "images"),
        _coop_layout("DTD", "dtd", "DescribableTextures", "dtd/images"),
        _Layout(("dtd/dtd/labels", "dtd/dtd/images"), "torchvision DTD", _dtd_tv),
    ),
    "EuroSAT": (
        _coop_layout("EuroSAT", "eurosat", "EuroSAT", "2750"),
        _Layout(("eurosat/2750",), "torchvision EuroSAT", _eurosat_tv),
    ),
    "Flowers": (
        _coop_layout("Flowers", "oxford_flowers", "OxfordFlowers", "jpg"),
        _coop_layout("Flowers", "flowers-102", "OxfordFlowers", "jpg"),
        _Layout(
            ("flowers-102/jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"),
            "torchvision Flowers102",
            _flowers_tv,
        ),
    ),
    "Food": (
        _coop_layout("Food", "food-101", "Food101", "images"),
        _Layout(("food-101/meta/train.json", "food-101/images"), "torchvision Food101", _food_tv),
    ),
    "MNIST": (
        _Layout(("MNIST/raw/train-images-idx3-ubyte",), "torchvision MNIST, uncompressed IDX files", _mnist_tv),
        _Layout(("mnist/train-images-idx3-ubyte",), "the four uncompressed IDX files, as DIKI keeps them", _mnist_idx),
    ),
    "OxfordPet": (
        _coop_layout("OxfordPet", "oxford_pets", "OxfordPets", "images"),
        _coop_layout("OxfordPet", "oxford-iiit-pet", "OxfordPets", "images"),
        _Layout(
            ("oxford-iiit-pet/images", "oxford-iiit-pet/annotations/trainval.txt"),
            "torchvision OxfordIIITPet",
            _pets_tv,
        ),
    ),
    "StanfordCars": (
        _coop_layout("StanfordCars", "stanford_cars", "StanfordCars", ""),
        _Layout(
            ("stanford_cars/devkit/cars_meta.mat",),
            "torchvision StanfordCars",
            _cars_tv,
        ),
    ),
    "SUN397": (
        _coop_layout("SUN397", "sun397", "SUN397", "SUN397"),
        _coop_layout("SUN397", "SUN397", "SUN397", ""),
        _Layout(("SUN397/ClassName.txt",), "torchvision SUN397", lambda root: _sun_tv(root)),
        _Layout(
            ("sun397/SUN397/ClassName.txt",),
            "torchvision SUN397 in CoOp's folder, without the split file",
            lambda root: _sun_tv(root / "sun397"),
        ),
    ),
}


def find_layout(root: str | Path, name: str) -> str:
    """Which layout of dataset ``name`` is under ``root`` (the paths it uses); a clear error when none is."""
    root = Path(root)
    return _layout(root, _check_name(name)).describe(root)


def _check_name(name: str) -> str:
    if name not in MTIL_DATASETS:
        raise ValueError(f"unknown MTIL dataset {name!r}; choose from {', '.join(MTIL_DATASETS)}")
    return name


def _missing(root: Path, name: str) -> str:
    options = "\n".join(f"  - {layout.describe(root)}" for layout in _LAYOUTS[name])
    return f"{name}: not found under {root}; expected one of\n{options}"


def _layout(root: Path, name: str) -> _Layout:
    for layout in _LAYOUTS[name]:
        if layout.present(root):
            return layout
    raise FileNotFoundError(f"{_missing(root, name)}\n(see {DOCS} for the layout)")


# --------------------------------------------------------------------------------- the tasks
def mtil_task(root: str | Path, name: str, shots: int | None = None, seed: int = 0) -> TaskData:
    """One MTIL dataset as a stream task; its files are read on the first ``train``/``test`` call, once.

    ``shots`` keeps that many training images per class (16 in DIKI, 5 in MoE-Adapters), drawn under
    ``seed``; the test split is always whole.
    """
    root = Path(root)
    _check_name(name)
    if shots is not None and shots < 1:
        raise ValueError(f"shots must be a positive number of images per class (or None for all), got {shots}")
    layout = _layout(root, name)
    splits = functools.cache(lambda: layout.build(root))

    def train(preprocess: Callable) -> MTILDataset:
        split = splits()["train"]
        if shots is not None:
            split = split.subset(few_shot_indices(split.labels, shots, seed, salt=name))
        return MTILDataset(name, split, preprocess)

    def test(preprocess: Callable) -> MTILDataset:
        return MTILDataset(name, splits()["test"], preprocess)

    return TaskData(
        name=name,
        classes=list(CLASSNAMES[name]),
        template=MTIL_TEMPLATES[name],
        role="stream",
        train=train,
        test=test,
    )


def mtil_tasks(
    root: str | Path,
    order: str = "I",
    shots: int | None = None,
    seed: int = 0,
    datasets: Sequence[str] | None = None,
) -> list[TaskData]:
    """The MTIL stream under ``root`` in order ``"I"`` or ``"II"`` (optionally only ``datasets``, same order).

    Every dataset's folder is checked up front: one error lists all that are missing.
    """
    root = Path(root)
    key = order.upper()
    if key not in MTIL_ORDERS:
        raise ValueError(f"unknown MTIL order {order!r}; choose from {', '.join(MTIL_ORDERS)}")
    names = list(MTIL_ORDERS[key])
    if datasets is not None:
        for n in datasets:
            _check_name(n)
        names = [n for n in names if n in set(datasets)]
    if not root.is_dir():
        raise FileNotFoundError(f"MTIL data root {root} is not a folder (see {DOCS} for the layout)")
    missing = [_missing(root, n) for n in names if not any(layout.present(root) for layout in _LAYOUTS[n])]
    if missing:
        raise FileNotFoundError("\n".join(missing) + f"\n(see {DOCS} for the layout)")
    return [mtil_task(root, n, shots, seed) for n in names]
