"""The inpainting job's input side as Ray Data tasks: ListImages, then ReadDecode.

``list_images`` runs as one streaming task per source (a prefix or a list file): it walks the
prefix one folder at a time (or reads the list file line by line) and yields pages of keys, so
neither the driver nor any task ever holds the whole key set; when resuming, ``drop_completed``
takes the keys an earlier run completed out of each page there. ``read_decode`` turns pages of keys
into rows ready for the network: RGB uint8 pixels, a hole mask (read from ``--masks`` or generated
from the image key), and every manifest field known so far. Nothing here raises on bad input:
each image ends as a row whose ``status`` is ``ok`` (ready) or ``error`` (with a type and a
message).
"""

from __future__ import annotations

import itertools
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline import storage
from pipeline.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image, decode_mask
from pipeline.manifest import STATUS_ERROR, STATUS_OK, contains
from pipeline.naming import MASKS_FOLDER, key_digests, output_key_for
from pipeline.train_data import scale_and_crop

LIST_FILE_SUFFIXES = (".txt", ".lst", ".list")
EMPTY_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)
EMPTY_MASK = np.zeros((0, 0), dtype=np.uint8)


def is_list_file(fs, path: str) -> bool:
    return path.lower().endswith(LIST_FILE_SUFFIXES) and fs.isfile(path)


def _list_file_entry(list_dir_uri: str, line: str) -> tuple[str, str]:
    """``(key, uri)`` of one list-file line: a key relative to the list file's folder, or a full URI
    / absolute path whose key is its path without the protocol (``s3://b/x.jpg`` -> ``b/x.jpg``)."""
    if "://" in line:
        return line.split("://", 1)[1].lstrip("/"), line
    if line.startswith("/"):
        return line.lstrip("/"), line
    return line, posixpath.join(list_dir_uri.rstrip("/"), line)


def _walk_prefix(fs, root: str, exclude: tuple[str, ...]) -> Iterator[list[str]]:
    """Pages of object paths under ``root`` (``storage.iter_object_pages``; a file: itself)."""
    if fs.isfile(root):
        yield [root]
        return
    yield from storage.iter_object_pages(fs, root, exclude)


def _output_name(key: str, output_format: str | None) -> str:
    """The key that ``key``'s output is written at, when that differs from ``key`` (it is then
    always ``key`` plus a suffix), else ""."""
    if output_format is None:
        return ""
    out_key = output_key_for(key, output_format)[0]
    return out_key if out_key != key else ""


def _with_collisions(entries: Iterator[tuple[str, str]], output_format: str | None):
    """``(key, uri, collides_with)`` of sorted ``(key, uri)`` entries, holding only a few keys.

    ``cat.jpg`` is written as ``cat.jpg.png``; if ``cat.jpg.png`` is an input too, it keeps that
    name (its output is itself) and ``cat.jpg`` becomes an ``output_collision`` error row, instead
    of one completion silently replacing the other. An output name is its key plus a suffix, so in
    sorted order it comes after the key, with only keys that extend the key in between: a key is
    held back only while the keys listed next extend it (a chain of a few keys at most). That
    finds every collision without a set of all keys.
    """
    held: list[list[str]] = []  # [key, uri, output name, collides_with], each extending the one before
    for key, uri in entries:
        while held and not key.startswith(held[-1][0]):
            k, u, _, c = held.pop()
            yield k, u, c
        for entry in held:
            if entry[2] == key:
                entry[3] = key
        out_name = _output_name(key, output_format)
        if out_name:
            held.append([key, uri, out_name, ""])
        else:
            yield key, uri, ""
    while held:
        k, u, _, c = held.pop()
        yield k, u, c


