"""Images the project draws itself: attribute-coded shapes, outline shapes, glyphs and pattern textures.

Everything is drawn at 4x the output size and box-downsampled, so edges are anti-aliased, and
every random choice comes from the ``numpy.random.Generator`` passed in (deterministic under a seed).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from diki_model.datasets.sources import MissingSourceError

SIZE = 32  # output side, the backbone's input
SS = 4  # supersampling factor
BIG = SIZE * SS

# The pre-training vocabulary: a shape image is described by one word per factor, in this order.
SIZES = ("small", "large")
COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "white")
FILLS = ("solid", "striped", "dotted")
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart")
FACTORS = (("size", SIZES), ("colour", COLOURS), ("fill", FILLS), ("shape", SHAPES))

_GRID_SMALL = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
_GRID_BIG = np.mgrid[0:BIG, 0:BIG].astype(np.float32) / SS

RGB = {
    "red": (225, 35, 35),
    "green": (40, 185, 50),
    "blue": (45, 85, 235),
    "yellow": (240, 225, 40),
    "orange": (250, 140, 20),
    "purple": (145, 50, 205),
    "pink": (250, 130, 195),
    "white": (240, 240, 240),
}

# Shapes the pre-training never shows; they name the classes of the outline-shapes stream task.
OUTLINE_SHAPES = ("arrow", "crescent", "pentagon", "ring", "trapezoid", "lightning bolt")
GLYPHS = ("A", "B", "C", "D", "E", "F", "G", "H", "J", "K")
PATTERNS = ("waves", "clouds", "speckles", "zigzags", "ripples")
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
)


def is_held_out_pair(shape: str, colour: str) -> bool:
    """The (shape, colour) pairs that pre-training never shows: a quarter of them, spread over every word."""
    return (SHAPES.index(shape) + COLOURS.index(colour)) % 4 == 0


def pretrain_shape_classes() -> list[str]:
    """``size colour fill shape`` phrases for every combination whose (shape, colour) pair is not held out."""
    return [
        f"{size} {colour} {fill} {shape}"
        for size in SIZES
        for colour in COLOURS
        for fill in FILLS
        for shape in SHAPES
        if not is_held_out_pair(shape, colour)
    ]


# --- geometry -------------------------------------------------------------------------------


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _regular(n: int, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _unit_polygon(shape: str) -> np.ndarray | None:
    """Vertices in the unit disc, or None for shapes drawn another way."""
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float) * 0.75
    if shape == "triangle":
        return _regular(3) * np.array([1.0, 1.0]) + np.array([0, 0.2])
    if shape == "diamond":
        return np.array([[0, -1], [0.6, 0], [0, 1], [-0.6, 0]], dtype=float)
    if shape == "hexagon":
        return _regular(6, 0.0) * 0.95
    if shape == "pentagon":
        return _regular(5) * 0.95
    if shape == "star":
        outer, inner = _regular(5), _regular(5, -math.pi / 2 + math.pi / 5) * 0.42
        return np.stack([outer, inner], axis=1).reshape(-1, 2)
    if shape == "cross":
        a = 0.32
        return np.array(
            [[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]]
        )
    if shape == "heart":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y + 2], axis=1) / 17
    if shape == "arrow":
        return np.array([[-1, -0.25], [0.2, -0.25], [0.2, -0.6], [1, 0], [0.2, 0.6], [0.2, 0.25], [-1, 0.25]])
    if shape == "trapezoid":
        return np.array([[-0.45, -0.6], [0.45, -0.6], [1, 0.6], [-1, 0.6]])
    if shape == "lightning bolt":
        return np.array([[0.1, -1], [-0.55, 0.1], [-0.05, 0.1], [-0.2, 1], [0.55, -0.2], [0.05, -0.2], [0.35, -1]])
    return None


def shape_mask(shape: str, cx: float, cy: float, radius: float, angle: float) -> Image.Image:
    """An 'L' mask at supersampled size; centre and radius are in output pixels."""
    mask = Image.new("L", (BIG, BIG), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = cx * SS, cy * SS, radius * SS
    if shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            h = r * 0.55
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=0)
        return mask
    if shape == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        off = np.array([math.cos(angle), math.sin(angle)]) * r * 0.45
        draw.ellipse([cx + off[0] - r * 0.85, cy + off[1] - r * 0.85, cx + off[0] + r * 0.85, cy + off[1] + r * 0.85],
                     fill=0)  # fmt: skip
        return mask
    unit = _unit_polygon(shape)
    if unit is None:
        raise ValueError(f"unknown shape {shape!r}")
    pts = _rotate(unit, angle) * r + np.array([cx, cy])
    draw.polygon([tuple(p) for p in pts], fill=255)
    return mask


def outline(mask: Image.Image, width: int) -> Image.Image:
    """The inner border of a mask, ``width`` output pixels wide (mask minus its erosion by a square)."""
    k = 2 * width * SS + 1
    m = np.asarray(mask)
    inner = np.pad(m, k // 2, mode="constant")
    inner = sliding_window_view(inner, k, axis=0).min(axis=-1)
    inner = sliding_window_view(inner, k, axis=1).min(axis=-1)
    return Image.fromarray((m.astype(np.int16) - inner).clip(0, 255).astype(np.uint8))


def _box(big: np.ndarray) -> np.ndarray:
    """(BIG, BIG) -> (SIZE, SIZE) by box averaging."""
    return big.reshape(SIZE, SS, SIZE, SS).mean(axis=(1, 3))


def composite(bg: np.ndarray, mask: Image.Image, colour: np.ndarray, pattern: np.ndarray | None = None) -> np.ndarray:
    """Paint ``colour`` (times ``pattern``) through a supersampled mask onto a (SIZE, SIZE, 3) background.

    The background is constant within each supersampled block, so compositing after box-averaging
    is exact and 16x cheaper.
    """
    alpha = np.asarray(mask, np.float32) / 255.0
    coverage = _box(alpha)[..., None]
    paint = _box(alpha * pattern if pattern is not None else alpha)[..., None]
    out = bg * (1 - coverage) + paint * colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --- backgrounds ----------------------------------------------------------------------------


def background(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A (SIZE, SIZE, 3) float background: ``dark`` (pre-training), ``grey`` or ``tinted`` (held-out)."""
    if kind == "dark":
        base = np.full(3, rng.uniform(0, 35))
        noise = 6.0
    elif kind == "grey":
        base = np.full(3, rng.uniform(95, 150))
        noise = 10.0
    elif kind == "tinted":
        base = rng.uniform(15, 60, size=3)
        base[rng.integers(3)] += rng.uniform(40, 80)
        noise = 8.0
    else:
        raise ValueError(f"unknown background {kind!r}")
    yy, xx = _GRID_SMALL / SIZE - 0.5
    g = rng.normal(0, 1, size=2) * (12 if kind != "dark" else 4)
    return base + (g[0] * xx + g[1] * yy)[..., None] + rng.normal(0, noise, size=(SIZE, SIZE, 1))


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: float = 18) -> np.ndarray:
    return np.clip(np.array(rgb, float) + rng.uniform(-amount, amount, size=3), 0, 255)


