"""Images that clients send: the one image decoder (``diki_model.data.images``) with the endpoint's limits.

The endpoint accepts PNG, JPEG and WebP, checks byte size, magic bytes, the header's pixel count
and aspect ratio before decoding any pixels, verifies the structure, then decodes on a fresh parser
(truncated data fails there). Datasets go through the same decoder with their own limits.
"""

from __future__ import annotations

from typing import Final

from PIL import Image

from diki_model.data import ImageDecodeError, decode_rgb, header_size, sniff_format

__all__ = ["ALLOWED_FORMATS", "MAX_ASPECT_RATIO", "ImageInputError", "decode_image", "is_small", "sniff_format"]

ALLOWED_FORMATS: Final = ("PNG", "JPEG", "WEBP")
# Preprocessing resizes the short side to the model's input size; a 1 x 10^7 strip would become a
# huge tensor. Images longer than this many times their width (or the reverse) are refused.
MAX_ASPECT_RATIO: Final = 32.0

# An image a client sent cannot be used; ``code`` names why, ``status`` is the HTTP status to answer.
ImageInputError = ImageDecodeError


def is_small(data: bytes, max_bytes: int, max_pixels: int) -> bool:
    """True when ``data`` is at most ``max_bytes`` and its header names at most ``max_pixels`` pixels.

    Reads the header only (no pixel decoding); anything unreadable counts as not small.
    """
    if len(data) > max_bytes:
        return False
    size = header_size(data, ALLOWED_FORMATS)
    return size is not None and size[0] * size[1] <= max_pixels


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, where: str = "image") -> Image.Image:
    """Decode PNG, JPEG or WebP bytes into an RGB image, or raise :class:`ImageInputError`.

    ``where`` names the input in messages (``"file"``, ``"items[2].image_base64"``).
    """
    return decode_rgb(
        data,
        formats=ALLOWED_FORMATS,
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        max_aspect_ratio=MAX_ASPECT_RATIO,
        verify=True,
        where=where,
    )
