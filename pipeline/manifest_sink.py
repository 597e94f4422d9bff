"""ManifestSink: the inpainting job's last stage, writing manifest parts where the rows are made.

The rows that leave EncodeWrite (no pixels) go to Ray Data write tasks, which bundle them into
parts of at least ``--manifest-rows-per-part`` rows and write each as one Parquet file
(``pipeline.manifest.write_part``: atomic, and named by its rows, so a retried write task rewrites
the same file). Each write task returns only its part's counts, so the driver's memory holds one
small dict per part (about 2,500 at 10 M images with the default 4,096 rows a part), never the
rows themselves.

A part is written once its rows are all written as images (they come out of EncodeWrite), so an
``ok`` row always names an existing output; the rows of a run that dies before its part is
written are simply done again by the rerun (their outputs are overwritten atomically).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasink
from ray.data.block import BlockAccessor

from pipeline import manifest as manifest_lib
from pipeline.metrics import STAGES


def part_counts(table: pa.Table) -> dict:
    """What the driver needs of a part: counts by status and error type, stage seconds, checkpoints."""
    statuses = table.column("status").to_pylist()
    error_types = [t for t in table.column("error_type").to_pylist() if t]
    return {
        "counts": dict(collections.Counter(statuses)),
        "error_types": dict(collections.Counter(error_types)),
        "stage_s": {name: float(pc.sum(table.column(name)).as_py() or 0.0) for name in STAGES},
        "checkpoint_ids": sorted({c for c in table.column("checkpoint_id").to_pylist() if c}),
    }


class RunTotals:
    """The sum of the parts' counts: what ``_SUCCESS.json`` reports."""

    def __init__(self):
        self.parts = 0
        self.counts: collections.Counter = collections.Counter()
        self.error_types: collections.Counter = collections.Counter()
        self.stage_s: collections.Counter = collections.Counter()
        self.checkpoint_ids: set[str] = set()

    def add(self, part: dict) -> None:
        self.parts += 1
        self.counts.update(part["counts"])
        self.error_types.update(part["error_types"])
        self.stage_s.update(part["stage_s"])
        self.checkpoint_ids.update(part["checkpoint_ids"])


class ManifestDatasink(Datasink):
    """Ray Data ``Datasink``: EncodeWrite's rows -> Parquet parts under ``<manifest>/run_id=<id>/``.

    ``totals`` (a ``RunTotals``) is filled on the driver when the write completes.
    """

    def __init__(self, manifest: str, run_id: str, rows_per_part: int, endpoint_url: str | None = None):
        self.manifest, self.run_id, self.endpoint_url = manifest, run_id, endpoint_url
        self.rows_per_part = rows_per_part
        self.totals = RunTotals()

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_part

    def get_name(self) -> str:
        return "ManifestSink"

    def write(self, blocks: Iterable, ctx) -> list[dict]:
        tables = []
        for block in blocks:
            accessor = BlockAccessor.for_block(block)
            if accessor.num_rows():
                tables.append(manifest_lib.rows_to_table(accessor.to_batch_format("numpy")))
        if not tables:
            return []
        table = pa.concat_tables(tables)
        manifest_lib.write_part(self.manifest, self.run_id, table, self.endpoint_url)
        return [part_counts(table)]

    def on_write_complete(self, write_result) -> None:
        for parts in write_result.write_returns:
            for part in parts:
                self.totals.add(part)
