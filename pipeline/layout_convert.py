"""Outputs in another layout than the input's (``--output-layout``): a shard's completed samples
written as a WebDataset tar, a Parquet file or one object per member, whatever the input shard was.

What carries across is a sample's *fields*, in the input's order: a tar's members by extension
(``jpg``, ``json``, ``txt``, ``mask.png``), a Parquet row's binary columns by name, and its other
columns (``url``, ``caption``, ``width``, ...) together as one ``json`` field, as img2dataset's own
WebDataset output holds them. The image field is the completion, named by its format's extension
(``jpg`` / ``png`` / ``webp``); the mask field is ``mask.png`` in a tar or in files and the
``--mask-column`` in Parquet. Bytes pass through unchanged:

- to ``webdataset``: ``{key}.{field}`` members, a sample's members together, in sample order;
- to ``parquet``: a ``key`` column, then a binary column per field in first-seen order (null where
  a sample has none), the image and mask columns uncompressed;
- to ``files``: ``{shard stem}/{key}.{field}`` under ``--output`` (img2dataset's ``files`` layout),
  then ``{shard stem}_stats.json``, written last: the shard's completion marker for a resume.

A sample that failed is left out with all its fields, as in a mirrored shard; so are a Parquet
row whose image is null (a tar or a folder has no place for an image that is not there: its
manifest row says ``null_image``) and a tar's members that belong to no sample.
"""

from __future__ import annotations

import json
import posixpath
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from pipeline import parquet_shard, storage, tar_shard
from pipeline.manifest import STATUS_ERROR
from pipeline.shard_layout import shard_stem

MASK_FIELD = tar_shard.MASK_EXTENSION
METADATA_FIELD = "json"  # a Parquet row's non-binary columns, as a JSON object
FILE_WRITE_THREADS = 16  # files output: a shard's objects are this many PUTs at a time


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def tar_fields(source: bytes) -> dict[int, list[tuple[str, bytes]]]:
    """Each sample's fields by its index among the tar's items (the read stage's numbering)."""
    fields = {}
    for index, item in enumerate(tar_shard.read_tar(source).items):
        if isinstance(item, tar_shard.TarSample):
            fields[index] = [(tar_shard.key_and_extension(m.name)[1], m.data) for m in item.members]
    return fields


def parquet_fields(table: pa.Table, key_column: str, mask_column: str) -> dict[int, list[tuple[str, bytes]]]:
    """Each row's fields by its index: binary columns by name (the mask column as ``mask.png``),
    the other columns but the key as one ``json`` field (``meta.json`` if a binary column is
    already called ``json``); nulls are no field."""
    binary = [f.name for f in table.schema if _is_binary(f.type) and f.name != key_column]
    other = [f.name for f in table.schema if f.name not in binary and f.name != key_column]
    metadata_name = METADATA_FIELD if METADATA_FIELD not in binary else f"meta.{METADATA_FIELD}"
    columns = {name: table.column(name).to_pylist() for name in binary + other}
    fields = {}
    for index in range(len(table)):
        row = [(MASK_FIELD if name == mask_column else name, columns[name][index]) for name in binary]
        row = [(name, bytes(value)) for name, value in row if value is not None]
        metadata = {name: columns[name][index] for name in other if columns[name][index] is not None}
        if metadata:
            text = json.dumps(metadata, default=str, ensure_ascii=False, sort_keys=False)
            row.append((metadata_name, text.encode()))
        fields[index] = row
    return fields


def packed_fields(row: dict) -> list[tuple[str, bytes]]:
    """A packed file's fields: its image (replaced by the completion) and a ``json`` naming the
    file it came from, as img2dataset's ``json`` names a sample's URL."""
    return [(row["source_field"], b""), (METADATA_FIELD, json.dumps({"source_key": row["key"]}).encode())]


def completed_fields(
    fields: list[tuple[str, bytes]], row: dict, mask_png: bytes | None
) -> list[tuple[str, bytes]]:
    """A done sample's fields with its image field replaced by the completion (named
    ``row["image_field"]``) and, with ``--write-masks``, its mask by the mask used (never two)."""
    out, placed, masked = [], False, mask_png is None
    for name, data in fields:
        if name == row["source_field"]:
            out.append((row["image_field"], row["out"]))
            placed = True
        elif name == MASK_FIELD and mask_png is not None:
            out.append((MASK_FIELD, mask_png))
            masked = True
        elif name != row["image_field"]:
            out.append((name, data))
    if not placed:
        out.insert(0, (row["image_field"], row["out"]))
    if not masked:
        out.append((MASK_FIELD, mask_png))
    return out


def build_tar(path: str, samples: list[tuple[str, list[tuple[str, bytes]]]]) -> None:
    """``(key, fields)`` samples as a WebDataset tar at local ``path``."""
    import tarfile
    import time

    writer = tar_shard.TarShardWriter(path)
    now = time.time()
    try:
        for key, fields in samples:
            for name, data in fields:
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime, info.mode = len(data), now, 0o644
                writer.add(info, data)
    finally:
        writer.close()


def build_parquet(path: str, samples: list[tuple[str, list[tuple[str, bytes]]]], mask_column: str) -> None:
    """``(key, fields)`` samples as a Parquet file at local ``path``: ``key`` and a binary column per
    field in first-seen order, the image (and mask) columns uncompressed."""
    names: dict[str, None] = {}
    for _, fields in samples:
        names.update(dict.fromkeys(name for name, _ in fields))
    column_of = {name: (mask_column if name == MASK_FIELD else name) for name in names}
    values = {name: [] for name in names}
    for _, fields in samples:
        have = dict(fields)
        for name in names:
            values[name].append(have.get(name))
    table = pa.table(
        {
            parquet_shard.KEY_COLUMN: pa.array([key for key, _ in samples], pa.string()),
            **{column_of[name]: pa.array(values[name], pa.binary()) for name in names},
        }
    )
    images = tuple(column_of[n] for n in names if n.rsplit(".", 1)[-1].lower() in tar_shard.IMAGE_EXTENSIONS)
    parquet_shard.write_parquet(path, table, images)


def file_key(shard: str, key: str, field: str) -> str:
    """Where a sample's field goes in the ``files`` layout: ``{shard stem}/{key}.{field}``, checked
    never to escape ``--output`` (a key is the input's, and may say anything)."""
    return storage.safe_relative_key(posixpath.join(shard_stem(shard), f"{key}.{field}"))


def write_files(fs, root: str, shard: str, samples: list[tuple[dict, list[tuple[str, bytes]]]]) -> None:
    """Each ``(row, fields)`` sample's fields as objects under ``root``; a sample whose writes fail
    becomes a ``write_failed`` row (its other objects may be there: a rerun overwrites them)."""

    def put(item):
        row, fields = item
        try:
            for name, data in fields:
                path = storage.join_key(root, file_key(shard, row["key"], name))
                storage.with_retries(lambda p=path, d=data: storage.atomic_write_bytes(fs, p, d))
        except Exception as e:
            row.update(
                status=STATUS_ERROR, error_type="write_failed", error_message=f"{type(e).__name__}: {e}"
            )

    with ThreadPoolExecutor(FILE_WRITE_THREADS) as pool:
        list(pool.map(put, samples))
