"""The inpainting job's read stage as Ray Data tasks: ReadDecode, after the listing
(``pipeline/listing.py``, with ``pipeline/resume.py`` dropping what earlier runs completed).

``read_decode`` turns pages of keys into rows ready for the network: RGB uint8 pixels, a hole mask (read from ``--masks`` or generated
from the image key), and every manifest field known so far. Nothing here raises on bad input:
each image ends as a row whose ``status`` is ``ok`` (ready) or ``error`` (with a type and a
message).
"""

from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass

import numpy as np

from pipeline import storage
from pipeline.decode import DEFAULT_MAX_PIXELS, DecodeError, decode, decode_mask, scale_and_crop
from pipeline.manifest import STATUS_ERROR, STATUS_OK
from pipeline.naming import MASKS_FOLDER, output_key_for

EMPTY_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)
EMPTY_MASK = np.zeros((0, 0), dtype=np.uint8)


@dataclass(frozen=True)
class ReadOptions:
    output: str
    masks: str | None = None
    mask_generator: str = "rectangle"
    mask_seed: int = 0
    output_format: str = "png"
    max_pixels: int = DEFAULT_MAX_PIXELS
    endpoint_url: str | None = None
    write_masks: bool = False  # <output>/_masks/ then holds the masks: no output may land there
    # Generated holes (model.masks.generate_mask): None = the paper's sizes, scaled below 256 px.
    hole_range: tuple[int, int] | None = None  # rectangle hole sides
    local_size: int | None = None  # ... inside a box of this side (both clipped to the image)
    # The evaluation's view (jobs/evaluate.py); the inpainting job leaves it unset.
    crop: int = 0  # > 0: shorter side resized to it, centre crop (decode.scale_and_crop), masks too


def _read(uri: str, endpoint_url: str | None) -> bytes:
    fs, path = storage.filesystem(uri, endpoint_url)
    return storage.with_retries(lambda: storage.read_bytes(fs, path))


def _mask_candidates(key: str) -> list[str]:
    """A mask shares the image's key, or its key with a ``.png`` suffix (``a.jpg`` -> ``a.png``)."""
    stem, suffix = posixpath.splitext(key)
    return [key] if suffix.lower() == ".png" else [key, stem + ".png"]


class RowError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.size: tuple[int, int] | None = None  # (width, height), when the image decoded
        self.hole: float | None = None


def _decoded_mask(data: bytes, name: str, height: int, width: int, options: ReadOptions) -> np.ndarray:
    """A mask file's bytes -> HxW {0, 1} of the image's size, or the ``RowError`` saying why not."""
    try:
        mask = decode_mask(data, options.max_pixels)
    except DecodeError as e:
        raise RowError(f"mask_{e.kind}", f"mask {name!r}: {e}") from None
    if mask.shape != (height, width):
        raise RowError(
            "mask_size_mismatch",
            f"mask {name!r} is {mask.shape[1]}x{mask.shape[0]}, the image is {width}x{height}",
        )
    return mask


def _load_mask(key: str, height: int, width: int, options: ReadOptions) -> tuple[np.ndarray, str]:
    fs, root = storage.filesystem(options.masks, options.endpoint_url)
    for candidate in _mask_candidates(key):
        path = storage.join_key(root, candidate)
        try:
            data = storage.with_retries(lambda path=path: storage.read_bytes(fs, path))
        except FileNotFoundError:
            continue
        return _decoded_mask(data, candidate, height, width, options), candidate
    raise RowError("mask_missing", f"no mask for {key!r} under --masks (tried {_mask_candidates(key)})")


def _generate_mask(key: str, height: int, width: int, options: ReadOptions) -> np.ndarray:
    from model.masks import generate_mask

    try:
        mask = generate_mask(
            options.mask_generator, height, width, seed=options.mask_seed, key=key,
            local_size=options.local_size, hole_range=options.hole_range,
        )  # fmt: skip
        return np.ascontiguousarray(mask, dtype=np.uint8)
    except Exception as e:
        raise RowError("mask_generation_failed", f"{type(e).__name__}: {e}") from None


