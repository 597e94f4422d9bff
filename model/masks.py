"""Hole masks: the paper's rectangles inside a local-discriminator box, and free-form brush strokes.

Every mask is a pure function of ``(seed, key)``: the key (an image's relative path, a step and
rank, ...) is hashed with the seed by ``derive_seed`` and drives a ``numpy`` PCG64 generator.
Only integer draws (``Generator.integers``) and OpenCV's integer line/circle rasterisers are used,
never floating-point trigonometry, so the same seed and key give the same mask bit for bit on any
machine. (NumPy may change a Generator's stream between its own major versions; the golden-value
test in tests/test_masks.py catches that.)

NumPy masks are HxW uint8 with 1 = hole.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np

# The paper's training setup: 256x256 images, holes with sides in [96, 128] inside the 128x128
# patch the local discriminator sees. Defaults are these absolute pixel sizes: the network's
# receptive field is about 300 px, so a hole scaled with a 3000x4000 photo (1100+ px) would leave
# its centre seeing nothing but the mean pixel. Only images whose shorter side is below
# PAPER_IMAGE_SIZE get proportionally smaller boxes, holes and brushes (exactly the masks that
# earlier, image-proportional versions drew for them).
PAPER_IMAGE_SIZE = 256
PAPER_LOCAL_SIZE = 128
PAPER_HOLE_RANGE = (96, 128)


def derive_seed(seed: int, key: str) -> int:
    """A 64-bit seed from ``seed`` and ``key``; sha256 so it is the same on every platform."""
    digest = hashlib.sha256(f"{int(seed)}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def mask_rng(seed: int, key: str) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(derive_seed(seed, key)))


@dataclass
class RectangleMask:
    mask: np.ndarray  # uint8 HxW, 1 = hole
    local_box: tuple[int, int, int, int]  # (y, x, h, w): the patch the local discriminator sees


def _reference_side(height: int, width: int) -> int:
    """The shorter side, capped at the paper's 256 px: mask sizes are absolute above it."""
    return min(height, width, PAPER_IMAGE_SIZE)


def default_local_size(height: int, width: int) -> int:
    """The paper's 128 px box; for images shorter than 256 px, scaled to the shorter side."""
    return max(
        1, min(height, width, round(PAPER_LOCAL_SIZE * _reference_side(height, width) / PAPER_IMAGE_SIZE))
    )


def default_hole_range(local_size: int) -> tuple[int, int]:
    """The paper's 96..128 px sides in a 128 px box, scaled to ``local_size``."""
    lo = max(1, round(PAPER_HOLE_RANGE[0] * local_size / PAPER_LOCAL_SIZE))
    return lo, max(lo, min(local_size, round(PAPER_HOLE_RANGE[1] * local_size / PAPER_LOCAL_SIZE)))


def _check_size(height: int, width: int) -> None:
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"mask size must be at least 1x1, got {height}x{width}")


def rectangle_mask(
    height: int,
    width: int,
    *,
    seed: int,
    key: str = "",
    hole_range: tuple[int, int] | None = None,
    local_size: int | None = None,
    max_holes: int = 1,
) -> RectangleMask:
    """One to ``max_holes`` rectangular holes, each inside one square ``local_size`` box.

    Hole sides are drawn independently and uniformly from ``hole_range`` (inclusive). The box is
    placed uniformly in the image and the holes uniformly in the box, so the local discriminator
    always sees every hole whole.
    """
    _check_size(height, width)
    if local_size is None:
        local_size = default_local_size(height, width)
    if not 1 <= local_size <= min(height, width):
        raise ValueError(
            f"local_size {local_size} must be between 1 and the image's shorter side ({height}x{width})"
        )
    if hole_range is None:
        hole_range = default_hole_range(local_size)
    lo, hi = (int(v) for v in hole_range)
    if not 1 <= lo <= hi <= local_size:
        raise ValueError(
            f"hole_range {hole_range} must satisfy 1 <= low <= high <= local_size ({local_size})"
        )
    if max_holes < 1:
        raise ValueError(f"max_holes must be at least 1, got {max_holes}")

    rng = mask_rng(seed, key)
    box_y = int(rng.integers(0, height - local_size + 1))
    box_x = int(rng.integers(0, width - local_size + 1))
    mask = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(1, max_holes + 1))):
        hole_h, hole_w = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        y = box_y + int(rng.integers(0, local_size - hole_h + 1))
        x = box_x + int(rng.integers(0, local_size - hole_w + 1))
        mask[y : y + hole_h, x : x + hole_w] = 1
    return RectangleMask(mask=mask, local_box=(box_y, box_x, local_size, local_size))