def _pattern(fill: str, rng: np.random.Generator) -> np.ndarray:
    """(BIG, BIG) in {0.25, 1}: where the fill shows its full colour."""
    yy, xx = _GRID_BIG
    if fill == "solid":
        return np.ones((BIG, BIG), np.float32)
    if fill == "striped":
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(3.6, 4.8)
        u = (xx * math.cos(theta) + yy * math.sin(theta)) / period + rng.uniform()
        return np.where((u % 1.0) < 0.5, 1.0, 0.25).astype(np.float32)
    if fill == "dotted":
        period = rng.uniform(3.6, 4.4)
        ox, oy = rng.uniform(0, period, size=2)
        dx = (xx + ox) % period - period / 2
        dy = (yy + oy) % period - period / 2
        return np.where(dx**2 + dy**2 < (0.3 * period) ** 2, 1.0, 0.25).astype(np.float32)
    raise ValueError(f"unknown fill {fill!r}")


# --- domains' renderers ---------------------------------------------------------------------


def render_shape(
    size: str, colour: str, fill: str, shape: str, rng: np.random.Generator, bg: str = "dark"
) -> np.ndarray:
    """One attribute-coded shape: (SIZE, SIZE, 3) uint8."""
    radius = rng.uniform(5.0, 7.0) if size == "small" else rng.uniform(11.0, 14.0)
    margin = radius + 1
    cx, cy = rng.uniform(margin, SIZE - margin, size=2)
    angle = rng.uniform(-0.35, 0.35)
    mask = shape_mask(shape, cx, cy, radius, angle)
    return composite(background(bg, rng), mask, _jitter(RGB[colour], rng), _pattern(fill, rng))


