"""How an input key names things: its output object, its mask's output, and its 16-byte digest.

The listing (which flags output-name collisions), the read stage (which looks keys up in the
resume index), the writer and the manifest all take names from here, so they always agree.
"""

from __future__ import annotations

import hashlib
import posixpath

import numpy as np

# Suffix -> encoder name for ``output_format="same"``; anything else is written as PNG.
SAME_FORMAT_SUFFIXES = {
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".png": "png",
    ".webp": "webp",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".bmp": "bmp",
}
# ``output_format`` jpeg / webp: the suffix an output gets unless its key already has one of these.
LOSSY_SUFFIXES = {"jpeg": (".jpg", ".jpeg"), "webp": (".webp",)}
MASKS_FOLDER = "_masks"


def output_key_for(key: str, output_format: str) -> tuple[str, str]:
    """``(output key relative to --output, encoder)`` for input ``key``.

    ``png``: the key itself if it already ends in ``.png``, else ``<key>.png`` (``cat.jpg`` ->
    ``cat.jpg.png``), which never maps two inputs (``cat.jpg``, ``cat.png``) to one output.
    ``same``: the key unchanged, encoded in the format its suffix names; unknown suffixes get PNG.
    ``jpeg`` / ``webp``: like ``png``, with ``.jpg`` / ``.webp``.
    """
    suffix = posixpath.splitext(key)[1].lower()
    if output_format == "same" and suffix in SAME_FORMAT_SUFFIXES:
        return key, SAME_FORMAT_SUFFIXES[suffix]
    if output_format in LOSSY_SUFFIXES:
        suffixes = LOSSY_SUFFIXES[output_format]
        return (key if suffix in suffixes else key + suffixes[0]), output_format
    if suffix == ".png":
        return key, "png"
    return key + ".png", "png"


def mask_output_key_for(output_key: str) -> str:
    base = output_key if output_key.lower().endswith(".png") else output_key + ".png"
    return f"{MASKS_FOLDER}/{base}"


def key_digest(key: str) -> bytes:
    """128 bits of BLAKE2b of the key (surrogates kept: local names need not be UTF-8)."""
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def key_digests(keys) -> np.ndarray:  # noqa: F821 (NumPy is imported where arrays are made)
    """``key_digest`` of each key as a NumPy ``S16`` array (sortable, searchable, 16 bytes a key)."""
    import numpy as np

    return np.array([key_digest(k) for k in keys], dtype="S16")


def contains(sorted_digests: np.ndarray, digests: np.ndarray) -> np.ndarray:
    """Boolean mask: which of ``digests`` are in ``sorted_digests``."""
    if len(sorted_digests) == 0 or len(digests) == 0:
        return np.zeros(len(digests), dtype=bool)
    pos = np.searchsorted(sorted_digests, digests)
    pos = np.minimum(pos, len(sorted_digests) - 1)
    return sorted_digests[pos] == digests
