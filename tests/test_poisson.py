"""model.poisson: the batched torch Poisson blend, against OpenCV's blend, a dense solve and itself.

All on CPU tensors with one torch thread; every solve here is a 128 px crop or smaller.

Agreement with ``model.postprocess.blend`` cannot be exact: OpenCV Telea-fills the hole and solves
one Poisson problem over the whole (padded) image with a DST, so its colour correction also
shifts known pixels (which ``blend`` then copies back) and it truncates to uint8; this module
holds the known pixels fixed as the boundary and uses a membrane instead of Telea's gradient near
the seam. The tolerances below are what those discretisations differ by on real photos, with a
margin, and each is several times below what skipping the blend would give.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.masks import freeform_mask
from model.poisson import poisson_blend, poisson_solve
from model.postprocess import blend

CAST = np.array([30, -20, 25])


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def crop(photos, i: int, size: int = 128) -> np.ndarray:
    photo = photos[i % len(photos)]
    y, x = 40 + 17 * i, 60 + 23 * i
    return np.ascontiguousarray(photo[y : y + size, x : x + size])


def flawed_completion(truth: np.ndarray, mask: np.ndarray, blur: bool) -> np.ndarray:
    """The network's typical flaws in the hole: a colour cast, optionally lost detail; known
    pixels are the truth's (``model.completion.composite``), as in the pipeline."""
    import cv2

    flawed = cv2.GaussianBlur(truth, (0, 0), 2) if blur else truth
    flawed = np.clip(flawed.astype(np.int16) + CAST, 0, 255).astype(np.uint8)
    return np.where(mask[..., None] > 0, flawed, truth)


