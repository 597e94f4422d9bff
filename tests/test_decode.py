"""Decoding every kind of input the inpainting job meets: modes, orientation, and broken files."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.decode import DecodeError, decode_image, decode_mask


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    sink = io.BytesIO()
    img.save(sink, format=fmt, **kwargs)
    return sink.getvalue()


@pytest.fixture(scope="module")
def rgb(photos) -> np.ndarray:
    return np.ascontiguousarray(photos[0][100:148, 200:264])  # 48x64 of a real photograph


def test_rgb_png_is_exact(rgb):
    image = decode_image(encode(Image.fromarray(rgb), "PNG"))
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, rgb)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "1", "CMYK", "YCbCr"])
def test_every_mode_becomes_rgb(rgb, mode):
    src = Image.fromarray(rgb).convert(mode)
    fmt = "JPEG" if mode in ("CMYK", "YCbCr") else "PNG"
    image = decode_image(encode(src, fmt, **({"quality": 95} if fmt == "JPEG" else {})))
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8
    expected = np.asarray(src.convert("RGB"), dtype=np.int16)
    if fmt == "PNG":
        np.testing.assert_array_equal(image, expected)
    else:  # JPEG's loss is the only difference allowed
        assert np.abs(image.astype(np.int16) - expected).mean() < 6


def test_rgba_drops_alpha_keeps_colour(rgb):
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])  # almost fully transparent
    image = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(image, rgb)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    ramp = (np.arange(64, dtype=np.uint16)[None, :] * 1024).repeat(8, axis=0)  # 0 .. 64512
    image = decode_image(encode(Image.fromarray(ramp), "PNG"))
    assert image.shape == (8, 64, 3)
    np.testing.assert_array_equal(image[..., 0], (ramp >> 8).astype(np.uint8))
    assert len(np.unique(image)) == 64  # clipping would have left almost everything at 255


def test_exif_orientation_is_applied(rgb):
    img = Image.fromarray(rgb)  # 64 wide, 48 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    image = decode_image(encode(img, "JPEG", quality=95, exif=exif.tobytes()))
    assert image.shape == (64, 48, 3)
    expected = np.asarray(img.transpose(Image.Transpose.ROTATE_270), dtype=np.int16)
    assert np.abs(image.astype(np.int16) - expected).mean() < 6


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims ``width`` x ``height``: a decompression bomb's header."""
    data = encode(Image.new("L", (1, 1)), "PNG")
    ihdr_at = data.index(b"IHDR")
    body = bytearray(data[ihdr_at : ihdr_at + 4 + 13])
    body[4:12] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(bytes(body)) & 0xFFFFFFFF)
    return data[:ihdr_at] + bytes(body) + crc + data[ihdr_at + 4 + 13 + 4 :]


@pytest.mark.parametrize(
    "data, kind",
    [
        (b"", "empty"),
        (b"this is a text file, not a photograph\n" * 20, "not_an_image"),
        (png_with_header_size(100_000, 100_000), "too_large"),  # 10 G pixels: refused from the header
        (png_with_header_size(5000, 5000), "too_large"),  # over the job's limit, under Pillow's
    ],
)
def test_broken_inputs_are_typed_errors(data, kind):
    with pytest.raises(DecodeError) as info:
        decode_image(data, max_pixels=4096 * 4096)
    assert info.value.kind == kind and str(info.value)


def test_truncated_jpeg(rgb):
    data = encode(Image.fromarray(rgb), "JPEG", quality=90)
    with pytest.raises(DecodeError) as info:
        decode_image(data[: len(data) // 2])
    assert info.value.kind == "truncated"


def test_mask_white_is_hole():
    grey = np.zeros((8, 12), np.uint8)
    grey[2:5, 3:9] = 255
    grey[0, 0] = 127  # under half: known
    grey[7, 11] = 128  # half or more: hole
    mask = decode_mask(encode(Image.fromarray(grey), "PNG"))
    expected = (grey >= 128).astype(np.uint8)
    np.testing.assert_array_equal(mask, expected)
    # the same mask as RGB JPEG-free PNG and as 16-bit
    np.testing.assert_array_equal(decode_mask(encode(Image.fromarray(grey).convert("RGB"), "PNG")), expected)
    wide = Image.fromarray(grey.astype(np.uint16) * 257)
    np.testing.assert_array_equal(decode_mask(encode(wide, "PNG")), expected)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_decoder_never_crashes(rgb, data):
    """Random bytes and randomly corrupted real files: an image or a DecodeError, nothing else."""
    originals = [encode(Image.fromarray(rgb), f) for f in ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")]
    choice = data.draw(st.integers(0, len(originals)))
    if choice == len(originals):
        blob = data.draw(st.binary(max_size=512))
    else:
        blob = bytearray(originals[choice])
        for _ in range(data.draw(st.integers(1, 8))):
            at = data.draw(st.integers(0, len(blob) - 1))
            blob[at] = data.draw(st.integers(0, 255))
        blob = bytes(blob[: data.draw(st.integers(0, len(blob)))])
    for decode in (decode_image, decode_mask):
        try:
            out = decode(blob, max_pixels=1 << 20)
        except DecodeError as e:
            assert e.kind in ("empty", "not_an_image", "truncated", "too_large", "corrupt")
            continue
        image = out[0] if isinstance(out, tuple) else out
        assert image.dtype == np.uint8 and image.shape[0] * image.shape[1] <= 1 << 20
