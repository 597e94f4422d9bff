"""Training data: the validation split, crops, seeded masks, the distributed mean pixel."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pipeline import train_data
from pipeline.decode import scale_and_crop


def test_validation_split_is_stable_disjoint_and_survives_new_images():
    uris = [f"s3://b/img/{i:03d}.jpg" for i in range(200)]
    train, val = train_data.split_validation(uris, 0.1, seed=7)
    assert 8 <= len(val) <= 35 and set(train).isdisjoint(val) and sorted(train + val) == sorted(uris)
    assert train_data.split_validation(uris, 0.1, seed=7) == (train, val)
    # Adding images never moves an old one from validation into training.
    more = uris + [f"s3://b/img/new{i}.jpg" for i in range(50)]
    train_more, val_more = train_data.split_validation(more, 0.1, seed=7)
    assert set(val) <= set(val_more) and set(train) <= set(train_more)
    assert train_data.split_validation(uris[:2], 0.01, seed=0)[1]  # at least one held out
    with pytest.raises(ValueError):
        train_data.split_validation(uris, 1.0, seed=0)


def test_crops_are_training_size_and_validation_view_is_deterministic(photos):
    rng = np.random.default_rng(0)
    crops = [scale_and_crop(photos[0], 48, rng) for _ in range(5)]
    assert all(c.shape == (48, 48, 3) and c.dtype == np.uint8 for c in crops)
    assert len({c.tobytes() for c in crops}) > 1  # random scale and position
    tiny = np.zeros((10, 7, 3), np.uint8)
    assert scale_and_crop(tiny, 48, rng).shape == (48, 48, 3)
    a = scale_and_crop(photos[0], 48, None)
    assert np.array_equal(a, scale_and_crop(photos[0], 48, None))


def test_masks_are_a_function_of_seed_key_and_step():
    kwargs = dict(seed=3, image_size=32, local_size=16, hole_range=(4, 12))
    m1, b1 = train_data.batch_masks(["a", "b"], step=5, **kwargs)
    m2, b2 = train_data.batch_masks(["a", "b"], step=5, **kwargs)
    m3, _ = train_data.batch_masks(["a", "b"], step=6, **kwargs)
    assert np.array_equal(m1, m2) and np.array_equal(b1, b2) and not np.array_equal(m1, m3)
    assert m1.shape == (2, 1, 32, 32) and set(np.unique(m1)) == {0.0, 1.0}
    for mask, (y, x, h, w) in zip(m1[:, 0], b1, strict=True):
        assert h == w == 16 and mask.sum() == mask[y : y + h, x : x + w].sum()  # hole inside the box


def test_mean_pixel_matches_a_direct_computation_and_skips_bad_files(
    ray_local, photo_paths, photos, tmp_path
):
    for p in photo_paths[:3]:
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    uris = train_data.list_image_uris(str(tmp_path))
    assert len(uris) == 4
    expected = np.concatenate([p.reshape(-1, 3) for p in photos[:3]]).astype(np.float64).mean(0) / 255
    mean, images = train_data.mean_pixel(uris)
    assert np.allclose(mean, expected, atol=1e-6) and images == 3
    keys = [u.rsplit("/", 1)[1] for u in uris]
    val = train_data.validation_arrays(keys, uris, 32)
    assert list(val["key"]) == sorted(p.name for p in photo_paths[:3])  # the broken file is dropped
    assert val["image"].shape == (3, 32, 32, 3)


@pytest.mark.parametrize("count,fraction", [(300, 0.1), (2, 0.01), (3, 0.99)])
def test_survey_streams_the_same_split_as_the_list_version(tmp_path, count, fraction):
    """One streaming pass holding val_limit + sample_size URIs decides what split_validation
    decides on the whole list (the exceptions that keep both sides non-empty included)."""
    for i in range(count):
        folder = tmp_path / f"d{i % 7}"
        folder.mkdir(exist_ok=True)
        (folder / f"{i:04d}.jpg").write_bytes(b"x")
    (tmp_path / "notes.txt").write_bytes(b"not an image")
    uris = train_data.list_image_uris(str(tmp_path))
    train, val = train_data.split_validation(uris, fraction, seed=5)

    survey = train_data.survey(str(tmp_path), fraction=fraction, seed=5, val_limit=4, sample_size=10)

    assert (survey.train_count, survey.val_count) == (len(train), len(val))
    assert [u for u in uris if survey.split.is_validation(u)] == val
    assert survey.val_uris == sorted(val)[:4]
    assert survey.val_keys == [u[len(str(tmp_path)) + 1 :] for u in survey.val_uris]
    # The mean's sample: the training images with the lowest hash, the same however they are listed.
    assert len(survey.sample_uris) == min(10, len(train)) and set(survey.sample_uris) <= set(train)
    expected = sorted(sorted(train, key=lambda u: train_data._score("mean", u))[:10])
    assert survey.sample_uris == expected
    # A list file of the same keys (relative to its folder) is the same training set.
    listed = tmp_path / "keys.txt"
    listed.write_text("".join(f"{u[len(str(tmp_path)) + 1 :]}\n" for u in reversed(uris)))
    from_list = train_data.survey(str(listed), fraction=fraction, seed=5, val_limit=4, sample_size=10)
    assert (from_list.train_count, from_list.val_uris, from_list.sample_uris) == (
        survey.train_count, survey.val_uris, survey.sample_uris)  # fmt: skip


def test_training_dataset_is_every_image_once_per_copy_in_a_new_order_each_epoch(ray_local, tmp_path):
    """Through ``training_dataset`` itself, run again as Ray Train runs it every epoch: each
    training image exactly once per copy, an order that changes from epoch to epoch (Ray 2.60's
    seeded shuffle alone replays one order), and the same orders again for the same seed."""
    import cv2

    tiny = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    for i in range(120):
        (tmp_path / f"{i:03d}.png").write_bytes(tiny)
    survey = train_data.survey(str(tmp_path), fraction=0.1, seed=1, val_limit=2, sample_size=4)

    def epochs(seed: int, count: int) -> list[list[str]]:
        ds = train_data.training_dataset(
            str(tmp_path), survey.split, 8, images=survey.train_count, copies=2, seed=seed, num_cpus=0.25
        )
        return [[str(r["key"]) for r in ds.take_all()] for _ in range(count)]

    first, second, third = epochs(seed=3, count=3)
    expected = sorted(2 * [f"{i:03d}.png" for i in range(120) if not survey.split.is_validation(
        str(tmp_path / f"{i:03d}.png"))])  # fmt: skip
    assert sorted(first) == sorted(second) == sorted(third) == expected
    assert len(expected) == 2 * survey.train_count
    assert first != sorted(first) and first != second and second != third and first != third
    assert epochs(seed=3, count=2) == [first, second]  # deterministic from --seed
    assert epochs(seed=4, count=1)[0] != first


def test_epoch_order_is_a_function_of_seed_epoch_and_keys():
    keys = [f"k{i}" for i in range(50)]
    order = train_data.epoch_order(keys, seed=0, epoch=0)
    assert sorted(order) == list(range(50))
    assert order == train_data.epoch_order(keys, seed=0, epoch=0)
    assert order != train_data.epoch_order(keys, seed=0, epoch=1)
    assert order != train_data.epoch_order(keys, seed=1, epoch=0)


def test_listing_an_empty_prefix_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(train_data.NoImagesError, match="no image files"):
        train_data.list_image_uris(str(tmp_path))
    with pytest.raises(train_data.NoImagesError, match="no such prefix"):
        train_data.list_image_uris(str(tmp_path / "missing"))


def test_resident_crops_are_the_papers_random_views_of_the_decoded_copy(photos):
    from pipeline.decode import crop_scaled, scale_for_crops

    image = photos[0]
    scaled = scale_for_crops(image, 64)
    assert min(scaled.shape[:2]) == 96  # the largest scale crops use: 1.5 x the crop
    rng = np.random.default_rng(0)
    crops = [crop_scaled(scaled, 64, rng) for _ in range(50)]
    assert all(c.shape == (64, 64, 3) and c.dtype == np.uint8 for c in crops)
    assert len({c.tobytes() for c in crops}) == 50  # fresh every time
    # At the largest scale a crop is a window of the copy itself, pixel for pixel.
    whole = crop_scaled(scaled, 64, rng, scale_range=(1.5, 1.5))
    windows = np.lib.stride_tricks.sliding_window_view(scaled, (64, 64, 3))[..., 0, :, :, :]
    assert (windows == whole).all(axis=(-3, -2, -1)).any()
    # At the smallest, the crop spans the copy's whole shorter side (scale_and_crop's 1.0 view).
    tall = crop_scaled(scaled, 64, rng, scale_range=(1.0, 1.0))
    assert abs(float(tall.mean()) - float(scale_and_crop(image, 64, None).mean())) < 40


def test_resident_images_serve_each_image_once_an_epoch_in_a_new_order():
    images = [np.full((96, 120, 3), i, np.uint8) for i in range(10)]
    held = train_data.ResidentImages([f"k{i}" for i in range(10)], images, 64, seed=[0, 0, 0])
    batches = held.batches(5)
    epochs = [[k for _ in range(2) for k in next(batches)[0]] for _ in range(3)]
    assert all(sorted(e) == sorted(held.keys) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3
    keys, crops = next(batches)
    assert crops.shape == (5, 64, 64, 3)
    # Each crop is of its own key's image (image i is all value i).
    assert [int(c[0, 0, 0]) for c in crops] == [int(k[1:]) for k in keys]
    with pytest.raises(ValueError, match="fewer than its batch"):
        next(held.batches(11))
    assert train_data.fits_in_memory(6000, 256, 1, 4.0) and not train_data.fits_in_memory(7000, 256, 1, 4.0)
    assert train_data.fits_in_memory(12000, 256, 2, 4.0)  # each worker holds its share


def test_prefetched_keeps_order_and_raises_the_producers_error_in_the_consumer():
    assert list(train_data.prefetched(iter(range(20)), depth=2)) == list(range(20))

    def failing():
        yield 1
        raise OSError("disk gone")

    items = train_data.prefetched(failing())
    assert next(items) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(items)
    masks = []
    steps = train_data.step_inputs(
        iter([(["a"], "x"), (["b"], "y")]), 7, lambda k, s: masks.append(s) or (s, -s)
    )
    assert [s[2] for s in steps] == [7, 8] and masks == [7, 8]
