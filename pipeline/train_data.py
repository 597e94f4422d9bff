"""Training data over Ray Data: a streamed listing, a train/validation split, a distributed
shuffle, random crops, seeded masks, and the mean pixel of a fixed-size sample.

Nothing holds the list of training images: ``survey`` streams the listing once (counts, the
validation images, the mean's sample), and every epoch a listing task streams the keys again into
Ray's ``random_shuffle``, whose blocks spread over the cluster, then read tasks decode and crop.
Rows of the training dataset are ``{"key": relative path, "image": uint8 (S, S, 3)}``; the training
workers only draw masks (a pure function of ``(seed, key, step)``) and run the networks.

Crops follow the paper (Sec. 4): the image is rescaled so its shorter side is a random length in
``[S, 1.5 S]`` (256..384 for S = 256) and a random S x S patch is taken. Crops are fresh on every
pass over the data; masks are reproducible.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from model.masks import training_mask
from pipeline import shard_layout, storage, train_shards
from pipeline.decode import crop_scaled, decode_or_none, scale_and_crop, scale_for_crops
from pipeline.train_shards import ShardInput

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class NoImagesError(ValueError):
    """The training (or validation) prefix holds no image files."""


def _score(seed, uri: str) -> float:
    """A uniform number in [0, 1) from a hash of ``(seed, uri)``."""
    digest = hashlib.sha256(f"{seed}\x00{uri}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def image_pages(source: str, endpoint_url: str | None = None) -> Iterator[tuple[list[str], list[str]]]:
    """``(keys, URIs)`` of the image files under ``source`` (a prefix, or a list file of keys or
    URIs), a page at a time: the inpainting job's streaming listing (``pipeline.inpaint_data``), so
    no process ever holds the whole list. Keys are relative to the prefix (or as listed)."""
    from pipeline.listing import iter_entries

    fs, root = storage.filesystem(source, endpoint_url)
    if not storage.exists(fs, root):
        raise NoImagesError(f"{source}: no such prefix")
    entries = iter_entries(source, endpoint_url)
    while page := list(itertools.islice(entries, storage.LIST_PAGE_KEYS)):
        kept = [(k, u) for k, u, _ in page if u and k.lower().endswith(IMAGE_EXTENSIONS)]
        if kept:
            keys, uris = zip(*kept, strict=True)
            yield list(keys), list(uris)


def list_image_uris(prefix: str, endpoint_url: str | None = None) -> list[str]:
    """URIs of every image file under ``prefix``, sorted; raises ``NoImagesError`` if none. For
    small sets (tests, tools); training itself streams the listing (``Survey``, ``training_dataset``)."""
    uris = sorted(u for _, page in image_pages(prefix, endpoint_url) for u in page)
    if not uris:
        raise NoImagesError(f"{prefix}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return uris


def split_validation(uris: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out about ``fraction`` of ``uris`` for validation, chosen by a hash of each key.

    An image is held out when a hash of ``(seed, uri)`` falls below ``fraction``: unlike a shuffle,
    adding images later never moves an old one across, so an extended run never trains on what it
    validated on before. At least one image stays on each side when ``fraction`` > 0. The list
    version of what ``survey`` decides in one streaming pass.
    """
    check_fraction(fraction)
    if fraction == 0.0:
        return list(uris), []
    if len(uris) < 2:
        raise NoImagesError(f"need at least 2 images to hold out a validation split, got {len(uris)}")
    held_out = {u for u in uris if _score(seed, u) < fraction}
    if not held_out:
        held_out = {min(uris, key=lambda u: _score(seed, u))}
    if len(held_out) == len(uris):
        held_out.remove(max(uris, key=lambda u: _score(seed, u)))
    return [u for u in uris if u not in held_out], [u for u in uris if u in held_out]


def check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")


