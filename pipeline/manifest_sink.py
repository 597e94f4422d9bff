"""ManifestSink: a batch run's last stage, writing manifest parts where the rows are made.

The rows that leave the job's last stage (no pixels: EncodeWrite's, or the evaluation's scores)
go to Ray Data write tasks, which bundle them into
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

import numpy as np
import pyarrow as pa
from ray.data import Datasink
from ray.data.block import BlockAccessor

from pipeline import manifest as manifest_lib
from pipeline.metrics import STAGES
from pipeline.shard_data import unpack

SHARD_ROWS = "manifest_table"  # a column of packed manifest tables, a shard's rows each


class RunTotals:
    """The inpainting run's totals, summed part by part: what ``_SUCCESS.json`` reports. A write
    task fills a fresh one (``empty``) from its part's rows; the driver merges them."""

    def __init__(self):
        self.parts = 0
        self.counts: collections.Counter = collections.Counter()
        self.error_types: collections.Counter = collections.Counter()
        self.stage_s: collections.Counter = collections.Counter()
        self.checkpoint_ids: set[str] = set()
        self.blocks: dict[str, int] = {}  # per operator, set once the run is done (batch_run)

    def empty(self) -> RunTotals:
        return RunTotals()

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """One block of a part's rows (in flight: "" stands for none)."""
        self.counts.update(str(s) for s in batch["status"])
        self.error_types.update(str(t) for t in batch["error_type"] if t)
        for name in STAGES:
            self.stage_s[name] += float(np.sum(batch[name]))
        self.checkpoint_ids.update(str(c) for c in set(batch["checkpoint_id"].tolist()) if c)

    def merge(self, part: RunTotals) -> None:
        self.parts += 1
        self.counts.update(part.counts)
        self.error_types.update(part.error_types)
        self.stage_s.update(part.stage_s)
        self.checkpoint_ids.update(part.checkpoint_ids)


class ManifestDatasink(Datasink):
    """Ray Data ``Datasink``: a run's result rows -> Parquet parts under ``<manifest>/run_id=<id>/``
    in ``schema`` (the manifest's, or the evaluation's).

    ``totals`` (``RunTotals`` by default; anything with ``empty``, ``add(batch)`` and ``merge``) is
    filled on the driver when the write completes, one small object per part.
    """

    def __init__(
        self,
        manifest: str,
        run_id: str,
        rows_per_part: int,
        endpoint_url: str | None = None,
        *,
        schema: pa.Schema | None = None,
        totals=None,
    ):
        self.manifest, self.run_id, self.endpoint_url = manifest, run_id, endpoint_url
        self.rows_per_part = rows_per_part
        self.schema = schema if schema is not None else manifest_lib.MANIFEST_SCHEMA
        self.totals = totals if totals is not None else RunTotals()

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_part

    def get_name(self) -> str:
        return "ManifestSink"

    def write(self, blocks: Iterable, ctx) -> list:
        tables, part = [], self.totals.empty()
        for block in blocks:
            accessor = BlockAccessor.for_block(block)
            if not accessor.num_rows():
                continue
            batch = accessor.to_batch_format("numpy")
            if SHARD_ROWS in batch:  # one value per shard: all its rows (pipeline/shard_writer.py)
                for packed in batch[SHARD_ROWS]:
                    table = unpack(packed)
                    tables.append(table)
                    part.add(
                        {
                            name: table.column(name).to_numpy(zero_copy_only=False)
                            for name in table.schema.names
                        }
                    )
                continue
            tables.append(manifest_lib.rows_to_table(batch, self.schema))
            part.add(batch)
        if not tables:
            return []
        manifest_lib.write_part(self.manifest, self.run_id, pa.concat_tables(tables), self.endpoint_url)
        return [part]

    def on_write_complete(self, write_result) -> None:
        for parts in write_result.write_returns:
            for part in parts:
                self.totals.merge(part)
