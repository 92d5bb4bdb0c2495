"""MTIL loaders, offline: tiny fake folders shaped like the real datasets (nothing is downloaded)."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
import torchvision.transforms as T
from PIL import Image

from diki_model.bench.mtil import (
    DIKI_FEW_SHOT_DATASETS,
    MTIL_DATASETS,
    MTIL_ORDERS,
    MTIL_TEMPLATES,
    MTILDataset,
    few_shot_indices,
    find_layout,
    mtil_task,
    mtil_tasks,
)
from diki_model.bench.mtil_classnames import CLASSNAMES, FLOWERS, name_key
from diki_model.bench.stream import TaskData

PRE = T.Compose([T.Resize((8, 8)), T.PILToTensor()])
EXPECTED_CLASSES = {
    "Aircraft": 100,
    "Caltech101": 100,
    "CIFAR100": 100,
    "DTD": 47,
    "EuroSAT": 10,
    "Flowers": 102,
    "Food": 101,
    "MNIST": 10,
    "OxfordPet": 37,
    "StanfordCars": 196,
    "SUN397": 397,
}


def _image(path: Path, value: int = 0, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (6, 5), value if mode == "L" else (value, 255 - value, 7)).save(path)


def _idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file as MNIST ships it (big-endian magic 0x0803 images / 0x0801 labels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _cifar_files(folder: Path, train_labels: list[int], test_labels: list[int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = [c.replace(" ", "_") for c in CLASSNAMES["CIFAR100"]]  # the pickles keep underscores
    for split, labels in (("train", train_labels), ("test", test_labels)):
        data = np.full((len(labels), 3 * 32 * 32), 9, dtype=np.uint8)
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * len(labels)}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": ["x"] * 20}, f)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data root with fake Caltech101 (CoOp split), MNIST (torchvision IDX), CIFAR100 (DIKI pickles),
    EuroSAT (torchvision folders, no split) and Aircraft (torchvision FGVC layout)."""
    r = tmp_path_factory.mktemp("mtil")

    # Caltech101, CoOp: paths keep the folder names, the split file carries CoOp's class names.
    cal = r / "caltech-101"
    items: dict[str, list] = {"train": [], "val": [], "test": []}
    for folder, cname, label in (("Faces", "face", 0), ("car_side", "car_side", 18), ("yin_yang", "yin_yang", 99)):
        for i in range(1, 8):
            rel = f"{folder}/image_{i:04d}.jpg"
            _image(cal / "101_ObjectCategories" / rel, i * 10)
            split = "train" if i <= 4 else "val" if i == 5 else "test"
            items[split].append([rel, label, cname])
    (cal / "split_zhou_Caltech101.json").write_text(json.dumps(items))

    # MNIST, torchvision: MNIST/raw/ with the four uncompressed IDX files.
    rng = np.random.default_rng(0)
    _idx(r / "MNIST/raw/train-images-idx3-ubyte", rng.integers(0, 255, (40, 28, 28)))
    _idx(r / "MNIST/raw/train-labels-idx1-ubyte", np.arange(40) % 10)
    _idx(r / "MNIST/raw/t10k-images-idx3-ubyte", rng.integers(0, 255, (20, 28, 28)))
    _idx(r / "MNIST/raw/t10k-labels-idx1-ubyte", np.arange(20) % 10)

    # CIFAR100 as DIKI keeps it: cifar100/{train,test,meta} pickles.
    _cifar_files(r / "cifar100", [0, 1, 55, 99, 1, 0], [99, 55])

    # EuroSAT, torchvision: eurosat/2750/<Folder>/*.jpg, no official split.
    for folder in ("AnnualCrop", "SeaLake", "Highway"):
        for i in range(10):
            _image(r / f"eurosat/2750/{folder}/{folder}_{i + 1}.jpg", i)

    # Aircraft, torchvision: fgvc-aircraft-2013b/data/.
    data = r / "fgvc-aircraft-2013b/data"
    _write_aircraft(data)
    return r