def render_outline_shape(shape: str, rng: np.random.Generator) -> np.ndarray:
    radius = rng.uniform(8.0, 14.0)
    cx, cy = rng.uniform(radius + 1, SIZE - radius - 1, size=2)
    angle = rng.uniform(-math.pi, math.pi) if shape not in ("pentagon", "trapezoid") else rng.uniform(-0.4, 0.4)
    border = outline(shape_mask(shape, cx, cy, radius, angle), width=1)
    return composite(background("dark", rng), border, rng.uniform(120, 255, size=3))


def font_paths() -> list[Path]:
    missing = [f for f in FONT_FILES if not (FONT_DIR / f).exists()]
    if missing:
        raise MissingSourceError(f"DejaVu fonts {missing} not found in {FONT_DIR}", apt="fonts-dejavu-core")
    return [FONT_DIR / f for f in FONT_FILES]


def render_glyph(glyph: str, rng: np.random.Generator, fonts: list[Path]) -> np.ndarray:
    font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), size=int(rng.uniform(17, 26) * SS))
    layer = Image.new("L", (BIG, BIG), 0)
    draw = ImageDraw.Draw(layer)
    left, top, right, bottom = draw.textbbox((0, 0), glyph, font=font)
    x = (BIG - (right - left)) / 2 - left + rng.uniform(-3, 3) * SS
    y = (BIG - (bottom - top)) / 2 - top + rng.uniform(-3, 3) * SS
    draw.text((x, y), glyph, fill=255, font=font)
    layer = layer.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR)
    return composite(background("dark", rng), layer, rng.uniform(130, 255, size=3))


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    coarse = Image.fromarray((rng.uniform(0, 255, size=(cells, cells))).astype(np.uint8))
    return np.asarray(coarse.resize((SIZE, SIZE), Image.BICUBIC), float) / 255.0


def render_pattern(pattern: str, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    theta = rng.uniform(0, math.pi)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    if pattern == "waves":
        t = 0.5 + 0.5 * np.sin(2 * math.pi * u / rng.uniform(5, 9) + rng.uniform(0, 6.3))
    elif pattern == "clouds":
        t = 0.6 * _smooth_noise(rng, 4) + 0.4 * _smooth_noise(rng, 8)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    elif pattern == "speckles":
        t = (rng.uniform(size=(SIZE, SIZE)) < rng.uniform(0.05, 0.12)).astype(float)
        t = np.asarray(Image.fromarray((t * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6)), float)
        t = np.clip(t / max(t.max(), 1e-6) * 1.4, 0, 1)
    elif pattern == "zigzags":
        period = rng.uniform(6, 10)
        tri = np.abs((u / period) % 2 - 1) * rng.uniform(3, 6)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (v + tri) / rng.uniform(5, 8))
    elif pattern == "ripples":
        cx, cy = rng.uniform(0, SIZE, size=2)
        r = np.hypot(xx - cx, yy - cy)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * r / rng.uniform(4, 7) + rng.uniform(0, 6.3))
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    fg, bg = rng.uniform(100, 255, size=3), rng.uniform(0, 90, size=3)
    img = bg + (fg - bg) * t[..., None] + rng.normal(0, 4, size=(SIZE, SIZE, 1))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