@dataclass(frozen=True)
class Split:
    """Which listed images are for validation: the hash rule of ``split_validation``, plus the one
    exception it makes so that neither side is empty."""

    fraction: float
    seed: int
    force_val: str = ""  # no image fell below the fraction: this one (the lowest hash) is held out
    force_train: str = ""  # every image did: this one (the highest hash) trains

    def is_validation(self, uri: str) -> bool:
        if uri == self.force_val:
            return True
        if uri == self.force_train:
            return False
        return self.fraction > 0 and _score(self.seed, uri) < self.fraction


@dataclass(frozen=True)
class Survey:
    """One streaming pass over the training listing: counts, the split, the first validation
    images by URI, and a fixed-size sample of training images for the mean pixel."""

    train_count: int
    val_count: int
    split: Split
    val_uris: list[str]  # the first ``val_limit`` validation images by URI, with their roots' keys
    val_keys: list[str]
    sample_uris: list[str]  # up to ``sample_size`` training images, the lowest ``mean_rank``
    sample_keys: list[str] = dataclasses.field(default_factory=list)  # theirs, in the same order


def mean_rank(uri: str) -> tuple[float, ...]:
    """Which training images the mean pixel is computed from: the lowest of a hash of ("mean",
    uri). A sample in a shard ranks by its shard's hash first, so the sample fills a few shards,
    each read once, rather than touching one sample in each of thousands."""
    if train_shards.SAMPLE_SEPARATOR in uri:
        return (_score("mean", train_shards.parse_sample_uri(uri)[0]), _score("mean", uri))
    return (_score("mean", uri),)