def freeform_mask(
    height: int,
    width: int,
    *,
    seed: int,
    key: str = "",
    max_strokes: int = 5,
    max_vertices: int = 10,
) -> np.ndarray:
    """Free-form brush strokes: polylines of random integer steps drawn with a round brush.

    Brush width (8..25 px) and step length (up to 51 px) are absolute, those of a 256 px image,
    so strokes on a photo are as thin as the network can fill; only images shorter than 256 px
    get proportionally smaller ones. Every mask has at least one hole pixel.
    """
    _check_size(height, width)
    reference = _reference_side(height, width)
    max_step = max(1, reference // 5)
    max_brush = max(1, reference // 10)
    min_brush = max(1, max_brush // 3)

    rng = mask_rng(seed, key)
    mask = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(1, max_strokes + 1))):
        brush = int(rng.integers(min_brush, max_brush + 1))
        y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
        # A dot first: a stroke whose steps all leave the image still marks its start.
        cv2.circle(mask, (x, y), max(1, brush // 2), 1, thickness=-1, lineType=cv2.LINE_8)
        for _ in range(int(rng.integers(1, max_vertices + 1))):
            dy, dx = (int(v) for v in rng.integers(-max_step, max_step + 1, size=2))
            ny = min(max(y + dy, 0), height - 1)
            nx = min(max(x + dx, 0), width - 1)
            cv2.line(mask, (x, y), (nx, ny), 1, thickness=brush, lineType=cv2.LINE_8)
            cv2.circle(mask, (nx, ny), max(1, brush // 2), 1, thickness=-1, lineType=cv2.LINE_8)
            y, x = ny, nx
    return mask


def freeform_box(mask: np.ndarray, local_size: int) -> tuple[int, int, int, int]:
    """The ``local_size`` square ``(y, x, h, w)`` centred on the hole pixels' centre of mass (in
    integer arithmetic), shifted to lie inside the image: it always contains the centre of mass,
    and the whole mask when that fits."""
    height, width = mask.shape
    if not 1 <= local_size <= min(height, width):
        raise ValueError(
            f"local_size {local_size} must be between 1 and the image's shorter side ({height}x{width})"
        )
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        cy, cx = height // 2, width // 2
    else:
        cy, cx = int(ys.sum()) // ys.size, int(xs.sum()) // xs.size
    y = min(max(cy - local_size // 2, 0), height - local_size)
    x = min(max(cx - local_size // 2, 0), width - local_size)
    return (y, x, local_size, local_size)


MASK_KINDS = ("rectangle", "freeform", "mixed")  # every generator, for training, evaluation and inpainting


def training_mask(
    kind: str,
    height: int,
    width: int,
    *,
    seed: int,
    key: str,
    local_size: int,
    hole_range: tuple[int, int] | None = None,
) -> RectangleMask:
    """A hole and the local discriminator's box: ``rectangle_mask``, a ``freeform_mask`` in its
    ``freeform_box``, or for ``mixed`` one of the two drawn from ``(seed, key)``. A pure function
    of ``(seed, key)`` like every mask here (the rectangle and free-form masks of a key are the
    ones those generators give it alone). The one route every job's masks take."""
    if kind == "mixed":
        kind = ("rectangle", "freeform")[int(mask_rng(seed, f"{key}#kind").integers(0, 2))]
    if kind == "rectangle":
        return rectangle_mask(height, width, seed=seed, key=key, hole_range=hole_range, local_size=local_size)
    if kind == "freeform":
        mask = freeform_mask(height, width, seed=seed, key=key)
        return RectangleMask(mask=mask, local_box=freeform_box(mask, local_size))
    raise ValueError(f"unknown mask kind {kind!r}; choose one of {list(MASK_KINDS)}")


def generate_mask(
    kind: str,
    height: int,
    width: int,
    *,
    seed: int,
    key: str = "",
    local_size: int | None = None,
    hole_range: tuple[int, int] | None = None,
) -> np.ndarray:
    """The ``kind`` mask (``MASK_KINDS``) of an image of ``height`` x ``width``, through
    ``training_mask``. ``local_size`` / ``hole_range`` default to the paper's sizes (scaled down
    below 256 px); given, they are clipped to the image's shorter side, so one setting serves
    images of every size."""
    _check_size(height, width)
    if local_size is None:
        local_size = default_local_size(height, width)
    else:
        local_size = max(1, min(int(local_size), height, width))
        if hole_range is not None:
            hole_range = (min(int(hole_range[0]), local_size), min(int(hole_range[1]), local_size))
    return training_mask(
        kind, height, width, seed=seed, key=key, local_size=local_size, hole_range=hole_range
    ).mask