@dataclass
class DecodedInput:
    """An input's pixels and hole, ready for the network, with what its output needs back."""

    image: np.ndarray  # HxWx3 uint8 (the evaluation's crop, if any)
    mask: np.ndarray  # HxW uint8, 1 = hole
    alpha: np.ndarray  # HxW uint8, EMPTY_MASK: none
    icc_profile: bytes  # b"": none
    exact: bool  # the decoded pixels are the file's exactly
    width: int  # the image's own size, also with a crop
    height: int
    hole: float
    mask_key: str  # where the mask was read ("": generated)
    message: str  # a note for an ok row ("the mask has no hole ...")
    decode_s: float
    mask_read_s: float


def decode_input(
    key: str, data: bytes, options: ReadOptions, mask_data: bytes | None = None, mask_name: str = ""
) -> DecodedInput:
    """Decode one input and find its hole: ``mask_data`` (a shard's mask member) if given, else the
    mask under ``--masks``, else a generated one; raises ``RowError`` with the reason."""
    start = time.perf_counter()
    try:
        decoded = decode(data, options.max_pixels)
    except DecodeError as e:
        raise RowError(e.kind, str(e)) from None
    image = decoded.rgb
    h, w = image.shape[:2]
    try:
        return _with_hole(key, decoded, image, h, w, start, options, mask_data, mask_name)
    except RowError as e:
        e.size = (w, h)  # the manifest says how large an image whose hole failed is
        raise


def _with_hole(key, decoded, image, h, w, start, options, mask_data, mask_name) -> DecodedInput:
    keep = not options.crop  # the evaluation's view writes nothing back
    if options.crop:
        image = scale_and_crop(image, options.crop, None)
    mask_key, mask_read_s = "", 0.0
    if mask_data is not None:
        mask, mask_key = _decoded_mask(mask_data, mask_name, h, w, options), mask_name
    elif options.masks is None:
        mask = _generate_mask(key, *image.shape[:2], options)
    else:
        mask_start = time.perf_counter()
        mask, mask_key = _load_mask(key, h, w, options)
        mask_read_s = time.perf_counter() - mask_start  # mostly the mask's GET
    if options.crop and (mask_data is not None or options.masks is not None):
        # the same view of the mask; white (>= 128 after resizing) = hole
        mask = (scale_and_crop(mask * 255, options.crop, None) >= 128).astype(np.uint8)
    hole = float(mask.mean())
    if hole >= 1.0:
        error = RowError("mask_all_hole", "the mask covers the whole image: nothing to complete from")
        error.hole = hole
        raise error
    return DecodedInput(
        image=image,
        mask=mask,
        alpha=decoded.alpha if keep and decoded.alpha is not None else EMPTY_MASK,
        icc_profile=(decoded.icc_profile or b"") if keep else b"",
        exact=decoded.exact if keep else False,
        width=w,
        height=h,
        hole=hole,
        mask_key=mask_key,
        message="the mask has no hole: the output is the input" if hole == 0.0 else "",
        decode_s=time.perf_counter() - start - mask_read_s,
        mask_read_s=mask_read_s,
    )


