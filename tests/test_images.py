"""The one image decoder and its limits, as the Serve endpoint and the dataset format use it (no services)."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from diki_model.data import DatasetError, ImageDecodeError, decode_image, decode_rgb, header_size, sniff_format
from services.serving.images import MAX_ASPECT_RATIO, is_small
from services.serving.images import decode_image as decode_request_image


def encoded(size: tuple[int, int], fmt: str = "PNG", mode: str = "RGB", color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode != "L" else 128).save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header names ``width`` x ``height`` pixels but which holds no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    # PIL reads the header up to the first IDAT chunk; this one holds a few bytes, far from the pixels.
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))


def request(data: bytes, **kw):
    return decode_request_image(
        data, max_bytes=kw.pop("max_bytes", 1 << 20), max_pixels=kw.pop("max_pixels", 10**6), **kw
    )


@pytest.mark.parametrize(
    "data, code, status",
    [
        (b"", "empty_image", 400),
        (b"plain text, not an image", "not_an_image", 400),
        (encoded((4, 4), "GIF", "P"), "unsupported_image_format", 415),
        (encoded((4, 4), "BMP"), "unsupported_image_format", 415),
        (encoded((64, 64))[:60], "truncated_image", 400),
        (encoded((1, 40)), "image_aspect_ratio", 422),
        (png_header_only(2000, 2000), "image_too_many_pixels", 413),
    ],
    ids=["empty", "text", "gif", "bmp", "cut-header", "strip", "pixel-bomb"],
)
def test_a_request_image_is_refused_with_its_code_and_status(data, code, status):
    with pytest.raises(ImageDecodeError) as info:
        request(data, where="file")
    assert (info.value.code, info.value.status) == (code, status)
    assert info.value.message.startswith("file: ")


def test_the_byte_limit_is_checked_before_anything_else():
    data = encoded((8, 8))
    assert request(data, max_bytes=len(data)).size == (8, 8)  # exactly at the limit: accepted
    with pytest.raises(ImageDecodeError) as info:
        request(data, max_bytes=len(data) - 1)
    assert info.value.code == "image_too_large" and info.value.status == 413
    assert f"{len(data)} bytes, more than the limit of {len(data) - 1}" in info.value.message


def test_the_pixel_limit_is_read_from_the_header_and_is_inclusive():
    data = encoded((10, 10))
    assert request(data, max_pixels=100).size == (10, 10)
    with pytest.raises(ImageDecodeError, match="10x10 = 100 pixels, more than 99"):
        request(data, max_pixels=99)
    # A header naming 81 million pixels is refused with our limit, never PIL's, and nothing is decoded.
    with pytest.raises(ImageDecodeError, match="9000x9000 = 81000000 pixels, more than 64000000"):
        decode_rgb(png_header_only(9000, 9000))


def test_the_aspect_ratio_limit_is_inclusive():
    ok = encoded((1, int(MAX_ASPECT_RATIO)))
    assert request(ok).size == (1, 32)
    with pytest.raises(ImageDecodeError) as info:
        request(encoded((1, int(MAX_ASPECT_RATIO) + 1)))
    assert info.value.code == "image_aspect_ratio"


def test_truncated_pixel_data_is_refused_after_the_header_was_read():
    full = _noisy_png(64)
    with pytest.raises(ImageDecodeError) as info:
        request(full[: len(full) // 2])
    assert info.value.code in ("truncated_image", "corrupt_image") and "truncated or corrupt" in info.value.message


def _noisy_png(side: int) -> bytes:
    import numpy as np

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_modes_become_rgb_and_transparency_is_composited_on_white():
    grey = request(encoded((3, 2), "PNG", "L"))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (128, 128, 128)
    buf = io.BytesIO()
    Image.new("RGBA", (2, 2), (255, 0, 0, 0)).save(buf, format="PNG")  # fully transparent red
    assert request(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)
    webp = encoded((5, 5), "WEBP")
    assert sniff_format(webp) == "WEBP" and request(webp).size == (5, 5)


def test_is_small_reads_only_the_header():
    assert is_small(png_header_only(10, 10), max_bytes=10**6, max_pixels=100)
    assert not is_small(png_header_only(10, 11), max_bytes=10**6, max_pixels=100)
    data = encoded((4, 4))
    assert is_small(data, max_bytes=len(data), max_pixels=16)
    assert not is_small(data, max_bytes=len(data) - 1, max_pixels=16)
    assert not is_small(encoded((4, 4), "GIF", "P"), max_bytes=10**6, max_pixels=10**6)  # not an allowed format
    assert header_size(b"garbage", ("PNG",)) is None


def test_datasets_use_the_same_decoder_with_their_own_formats_and_errors():
    assert decode_image(encoded((6, 5), "JPEG")).size == (6, 5)
    with pytest.raises(DatasetError, match="unsupported image format WEBP: only PNG or JPEG are accepted"):
        decode_image(encoded((5, 5), "WEBP"))  # the endpoint takes WebP, a dataset does not
    with pytest.raises(DatasetError, match="not a PNG or JPEG image"):
        decode_image(b"nope")
    wide = encoded((200, 2))  # no aspect limit for datasets
    assert decode_image(wide).size == (200, 2)