def survey(
    source: str,
    *,
    fraction: float,
    seed: int,
    val_limit: int,
    sample_size: int,
    val_source: str | None = None,
    endpoint_url: str | None = None,
    shards: ShardInput | None = None,
    val_shards: ShardInput | None = None,
) -> Survey:
    """Survey ``source`` (and ``val_source``, when validation images have their own prefix) in one
    streaming pass each, holding only ``val_limit + sample_size`` URIs. Runs as a Ray task."""
    check_fraction(fraction)
    rule = Split(0.0 if val_source else fraction, seed)
    n = held = 0
    lowest, highest = (2.0, "", ""), (-1.0, "", "")  # (score, uri, key): the split's exceptions
    first_val: list[tuple[_Reversed, str]] = []  # the smallest URIs held out, as a max-heap
    sample: list[tuple[tuple, str, str]] = []  # the lowest mean_rank, as a max-heap (ranks negated)

    def keep_first(uri: str, key: str) -> None:
        if len(first_val) < val_limit:
            heapq.heappush(first_val, (_Reversed(uri), key))
        elif val_limit and uri < first_val[0][0].value:
            heapq.heapreplace(first_val, (_Reversed(uri), key))

    def keep_sample(uri: str, key: str) -> None:
        entry = (tuple(-r for r in mean_rank(uri)), uri, key)
        if len(sample) < sample_size:
            heapq.heappush(sample, entry)
        elif sample_size and entry > sample[0]:
            heapq.heapreplace(sample, entry)

    for keys, uris in training_pages(source, shards, endpoint_url):
        for key, uri in zip(keys, uris, strict=True):
            n += 1
            score = _score(seed, uri)
            lowest, highest = min(lowest, (score, uri, key)), max(highest, (score, uri, key))
            if rule.is_validation(uri):
                held += 1
                keep_first(uri, key)
            else:
                keep_sample(uri, key)
    if not n:
        if shards is not None:
            raise NoImagesError(f"{source}: no usable samples in {shards.layout} shards")
        raise NoImagesError(f"{source}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    if rule.fraction and n < 2:
        raise NoImagesError(f"need at least 2 images to hold out a validation split, got {n}")
    if rule.fraction and held == 0:  # as split_validation: the lowest hash is held out
        rule = dataclasses.replace(rule, force_val=lowest[1])
        keep_first(lowest[1], lowest[2])
        sample = [e for e in sample if e[1] != lowest[1]]
        held = 1
    elif rule.fraction and held == n:  # ... and with all held out, the highest trains
        rule = dataclasses.replace(rule, force_train=highest[1])
        first_val = [e for e in first_val if e[0].value != highest[1]]
        sample = [(tuple(-r for r in mean_rank(highest[1])), highest[1], highest[2])]
        held = n - 1
    train_count = n - held
    if val_source:
        held = 0
        for keys, uris in training_pages(val_source, val_shards, endpoint_url):
            for key, uri in zip(keys, uris, strict=True):
                held += 1
                keep_first(uri, key)
    ordered = sorted((e[0].value, e[1]) for e in first_val)
    return Survey(
        train_count=train_count,
        val_count=held,
        split=rule,
        val_uris=[u for u, _ in ordered],
        val_keys=[k for _, k in ordered],
        sample_uris=[u for u, _ in sorted((u, k) for _, u, k in sample)],
        sample_keys=[k for _, k in sorted((u, k) for _, u, k in sample)],
    )


def training_pages(
    source: str, shards: ShardInput | None, endpoint_url: str | None = None
) -> Iterator[tuple[list[str], list[str]]]:
    """``(keys, URIs)`` a page at a time of the images under ``source``: its image files, or the
    samples of its shards (``sample_pages``)."""
    if shards is None:
        return image_pages(source, endpoint_url)
    return sample_pages(source, shards, endpoint_url)


SURVEY_THREADS = 8  # shards the survey reads at once (it waits on storage, not the CPU)


def sample_pages(
    source_uri: str, source: ShardInput, endpoint_url: str | None = None
) -> Iterator[tuple[list[str], list[str]]]:
    """``(display keys, sample URIs)`` of the usable samples of every shard ``source_uri`` names,
    a page a shard, in listing order, ``SURVEY_THREADS`` shards read at once: what
    ``survey`` streams for a sharded training set."""
    entries = shard_layout.shard_entries(source_uri, source.layout, endpoint_url)

    def page(entry: tuple[str, str]) -> tuple[list[str], list[str]]:
        shard_key, uri = entry
        keys = train_shards.sample_keys(shard_key, uri, source, endpoint_url)
        return [train_shards.display_key(shard_key, k) for k in keys], [
            train_shards.sample_uri(uri, k) for k in keys
        ]

    for keys, uris in prefetched_map(page, entries, threads=SURVEY_THREADS, depth=2 * SURVEY_THREADS):
        if keys:
            yield keys, uris


class _Reversed:
    """Orders strings backwards, so ``heapq`` (a min-heap) keeps the smallest ones."""

    __slots__ = ("value",)

    def __init__(self, value: str):
        self.value = value

    def __lt__(self, other: _Reversed) -> bool:
        return self.value > other.value

    def __eq__(self, other) -> bool:
        return isinstance(other, _Reversed) and self.value == other.value


def read_images(
    batch: dict[str, np.ndarray], endpoint_url: str | None, shards: ShardInput | None = None, split=None
) -> Iterator[tuple[str, np.ndarray]]:
    """``(key, RGB image)`` of each ``{"key", "uri"}`` row; a file that is gone or undecodable is
    skipped with a warning naming it. ``shards``: the rows are shards (``train_shards.batch_images``:
    each read once, for its picked samples or else the ones ``split`` trains on)."""
    if shards is not None:
        yield from train_shards.batch_images(batch, shards, endpoint_url, split)
        return
    for key, uri in zip(batch["key"], batch["uri"], strict=True):
        key, uri = str(key), str(uri)
        fs, path = storage.filesystem(uri, endpoint_url)
        try:
            data = storage.with_retries(lambda fs=fs, path=path: storage.read_bytes(fs, path))
        except FileNotFoundError:
            logger.warning("skipping %s: no longer exists", key)
            continue
        image = decode_or_none(data, key)
        if image is not None:
            yield key, image


def crop_images(
    batch: dict[str, np.ndarray],
    *,
    image_size: int,
    random: bool = True,
    endpoint_url: str | None = None,
    shards: ShardInput | None = None,
    split=None,
) -> dict:
    """Ray Data ``map_batches`` function: ``{"key", "uri"}`` rows (files, or shards: ``read_images``)
    -> ``{"key", "image"}`` crops."""
    rng = np.random.default_rng() if random else None
    keys, crops = [], []
    for key, image in read_images(batch, endpoint_url, shards, split):
        keys.append(key)
        crops.append(scale_and_crop(image, image_size, rng))
    images = np.stack(crops) if crops else np.zeros((0, image_size, image_size, 3), np.uint8)
    return {"key": np.array(keys, dtype=object), "image": images}


def scaled_images(
    batch: dict[str, np.ndarray],
    *,
    image_size: int,
    endpoint_url: str | None = None,
    shards: ShardInput | None = None,
    split=None,
) -> dict:
    """Ray Data ``map_batches`` function of a resident training set: ``{"key", "uri"}`` rows ->
    ``{"key", "image"}`` with each image decoded and at ``scale_for_crops``'s scale (sizes vary)."""
    keys, images = [], []
    for key, image in read_images(batch, endpoint_url, shards, split):
        keys.append(key)
        images.append(scale_for_crops(image, image_size))
    column = np.empty(len(images), dtype=object)
    column[:] = images
    return {"key": np.array(keys, dtype=object), "image": column}


# Decoded bytes of one image held by ResidentImages, per (crop side)^2: scale_for_crops keeps the
# shorter side at 1.5 x the crop, and photographs are mostly 3:2, so 1.5^2 x 1.5 x 3 channels.
RESIDENT_BYTES_PER_PIXEL = 1.5**2 * 1.5 * 3


def fits_in_memory(images: int, image_size: int, workers: int, max_gib: float) -> bool:
    """Whether each worker's share of ``images`` training images, decoded at ``scale_for_crops``'s
    scale, fits in ``max_gib``: then they are decoded once and held (``ResidentImages``)."""
    per_worker = -(-images // max(1, workers))
    return per_worker * image_size**2 * RESIDENT_BYTES_PER_PIXEL <= max_gib * 2**30


class ResidentImages:
    """A training worker's share of a small training set, decoded once and held in its memory:
    every batch is fresh random crops of it (``crop_scaled``, the paper's random scale and place),
    each image once per epoch in a new random order. Decoding a photograph costs several times
    cutting a crop from its decoded copy (bench/train_input.py), so a set that fits is never
    decoded again. ``batch(i)`` is a pure function of ``(seed, i)``, so threads can make several
    steps' batches at once (``prefetched_map``)."""

    def __init__(self, keys: list[str], images: list[np.ndarray], image_size: int, seed):
        if not keys:
            raise NoImagesError("a training worker's share of the training images is empty")
        self.keys, self.images, self.image_size = keys, images, image_size
        self.seed = list(seed) if isinstance(seed, (list, tuple)) else [int(seed)]
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_shard(cls, shard, image_size: int, seed) -> ResidentImages:
        """One pass over this worker's Ray Data shard of ``scaled_images`` rows."""
        keys, images = [], []
        for batch in shard.iter_batches(batch_size=64, batch_format="numpy"):
            keys.extend(str(k) for k in batch["key"])
            images.extend(np.asarray(im, dtype=np.uint8) for im in batch["image"])
        return cls(keys, images, image_size, seed)

    @property
    def nbytes(self) -> int:
        return sum(im.nbytes for im in self.images)

    def _order(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._orders:
                self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
                self._orders[epoch] = np.random.default_rng([*self.seed, epoch]).permutation(len(self.keys))
            return self._orders[epoch]

    def batch(self, index: int, batch_size: int) -> tuple[list[str], np.ndarray]:
        """The ``index``-th batch: epoch ``index // (images // batch_size)`` in its own order (the
        images left over by whole batches wait for a later epoch's order)."""
        per_epoch = len(self.keys) // batch_size
        if per_epoch == 0:
            raise ValueError(
                f"a training worker holds {len(self.keys)} images, fewer than its batch ({batch_size}): "
                "lower batch_size or num_workers, or add images"
            )
        epoch, position = divmod(index, per_epoch)
        picked = self._order(epoch)[position * batch_size : (position + 1) * batch_size]
        rng = np.random.default_rng([*self.seed, epoch, position, 1])
        crops = np.stack([crop_scaled(self.images[i], self.image_size, rng) for i in picked])
        return [self.keys[i] for i in picked], crops

    def batches(self, batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
        return (self.batch(i, batch_size) for i in itertools.count())


def prefetched(produce: Iterator, depth: int = 3) -> Iterator:
    """``produce``'s items, made ``depth`` ahead in a thread: the next steps' crops and masks are
    prepared while this one runs on the GPU (OpenCV and the GPU wait release the GIL). An error in
    the thread is raised here, at the item it replaced."""
    return prefetched_map(lambda item: item, produce, threads=1, depth=depth)


def prefetched_map(make: Callable, items: Iterator, threads: int = 1, depth: int = 4) -> Iterator:
    """``make(item)`` for each of ``items``, in order, computed ``depth`` ahead by ``threads``
    threads (``make`` must be safe to run concurrently; ``items`` is read in the caller's order).
    An error is raised here, at the result it replaced."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="glcic-input")
    pending: deque = deque()
    source = iter(items)
    exhausted = False

    def submit() -> None:
        nonlocal exhausted
        if threads <= 1:  # one thread runs its tasks in order: it may advance the source itself
            pending.append(pool.submit(lambda: make(next(source))))
            return
        try:  # several: the source is advanced here, in order, and only make() runs in threads
            item = next(source)
        except StopIteration:
            exhausted = True
            return
        pending.append(pool.submit(make, item))

    try:
        while True:
            while not exhausted and len(pending) < max(depth, threads):
                submit()
            if not pending:
                return
            try:
                result = pending.popleft().result()
            except StopIteration:
                return
            yield result
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


def step_inputs(
    batches: Iterator[tuple[list[str], np.ndarray]], first_step: int, masks_for: Callable
) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, np.ndarray]]:
    """``(keys, images, masks, boxes)`` of each step from ``first_step`` on: a batch and its seeded
    masks (``masks_for(keys, step)``), everything a step needs from the CPU."""
    step = first_step
    for keys, images in batches:
        masks, boxes = masks_for(keys, step)
        yield keys, images, masks, boxes
        step += 1


def channel_sums(
    batch: dict[str, np.ndarray], *, endpoint_url: str | None = None, shards: ShardInput | None = None
) -> dict[str, np.ndarray]:
    """One row per batch: its RGB sums, pixel count and images (float64: exact at any realistic size)."""
    sums, pixels, images = np.zeros(3, np.float64), 0.0, 0
    for _, image in read_images(batch, endpoint_url, shards):
        sums += image.reshape(-1, 3).sum(0, dtype=np.float64)
        pixels += image.shape[0] * image.shape[1]
        images += 1
    return {"sums": sums[None], "pixels": np.array([pixels]), "images": np.array([images])}


def rows_dataset(keys: list[str], uris: list[str], shards: ShardInput | None = None):
    """A small Ray Dataset of ``{"key", "uri"}`` rows (the validation images, the mean's sample);
    of samples in shards, one row a shard that picks them (``train_shards.picked_rows``)."""
    import ray.data

    if shards is not None:
        return ray.data.from_items(train_shards.picked_rows(keys, uris))
    return ray.data.from_items([{"key": k, "uri": u} for k, u in zip(keys, uris, strict=True)])


class EpochCounter:
    """Counts the executions of one training dataset: its epochs.

    Ray Train runs the same Dataset again every epoch, and Ray 2.60's ``random_shuffle(seed=int)``
    gives the same order on every execution, so the epoch must be in the data itself: the listing
    task asks this (a tiny Ray actor owned by the driver) which epoch it lists, and orders each page
    by a hash of ``(seed, epoch, key)``; the shuffle then mixes differently ordered blocks."""

    def __init__(self, first: int = 0):
        self.epoch = first - 1

    def next(self) -> int:
        self.epoch += 1
        return self.epoch


def epoch_order(keys: list[str], seed: int, epoch: int) -> list[int]:
    """The indices of ``keys`` sorted by a hash of ``(seed, epoch, key)``: each epoch a different
    order, the same for the same seed and epoch."""
    scores = [
        hashlib.blake2b(
            f"{seed}\x00{epoch}\x00{key}".encode("utf-8", "surrogatepass"), digest_size=8
        ).digest()
        for key in keys
    ]
    return sorted(range(len(keys)), key=scores.__getitem__)


def list_training_keys(
    batch: dict[str, np.ndarray],
    *,
    split: Split,
    copies: int,
    page_rows: int,
    endpoint_url: str | None,
    seed: int = 0,
    epochs=None,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data ``map_batches`` function: ``{"source"}`` -> pages of ``page_rows`` ``{"key", "uri"}``
    rows of the training images (not the validation ones), the listing streamed ``copies`` times.
    ``epochs``: an ``EpochCounter`` actor; each page is then in the order of ``epoch_order``."""
    import ray

    epoch = ray.get(epochs.next.remote()) if epochs is not None else 0
    keys: list[str] = []
    uris: list[str] = []

    def page() -> dict[str, np.ndarray]:
        # Each copy of a key gets its own place: the copy number is part of what is hashed.
        order = epoch_order([f"{k}\x00{i}" for i, k in enumerate(keys)], seed, epoch)
        return {
            "key": np.array([keys[i] for i in order], dtype=object),
            "uri": np.array([uris[i] for i in order], dtype=object),
        }

    for source in batch["source"]:
        for _ in range(copies):
            for page_keys, page_uris in image_pages(str(source), endpoint_url):
                for key, uri in zip(page_keys, page_uris, strict=True):
                    if not split.is_validation(uri):
                        keys.append(key)
                        uris.append(uri)
                if len(keys) >= page_rows:
                    yield page()
                    keys, uris = [], []
    if keys:
        yield page()


def list_training_shards(
    batch: dict[str, np.ndarray],
    *,
    source: ShardInput,
    copies: int,
    endpoint_url: str | None,
    seed: int = 0,
    epochs=None,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data ``map_batches`` function: ``{"source"}`` -> one ``{"key", "uri"}`` row a shard (its
    own block, so each shard is its own read task), ``copies`` times over, each copy's shards in
    the order of ``epoch_order`` for this epoch (``epochs``: an ``EpochCounter``)."""
    import ray

    epoch = ray.get(epochs.next.remote()) if epochs is not None else 0
    for source_uri in batch["source"]:
        # A list of shards is the images' count / the shard size: small even for 100 M images.
        shards = list(shard_layout.shard_entries(str(source_uri), source.layout, endpoint_url))
        for copy in range(copies):
            for i in epoch_order([f"{key}\x00{copy}" for key, _ in shards], seed, epoch):
                key, uri = shards[i]
                yield {"key": np.array([key], dtype=object), "uri": np.array([uri], dtype=object)}


SHUFFLE_BLOCKS = 256  # blocks of keys per epoch: the shuffle's width (an all-to-all of this squared)


def training_dataset(
    source: str,
    split: Split,
    image_size: int,
    *,
    images: int,
    copies: int = 1,
    seed: int = 0,
    endpoint_url: str | None = None,
    num_cpus: float = 1.0,
    first_epoch: int = 0,
    resident: bool = False,
    shards: ShardInput | None = None,
):
    """Random ``image_size`` crops of the training images under ``source``, in a fresh order each
    epoch: a listing task streams the keys (``copies`` times over, for tiny sets) in about
    ``SHUFFLE_BLOCKS`` blocks, Ray's distributed ``random_shuffle`` mixes them across the cluster
    (no machine holds the whole list), and read tasks decode and crop. ``images``: the survey's
    count of training images, to size the blocks. The order is a function of ``seed`` and the
    epoch (``EpochCounter``, from ``first_epoch``), never the same two epochs running.

    ``resident``: the set is read once, each image decoded and scaled for cropping
    (``scaled_images``) with no shuffle; the workers hold it (``ResidentImages``) and crop.

    ``shards``: ``source`` holds shards (``pipeline.train_shards``): the listing task lists them in
    a fresh order each epoch, one read task a shard decodes its training samples, and the workers'
    local shuffle buffer mixes them (there is no shuffle of keys: the keys are inside the shards)."""
    import ray
    import ray.data

    epochs = ray.remote(num_cpus=0)(EpochCounter).remote(first_epoch)
    listed = {"copies": copies, "endpoint_url": endpoint_url, "seed": seed, "epochs": epochs}
    read_kwargs = {"image_size": image_size, "endpoint_url": endpoint_url}
    if shards is None:
        keys_per_block = max(16, -(-images * copies // SHUFFLE_BLOCKS))
        # One block per page of keys: Ray Data would otherwise merge a task's small rows into
        # blocks of up to 128 MiB, and a block is what one read task decodes.
        block_rows, rows_per_read = keys_per_block, 16
        listing = list_training_keys
        listed.update(split=split, page_rows=keys_per_block)
    else:  # a listed shard is a block, and one read task
        block_rows, rows_per_read = 1, 1
        listing = list_training_shards
        listed.update(source=shards)
        read_kwargs.update(shards=shards, split=split)
    ds = ray.data.from_items([{"source": source}])
    ds.context.target_max_block_size = block_rows * storage.KEY_ROW_BYTES
    # The listing mostly waits on listing calls: a quarter of a CPU.
    ds = ds.map_batches(listing, batch_size=1, num_cpus=0.25, fn_kwargs=listed)
    if resident:
        return ds.map_batches(
            scaled_images, fn_kwargs=read_kwargs, batch_size=rows_per_read, num_cpus=num_cpus
        )
    if shards is None:
        # Fractional CPUs: with Ray's default of one, the shuffle's tasks wait forever on a machine
        # whose training workers hold all but a fraction of its CPUs (so no ``sort``: its tasks
        # take a whole CPU each). Seeded: the same permutation of its input every execution; the
        # listing's epoch order is what changes from one epoch to the next.
        ds = ds.random_shuffle(seed=seed, num_cpus=min(0.25, num_cpus))
    return ds.map_batches(
        crop_images, fn_kwargs={**read_kwargs, "random": True}, batch_size=rows_per_read, num_cpus=num_cpus
    )


def validation_arrays(
    keys: list[str],
    uris: list[str],
    image_size: int,
    endpoint_url: str | None = None,
    shards: ShardInput | None = None,
) -> dict[str, np.ndarray]:
    """Centre crops of the validation images as ``{"key", "image"}`` arrays, by key."""
    rows = (
        rows_dataset(keys, uris, shards)
        .map_batches(
            crop_images,
            fn_kwargs={
                "image_size": image_size,
                "random": False,
                "endpoint_url": endpoint_url,
                "shards": shards,
            },
        )
        .take_all()
    )
    rows.sort(key=lambda r: r["key"])
    if not rows:
        raise NoImagesError("no decodable validation images")
    return {
        "key": np.array([r["key"] for r in rows], dtype=object),
        "image": np.stack([r["image"] for r in rows]),
    }


def mean_pixel(
    uris: list[str],
    endpoint_url: str | None = None,
    shards: ShardInput | None = None,
    keys: list[str] | None = None,
) -> tuple[tuple[float, float, float], int]:
    """The mean RGB pixel of ``uris`` in [0, 1] (``Survey.sample_uris``: a fixed-size sample, so
    the cost does not grow with the training set) and how many images it is the mean of. Ray Data
    tasks decode and sum their share; the driver only adds one row per batch. Samples in shards
    need their display ``keys`` too."""
    rows = (
        rows_dataset(keys if keys is not None else uris, uris, shards)
        .map_batches(channel_sums, batch_size=16, fn_kwargs={"endpoint_url": endpoint_url, "shards": shards})
        .take_all()
    )
    pixels = sum(float(r["pixels"]) for r in rows)
    if not pixels:
        raise NoImagesError("no decodable training images to compute the mean pixel from")
    sums = np.sum([r["sums"] for r in rows], axis=0) / (pixels * 255.0)
    return (float(sums[0]), float(sums[1]), float(sums[2])), int(sum(int(r["images"]) for r in rows))


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