def read_decode(batch: dict[str, np.ndarray], *, options: ReadOptions) -> dict[str, list | np.ndarray]:
    """ReadDecode stage: keys -> pixels, masks and manifest fields, one row per key, never raising."""
    keys = [str(k) for k in batch["key"]]
    uris = [str(u) for u in batch["uri"]]
    collides = [str(c) for c in batch.get("collides_with", [""] * len(keys))]
    n = len(keys)

    # In flight, "" and 0 stand for "none": a column that is all None in one block would get a
    # different Arrow type than in the next. The manifest turns them back into nulls.
    rows: dict[str, list[str]] = {
        name: [""] * n
        for name in ("status", "error_type", "error_message", "output_key", "encoder", "mask_key")
    }
    images: list[np.ndarray] = [EMPTY_IMAGE] * n
    masks: list[np.ndarray] = [EMPTY_MASK] * n
    # Written back with the completion (pipeline/writer.py): alpha (EMPTY_MASK: none), the colour
    # profile (b"": none), and whether the decoded pixels are the file's exactly.
    alphas: list[np.ndarray] = [EMPTY_MASK] * n
    profiles: list[bytes] = [b""] * n
    exact = np.zeros(n, dtype=bool)
    width = np.zeros(n, dtype=np.int32)
    height = np.zeros(n, dtype=np.int32)
    hole = np.full(n, np.nan, dtype=np.float32)
    read_s = np.zeros(n, dtype=np.float32)
    decode_s = np.zeros(n, dtype=np.float32)
    generated = options.masks is None

    for i, key in enumerate(keys):
        try:
            try:
                storage.safe_relative_key(key)
                out_key, encoder = output_key_for(key, options.output_format)
                storage.join_key(options.output, out_key)
            except storage.UnsafeKeyError as e:
                raise RowError("unsafe_key", str(e)) from None
            rows["output_key"][i], rows["encoder"][i] = out_key, encoder
            if not uris[i]:
                raise RowError("duplicate_key", "listed more than once; the first listing is processed")
            if options.write_masks and out_key.startswith(MASKS_FOLDER + "/"):
                raise RowError(
                    "output_collision",
                    f"its output {out_key!r} lies in {MASKS_FOLDER}/, where --write-masks writes the masks "
                    "(the mask of another input may have this name); rename it or leave --write-masks off",
                )
            if collides[i]:
                raise RowError(
                    "output_collision",
                    f"its output name {out_key!r} is the key of another input, which keeps it; rename one",
                )
            start = time.perf_counter()
            try:
                data = _read(uris[i], options.endpoint_url)
            except FileNotFoundError:
                raise RowError("not_found", f"{uris[i]!r} no longer exists") from None
            except Exception as e:
                raise RowError("read_failed", f"{type(e).__name__}: {e}") from None
            read_s[i] = time.perf_counter() - start
            got = decode_input(key, data, options)
            del data
            decode_s[i], read_s[i] = decode_s[i] + got.decode_s, read_s[i] + got.mask_read_s
            alphas[i], profiles[i], exact[i] = got.alpha, got.icc_profile, got.exact
            height[i], width[i], hole[i], rows["mask_key"][i] = got.height, got.width, got.hole, got.mask_key
            rows["error_message"][i] = got.message
            images[i], masks[i] = got.image, got.mask
            rows["status"][i] = STATUS_OK
        except RowError as e:
            if e.size is not None:
                width[i], height[i] = e.size
            if e.hole is not None:
                hole[i] = e.hole
            rows["status"][i] = STATUS_ERROR
            rows["error_type"][i] = e.kind
            rows["error_message"][i] = str(e)
            rows["output_key"][i] = rows["encoder"][i] = ""

    # Rows of one size next to each other: the actor's batches are slices of these blocks, and a
    # batch of one (padded) size is one forward pass, where mixed photo sizes would split it in many.
    order = sorted(range(n), key=lambda i: (int(height[i]), int(width[i])))
    if order != list(range(n)):
        keys, uris, images, masks, alphas, profiles = (
            [seq[i] for i in order] for seq in (keys, uris, images, masks, alphas, profiles)
        )
        rows = {name: [values[i] for i in order] for name, values in rows.items()}
        width, height, hole, read_s, decode_s, exact = (
            a[order] for a in (width, height, hole, read_s, decode_s, exact)
        )
    return {
        "input_key": keys,
        "input_uri": uris,
        **rows,
        "mask_generator": [options.mask_generator if generated else ""] * n,
        "mask_seed": np.full(n, options.mask_seed, dtype=np.int64),
        "width": width,
        "height": height,
        "hole_fraction": hole,
        "read_s": read_s,
        "decode_s": decode_s,
        "image": images,
        "mask": masks,
        "alpha": alphas,
        "icc_profile": profiles,
        "source_exact": exact,
    }