def to_tensor(a: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    if a.ndim == 2:
        return torch.from_numpy(a)[None, None].to(dtype)
    return torch.from_numpy(a).permute(2, 0, 1)[None].to(dtype) / 255


def to_u8(t: torch.Tensor) -> np.ndarray:
    return (t[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def torch_blend(completed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """How the pipeline would call it: ``completed`` is both the image and the completion."""
    c = to_tensor(completed)
    return to_u8(poisson_blend(c, c, to_tensor(mask)))


def hole_mad(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute difference over the hole's pixels and channels, in 1/255 units."""
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32))[mask > 0].mean())


def rectangle(size: int, top: int, left: int, h: int, w: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[top : top + h, left : left + w] = 1
    return mask


# Rectangular holes of 32-96 px inside 128 px crops; (photo, top, left, h, w, blur).
RECTANGLES = [
    (0, 30, 40, 32, 48, False),
    (1, 20, 16, 64, 64, True),
    (2, 16, 20, 96, 80, False),
    (3, 40, 30, 48, 80, True),
    (4, 10, 10, 80, 96, False),
]


@pytest.mark.parametrize("case", RECTANGLES, ids=lambda c: f"photo{c[0]}-{c[3]}x{c[4]}")
def test_rectangles_agree_with_opencv_blend(photos, case):
    i, top, left, h, w, blur = case
    truth = crop(photos, i)
    mask = rectangle(128, top, left, h, w)
    completed = flawed_completion(truth, mask, blur)
    opencv = blend(completed, completed, mask)
    ours = torch_blend(completed, mask)
    skipped = hole_mad(completed, opencv, mask)  # ~ the 25/255 cast
    agreement = hole_mad(ours, opencv, mask)
    assert agreement < 2.5, (agreement, skipped)
    assert agreement < skipped / 8, (agreement, skipped)


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_freeform_masks_agree_with_opencv_blend(photos, seed):
    # Thin strokes are almost all seam: there OpenCV's global solve (which also moves the known
    # pixels around the stroke, then has them copied back) and the fixed-boundary solve differ
    # most, hence the looser bound than for rectangles.
    truth = crop(photos, seed)
    mask = freeform_mask(128, 128, seed=seed)
    completed = flawed_completion(truth, mask, blur=False)
    opencv = blend(completed, completed, mask)
    ours = torch_blend(completed, mask)
    skipped = hole_mad(completed, opencv, mask)
    agreement = hole_mad(ours, opencv, mask)
    assert agreement < 6.0, (agreement, skipped)
    assert agreement < skipped / 4, (agreement, skipped)


def seam_jump(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean |difference| across the hole's boundary edges (hole pixel vs known 4-neighbour)."""
    a = image.astype(np.float64)
    hole = mask > 0
    jumps = []
    for axis in (0, 1):
        lo = [slice(None), slice(None)]
        hi = [slice(None), slice(None)]
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        crossing = hole[tuple(lo)] != hole[tuple(hi)]
        jumps.append(np.abs(a[tuple(lo)] - a[tuple(hi)])[crossing])
    return float(np.concatenate(jumps).mean())


def test_blending_removes_the_seam(photos):
    truth = crop(photos, 5)
    mask = rectangle(128, 30, 30, 64, 72)
    completed = flawed_completion(truth, mask, blur=True)
    ours = torch_blend(completed, mask)
    before, after, natural = seam_jump(completed, mask), seam_jump(ours, mask), seam_jump(truth, mask)
    assert after < before / 3, (before, after, natural)
    assert after < 2 * natural + 1, (before, after, natural)
    # The colour cast is gone from the hole, the blur (lost detail) is not blending's to fix.
    assert hole_mad(ours, truth, mask) < hole_mad(completed, truth, mask) / 3


def test_known_pixels_are_bit_exact():
    g = torch.Generator().manual_seed(0)
    image, completed = torch.rand(3, 3, 40, 50, generator=g), torch.rand(3, 3, 40, 50, generator=g)
    mask = (torch.rand(3, 1, 40, 50, generator=g) > 0.7).float()
    mask[1] = 0
    mask[1, :, 10:30, 5:45] = 1
    out = poisson_blend(image, completed, mask)
    known = (mask == 0).expand_as(image)
    assert torch.equal(out[known], image[known])
    assert out.dtype == image.dtype and out.shape == image.shape
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize(
    "where",
    [np.s_[0:40, 0:50], np.s_[70:, 90:], np.s_[20:80, 0:30], np.s_[50:64, :], np.s_[0:1, 10:70]],
    ids=["top-left corner", "bottom-right corner", "left edge", "full-width stripe", "top row"],
)
def test_holes_at_the_border(photos, where):
    truth = crop(photos, 5)  # a textured crop with few clipped pixels, so the cast is a cast
    mask = np.zeros((128, 128), np.uint8)
    mask[where] = 1
    completed = flawed_completion(truth, mask, blur=False)
    result = poisson_solve(to_tensor(completed), to_tensor(completed), to_tensor(mask))
    ours = to_u8(result.image)
    assert np.array_equal(ours[mask == 0], truth[mask == 0])
    assert float(result.relative_residual.max()) <= 1e-5
    # The image border is no-flux, not a boundary value: the cast goes. (``blend`` mirrors the
    # image, cast included, past the border as boundary values and keeps up to half of it.)
    error = hole_mad(ours, truth, mask)
    assert error < hole_mad(completed, truth, mask) / 3
    opencv = blend(completed, completed, mask)
    assert error <= hole_mad(opencv, truth, mask) + 0.5


def test_whole_image_hole_returns_the_completion():
    g = torch.Generator().manual_seed(1)
    image, completed = torch.rand(1, 3, 20, 24, generator=g), torch.rand(1, 3, 20, 24, generator=g)
    out = poisson_blend(image, completed, torch.ones(1, 1, 20, 24))
    assert torch.allclose(out, completed, atol=1e-6)


def test_empty_mask_returns_the_image():
    image, completed = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    result = poisson_solve(image, completed, torch.zeros(2, 1, 16, 16))
    assert torch.equal(result.image, image) and result.image is not image
    assert result.iterations.tolist() == [0, 0]


def test_one_pixel_holes_take_their_neighbours_mean():
    # A one-pixel hole is all seam (no guidance), so the discrete solution is the mean of its
    # in-image neighbours: four inside, two in a corner. Many random images: for about 1 in 25 the
    # residual underflowed to exactly zero between two convergence checks and CG's next beta was
    # 0 / 0, a NaN pixel (CI caught it once with unseeded values).
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        image = torch.rand(1, 3, 9, 11, dtype=torch.float64, generator=generator)
        completed = torch.rand(1, 3, 9, 11, dtype=torch.float64, generator=generator)
        mask = torch.zeros(1, 1, 9, 11, dtype=torch.float64)
        mask[0, 0, 4, 5] = mask[0, 0, 0, 0] = 1
        out = poisson_blend(image, completed, mask, tol=1e-12)
        inside = (image[..., 3, 5] + image[..., 5, 5] + image[..., 4, 4] + image[..., 4, 6]) / 4
        corner = (image[..., 0, 1] + image[..., 1, 0]) / 2
        assert torch.allclose(out[..., 4, 5], inside, atol=1e-12)
        assert torch.allclose(out[..., 0, 0], corner, atol=1e-12)


def test_a_mixed_batch_equals_each_image_alone(photos):
    masks = [
        rectangle(128, 30, 40, 32, 48),
        rectangle(128, 10, 10, 96, 90),
        np.zeros((128, 128), np.uint8),  # nothing to do
        rectangle(128, 64, 64, 1, 1),
        rectangle(128, 0, 100, 40, 28),  # touches two borders
        freeform_mask(128, 128, seed=2),
    ]
    images = [flawed_completion(crop(photos, i), m, blur=i % 2 == 0) for i, m in enumerate(masks)]
    batch = torch.cat([to_tensor(a) for a in images])
    mask = torch.cat([to_tensor(m) for m in masks])
    together = poisson_solve(batch, batch, mask)
    for i in range(len(masks)):
        alone = poisson_solve(batch[i : i + 1], batch[i : i + 1], mask[i : i + 1])
        # Not bit for bit: the batch solves every image in its largest hole's window, and sums
        # with extra zeros round differently. Same iterations, same pixels to far below 1/255.
        assert together.iterations[i] == alone.iterations[0]
        assert torch.allclose(together.image[i], alone.image[0], atol=1e-5, rtol=0), i


def dense_reference(image: np.ndarray, completed: np.ndarray, hole: np.ndarray, band: int) -> np.ndarray:
    """The discrete system of model.poisson written out pixel by pixel, solved densely.

    For each hole pixel p: sum over in-image 4-neighbours q of (f_p - f_q) = sum of v_pq, with
    f_q = image_q for known q and v_pq = completed_p - completed_q when both p and q lie in the
    hole eroded ``band`` times (3x3, the border counting as hole), else 0.
    """
    h, w = hole.shape
    inner = hole.copy()
    for _ in range(band):
        grown = np.pad(inner, 1, constant_values=True)
        inner = np.ones_like(inner)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                inner &= grown[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
    unknowns = list(zip(*np.nonzero(hole), strict=True))
    index = {p: k for k, p in enumerate(unknowns)}
    a = torch.zeros(len(unknowns), len(unknowns), dtype=torch.float64)
    b = torch.zeros(len(unknowns), image.shape[0], dtype=torch.float64)
    for k, (y, x) in enumerate(unknowns):
        for qy, qx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if not (0 <= qy < h and 0 <= qx < w):
                continue
            a[k, k] += 1
            if hole[qy, qx]:
                a[k, index[qy, qx]] -= 1
            else:
                b[k] += torch.from_numpy(image[:, qy, qx])
            if inner[y, x] and inner[qy, qx]:
                b[k] += torch.from_numpy(completed[:, y, x] - completed[:, qy, qx])
    f = torch.linalg.solve(a, b)
    out = image.copy()
    for k, (y, x) in enumerate(unknowns):
        out[:, y, x] = f[k].numpy()
    return out


@pytest.mark.parametrize("band", [0, 1, 2])
def test_cg_converges_to_the_dense_solution(band):
    # Two holes, one touching the border, in a small float64 image: CG run to tight tolerance
    # matches torch.linalg.solve of the same equations (before clamping: values stay in [0, 1]).
    rng = np.random.default_rng(band)
    h, w = 14, 17
    image = rng.uniform(0.3, 0.7, (3, h, w))
    completed = image + rng.normal(0, 0.02, (3, h, w)) + 0.1
    hole = np.zeros((h, w), bool)
    hole[3:10, 4:11] = True
    hole[6:9, 10:14] = True
    hole[0:4, 13:17] = True
    expected = dense_reference(image, completed, hole, band)
    assert expected.min() >= 0 and expected.max() <= 1
    got = poisson_solve(
        torch.from_numpy(image)[None],
        torch.from_numpy(completed)[None],
        torch.from_numpy(hole)[None, None].double(),
        iterations=500,
        tol=1e-13,
        band=band,
        check_every=1,
    )
    assert float(got.relative_residual.max()) <= 1e-13
    assert np.abs(got.image[0].numpy() - expected).max() < 1e-10


def test_bad_inputs_are_refused():
    image = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="mask must be"):
        poisson_blend(image, image, torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="completed must be float"):
        poisson_blend(image, image[:, :, :4], torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="image must be float"):
        poisson_blend(image[:, :1], image[:, :1], torch.zeros(1, 1, 8, 8))
