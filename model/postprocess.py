"""The paper's optional post-processing: Telea fast marching fill, then Poisson blending.

The network's output can have subtle colour shifts against the surrounding pixels. As in the paper,
the hole is first filled by fast marching (Telea 2004) and the network's output is then
Poisson-blended into that (``cv2.seamlessClone``), so the hole takes the network's gradients
and the surroundings' colours.

``cv2.seamlessClone`` raises when the hole's bounding box touches the image border (its ROI would
leave the destination). We pad every image by a margin first and crop back after, and put the clone
exactly where the hole is, so any hole, border or corner, works. Known pixels are copied back from
the input at the end, so they never change.
"""

from __future__ import annotations

import cv2
import numpy as np

TELEA_RADIUS = 3
# seamlessClone zeroes the mask's outermost pixel ring and needs the ROI inside the image.
MARGIN = 4  # > 1 (the zeroed ring) + 1 (the dilation)


def _check(image: np.ndarray, completed: np.ndarray, mask: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 HxWx3, got {image.dtype} {image.shape}")
    if completed.dtype != np.uint8 or completed.shape != image.shape:
        raise ValueError(f"completed must be uint8 {image.shape}, got {completed.dtype} {completed.shape}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask must be {image.shape[:2]}, got {mask.shape}")


def blend(image: np.ndarray, completed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Blend the network's ``completed`` image into ``image`` over the hole ``mask`` (1 = hole).

    ``image`` and ``completed`` are uint8 HxWx3, ``mask`` uint8 HxW. Returns uint8 HxWx3 whose
    known pixels equal ``image``'s; an empty mask returns a copy of ``image``.
    """
    _check(image, completed, mask)
    hole = (mask > 0).astype(np.uint8)
    if not hole.any():
        return image.copy()

    def pad(a: np.ndarray, border: int = cv2.BORDER_REFLECT_101) -> np.ndarray:
        return cv2.copyMakeBorder(a, MARGIN, MARGIN, MARGIN, MARGIN, border, value=0)

    # Reflect-101 needs a side longer than one pixel; tiny images replicate instead.
    border = cv2.BORDER_REFLECT_101 if min(image.shape[:2]) > 1 else cv2.BORDER_REPLICATE
    padded_hole = pad(hole * 255, cv2.BORDER_CONSTANT)
    filled = cv2.inpaint(
        pad(np.ascontiguousarray(image), border), padded_hole, TELEA_RADIUS, cv2.INPAINT_TELEA
    )
    # The clone region is the hole grown by one pixel: its box then has known pixels on its edge
    # (the Poisson boundary condition) and the whole hole strictly inside, where the solver works;
    # a one-pixel-thin hole would otherwise leave no inside at all (OpenCV throws).
    clone_mask = cv2.dilate(padded_hole, np.ones((3, 3), np.uint8))
    x, y, w, h = cv2.boundingRect(clone_mask)
    # seamlessClone places the source's mask box centred at this point; this centre puts it back
    # on the same pixels (it computes the corner as centre - size // 2).
    center = (x + w // 2, y + h // 2)
    # Inside that one-pixel ring the guidance must be the image's own gradient, not the network's.
    source = pad(np.where(hole[..., None].astype(bool), completed, image), border)
    blended = cv2.seamlessClone(source, filled, clone_mask, center, cv2.NORMAL_CLONE)
    blended = blended[MARGIN:-MARGIN, MARGIN:-MARGIN]
    return np.where(hole[..., None].astype(bool), blended, image)
