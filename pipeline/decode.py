"""Bytes -> RGB uint8, or a typed error that names what is wrong with the input.

Every image the jobs meet, for inference and for training alike, goes through ``decode_image``: EXIF orientation is applied, every
Pillow mode (1, L, LA, P, PA, RGBA, CMYK, YCbCr, LAB, HSV, I;16*, I, F) ends as HxWx3 RGB uint8,
16-bit samples are scaled (not clipped) to 8 bits, and an image over ``max_pixels`` is refused
from its header, before a single pixel is decoded (decompression bombs). Masks go through
``decode_mask``: any mode, white (>= 128) = hole.

Errors are ``DecodeError`` with a stable ``kind`` (``empty``, ``not_an_image``, ``truncated``,
``too_large``, ``corrupt``) that becomes the manifest's ``error_type``.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

# Never hand half an image to the network: a truncated file is an error row, not a grey band.
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 4096 * 4096


class DecodeError(ValueError):
    """An input that cannot become an image; ``kind`` is the manifest's error type."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise DecodeError("empty", "the object is empty (0 bytes)")
    # Pillow's own bomb check warns at MAX_IMAGE_PIXELS and raises at twice that; we check the
    # header size ourselves below, so silence its warning and keep its hard limit as a backstop.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise DecodeError("not_an_image", f"not a recognised image format ({len(data)} bytes)") from None
        except Image.DecompressionBombError as e:
            raise DecodeError("too_large", str(e)) from None
        except Exception as e:  # Pillow plugins raise a zoo of types on malformed headers
            kind = "truncated" if "truncated" in str(e).lower() else "corrupt"
            raise DecodeError(kind, f"unreadable image header: {type(e).__name__}: {e}") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise DecodeError("corrupt", f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise DecodeError(
            "too_large",
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
        )
    return img


def _load(img: Image.Image) -> Image.Image:
    try:
        img.load()
        return ImageOps.exif_transpose(img) or img
    except Image.DecompressionBombError as e:
        raise DecodeError("too_large", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        text = str(e)
        kind = "truncated" if "truncated" in text.lower() or isinstance(e, EOFError) else "corrupt"
        raise DecodeError(kind, f"cannot decode the image: {type(e).__name__}: {text}") from None
    except Exception as e:
        raise DecodeError("corrupt", f"cannot decode the image: {type(e).__name__}: {e}") from None


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey arrives as I;16* (or I, 32-bit, from some decoders): scale 0..65535 to
        # 0..255 rather than let Pillow's convert("L") clip everything above 255 to white.
        grey = (np.clip(np.asarray(img).astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        grey = np.asarray(img, dtype=np.float32)
        scale = 255.0 if np.nanmax(grey, initial=0.0) <= 1.0 else 1.0
        grey = np.nan_to_num(grey * scale, nan=0.0).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if _has_alpha(img):
        # The network sees colour only (the hole mask says what to fill); the alpha channel
        # travels beside it (``Decoded.alpha``) and is written back with the completion.
        img = img.convert("RGBA")
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)


# Modes whose samples are 8-bit RGB, grey, palette or bilevel: their RGB (+ alpha) is the file's
# pixels exactly. 16-bit, float, CMYK, LAB, ... are converted, so no output can be bit-exact.
EXACT_MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "PA")


@dataclass(frozen=True)
class Decoded:
    """What the jobs keep of an input besides its RGB pixels, to write its completion back."""

    rgb: np.ndarray  # HxWx3 uint8
    alpha: np.ndarray | None  # HxW uint8 (orientation applied), or None without transparency
    icc_profile: bytes | None  # the embedded colour profile, written back unchanged
    exact: bool  # an 8-bit mode (EXACT_MODES): rgb + alpha are the file's pixels bit for bit


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """The image with its alpha and colour profile; raises ``DecodeError``."""
    img = _load(_open(data, max_pixels))
    try:
        rgb = _to_rgb(img)
        alpha = None
        if _has_alpha(img):
            alpha = np.ascontiguousarray(np.asarray(img.convert("RGBA"), dtype=np.uint8)[..., 3])
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(
            "corrupt", f"cannot convert {img.mode} image to RGB: {type(e).__name__}: {e}"
        ) from None
    icc = img.info.get("icc_profile") or None
    return Decoded(rgb=rgb, alpha=alpha, icc_profile=icc, exact=img.mode in EXACT_MODES)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """HxWx3 uint8 RGB; raises ``DecodeError``."""
    return decode(data, max_pixels).rgb


def decode_mask(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """HxW uint8 {0, 1}, 1 = hole (white >= 128 in the file); raises ``DecodeError``."""
    img = _load(_open(data, max_pixels))
    try:
        if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
            top = 1.0 if img.mode == "F" else 65535.0
            return (np.asarray(img).astype(np.float64) >= top / 2).astype(np.uint8)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA").convert("RGB")
        return (np.asarray(img.convert("L")) >= 128).astype(np.uint8)
    except Exception as e:
        raise DecodeError("corrupt", f"cannot read the mask: {type(e).__name__}: {e}") from None


# The paper rescales the shorter side to a random length in [256, 384] before a 256 crop.
SCALE_RANGE = (1.0, 1.5)


def scale_and_crop(
    image: np.ndarray, size: int, rng: np.random.Generator | None, scale_range=SCALE_RANGE
) -> np.ndarray:
    """Rescale so the shorter side is ``size * U(scale_range)`` and crop ``size`` x ``size``.

    ``rng=None`` is the deterministic validation view: shorter side exactly ``size``, centre crop.
    """
    h, w = image.shape[:2]
    scale = 1.0 if rng is None else float(rng.uniform(*scale_range))
    short = max(size, int(round(size * scale)))
    factor = short / min(h, w)
    new_h, new_w = max(size, int(round(h * factor))), max(size, int(round(w * factor)))
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interp)
    if rng is None:
        y, x = (new_h - size) // 2, (new_w - size) // 2
    else:
        y, x = int(rng.integers(0, new_h - size + 1)), int(rng.integers(0, new_w - size + 1))
    return np.ascontiguousarray(resized[y : y + size, x : x + size])


def scale_for_crops(image: np.ndarray, size: int, scale_range=SCALE_RANGE) -> np.ndarray:
    """``image`` rescaled once to the largest scale ``scale_and_crop`` draws (shorter side
    ``size * scale_range[1]``), what ``crop_scaled`` cuts any number of random crops from."""
    h, w = image.shape[:2]
    short = max(size, int(round(size * scale_range[1])))
    factor = short / min(h, w)
    new_h, new_w = max(short, int(round(h * factor))), max(short, int(round(w * factor)))
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (new_w, new_h), interpolation=interp)


def crop_scaled(
    scaled: np.ndarray, size: int, rng: np.random.Generator, scale_range=SCALE_RANGE
) -> np.ndarray:
    """A random ``size`` x ``size`` crop of ``scale_for_crops``'s copy, drawn as ``scale_and_crop``
    draws from the original: the shorter side ``size * U(scale_range)``, a uniform position.

    At shorter side ``L`` a crop covers ``size / L`` of the image's shorter side, which is a
    window of ``size * short / L`` pixels of the stored copy, resized down to ``size``.
    """
    h, w = scaled.shape[:2]
    target = max(size, int(round(size * float(rng.uniform(*scale_range)))))
    window = min(min(h, w), max(size, int(round(size * min(h, w) / target))))
    y, x = int(rng.integers(0, h - window + 1)), int(rng.integers(0, w - window + 1))
    patch = scaled[y : y + window, x : x + window]
    if window == size:
        return np.ascontiguousarray(patch)
    return cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)


def decode_or_none(data: bytes, key: str) -> np.ndarray | None:
    """``decode_image`` (the inference decoder: EXIF, modes, 16-bit, CMYK, bombs), or
    None with a warning naming the file: one corrupt JPEG among millions must not stop a run."""
    try:
        return decode_image(data)
    except DecodeError as e:
        logger.warning("skipping %s: %s (%s)", key, e, e.kind)
        return None
