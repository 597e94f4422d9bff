"""The run manifest: one Parquet row per input image, per run, and what resuming reads back.

Layout under ``--manifest``::

    run_id=<id>/_config.json         the InpaintConfig of that run
    run_id=<id>/part-<hash>.parquet  result rows, each file written whole (atomic PUT / rename)
    run_id=<id>/_SUCCESS.json        counts by status, throughput, wall time; written last

The ``run_id=`` folders are Hive partitions (the files do not repeat the column), so
``pyarrow.dataset``, ``pandas.read_parquet(<manifest>)`` and DuckDB
(``read_parquet('<manifest>/*/*.parquet', hive_partitioning=true)``) read every run at once and
add ``run_id``; names starting with ``_`` are ignored by all three.

A part's name is a hash of the rows' input keys and statuses, so a write task that Ray retries
rewrites the same file instead of adding a duplicate. A row says ``ok`` only after its output
object is fully written, so every ``ok`` row of every run, finished or crashed, names an output
that exists: resuming skips exactly those images (``pipeline/resume.py``, the resume index),
so with resuming on (the default) each completed image has exactly one ``ok`` row across all
runs; ``--skip-existing false`` redoes images and gives them another.

A run has rows only for the inputs it worked on: the ones an earlier run completed are dropped
by the listing and counted in ``_SUCCESS.json`` (``counts.skipped``). So every input ever listed
has, across runs, exactly one ``ok`` row, or only ``error`` rows (still to do), and the manifest
grows with the work done, not with the number of reruns. ``input_states`` (``glcic manifest``)
gives the latest state of every input. Manifests written before this rule may hold ``skipped``
rows; every reader here ignores them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage

log = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_SKIPPED = "skipped"  # a count in _SUCCESS.json: inputs an earlier run completed
STATUSES = (STATUS_OK, STATUS_ERROR, STATUS_SKIPPED)

SUCCESS_FILE = "_SUCCESS.json"
RUN_CONFIG_FILE = "_config.json"  # a run's config (a checkpoint's is checkpoint.CONFIG_FILE)

# A run's rows reach storage only through these writes, and one that gives up ends the run (its
# write task raises), so they outlast a storage outage longer than an image's own read or write
# does: 61 to 122 s of backoff instead of 12 to 24 (storage.DATA_RETRIES; RELIABILITY.md, "Retries").
MANIFEST_WRITE_RETRIES = {"attempts": 10, "max_delay": 30.0}

MANIFEST_SCHEMA = pa.schema(
    [
        ("input_key", pa.string()),  # relative to --images
        ("input_uri", pa.string()),
        ("mask_key", pa.string()),  # relative to --masks; null when generated
        ("mask_generator", pa.string()),  # "rectangle" / "freeform"; null when read from --masks
        ("mask_seed", pa.int64()),  # the run's seed; the mask is generate_mask(kind, h, w, seed, key)
        ("output_key", pa.string()),  # relative to --output; null unless ok
        ("output_uri", pa.string()),
        ("mask_output_key", pa.string()),  # relative to --output, when --write-masks
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("hole_fraction", pa.float32()),
        # ok rows: the output's known pixels (and alpha) are the input's bit for bit: an 8-bit
        # source written losslessly (png; a jpeg/webp output or a 16-bit/CMYK source is not)
        ("known_pixels_exact", pa.bool_()),
        ("status", pa.string()),  # ok / error (older manifests: also skipped)
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("checkpoint_id", pa.string()),
        ("read_s", pa.float32()),
        ("decode_s", pa.float32()),
        ("inference_s", pa.float32()),  # the batch's forward time divided by its images
        ("write_s", pa.float32()),  # post-processing, encoding and the atomic write
        ("node_id", pa.string()),  # where the inference actor ran
        ("inference_worker", pa.string()),  # the actor's id
        ("gpu_id", pa.string()),  # the GPU Ray assigned to that actor ("" on CPU)
        # Sharded inputs (WebDataset tars, Parquet files): a sample is (shard, input_key); null for
        # one object per image. input_uri is then the shard's URI, output_key the output shard's key.
        ("shard", pa.string()),  # the input shard, relative to --images
        ("member", pa.string()),  # the image member in it (a tar member's name / the image column)
        ("output_member", pa.string()),  # the completed image's member in the output shard
    ]
)
# Columns that rows of one object per image do not carry: null there.
SHARD_COLUMNS = ("shard", "member", "output_member")
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)


def run_prefix(manifest: str, run_id: str) -> str:
    return storage.join_key(manifest, f"run_id={run_id}")


def part_name(keys: list[str], statuses: list[str], shards: list[str | None] | None = None) -> str:
    """Deterministic per batch of rows, so a retried write task overwrites instead of duplicating.
    Sharded rows hash their shard too: sample keys repeat from one shard to the next."""
    h = hashlib.blake2b(digest_size=12)
    for i, (key, status) in enumerate(zip(keys, statuses, strict=True)):
        if shards is not None and shards[i] is not None:
            h.update(shards[i].encode("utf-8", "surrogatepass"))
            h.update(b"\x02")
        h.update((key or "").encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
        h.update(status.encode())
        h.update(b"\x01")
    return f"part-{h.hexdigest()}.parquet"


def rows_to_table(rows: dict[str, list | np.ndarray], schema: pa.Schema = MANIFEST_SCHEMA) -> pa.Table:
    """Column dict (every name of ``schema``) -> a table with that schema (default: the manifest's).

    The pipeline carries "none" as "" (strings), 0 (int32 sizes) and NaN (floats) so every block
    has the same Arrow types; here they become nulls. ``mask_seed`` is null when masks were read.
    """
    columns = {}
    n = len(next(iter(rows.values()))) if rows else 0
    for f in schema:
        if f.name not in rows and f.name in SHARD_COLUMNS:
            columns[f.name] = [None] * n
            continue
        values = list(rows[f.name].tolist() if isinstance(rows[f.name], np.ndarray) else rows[f.name])
        if pa.types.is_string(f.type):
            values = [v if isinstance(v, str) and v else None for v in values]
        elif pa.types.is_int32(f.type):  # sizes: width, height
            values = [int(v) if v else None for v in values]
        columns[f.name] = values
    if "known_pixels_exact" in columns:  # said of outputs only
        columns["known_pixels_exact"] = [
            bool(v) if s == STATUS_OK else None
            for v, s in zip(columns["known_pixels_exact"], columns["status"], strict=True)
        ]
    if "mask_seed" in columns:
        columns["mask_seed"] = [
            int(seed) if generator else None
            for seed, generator in zip(columns["mask_seed"], columns["mask_generator"], strict=True)
        ]
    arrays = [pa.array(columns[f.name], type=f.type, from_pandas=True) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def write_part(manifest: str, run_id: str, table: pa.Table, endpoint_url: str | None = None) -> str:
    """Write ``table`` as one Parquet file under the run's folder, whole or not at all."""
    keys = table.column("input_key").to_pylist()
    statuses = table.column("status").to_pylist()
    shards = table.column("shard").to_pylist() if "shard" in table.schema.names else None
    fs, root = storage.filesystem(run_prefix(manifest, run_id), endpoint_url)
    path = storage.join_key(root, part_name(keys, statuses, shards))
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue()
    storage.with_retries(lambda: storage.atomic_write_bytes(fs, path, data), **MANIFEST_WRITE_RETRIES)
    return path


def run_dirs(fs, root: str) -> list[str]:
    """The ``run_id=<id>`` folders under ``root``, sorted."""
    # fsspec caches listings per filesystem instance, and instances are shared within a process:
    # a worker that listed this prefix during an earlier run would not see that run's parts.
    fs.invalidate_cache()
    try:
        runs = storage.ls(fs, root)
    except FileNotFoundError:
        return []
    return sorted(r for r in runs if posixpath.basename(r.rstrip("/")).startswith("run_id="))


def run_id_of(run_dir: str) -> str:
    """The id of a ``run_id=<id>`` folder."""
    return posixpath.basename(run_dir.rstrip("/")).split("=", 1)[1]


def read_part(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    data = storage.with_retries(lambda: storage.read_bytes(fs, path))
    return pq.read_table(io.BytesIO(data), columns=columns)


def part_paths(fs, root: str) -> list[str]:
    parts = []
    for run in run_dirs(fs, root):
        try:
            names = storage.ls(fs, run)
        except FileNotFoundError:
            continue
        parts += sorted(
            p for p in names if posixpath.basename(p).startswith("part-") and p.endswith(".parquet")
        )
    return parts


def run_exists(manifest: str, run_id: str, endpoint_url: str | None = None) -> bool:
    fs, path = storage.filesystem(run_prefix(manifest, run_id), endpoint_url)
    fs.invalidate_cache()
    return storage.exists(fs, path)


def write_summary(manifest: str, run_id: str, summary: dict, endpoint_url: str | None = None) -> str:
    fs, root = storage.filesystem(run_prefix(manifest, run_id), endpoint_url)
    path = storage.join_key(root, SUCCESS_FILE)
    data = json.dumps(summary, indent=2, sort_keys=True, default=str).encode()
    storage.with_retries(lambda: storage.atomic_write_bytes(fs, path, data), **MANIFEST_WRITE_RETRIES)
    return path


def read_manifest(manifest: str, run_id: str | None = None, endpoint_url: str | None = None) -> pa.Table:
    """Every row of one run (or of all runs) as one table; for tests, tools and notebooks."""
    fs, root = storage.filesystem(manifest, endpoint_url)
    paths = part_paths(fs, root)
    if run_id is not None:
        paths = [p for p in paths if run_id_of(posixpath.dirname(p)) == run_id]
    tables = []
    for p in paths:
        table = pq.read_table(io.BytesIO(storage.read_bytes(fs, p)))
        tables.append(
            table.append_column(
                "run_id", pa.array([run_id_of(posixpath.dirname(p))] * len(table), pa.string())
            )
        )
    if not tables:
        return MANIFEST_SCHEMA.append(pa.field("run_id", pa.string())).empty_table()
    return pa.concat_tables(tables)


STATE_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),  # sharded inputs: a sample is (shard, input_key); null otherwise
        ("input_key", pa.string()),
        ("input_uri", pa.string()),
        ("status", pa.string()),  # ok: some run completed it; error: every run that tried failed
        ("run_id", pa.string()),  # the run of that row: the ok one, else the latest error's
        ("output_uri", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("attempts", pa.int64()),  # rows of this input across runs
    ]
)


