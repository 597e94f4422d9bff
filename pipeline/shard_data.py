"""The read stage of sharded inputs (WebDataset tars, Parquet files of image bytes): ReadShard.

A shard is the unit of work and of commit. Its samples travel together as ONE Ray Data row
(``ShardRow``): the shard's own bytes (what the writer passes through) and its samples, decoded
and with their holes, packed in an Arrow IPC stream (``pack`` / ``unpack``). A row is never
split across blocks or re-bundled with another shard's samples by ``map_batches``, so the
inference actor gets whole shards (and batches their images itself) and the writer gets every
sample of a shard at once, with no shuffle. A decoded shard of 1,000 images at 256 px is about
200 MB (plus its mask), held in the object store while it is in flight.

Nothing here raises on bad input: a sample whose content fails (corrupt bytes, text named .jpg,
zero bytes, a null Parquet value, split keys) is an error sample; a shard that cannot be read at
all (gone, a storage failure after the retries, not a tar) is a shard-level error, one row.
"""

from __future__ import annotations

import io
import itertools
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import parquet_shard, storage, tar_shard
from pipeline.inpaint_data import EMPTY_MASK, ReadOptions, RowError, decode_input
from pipeline.manifest import STATUS_ERROR, STATUS_OK

# A sample in flight between the stages ("" / 0 / NaN stand for none, as in pipeline/inpaint_data.py).
SAMPLE_SCHEMA = pa.schema(
    [
        ("index", pa.int32()),  # its position among the shard's samples (tar items / Parquet rows)
        ("key", pa.string()),  # the WebDataset __key__ / the key column; "" for a shard-level row
        ("member", pa.string()),  # the image member's name / the image column
        ("status", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("mask_key", pa.string()),  # the mask member / column it was read from ("": generated)
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("hole_fraction", pa.float32()),
        ("read_s", pa.float32()),
        ("decode_s", pa.float32()),
        ("source_exact", pa.bool_()),
        ("image", pa.large_binary()),  # HxWx3 uint8, raw
        ("mask", pa.large_binary()),  # HxW uint8, raw
        ("alpha", pa.large_binary()),  # HxW uint8, raw; b"": none
        ("icc_profile", pa.large_binary()),
        ("uri", pa.string()),  # a packed file's own URI ("": the shard's)
    ]
)


def pack(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def unpack(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def pixels(raw, height: int, width: int, channels: int = 3) -> np.ndarray:
    """A packed image or mask as an array (a read-only view of the IPC buffer)."""
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.frombuffer(memoryview(raw), dtype=np.uint8).reshape(shape)


@dataclass(frozen=True)
class ShardOptions:
    layout: str  # webdataset / parquet
    # Decode limits, generated masks (a shard's masks come from its members, or from its mask
    # shard under --masks); training, which only takes the samples' bytes (shard_samples), has none.
    read: ReadOptions | None = None
    image_column: str | None = None  # Parquet: default the first of parquet_shard.IMAGE_COLUMNS
    key_column: str = parquet_shard.KEY_COLUMN
    mask_column: str = parquet_shard.MASK_COLUMN
    image_ext: str | None = None  # WebDataset: the image member's extension, exactly
    run_id: str = ""


@dataclass
class Sample:
    """One sample of a shard, not yet decoded."""

    index: int
    key: str
    member: str
    data: bytes | None  # None: no image bytes (the error says why)
    mask: bytes | None = None
    mask_name: str = ""
    error: tuple[str, str] | None = None
    uri: str = ""  # packed files: the file's URI
    read_s: float = 0.0  # packed files: its own GET


def _tar_samples(data: bytes, options: ShardOptions) -> tuple[list[Sample], tuple[str, str] | None]:
    contents = tar_shard.read_tar(data)
    samples = []
    for index, item in enumerate(contents.items):
        if not isinstance(item, tar_shard.TarSample):
            continue
        sample = Sample(index, item.key, "", None, error=item.error)
        if sample.error is None:
            try:
                image = tar_shard.image_member(item, options.image_ext)
                sample.member, sample.data = image.name, image.data
                mask = tar_shard.mask_member(item)
                if mask is not None:
                    sample.mask, sample.mask_name = mask.data, mask.name
            except ValueError as e:
                sample.error = ("no_image_member", str(e))
        samples.append(sample)
    damage = None
    if contents.damage is not None and not any(s.error and s.error[0] == "truncated" for s in samples):
        kind = "not_a_tar" if not contents.items else "truncated"
        damage = (kind, contents.damage)
    return samples, damage


def _parquet_samples(data: bytes, options: ShardOptions) -> list[Sample]:
    try:
        table = parquet_shard.read_parquet(data)
    except (pa.ArrowException, OSError) as e:
        raise RowError("not_parquet", f"not a readable Parquet file ({len(data)} bytes): {e}") from None
    try:
        image_col = parquet_shard.image_column(table.schema, options.image_column)
        key_col = parquet_shard.key_column(table.schema, options.key_column)
    except parquet_shard.ShardLayoutError as e:
        raise RowError("shard_layout", str(e)) from None
    keys = table.column(key_col).to_pylist()
    images = table.column(image_col).to_pylist()
    has_mask = options.mask_column in table.schema.names and options.mask_column != image_col
    masks = table.column(options.mask_column).to_pylist() if has_mask else [None] * len(table)
    samples = []
    for index, (key, image, mask) in enumerate(zip(keys, images, masks, strict=True)):
        sample = Sample(index, "" if key is None else str(key), image_col, image, mask, options.mask_column)
        if key is None:
            sample.error = ("null_key", f"row {index} has a null {key_col!r}")
        elif image is None:
            sample.error = (
                "null_image",
                f"row {index} has no image bytes (null {image_col!r}: a failed download)",
            )
        samples.append(sample)
    return samples


def shard_samples(data: bytes, options: ShardOptions) -> tuple[list[Sample], tuple[str, str] | None]:
    """A shard's samples from its bytes, not yet decoded, each with its image bytes or why it has
    none, and the damage that ended a tar early (None if none): what the read stage decodes and
    what training reads (pipeline/train_shards.py). Raises ``RowError`` when the shard as a whole
    cannot be read (not Parquet, no such column)."""
    if options.layout == "webdataset":
        return _tar_samples(data, options)
    return _parquet_samples(data, options), None


def _mask_members(data: bytes, options: ShardOptions) -> dict[str, tuple[str, bytes]]:
    """``key -> (member or column, PNG bytes)`` of a mask shard: a tar's ``{key}.mask.png`` member
    (else its image member: ``{key}.png``), a Parquet file's ``--mask-column`` (else its image
    column). Raises ``RowError`` when the mask shard cannot be read as one."""
    found: dict[str, tuple[str, bytes]] = {}
    if options.layout == "webdataset":
        for item in tar_shard.read_tar(data).items:  # a damaged tar: its complete members count
            if isinstance(item, tar_shard.TarSample) and item.error is None:
                member = tar_shard.mask_member(item)
                if member is None:
                    try:
                        member = tar_shard.image_member(item, options.image_ext)
                    except ValueError:
                        continue
                found[item.key] = (member.name, member.data)
        return found
    try:
        table = parquet_shard.read_parquet(data)
        column = (
            options.mask_column
            if options.mask_column in table.schema.names
            else parquet_shard.image_column(table.schema, options.image_column)
        )
        keys = table.column(parquet_shard.key_column(table.schema, options.key_column)).to_pylist()
    except (pa.ArrowException, OSError, parquet_shard.ShardLayoutError) as e:
        raise RowError("mask_shard_unreadable", f"{e}") from None
    for key, mask in zip(keys, table.column(column).to_pylist(), strict=True):
        if key is not None and mask is not None:
            found[str(key)] = (column, mask)
    return found


def _masks_from_mask_shard(samples: list[Sample], shard: str, options: ShardOptions) -> None:
    """``--masks`` with shards: every sample's hole from the mask shard of the same name under
    ``--masks`` (``_mask_members``), in place of a mask member of its own; a sample it has none for,
    or whose mask shard is missing or unreadable, is a ``mask_missing`` / ``mask_shard_unreadable``
    error, as a file without its mask file is. A failure to read it is the shard's I/O failure."""
    fs, root = storage.filesystem(options.read.masks, options.read.endpoint_url)
    where = f"{shard!r} under --masks"
    try:
        data = storage.with_retries(lambda: storage.read_bytes(fs, storage.join_key(root, shard)))
        found, error = _mask_members(data, options), None
    except FileNotFoundError:
        found, error = {}, ("mask_missing", f"no mask shard {where}")
    except RowError as e:
        found, error = {}, (e.kind, f"mask shard {where}: {e}")
    except Exception as e:
        raise RowError("read_failed", f"mask shard {where}: {type(e).__name__}: {e}") from None
    for sample in samples:
        if sample.error is not None:
            continue
        if sample.key in found:
            name, sample.mask = found[sample.key]
            sample.mask_name = f"{shard}/{name}" if options.layout == "webdataset" else f"{shard}:{name}"
        else:
            sample.error = error or ("mask_missing", f"no mask for {sample.key!r} in the mask shard {where}")


def _decode(samples: list[Sample], options: ShardOptions) -> pa.Table:
    columns: dict[str, list] = {f.name: [] for f in SAMPLE_SCHEMA}
    for sample in samples:
        row = dict(
            index=sample.index, key=sample.key, member=sample.member, status=STATUS_ERROR, error_type="",
            error_message="", mask_key="", width=0, height=0, hole_fraction=float("nan"), read_s=0.0,
            decode_s=0.0, source_exact=False, image=b"", mask=b"", alpha=b"", icc_profile=b"", uri=sample.uri,
        )  # fmt: skip
        try:
            if sample.error is not None:
                raise RowError(*sample.error)
            got = decode_input(sample.key, sample.data, options.read, sample.mask, sample.mask_name)
            row.update(
                status=STATUS_OK, error_message=got.message, mask_key=got.mask_key, width=got.width,
                height=got.height, hole_fraction=got.hole, decode_s=got.decode_s, source_exact=got.exact,
                image=got.image.tobytes(), mask=got.mask.tobytes(),
                alpha=got.alpha.tobytes() if got.alpha is not EMPTY_MASK else b"", icc_profile=got.icc_profile,
            )  # fmt: skip
        except RowError as e:
            row.update(error_type=e.kind, error_message=str(e))
            if e.size is not None:
                row["width"], row["height"] = e.size
        for name, value in row.items():
            columns[name].append(value)
    return pa.Table.from_pydict(columns, schema=SAMPLE_SCHEMA)


def shard_level_error(kind: str, message: str) -> pa.Table:
    """The one row a shard that cannot be read at all gets (its key is empty)."""
    return _decode([Sample(-1, "", "", None, error=(kind, message))], None)


def read_shard(batch: dict[str, np.ndarray], *, options: ShardOptions) -> dict[str, list]:
    """ReadShard stage: listed shards -> one row each: ``shard``, ``shard_uri``, ``source`` (the
    shard's bytes, b"" when it could not be read), ``samples`` (packed ``SAMPLE_SCHEMA`` rows)."""
    from pipeline.metrics import board

    out: dict[str, list] = {"shard": [], "shard_uri": [], "source": [], "samples": [], "read_s": []}
    progress_board = board(options.run_id)
    for shard, uri in zip(batch["key"], batch["uri"], strict=True):
        shard, uri = str(shard), str(uri)
        start = time.perf_counter()
        data = b""
        try:
            storage.safe_relative_key(shard)
            fs, path = storage.filesystem(uri, options.read.endpoint_url)
            try:
                data = storage.with_retries(lambda fs=fs, path=path: storage.read_bytes(fs, path))
            except FileNotFoundError:
                raise RowError("not_found", f"{storage.redact(uri)!r} does not exist") from None
            except Exception as e:
                raise RowError("read_failed", f"{type(e).__name__}: {e}") from None
            read_s = time.perf_counter() - start
            samples, damage = shard_samples(data, options)
            if options.read is not None and options.read.masks:
                _masks_from_mask_shard(samples, shard, options)
            table = _decode(samples, options)
            if len(table):
                # The shard's GET, shared by its samples.
                share = read_s / len(table)
                table = table.set_column(
                    table.schema.get_field_index("read_s"), "read_s",
                    pa.array([share] * len(table), pa.float32()),
                )  # fmt: skip
            if damage is not None:
                table = pa.concat_tables([table, shard_level_error(*damage)])
        except storage.UnsafeKeyError as e:
            table, data = shard_level_error("unsafe_key", str(e)), b""
        except RowError as e:
            table = shard_level_error(e.kind, str(e))
            if e.kind in ("not_found", "read_failed"):
                data = b""
        if progress_board is not None:
            progress_board.found_rows.remote(len(table))  # its manifest rows, the run's total
        out["shard"].append(shard)
        out["shard_uri"].append(uri)
        out["source"].append(data)
        out["samples"].append(pack(table))
        out["read_s"].append(time.perf_counter() - start)
    return out


PACK_READ_THREADS = 8  # a pack's images are this many GETs at a time


def _read_packed(key: str, uri: str, endpoint_url: str | None) -> Sample:
    """One image of a pack, not yet decoded: its bytes, or why it has none."""
    sample = Sample(0, key, key, None, uri=uri)
    try:
        storage.safe_relative_key(key)  # its --masks mask is looked up at this key
        if not uri:
            raise RowError("duplicate_key", "listed more than once; the first listing is processed")
        fs, path = storage.filesystem(uri, endpoint_url)
        start = time.perf_counter()
        sample.data = storage.with_retries(lambda: storage.read_bytes(fs, path))
        sample.read_s = time.perf_counter() - start
    except storage.UnsafeKeyError as e:
        sample.error = ("unsafe_key", str(e))
    except RowError as e:
        sample.error = (e.kind, str(e))
    except FileNotFoundError:
        sample.error = ("not_found", f"{storage.redact(uri)!r} no longer exists")
    except Exception as e:
        sample.error = ("read_failed", f"{type(e).__name__}: {e}")
    return sample


def read_pack(batch: dict[str, np.ndarray], *, options: ShardOptions) -> dict[str, list]:
    """ReadShard for files packed into shards (``--output-layout webdataset|parquet`` with files in):
    a listed pack -> the same row ``read_shard`` makes, its samples the pack's images in listing
    order, each with its own URI; ``source`` is empty (the writer builds the shard from the samples)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.listing import PACK_SEPARATOR
    from pipeline.metrics import board

    out: dict[str, list] = {"shard": [], "shard_uri": [], "source": [], "samples": [], "read_s": []}
    progress_board = board(options.run_id)
    endpoints = itertools.repeat(options.read.endpoint_url)
    for shard, members, uris in zip(batch["key"], batch["members"], batch["member_uris"], strict=True):
        start = time.perf_counter()
        keys, uris = str(members).split(PACK_SEPARATOR), str(uris).split(PACK_SEPARATOR)
        with ThreadPoolExecutor(PACK_READ_THREADS) as pool:
            samples = list(pool.map(_read_packed, keys, uris, endpoints))
        for index, sample in enumerate(samples):
            sample.index = index
        table = _decode(samples, options)
        table = table.set_column(
            table.schema.get_field_index("read_s"), "read_s",
            pa.array([sample.read_s for sample in samples], pa.float32()),
        )  # fmt: skip
        if progress_board is not None:
            progress_board.found_rows.remote(len(table))
        out["shard"].append(str(shard))
        out["shard_uri"].append("")
        out["source"].append(b"")
        out["samples"].append(pack(table))
        out["read_s"].append(time.perf_counter() - start)
    return out
