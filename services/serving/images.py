"""Decoding images that clients send, with limits checked before the pixels are decoded.

Order of checks, cheapest first: byte size, magic bytes (so a known but unsupported format gets a
precise answer), header-only open (dimensions, without decoding pixels), pixel count and aspect
ratio, ``verify()`` (structure and checksums), then the full decode on a fresh parser (truncated
data fails here), then conversion to RGB. Only PNG, JPEG and WebP decoders are ever run.
"""

from __future__ import annotations

import io
import warnings
from typing import Final

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ALLOWED_FORMATS", "MAX_ASPECT_RATIO", "ImageInputError", "decode_image", "is_small", "sniff_format"]

ALLOWED_FORMATS: Final = ("PNG", "JPEG", "WEBP")
# Preprocessing resizes the short side to the model's input size; a 1 x 10^7 strip would become a
# huge tensor. Images longer than this many times their width (or the reverse) are refused.
MAX_ASPECT_RATIO: Final = 32.0

# Magic bytes of formats we recognise; only ALLOWED_FORMATS are decoded.
_MAGIC: Final[tuple[tuple[int, bytes, str], ...]] = (
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"8BPS", "PSD"),
    (0, b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
    (0, b"\xff\x4f\xff\x51", "JPEG2000"),
    (0, b"qoif", "QOI"),
    (0, b"%PDF", "PDF"),
)


class ImageInputError(ValueError):
    """An image a client sent cannot be used. ``status`` is the HTTP status to answer with."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def sniff_format(data: bytes) -> str | None:
    """The image format named by the leading bytes, or None when unknown."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if len(data) >= 12 and data[4:8] == b"ftyp":
        brand = data[8:12]
        return "AVIF" if brand in (b"avif", b"avis") else "HEIF"
    for offset, magic, name in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return name
    return None


def is_small(data: bytes, max_bytes: int, max_pixels: int) -> bool:
    """True when ``data`` is at most ``max_bytes`` and its header names at most ``max_pixels`` pixels.

    Reads the header only (no pixel decoding); anything unreadable counts as not small.
    """
    if len(data) > max_bytes or sniff_format(data) not in ALLOWED_FORMATS:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS).size
    except Exception:  # noqa: BLE001 - the full decoder reports the problem
        return False
    return width * height <= max_pixels


def _broken(where: str, fmt: str, err: BaseException, what: str) -> ImageInputError:
    detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    if "truncat" in str(err).lower() or isinstance(err, EOFError):
        return ImageInputError("truncated_image", f"{where}: the {fmt} image is truncated ({detail})")
    return ImageInputError("corrupt_image", f"{where}: the {fmt} {what} ({detail})")


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, where: str = "image") -> Image.Image:
    """Decode PNG, JPEG or WebP bytes into an RGB image, or raise :class:`ImageInputError`.

    ``where`` names the input in messages (``"file"``, ``"items[2].image_base64"``).
    """
    size = len(data)
    if size == 0:
        raise ImageInputError("empty_image", f"{where}: the image is empty (0 bytes)")
    if size > max_bytes:
        raise ImageInputError(
            "image_too_large", f"{where}: the image has {size} bytes, more than the limit of {max_bytes}", 413
        )
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageInputError(
            "not_an_image", f"{where}: the data is not an image (expected one of {', '.join(ALLOWED_FORMATS)})"
        )
    if fmt not in ALLOWED_FORMATS:
        raise ImageInputError(
            "unsupported_image_format",
            f"{where}: {fmt} images are not supported; send one of {', '.join(ALLOWED_FORMATS)}",
            415,
        )
    with warnings.catch_warnings():
        # The pixel limit is ours (max_pixels); PIL's own warning is not the check.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            header = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except Image.DecompressionBombError as err:
            raise ImageInputError("image_too_many_pixels", f"{where}: {err}", 413) from err
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise _broken(where, fmt, err, "header cannot be read: the data is truncated or corrupt") from err
        width, height = header.size
        if width < 1 or height < 1:
            raise ImageInputError("corrupt_image", f"{where}: the image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageInputError(
                "image_too_many_pixels",
                f"{where}: the image has {width}x{height} = {width * height} pixels, more than the limit of "
                f"{max_pixels}",
                413,
            )
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise ImageInputError(
                "image_aspect_ratio",
                f"{where}: the image is {width}x{height}; its long side may be at most {MAX_ASPECT_RATIO:g} "
                "times its short side",
                422,
            )
        try:
            header.verify()
        except Exception as err:  # noqa: BLE001 - PIL raises many types for broken data
            raise _broken(where, fmt, err, "data is corrupt") from err
        # verify() leaves the parser unusable; decode on a fresh one. Truncated data fails here
        # (PIL's LOAD_TRUNCATED_IMAGES is left at its default, False).
        try:
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            img.load()
        except Image.DecompressionBombError as err:
            raise ImageInputError("image_too_many_pixels", f"{where}: {err}", 413) from err
        except Exception as err:  # noqa: BLE001
            raise _broken(where, fmt, err, "data cannot be decoded") from err
    if img.mode == "RGB":
        return img
    try:
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            # Composite transparent images on white rather than on undefined colour values.
            rgba = img.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, (255, 255, 255))
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        if img.mode.startswith("I"):  # 16- or 32-bit grey: scale to 8 bits
            arr = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
            img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8))
        return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise ImageInputError(
            "unsupported_image_mode", f"{where}: pixel mode {img.mode} cannot be converted to RGB ({err})", 415
        ) from err