def input_states(manifest: str, endpoint_url: str | None = None) -> pa.Table:
    """The latest state of every input that has a row under ``manifest``, one row each, by key
    (by shard and key for sharded inputs).

    An input is ``ok`` if any run completed it (its ok row), else ``error`` with the latest run's
    reason (run ids sort by start time; ``--run-id`` names sort as given). Reads seven columns of
    every part: about 150 bytes per row in memory, so for manifests of tens of millions of rows
    run the DuckDB query in README.md ("The manifest") instead, which streams.
    """
    fs, root = storage.filesystem(manifest, endpoint_url)
    columns = ["input_key", "input_uri", "status", "output_uri", "error_type", "error_message"]
    tables = []
    for path in part_paths(fs, root):
        data = storage.with_retries(lambda path=path: storage.read_bytes(fs, path))
        part = pq.ParquetFile(io.BytesIO(data))
        if "shard" in part.schema_arrow.names:
            table = part.read(columns=[*columns, "shard"])
        else:  # parts written before shards existed have no such column
            table = part.read(columns=columns)
            table = table.append_column("shard", pa.nulls(len(table), pa.string()))
        table = table.filter(pc.not_equal(table.column("status"), STATUS_SKIPPED))
        tables.append(
            table.append_column(
                "run_id", pa.array([run_id_of(posixpath.dirname(path))] * len(table), pa.string())
            )
        )
    if not tables or not sum(len(t) for t in tables):
        return STATE_SCHEMA.empty_table()
    rows = pa.concat_tables(tables)
    rows = rows.append_column("is_ok", pc.equal(rows.column("status"), STATUS_OK).cast(pa.int8()))
    rows = rows.sort_by(
        [
            ("shard", "ascending"),
            ("input_key", "ascending"),
            ("is_ok", "descending"),
            ("run_id", "descending"),
        ]
    )
    keys = rows.column("input_key").to_numpy(zero_copy_only=False)
    shards = rows.column("shard").to_numpy(zero_copy_only=False)
    first = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]) | (shards[1:] != shards[:-1])])
    attempts = np.diff(np.r_[first, len(keys)])
    latest = rows.take(pa.array(first))
    return pa.table(
        {name: latest.column(name) for name in STATE_SCHEMA.names if name != "attempts"}
        | {"attempts": pa.array(attempts, pa.int64())},
        schema=STATE_SCHEMA,
    )


def run_summaries(manifest: str, endpoint_url: str | None = None) -> list[tuple[str, dict | None]]:
    """``(run_id, _SUCCESS.json or None when the run did not finish)`` of every run, by run id."""
    fs, root = storage.filesystem(manifest, endpoint_url)
    found = []
    for run in run_dirs(fs, root):
        try:
            summary = json.loads(storage.read_bytes(fs, storage.join_key(run, SUCCESS_FILE)))
        except FileNotFoundError:
            summary = None
        found.append((run_id_of(run), summary))
    return found
