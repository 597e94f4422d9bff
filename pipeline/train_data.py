"""Training data over Ray Data: listing, a train/validation split, random crops, seeded masks, and
the dataset's mean pixel computed in a distributed pass.

Rows of the training dataset are ``{"key": relative path, "image": uint8 (S, S, 3)}``. Ray Data
decodes and crops in its own CPU tasks; the training workers only draw masks (a pure function of
``(seed, key, step)``) and run the networks.

Crops follow the paper (Sec. 4): the image is rescaled so its shorter side is a random length in
``[S, 1.5 S]`` (256..384 for S = 256) and a random S x S patch is taken. Crops are fresh on every
pass over the data; masks are reproducible.
"""

from __future__ import annotations

import hashlib
import logging

import cv2
import numpy as np

from model.masks import training_mask
from pipeline import storage
from pipeline.decode import DecodeError, decode_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

# The paper rescales the shorter side to a random length in [256, 384] before a 256 crop.
SCALE_RANGE = (1.0, 1.5)


class NoImagesError(ValueError):
    """The training (or validation) prefix holds no image files."""


def list_images(prefix: str, endpoint_url: str | None = None) -> list[str]:
    """URIs of every image file under ``prefix``, sorted; raises ``NoImagesError`` if none."""
    fs, root = storage.filesystem(prefix, endpoint_url)
    if not fs.exists(root):
        raise NoImagesError(f"{prefix}: no such prefix")
    uris = [
        storage.full_uri(fs, path)
        for path in storage.iter_files(fs, root)
        if path.lower().endswith(IMAGE_EXTENSIONS)
    ]
    if not uris:
        raise NoImagesError(f"{prefix}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return uris


def split_validation(uris: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out about ``fraction`` of ``uris`` for validation, chosen by a hash of each key.

    An image is held out when a hash of ``(seed, uri)`` falls below ``fraction``: unlike a shuffle,
    adding images later never moves an old one across, so an extended run never trains on what it
    validated on before. At least one image stays on each side when ``fraction`` > 0.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(uris), []
    if len(uris) < 2:
        raise NoImagesError(f"need at least 2 images to hold out a validation split, got {len(uris)}")

    def score(uri: str) -> float:
        digest = hashlib.sha256(f"{seed}\x00{uri}".encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2**64

    held_out = {u for u in uris if score(u) < fraction}
    if not held_out:
        held_out = {min(uris, key=score)}
    if len(held_out) == len(uris):
        held_out.remove(max(uris, key=score))
    return [u for u in uris if u not in held_out], [u for u in uris if u in held_out]


def decode_or_none(data: bytes, key: str) -> np.ndarray | None:
    """``pipeline.decode.decode_image`` (the inference decoder: EXIF, modes, 16-bit, CMYK, bombs), or
    None with a warning naming the file: one corrupt JPEG among millions must not stop a run."""
    try:
        return decode_image(data)
    except DecodeError as e:
        logger.warning("skipping %s: %s (%s)", key, e, e.kind)
        return None


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


def _keys(paths, root: str) -> list[str]:
    return [storage.relative_key(root, str(p)) for p in paths]


def crop_images(batch: dict[str, np.ndarray], root: str, image_size: int, random: bool = True) -> dict:
    """Ray Data ``map_batches`` function: raw bytes -> ``{"key", "image"}`` crops (undecodable files
    dropped with a warning)."""
    rng = np.random.default_rng() if random else None
    keys, crops = [], []
    for key, data in zip(_keys(batch["path"], root), batch["bytes"], strict=True):
        image = decode_or_none(data, key)
        if image is None:
            continue
        keys.append(key)
        crops.append(scale_and_crop(image, image_size, rng))
    images = np.stack(crops) if crops else np.zeros((0, image_size, image_size, 3), np.uint8)
    return {"key": np.array(keys, dtype=object), "image": images}


def channel_sums(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One row per batch: its RGB sums and pixel count (float64: exact for any realistic size)."""
    sums, pixels = np.zeros(3, np.float64), 0.0
    for path, data in zip(batch["path"], batch["bytes"], strict=True):
        image = decode_or_none(data, str(path))
        if image is not None:
            sums += image.reshape(-1, 3).sum(0, dtype=np.float64)
            pixels += image.shape[0] * image.shape[1]
    return {"sums": sums[None], "pixels": np.array([pixels])}


def read_bytes_dataset(uris: list[str], endpoint_url: str | None = None, num_cpus: float = 1.0):
    """A Ray Dataset of ``{"bytes", "path"}`` for ``uris`` (all on one filesystem)."""
    import ray.data

    fs, _ = storage.pyarrow_filesystem(uris[0], endpoint_url)
    paths = [storage.pyarrow_filesystem(u, endpoint_url)[1] for u in uris]
    return ray.data.read_binary_files(paths, filesystem=fs, include_paths=True, num_cpus=num_cpus)


def training_dataset(
    uris: list[str], root: str, image_size: int, endpoint_url: str | None = None, num_cpus: float = 1.0
):
    """Random ``image_size`` crops of ``uris``, keyed by their path relative to ``root``."""
    root_path = storage.pyarrow_filesystem(root, endpoint_url)[1]
    return read_bytes_dataset(uris, endpoint_url, num_cpus).map_batches(
        crop_images,
        fn_kwargs={"root": root_path, "image_size": image_size, "random": True},
        batch_size=16,
        num_cpus=num_cpus,
    )


def validation_arrays(
    uris: list[str], root: str, image_size: int, endpoint_url: str | None = None, limit: int | None = None
) -> dict[str, np.ndarray]:
    """Centre crops of the first ``limit`` of ``uris`` as ``{"key", "image"}`` arrays, by key."""
    uris = sorted(uris)[:limit]
    root_path = storage.pyarrow_filesystem(root, endpoint_url)[1]
    rows = (
        read_bytes_dataset(uris, endpoint_url)
        .map_batches(crop_images, fn_kwargs={"root": root_path, "image_size": image_size, "random": False})
        .take_all()
    )
    rows.sort(key=lambda r: r["key"])
    if not rows:
        raise NoImagesError("no decodable validation images")
    return {
        "key": np.array([r["key"] for r in rows], dtype=object),
        "image": np.stack([r["image"] for r in rows]),
    }


def mean_pixel(uris: list[str], endpoint_url: str | None = None) -> tuple[float, float, float]:
    """The mean RGB pixel of ``uris`` in [0, 1]: Ray Data tasks decode and sum their share of the
    images across the cluster; the driver only adds one row per batch."""
    rows = read_bytes_dataset(uris, endpoint_url).map_batches(channel_sums, batch_size=16).take_all()
    pixels = sum(float(r["pixels"]) for r in rows)
    if not pixels:
        raise NoImagesError("no decodable training images to compute the mean pixel from")
    sums = np.sum([r["sums"] for r in rows], axis=0) / (pixels * 255.0)
    return (float(sums[0]), float(sums[1]), float(sums[2]))


def batch_masks(
    keys,
    *,
    step: int,
    seed: int,
    image_size: int,
    local_size: int,
    hole_range: tuple[int, int],
    kind: str = "rectangle",
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded masks for one batch: ``(masks (N, 1, S, S) float32, boxes (N, 4) int64)``, of
    ``kind`` (``model.masks.training_mask``: rectangle, freeform or mixed).

    Each mask is a pure function of ``(seed, key, step)``, so a resumed run draws the same holes
    it would have drawn without the interruption.
    """
    masks = np.empty((len(keys), 1, image_size, image_size), np.float32)
    boxes = np.empty((len(keys), 4), np.int64)
    for i, key in enumerate(keys):
        drawn = training_mask(
            kind,
            image_size,
            image_size,
            seed=seed,
            key=f"{key}@{step}",
            hole_range=hole_range,
            local_size=local_size,
        )
        masks[i, 0] = drawn.mask
        boxes[i] = drawn.local_box
    return masks, boxes


def validation_masks(
    keys, *, seed: int, image_size: int, local_size: int, hole_range: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The fixed validation masks: rectangles (whatever the training masks), the same holes at
    every evaluation, so metrics are comparable across runs and steps."""
    return batch_masks(
        [f"val/{k}" for k in keys],
        step=0,
        seed=seed,
        image_size=image_size,
        local_size=local_size,
        hole_range=hole_range,
    )