def _printable(key: str) -> str:
    """Local file names may not be UTF-8; show their bytes escaped. The backslash makes such a key
    unsafe, so it becomes an ``unsafe_key`` error row instead of breaking the Arrow block."""
    try:
        key.encode("utf-8")
        return key
    except UnicodeEncodeError:
        return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def iter_entries(
    source: str,
    endpoint_url: str | None = None,
    exclude: tuple[str, ...] = (),
    output_format: str | None = None,
) -> Iterator[tuple[str, str, str]]:
    """``(relative key, URI, collides_with)`` of every input under ``source``, a prefix or a list
    file; ``collides_with`` (with an ``output_format``) is the input whose key is this one's output
    name, else ""."""
    fs, root = storage.filesystem(source, endpoint_url)
    fs.invalidate_cache()  # listings are cached per filesystem instance, shared in a process
    if is_list_file(fs, root):
        list_dir = source.rstrip("/").rsplit("/", 1)[0] if "/" in source.rstrip("/") else "."

        def listed_keys() -> Iterator[tuple[str, str]]:
            with fs.open(root, "rt", encoding="utf-8") as lines:
                for raw in lines:
                    line = raw.strip()
                    if line and not line.startswith("#"):
                        yield _list_file_entry(list_dir, line)

        # A first pass takes every listed key's 16-byte digest (in a NumPy array: 41 bytes a key in
        # all, in this task only), so a duplicate and an output collision are found wherever in the
        # file the other key is listed.
        chunks, chunk = [], []
        for key, _ in listed_keys():
            chunk.append(key)
            if len(chunk) == 65536:
                chunks.append(key_digests(chunk))
                chunk = []
        digests = np.concatenate([*chunks, key_digests(chunk)])
        distinct, first_index = np.unique(digests, return_index=True)
        first = np.zeros(len(digests), dtype=bool)
        first[first_index] = True
        del digests, first_index
        for i, (key, uri) in enumerate(listed_keys()):
            out_name = _output_name(key, output_format)
            collides = out_name if out_name and contains(distinct, key_digests([out_name]))[0] else ""
            # A key listed twice is done once: later copies get an empty URI (a ``duplicate_key`` row).
            yield (key, uri, collides) if first[i] else (key, "", collides)
        return
    excluded = tuple(storage.filesystem(u, endpoint_url)[1] for u in exclude)
    keys = (
        # The URI too: a manifest row (an Arrow string) cannot hold the surrogates of such a name.
        (_printable(storage.relative_key(root, path)), _printable(storage.full_uri(fs, path)))
        for paths in _walk_prefix(fs, root, excluded)
        for path in paths
    )
    yield from _with_collisions(keys, output_format)


