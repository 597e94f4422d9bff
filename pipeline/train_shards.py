"""Training images inside shards (WebDataset tars, Parquet files of image bytes), read by the rules
the inpainting job reads them with (``pipeline.shard_layout`` finds the shards,
``pipeline.shard_data.shard_samples`` takes their samples apart).

A shard is read whole by one task, never once per sample. A sample is named by its shard's URI
and its key (``sample_uri``): that is what the validation split hashes, so adding shards never
moves an old sample across, and what the survey's validation and mean-pixel lists hold. Its key
in logs and mask seeds is ``{shard key}/{sample key}``.

The survey reads every shard once for its sample keys (a tar whole, a Parquet file's key column
only) without decoding anything. Each epoch then lists the shards in a fresh order; one task a
shard decodes that shard's training samples and crops them. The samples of a shard arrive
together, so the training workers mix them in a local shuffle buffer (``--shuffle-buffer``). A
sample that cannot be used (corrupt, no image member, a null Parquet value, split keys) is
skipped with a warning naming it, as a corrupt file is (training has no manifest to put it in).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from pipeline import parquet_shard, storage
from pipeline.decode import decode_or_none
from pipeline.inpaint_data import RowError
from pipeline.shard_data import ShardOptions, shard_samples

logger = logging.getLogger(__name__)

SAMPLE_SEPARATOR = "\x00"  # between a shard's URI and a sample's key: in neither


@dataclass(frozen=True)
class ShardInput:
    """How training reads its shards: the layout found (or forced) and, as for inpainting, which
    Parquet columns and which WebDataset member hold the image."""

    layout: str  # webdataset / parquet
    image_column: str | None = None
    key_column: str = parquet_shard.KEY_COLUMN
    image_ext: str | None = None

    def options(self) -> ShardOptions:
        return ShardOptions(
            self.layout, image_column=self.image_column, key_column=self.key_column, image_ext=self.image_ext
        )


def sample_uri(shard_uri: str, key: str) -> str:
    return f"{shard_uri}{SAMPLE_SEPARATOR}{key}"


def parse_sample_uri(uri: str) -> tuple[str, str]:
    """``(shard URI, sample key)`` of a ``sample_uri``."""
    shard_uri, separator, key = uri.partition(SAMPLE_SEPARATOR)
    if not separator:
        raise ValueError(f"not a sample of a shard: {uri!r}")
    return shard_uri, key


def display_key(shard_key: str, key: str) -> str:
    return f"{shard_key}/{key}"


def _read(shard_key: str, uri: str, endpoint_url: str | None) -> bytes | None:
    fs, path = storage.filesystem(uri, endpoint_url)
    try:
        return storage.with_retries(lambda: storage.read_bytes(fs, path))
    except FileNotFoundError:
        logger.warning("skipping shard %s: no longer exists", shard_key)
        return None


def _usable_samples(shard_key: str, data: bytes, source: ShardInput):
    """The samples of a shard that have image bytes; the others are skipped with a warning. Bytes
    that are no image (text named .jpg) are only found when decoded (``shard_images``)."""
    try:
        samples, damage = shard_samples(data, source.options())
    except RowError as e:
        logger.warning("skipping shard %s: %s (%s)", shard_key, e, e.kind)
        return []
    if damage is not None:
        logger.warning(
            "shard %s: %s (%s); its complete samples before it are used", shard_key, damage[1], damage[0]
        )
    usable = []
    for sample in samples:
        if sample.error is None and not sample.data:
            sample.error = ("empty", f"{sample.member or 'its image'} has zero bytes")
        if sample.error is not None:
            logger.warning(
                "skipping %s: %s (%s)", display_key(shard_key, sample.key), sample.error[1], sample.error[0]
            )
        else:
            usable.append(sample)
    return usable


def shard_images(
    shard_key: str,
    shard_uri: str,
    source: ShardInput,
    wanted: Callable[[str], bool],
    endpoint_url: str | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """``(display key, RGB image)`` of the samples of one shard whose ``sample_uri`` is ``wanted``,
    the shard read once; an undecodable sample is skipped with a warning naming it."""
    data = _read(shard_key, shard_uri, endpoint_url)
    if data is None:
        return
    for sample in _usable_samples(shard_key, data, source):
        if wanted(sample_uri(shard_uri, sample.key)):
            key = display_key(shard_key, sample.key)
            image = decode_or_none(sample.data, key)
            if image is not None:
                yield key, image


def batch_images(batch: dict[str, np.ndarray], source: ShardInput, endpoint_url: str | None, split=None):
    """``read_images`` for rows of shards: ``{"key": shard key, "uri": shard URI}``, with a
    ``pick`` column (the wanted sample keys, ``SAMPLE_SEPARATOR``-joined) or, without one, every
    sample the ``split`` trains on."""
    picks = batch.get("pick")
    for i, (shard_key, uri) in enumerate(zip(batch["key"], batch["uri"], strict=True)):
        if picks is not None:
            keys = set(str(picks[i]).split(SAMPLE_SEPARATOR))
            wanted = lambda ref, keys=keys: parse_sample_uri(ref)[1] in keys  # noqa: E731
        else:
            wanted = lambda ref: not split.is_validation(ref)  # noqa: E731
        yield from shard_images(str(shard_key), str(uri), source, wanted, endpoint_url)


def picked_rows(keys: list[str], uris: list[str]) -> list[dict]:
    """Rows for ``batch_images`` that read each shard once for the samples ``uris`` name (their
    display ``keys`` alongside): one row a shard."""
    by_shard: dict[str, tuple[str, list[str]]] = {}
    for key, uri in zip(keys, uris, strict=True):
        shard_uri, sample = parse_sample_uri(uri)
        shard_key = key[: len(key) - len(sample) - 1]
        by_shard.setdefault(shard_uri, (shard_key, []))[1].append(sample)
    return [
        {"key": shard_key, "uri": shard_uri, "pick": SAMPLE_SEPARATOR.join(samples)}
        for shard_uri, (shard_key, samples) in sorted(by_shard.items())
    ]


def sample_keys(shard_key: str, uri: str, source: ShardInput, endpoint_url: str | None) -> list[str]:
    """The keys of a shard's usable samples, for the survey: a Parquet file's key column only (its
    null images are found, and skipped, when an epoch reads it); a tar read whole."""
    if source.layout == "parquet":
        import pyarrow.parquet as pq

        fs, path = storage.filesystem(uri, endpoint_url)
        try:

            def keys() -> list:
                with fs.open(path, "rb") as f:
                    parquet = pq.ParquetFile(f)
                    column = parquet_shard.key_column(parquet.schema_arrow, source.key_column)
                    return parquet.read(columns=[column]).column(column).to_pylist()

            found = storage.with_retries(keys)
        except FileNotFoundError:
            logger.warning("skipping shard %s: no longer exists", shard_key)
            return []
        except (parquet_shard.ShardLayoutError, OSError, ValueError) as e:
            logger.warning("skipping shard %s: %s", shard_key, e)
            return []
        if None in found:
            logger.warning("shard %s: %d rows with a null key skipped", shard_key, found.count(None))
        return [str(k) for k in found if k is not None]
    data = _read(shard_key, uri, endpoint_url)
    return [] if data is None else [s.key for s in _usable_samples(shard_key, data, source)]
