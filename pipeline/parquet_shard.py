"""Parquet shards with the image bytes in a column, as img2dataset writes them (``key``, ``jpg``,
``url``, ``caption``, ``status``, ...): which columns hold what, and a shard written back in the
input's schema and column order.

The output stores the image (and mask) columns uncompressed, since JPEG and PNG bytes do not
compress, and bounds each row group by bytes rather than rows: Arrow's binary offsets are 32-bit,
so one column chunk of a row group must stay under 2 GiB, and readers hold a row group at once.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_COLUMNS = ("jpg", "png", "webp", "image")  # the default image column: the first present
KEY_COLUMN = "key"
MASK_COLUMN = "mask"  # PNG bytes of the sample's hole mask (white = hole), when present
ROW_GROUP_BYTES = 128 * 1024 * 1024


class ShardLayoutError(ValueError):
    """The shard cannot be read as asked (no such column): an error row for the whole shard."""


def read_parquet(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


def image_column(schema: pa.Schema, chosen: str | None) -> str:
    if chosen is not None:
        if chosen not in schema.names:
            raise ShardLayoutError(f"no column {chosen!r} (--image-column) among {schema.names}")
        return chosen
    for name in IMAGE_COLUMNS:
        if name in schema.names:
            return name
    raise ShardLayoutError(
        f"no image column ({', '.join(IMAGE_COLUMNS)}) among {schema.names}; pass --image-column"
    )


def key_column(schema: pa.Schema, chosen: str) -> str:
    if chosen not in schema.names:
        raise ShardLayoutError(f"no key column {chosen!r} (--key-column) among {schema.names}")
    return chosen


def write_parquet(path: str, table: pa.Table, binary_columns: tuple[str, ...]) -> None:
    """``table`` as a Parquet file at local ``path``: ``binary_columns`` uncompressed, the rest
    zstd, row groups of at most ``ROW_GROUP_BYTES`` of binary data (at least one row each)."""
    compression = {name: ("NONE" if name in binary_columns else "ZSTD") for name in table.schema.names}
    dictionary = [name for name in table.schema.names if name not in binary_columns]
    sizes = [0] * len(table)
    for name in binary_columns:
        for i, value in enumerate(table.column(name).to_pylist()):
            sizes[i] += len(value) if value is not None else 0
    with pq.ParquetWriter(path, table.schema, compression=compression, use_dictionary=dictionary) as writer:
        start, size = 0, 0
        for i, row_bytes in enumerate(sizes):
            if i > start and size + row_bytes > ROW_GROUP_BYTES:
                writer.write_table(table.slice(start, i - start), row_group_size=i - start)
                start, size = i, 0
            size += row_bytes
        if start < len(table) or not len(table):
            writer.write_table(table.slice(start), row_group_size=max(1, len(table) - start))