def _write_aircraft(data: Path) -> None:
    variants = list(CLASSNAMES["Aircraft"])
    data.mkdir(parents=True, exist_ok=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    rows = {
        "train": [("0001", "707-320"), ("0002", "Boeing 717"), ("0003", "Boeing 717")],
        "test": [("0004", "Yak-42")],
    }
    for split, lines in rows.items():
        (data / f"images_variant_{split}.txt").write_text("".join(f"{i} {v}\n" for i, v in lines))
        for image_id, _ in lines:
            _image(data / "images" / f"{image_id}.jpg", int(image_id))


# --------------------------------------------------------------------------------- metadata
def test_metadata_of_all_eleven_datasets() -> None:
    assert MTIL_DATASETS == tuple(EXPECTED_CLASSES)
    for name, n in EXPECTED_CLASSES.items():
        names = CLASSNAMES[name]
        assert len(names) == n, name
        assert len({name_key(c) for c in names}) == n, f"{name}: two classes share a matching key"
        assert all("_" not in c for c in names), name
        assert MTIL_TEMPLATES[name].count("{}") == 1
    assert MTIL_TEMPLATES["Aircraft"] == "a photo of a {}, a type of aircraft."
    assert MTIL_TEMPLATES["MNIST"] == 'a photo of the number: "{}".'
    assert MTIL_TEMPLATES["EuroSAT"] == "a centered satellite photo of {}."
    assert set(DIKI_FEW_SHOT_DATASETS) == set(MTIL_DATASETS) - {"EuroSAT", "MNIST", "OxfordPet"}


def test_class_names_follow_coop() -> None:
    assert FLOWERS == tuple(tvd.Flowers102.classes)  # CoOp's cat_to_name.json, which torchvision ships too
    assert CLASSNAMES["StanfordCars"][0] == "2000 AM General Hummer SUV"  # year first
    assert CLASSNAMES["SUN397"][8] == "outdoor apartment building"  # qualifier first
    assert CLASSNAMES["Caltech101"][:3] == ("face", "leopard", "motorbike")
    assert "BACKGROUND_Google" not in CLASSNAMES["Caltech101"] and "Faces_easy" not in CLASSNAMES["Caltech101"]
    assert name_key("Audi S4 Sedan 2012") == name_key("2012 Audi S4 Sedan")
    assert name_key("apartment_building/outdoor") == name_key("outdoor apartment building")


def test_orders() -> None:
    assert MTIL_ORDERS["I"] == tuple(sorted(MTIL_DATASETS, key=str.lower))
    assert MTIL_ORDERS["II"] == (
        "StanfordCars", "Food", "MNIST", "OxfordPet", "Flowers", "SUN397",
        "Aircraft", "Caltech101", "DTD", "EuroSAT", "CIFAR100",
    )  # fmt: skip
    assert sorted(MTIL_ORDERS["II"]) == sorted(MTIL_DATASETS)


# ----------------------------------------------------------------------------- the loaders
def test_coop_split_file(root: Path) -> None:
    task = mtil_task(root, "Caltech101")
    assert isinstance(task, TaskData) and task.role == "stream"
    assert len(task.classes) == 100 and task.template == "a photo of a {}."
    train, test = task.train(PRE), task.test(PRE)
    assert (len(train), len(test)) == (12, 6)  # CoOp's val items are left out
    ids = {task.classes.index(c) for c in ("face", "car side", "yin yang")}
    assert set(train.labels) == ids and set(test.labels) == ids
    x, y = train[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8 and y == train.labels[0]
    assert "CoOp" in find_layout(root, "Caltech101")


def test_coop_split_preferred_over_torchvision(root: Path, tmp_path: Path) -> None:
    for folder in ("BACKGROUND_Google", "Faces", "Faces_easy", "yin_yang"):
        _image(tmp_path / f"caltech101/101_ObjectCategories/{folder}/image_0001.jpg")
    assert "torchvision" in find_layout(tmp_path, "Caltech101")
    (tmp_path / "caltech-101").symlink_to(root / "caltech-101")
    assert "CoOp" in find_layout(tmp_path, "Caltech101")


def test_torchvision_caltech_drops_background_and_easy_faces(tmp_path: Path) -> None:
    for folder in ("BACKGROUND_Google", "Faces", "Faces_easy", "airplanes"):
        for i in range(1, 11):
            _image(tmp_path / f"caltech101/101_ObjectCategories/{folder}/image_{i:04d}.jpg", i)
    task = mtil_task(tmp_path, "Caltech101")
    train, test = task.train(PRE), task.test(PRE)
    face, airplane = task.classes.index("face"), task.classes.index("airplane")
    assert sorted(set(train.labels)) == sorted(set(test.labels)) == sorted({face, airplane})
    assert (len(train), len(test)) == (10, 6)  # 5 + 3 of 10 per class: 50% train, 30% test
    assert train[0][0].shape == (3, 8, 8)


def test_binary_mnist_in_torchvision_layout(root: Path) -> None:
    task = mtil_task(root, "MNIST")
    train, test = task.train(PRE), task.test(PRE)
    assert (len(train), len(test)) == (40, 20)
    assert (
        task.classes[3] == "3 - three"
        and task.template.format(task.classes[3]) == 'a photo of the number: "3 - three".'
    )
    assert train.labels == [i % 10 for i in range(40)]
    x, _ = test[5]
    assert x.shape == (3, 8, 8)  # greyscale digits come out RGB


@pytest.mark.parametrize("layout", ["diki", "torchvision"])
def test_binary_cifar100(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    if layout == "torchvision":  # the same pickles under torchvision's folder; fakes cannot match its md5s
        _cifar_files(tmp_path / "cifar-100-python", [0, 1, 55, 99, 1, 0], [99, 55])
        monkeypatch.setattr(tvd.cifar, "check_integrity", lambda *a, **k: True)
        where = tmp_path
    else:
        where = root
    task = mtil_task(where, "CIFAR100")
    train, test = task.train(PRE), task.test(PRE)
    assert train.labels == [0, 1, 55, 99, 1, 0] and test.labels == [99, 55]
    assert task.classes[1] == "aquarium fish" and task.classes[55] == "otter"
    assert train[2][0].shape == (3, 8, 8)


def test_torchvision_eurosat_gets_a_fixed_split(root: Path) -> None:
    task = mtil_task(root, "EuroSAT")
    train, test = task.train(PRE), task.test(PRE)
    assert len(task.classes) == 10
    wanted = {task.classes.index(c) for c in ("Annual Crop Land", "Sea or Lake", "Highway or Road")}
    assert set(train.labels) == set(test.labels) == wanted
    assert (len(train), len(test)) == (15, 9)  # per class of 10: 5 train, 2 held out, 3 test
    again = mtil_task(root, "EuroSAT").test(PRE)
    assert again._split.indices == test._split.indices
    assert not set(train._split.indices) & set(test._split.indices)


@pytest.mark.parametrize("folder", ["fgvc-aircraft-2013b/data", "fgvc_aircraft"])
def test_aircraft_layouts(root: Path, tmp_path: Path, folder: str) -> None:
    where = root
    if folder == "fgvc_aircraft":  # DIKI/CoOp keep the archive's data/ folder under this name
        _write_aircraft(tmp_path / folder)
        where = tmp_path
    task = mtil_task(where, "Aircraft")
    train, test = task.train(PRE), task.test(PRE)
    boeing = task.classes.index("Boeing 717")
    assert train.labels == [0, boeing, boeing] and test.labels == [99]
    assert task.template.format(task.classes[99]) == "a photo of a Yak-42, a type of aircraft."
    assert train[1][0].shape == (3, 8, 8)


def test_torchvision_pets_label_by_breed(tmp_path: Path) -> None:
    base = tmp_path / "oxford-iiit-pet"
    lines = {"trainval": [("Abyssinian_1", 1), ("beagle_3", 5), ("beagle_4", 5)], "test": [("yorkshire_terrier_2", 37)]}
    for split, rows in lines.items():
        (base / "annotations").mkdir(parents=True, exist_ok=True)
        (base / "annotations" / f"{split}.txt").write_text("".join(f"{i} {c} 1 1\n" for i, c in rows))
        for image_id, _ in rows:
            _image(base / "images" / f"{image_id}.jpg")
    task = mtil_task(tmp_path, "OxfordPet")
    assert task.train(PRE).labels == [0, 4, 4] and task.test(PRE).labels == [36]
    assert task.classes[4] == "beagle" and task.template == "a photo of a {}, a type of pet."


def test_torchvision_sun397_matches_coop_names(tmp_path: Path) -> None:
    data = tmp_path / "SUN397"
    data.mkdir()
    (data / "ClassName.txt").write_text("/a/abbey\n/a/apartment_building/outdoor\n")
    for cls in ("a/abbey", "a/apartment_building/outdoor"):
        for i in range(4):
            _image(data / cls / f"sun_{cls[-3:]}{i}.jpg", i)
    task = mtil_task(tmp_path, "SUN397")
    labels = set(task.train(PRE).labels) | set(task.test(PRE).labels)
    assert labels == {0, task.classes.index("outdoor apartment building")}


# ------------------------------------------------------------------------------- few-shot
def test_few_shot_subset(root: Path) -> None:
    full = mtil_task(root, "EuroSAT").train(PRE)
    few = mtil_task(root, "EuroSAT", shots=2, seed=0).train(PRE)
    assert len(few) == 6 and all(few.labels.count(y) == 2 for y in set(full.labels))
    assert set(few._split.indices) <= set(full._split.indices)
    same = mtil_task(root, "EuroSAT", shots=2, seed=0).train(PRE)
    other = mtil_task(root, "EuroSAT", shots=2, seed=1).train(PRE)
    assert same._split.indices == few._split.indices
    assert other._split.indices != few._split.indices
    assert len(mtil_task(root, "EuroSAT", shots=2).test(PRE)) == 9  # the test split stays whole
    assert len(mtil_task(root, "EuroSAT", shots=16).train(PRE)) == 15  # fewer than 16: every image


def test_few_shot_indices() -> None:
    labels = [0] * 10 + [1] * 3 + [2] * 7
    picked = few_shot_indices(labels, 5, seed=3, salt="X")
    assert [labels[p] for p in picked].count(0) == 5 and [labels[p] for p in picked].count(1) == 3
    assert picked == few_shot_indices(labels, 5, seed=3, salt="X") and picked == sorted(picked)
    assert picked != few_shot_indices(labels, 5, seed=3, salt="Y")
    with pytest.raises(ValueError, match="shots"):
        few_shot_indices(labels, 0)


# ---------------------------------------------------------------------------- the stream
def test_stream_orders(root: Path) -> None:
    present = ["Aircraft", "Caltech101", "CIFAR100", "EuroSAT", "MNIST"]
    assert [t.name for t in mtil_tasks(root, "I", datasets=present)] == present
    tasks = mtil_tasks(root, "II", shots=16, datasets=present)
    assert [t.name for t in tasks] == ["MNIST", "Aircraft", "Caltech101", "EuroSAT", "CIFAR100"]
    for t in tasks:
        assert t.role == "stream" and len(t.classes) == EXPECTED_CLASSES[t.name]
        assert t.template == MTIL_TEMPLATES[t.name]
        ds = t.train(PRE)
        assert isinstance(ds, MTILDataset) and 0 <= min(ds.labels) and max(ds.labels) < len(t.classes)
    with pytest.raises(ValueError, match="order"):
        mtil_tasks(root, "III")


# ------------------------------------------------------------------------------ the errors
def test_missing_datasets_are_named_with_their_folders(root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        mtil_tasks(root, "I")
    msg = str(err.value)
    for name in ("DTD", "Flowers", "Food", "OxfordPet", "StanfordCars", "SUN397"):
        assert f"{name}: not found under {root}" in msg
    assert "Caltech101: not found" not in msg and "MNIST: not found" not in msg
    assert str(root / "dtd/split_zhou_DescribableTextures.json") in msg and "docs/mtil.md" in msg

    with pytest.raises(FileNotFoundError, match=r"caltech-101/split_zhou_Caltech101\.json"):
        mtil_task(tmp_path, "Caltech101")
    assert list(tmp_path.iterdir()) == []  # nothing created, nothing downloaded
    with pytest.raises(FileNotFoundError, match="not a folder"):
        mtil_tasks(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown MTIL dataset"):
        mtil_task(root, "ImageNet")


def test_split_file_naming_an_unknown_class_is_rejected(tmp_path: Path) -> None:
    cal = tmp_path / "caltech-101"
    _image(cal / "101_ObjectCategories/kittens/image_0001.jpg")
    item = ["kittens/image_0001.jpg", 0, "kittens"]
    (cal / "split_zhou_Caltech101.json").write_text(json.dumps({"train": [item], "val": [], "test": [item]}))
    task = mtil_task(tmp_path, "Caltech101")
    with pytest.raises(ValueError, match=r"not among the 100 MTIL classes of Caltech101: \['kittens'\]"):
        task.train(PRE)


def test_coop_split_file_next_to_a_torchvision_download(root: Path, tmp_path: Path) -> None:
    (tmp_path / "caltech101").mkdir()
    (tmp_path / "caltech101/101_ObjectCategories").symlink_to(root / "caltech-101/101_ObjectCategories")
    (tmp_path / "caltech101/split_zhou_Caltech101.json").write_bytes(
        (root / "caltech-101/split_zhou_Caltech101.json").read_bytes()
    )
    assert "CoOp" in find_layout(tmp_path, "Caltech101")
    task = mtil_task(tmp_path, "Caltech101")
    assert (len(task.train(PRE)), len(task.test(PRE))) == (12, 6)