def list_images(
    batch: dict[str, np.ndarray],
    *,
    page_rows: int = 1000,
    endpoint_url: str | None = None,
    exclude: tuple[str, ...] = (),
    output_format: str | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """ListImages stage: ``{"source": [uri]}`` -> pages of ``{"key", "uri", "collides_with"}`` rows.

    ``exclude``: URIs (the output and manifest prefixes) never listed as inputs, so an output
    prefix nested inside the input prefix is not read back as images. ``output_format``: the
    job's, to find inputs whose output name is another input's key (``_collision``).
    """
    for source in batch["source"]:
        entries = iter_entries(source, endpoint_url, exclude, output_format)
        while page := list(itertools.islice(entries, page_rows)):
            keys, uris, collides = zip(*page, strict=True)
            yield {
                "key": np.array(keys, dtype=object),
                "uri": np.array(uris, dtype=object),
                "collides_with": np.array(collides, dtype=object),
            }


def drop_completed(
    page: dict[str, np.ndarray], index: np.ndarray | None
) -> tuple[dict[str, np.ndarray], int]:
    """Resuming: ``page`` without the keys in the resume index (completed by an earlier run), and
    how many it dropped. Done in the listing so that a finished input costs one digest lookup and
    never reaches a read task, an actor, a writer or the driver."""
    if index is None or len(page["key"]) == 0:
        return page, 0
    keep = ~contains(index, key_digests([str(k) for k in page["key"]]))
    dropped = int(len(keep) - keep.sum())
    return ({name: values[keep] for name, values in page.items()} if dropped else page), dropped


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
    # The evaluation's view (jobs/evaluate.py); the inpainting job leaves these unset.
    crop: int = 0  # > 0: shorter side resized to it, centre crop (train_data.scale_and_crop), masks too
    hole_range: tuple[int, int] | None = None  # rectangle hole sides, instead of the size-scaled default
    local_size: int | None = None  # ... inside a box of this side (both clipped to the image)


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


def _load_mask(key: str, height: int, width: int, options: ReadOptions) -> tuple[np.ndarray, str]:
    fs, root = storage.filesystem(options.masks, options.endpoint_url)
    for candidate in _mask_candidates(key):
        path = storage.join_key(root, candidate)
        try:
            data = storage.with_retries(lambda path=path: storage.read_bytes(fs, path))
        except FileNotFoundError:
            continue
        try:
            mask = decode_mask(data, options.max_pixels)
        except DecodeError as e:
            raise RowError(f"mask_{e.kind}", f"mask {candidate!r}: {e}") from None
        if mask.shape != (height, width):
            raise RowError(
                "mask_size_mismatch",
                f"mask {candidate!r} is {mask.shape[1]}x{mask.shape[0]}, the image is {width}x{height}",
            )
        return mask, candidate
    raise RowError("mask_missing", f"no mask for {key!r} under --masks (tried {_mask_candidates(key)})")


def _generate_mask(key: str, height: int, width: int, options: ReadOptions) -> np.ndarray:
    from model.masks import generate_mask, rectangle_mask

    try:
        if options.mask_generator == "rectangle" and options.local_size is not None:
            box = min(options.local_size, height, width)
            lo, hi = options.hole_range or (box, box)
            mask = rectangle_mask(
                height, width, seed=options.mask_seed, key=key, hole_range=(min(lo, box), min(hi, box)),
                local_size=box,
            ).mask  # fmt: skip
        else:
            mask = generate_mask(options.mask_generator, height, width, seed=options.mask_seed, key=key)
        return np.ascontiguousarray(mask, dtype=np.uint8)
    except Exception as e:
        raise RowError("mask_generation_failed", f"{type(e).__name__}: {e}") from None


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
            start = time.perf_counter()
            try:
                image = decode_image(data, options.max_pixels)
            except DecodeError as e:
                raise RowError(e.kind, str(e)) from None
            del data
            h, w = image.shape[:2]
            height[i], width[i] = h, w  # the image's own size, also with a crop
            if options.crop:
                image = scale_and_crop(image, options.crop, None)
            decode_s[i] = time.perf_counter() - start
            start = time.perf_counter()
            if generated:
                mask = _generate_mask(key, *image.shape[:2], options)
                decode_s[i] += time.perf_counter() - start
            else:
                mask, rows["mask_key"][i] = _load_mask(key, h, w, options)
                if options.crop:  # the same view of the mask; white (>= 128 after resizing) = hole
                    mask = (scale_and_crop(mask * 255, options.crop, None) >= 128).astype(np.uint8)
                read_s[i] += time.perf_counter() - start  # mostly the mask's GET
            hole[i] = float(mask.mean())
            if hole[i] >= 1.0:
                raise RowError("mask_all_hole", "the mask covers the whole image: nothing to complete from")
            if hole[i] == 0.0:
                rows["error_message"][i] = "the mask has no hole: the output is the input"
            images[i], masks[i] = image, mask
            rows["status"][i] = STATUS_OK
        except RowError as e:
            rows["status"][i] = STATUS_ERROR
            rows["error_type"][i] = e.kind
            rows["error_message"][i] = str(e)
            rows["output_key"][i] = rows["encoder"][i] = ""

    # Rows of one size next to each other: the actor's batches are slices of these blocks, and a
    # batch of one (padded) size is one forward pass, where mixed photo sizes would split it in many.
    order = sorted(range(n), key=lambda i: (int(height[i]), int(width[i])))
    if order != list(range(n)):
        keys, uris, images, masks = ([seq[i] for i in order] for seq in (keys, uris, images, masks))
        rows = {name: [values[i] for i in order] for name, values in rows.items()}
        width, height, hole, read_s, decode_s = (a[order] for a in (width, height, hole, read_s, decode_s))
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
    }
