"""The one image decoder: bytes in, an RGB ``PIL.Image`` out, with limits checked before the pixels are decoded.

Datasets (training, evaluation, validation of a drop) and the Serve endpoint (images that clients
send) both decode through :func:`decode_rgb`; they differ only in the limits they pass.

Order of checks, cheapest first: byte size, magic bytes (so a known but unsupported format gets a
precise answer), header-only open (dimensions, without decoding pixels), pixel count and aspect
ratio, optionally ``verify()`` (structure and checksums), then the full decode on a fresh parser
(truncated data fails here), then conversion to RGB. Only the allowed formats' decoders ever run.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import Final

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["DEFAULT_MAX_PIXELS", "ImageDecodeError", "decode_rgb", "header_size", "sniff_format"]

DEFAULT_MAX_PIXELS: Final = 64_000_000

# Magic bytes of formats we recognise; only the allowed ones are decoded.
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


class ImageDecodeError(ValueError):
    """Image bytes cannot be used. ``code`` names the problem; ``status`` is the HTTP status that fits it."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    def __reduce__(self):  # picklable across process boundaries (Ray workers)
        return (type(self), (self.code, self.message, self.status))


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


def _names(formats: Sequence[str]) -> str:
    return formats[0] if len(formats) == 1 else f"{', '.join(formats[:-1])} or {formats[-1]}"


def header_size(data: bytes, formats: Sequence[str]) -> tuple[int, int] | None:
    """(width, height) read from the header only, or None when the header cannot be read."""
    if sniff_format(data) not in formats:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=tuple(formats)).size
    except Exception:  # noqa: BLE001 - the full decoder reports the problem
        return None


def _broken(prefix: str, fmt: str, err: BaseException) -> ImageDecodeError:
    detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    code = "truncated_image" if "truncat" in str(err).lower() or isinstance(err, EOFError) else "corrupt_image"
    return ImageDecodeError(code, f"{prefix}{fmt} image is truncated or corrupt ({detail})")


def decode_rgb(
    data: bytes,
    *,
    formats: Sequence[str] = ("PNG", "JPEG"),
    max_bytes: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float | None = None,
    verify: bool = False,
    where: str | None = None,
) -> Image.Image:
    """Decode image bytes of one of ``formats`` into an RGB image, or raise :class:`ImageDecodeError`.

    Args:
        max_bytes: refuse larger inputs before looking at them (None: no byte limit).
        max_pixels: refuse images whose header names more pixels, before decoding them.
        max_aspect_ratio: refuse images whose long side exceeds this many times the short side.
        verify: run PIL's ``verify()`` (structure and checksums) before the decode.
        where: names the input in messages (``"file"``, ``"items[2].image_base64"``).
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ImageDecodeError("not_an_image", f"{prefix}image must be bytes, got {type(data).__name__}")
    data = bytes(data)
    size = len(data)
    if size == 0:
        raise ImageDecodeError("empty_image", f"{prefix}image is empty (0 bytes)")
    if max_bytes is not None and size > max_bytes:
        raise ImageDecodeError(
            "image_too_large", f"{prefix}image is {size} bytes, more than the limit of {max_bytes}", 413
        )
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageDecodeError(
            "not_an_image", f"{prefix}not a {_names(formats)} image (cannot identify the image data)"
        )
    if fmt not in formats:
        raise ImageDecodeError(
            "unsupported_image_format",
            f"{prefix}unsupported image format {fmt}: only {_names(formats)} are accepted",
            415,
        )
    with warnings.catch_warnings():
        # The pixel limit is ours (max_pixels), checked on the header; PIL's own warning is not the check.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            header = Image.open(io.BytesIO(data), formats=tuple(formats))
        except Image.DecompressionBombError as err:
            raise ImageDecodeError(
                "image_too_many_pixels", f"{prefix}image has more than {max_pixels} pixels", 413
            ) from err
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise _broken(prefix, fmt, err) from err
        width, height = header.size
        if width < 1 or height < 1:
            raise ImageDecodeError("corrupt_image", f"{prefix}image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageDecodeError(
                "image_too_many_pixels",
                f"{prefix}image has {width}x{height} = {width * height} pixels, more than {max_pixels}",
                413,
            )
        if max_aspect_ratio is not None and max(width, height) > max_aspect_ratio * min(width, height):
            raise ImageDecodeError(
                "image_aspect_ratio",
                f"{prefix}image is {width}x{height}; its long side may be at most {max_aspect_ratio:g} "
                "times its short side",
                422,
            )
        if verify:
            try:
                header.verify()
            except Exception as err:  # noqa: BLE001 - PIL raises many types for broken data
                raise _broken(prefix, fmt, err) from err
            # verify() leaves the parser unusable: decode on a fresh one.
            header = Image.open(io.BytesIO(data), formats=tuple(formats))
        # Truncated data fails here (PIL's LOAD_TRUNCATED_IMAGES is left at its default, False).
        try:
            header.load()
        except Image.DecompressionBombError as err:
            raise ImageDecodeError(
                "image_too_many_pixels", f"{prefix}image has more than {max_pixels} pixels", 413
            ) from err
        except Exception as err:  # noqa: BLE001
            raise _broken(prefix, fmt, err) from err
    return _to_rgb(header, prefix)


def _to_rgb(img: Image.Image, prefix: str) -> Image.Image:
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
        raise ImageDecodeError(
            "unsupported_image_mode", f"{prefix}pixel mode {img.mode} cannot be converted to RGB ({err})", 415
        ) from err
