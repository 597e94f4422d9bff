import numpy as np
import pytest

from model.postprocess import blend


def photo_crop(photos, h=96, w=128):
    return np.ascontiguousarray(photos[0][100 : 100 + h, 200 : 200 + w])


HOLES = {
    "centre": np.s_[30:60, 40:90],
    "top-left corner": np.s_[0:30, 0:40],
    "bottom-right corner": np.s_[70:, 100:],
    "left edge": np.s_[20:70, 0:25],
    "full-width stripe": np.s_[40:50, :],
    "one-pixel row at the top": np.s_[0:1, 10:60],
    "one-pixel column at the right": np.s_[:, -1:],
    "single pixel in the corner": np.s_[-1:, -1:],
    "whole image": np.s_[:, :],
}


@pytest.mark.parametrize("where", sorted(HOLES))
def test_holes_anywhere_blend_without_crashing_and_keep_known_pixels(photos, where):
    image = photo_crop(photos)
    completed = image.copy()
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[HOLES[where]] = 1
    completed[mask == 1] = 255 - completed[mask == 1]  # a completion that is clearly not the image
    out = blend(image, completed, mask)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.array_equal(out[mask == 0], image[mask == 0])


def test_blending_matches_the_surrounding_colours_and_keeps_the_structure(photos):
    # The network's typical flaw: the right content with a colour cast. After blending the hole
    # should be much closer to the truth than the raw completion, as in the paper.
    image = photo_crop(photos)
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[30:66, 40:96] = 1
    cast = np.clip(image.astype(np.int16) + np.array([40, -25, 30]), 0, 255).astype(np.uint8)
    completed = np.where(mask[..., None] == 1, cast, image)
    out = blend(image, completed, mask)
    hole = mask == 1
    raw_error = np.abs(completed[hole].astype(int) - image[hole]).mean()
    blended_error = np.abs(out[hole].astype(int) - image[hole]).mean()
    assert blended_error < raw_error / 3, (raw_error, blended_error)


def test_tiny_images_and_empty_masks(photos):
    image = photo_crop(photos, 3, 2)
    full = np.ones((3, 2), np.uint8)
    assert blend(image, image, full).shape == (3, 2, 3)
    out = blend(image, 255 - image, np.zeros((3, 2), np.uint8))
    assert np.array_equal(out, image) and out is not image


def test_mismatched_inputs_are_refused(photos):
    image = photo_crop(photos)
    with pytest.raises(ValueError, match="mask must be"):
        blend(image, image, np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="completed must be uint8"):
        blend(image, image.astype(np.float32), np.zeros(image.shape[:2], np.uint8))
    with pytest.raises(ValueError, match="image must be uint8 HxWx3"):
        blend(image[..., 0], image, np.zeros(image.shape[:2], np.uint8))
