"""Evaluation: the generator against OpenCV's Telea and Navier-Stokes fills and PatchMatch on the same holes.

    python -m jobs.evaluate --images s3://bucket/val --output s3://bucket/eval \\
        --checkpoint s3://bucket/checkpoints/final

The inpainting job's listing, reading and inference, then a scoring stage (Ray Data operators)::

    list_images -> read_decode (crop, seeded mask) -> InpaintPredictor (actor pool, keep_images)
        -> evaluate_batch (tasks: post-processing, Telea, Navier-Stokes, PatchMatch, metrics)

Each image is viewed as the trainer's validation views it (``--crop``: shorter side resized to it,
centre crop; 0 = the whole image) with a hole drawn from ``--mask-seed`` and its key (rectangles of
``--hole-min``..``--hole-max`` px inside a ``--local-size`` box, or ``--mask-generator freeform``),
or read from ``--masks``; reruns score the same holes. Under ``<output>/run_id=<id>/`` (the
manifest's conventions, ``pipeline/manifest.py``):

    _config.json        the EvaluateConfig
    part-<hash>.parquet one row per input (``pipeline.evaluation.EVALUATION_SCHEMA``)
    _grid.png           input with hole | Telea | PatchMatch | glcic (raw) | truth, the first --grid-rows ok keys
    _summary.md         the summary as Markdown tables
    _SUCCESS.json       the summary (means per method, comparisons, counts, timings); written last

The rows go through the inpainting job's manifest sink (``pipeline/batch_run.py``): write tasks
write them as parts and sum them for the summary and the first ``--grid-rows`` ok keys, so the
driver never holds rows; one task then redoes those few images for the grid.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import datetime, timezone

import numpy as np

from jobs.config import EvaluateConfig, print_config, run_main, to_dict, to_json
from pipeline import manifest as manifest_lib
from pipeline import storage
from pipeline.batch_run import (
    actor_pool,
    inference_stage,
    listing_stage,
    postprocess_path,
    predictor_kwargs,
    reachable_resources,
    read_stage,
    start_run,
    write_manifest,
)

log = logging.getLogger("glcic.evaluate")

GRID_FILE = "_grid.png"
SUMMARY_MARKDOWN_FILE = "_summary.md"
GRID_MAX_HEIGHT = 256


def read_options(config: EvaluateConfig):
    from pipeline.inpaint_data import ReadOptions

    return ReadOptions(
        output=config.output,
        masks=config.masks,
        mask_generator=config.mask_generator,
        mask_seed=config.mask_seed,
        max_pixels=config.max_pixels,
        endpoint_url=config.endpoint_url,
        crop=config.crop,
        hole_range=config.hole_range,
        local_size=config.local_size,
    )


def scored_postprocess(config: EvaluateConfig) -> str:
    """The post-processing ``model_post`` is scored with: the one submit-inpaint would run."""
    import ray

    return postprocess_path(config, actor_pool(config, ray.cluster_resources(), reachable_resources()))


def build_dataset(config: EvaluateConfig, path: str):
    from pipeline.evaluation import evaluate_batch

    ds = listing_stage(config, exclude=(config.output,), output_format=None, run_id="")
    ds = read_stage(ds, config, read_options(config))
    ds = inference_stage(ds, config, keep_images=True)
    return ds.map_batches(
        evaluate_batch, batch_size=config.task_batch_size, num_cpus=config.num_cpus_per_task,
        fn_kwargs={"postprocess_path": path},
    )  # fmt: skip


def grid_png(config: EvaluateConfig, entries: list[tuple[str, str]]) -> bytes:
    """Redo the ``entries`` (key, URI) as the pipeline did them and draw the comparison grid (a task)."""
    from pipeline.evaluation import grid_image, grid_row
    from pipeline.inference import InpaintPredictor
    from pipeline.inpaint_data import read_decode
    from pipeline.writer import encode

    keys = np.array([k for k, _ in entries], dtype=object)
    rows = read_decode(
        {"key": keys, "uri": np.array([u for _, u in entries], dtype=object)}, options=read_options(config)
    )
    # As Ray Data would hand them to the actor: string columns as arrays, pixels as lists.
    batch = {
        k: v if k in ("image", "mask") or isinstance(v, np.ndarray) else np.array(v, dtype=object)
        for k, v in rows.items()
    }
    import ray

    pool = actor_pool(config, ray.cluster_resources(), reachable_resources())
    predictor = InpaintPredictor(**predictor_kwargs(config, pool, keep_images=True))
    batch = predictor(batch)
    rows = [
        grid_row(batch["image"][i], batch["mask"][i], batch["completed"][i])
        for i in range(len(keys))
        if batch["status"][i] == manifest_lib.STATUS_OK
    ]
    if not rows:
        raise RuntimeError(f"none of the grid's images could be completed again: {list(keys)}")
    # Cells of the crop's size; with --crop 0, of the tallest image's height, at most 256 px.
    height = config.crop or min(GRID_MAX_HEIGHT, max(row[0].shape[0] for row in rows))
    return encode(grid_image(rows, height=height), "png")


def run(config: EvaluateConfig) -> dict:
    """Run the evaluation to the end; return the summary also written as ``_SUCCESS.json``."""
    import ray

    from pipeline.evaluation import EVALUATION_SCHEMA, TIMING_COLUMNS, EvaluationTotals, summary_markdown

    run = start_run(config, config.output, to_json(config))
    run_id, run_prefix = run.run_id, run.prefix
    print_config(config)
    if not ray.is_initialized():
        ray.init()

    started = time.time()
    # The rows go to parts in Ray Data write tasks, which sum them there: the driver gets one small
    # EvaluationTotals per part (the summary's sums, the grid's first keys), never the rows.
    path = scored_postprocess(config)
    print(f"model_post is post-processed as submit-inpaint's {path!r} path does it")
    evaluated = write_manifest(
        build_dataset(config, path), run, config, schema=EVALUATION_SCHEMA,
        totals=EvaluationTotals(config.grid_rows),
    )  # fmt: skip
    totals, first = evaluated.summary, evaluated.first
    scored_s = time.time() - started

    fs, root = storage.filesystem(run_prefix, config.endpoint_url)
    grid = grid_error = None
    if first.items:
        # The grid is a picture of the rows, not a result: if it fails (an input gone since it was
        # scored, storage down), the rows and the summary still stand and say why.
        try:
            pool = actor_pool(config, ray.cluster_resources(), reachable_resources())
            task = ray.remote(num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, max_retries=1)(grid_png)
            data = ray.get(task.remote(config, first.entries()))
            storage.with_retries(
                lambda: storage.atomic_write_bytes(fs, storage.join_key(root, GRID_FILE), data)
            )
            grid = storage.join_key(run_prefix, GRID_FILE)
        except Exception as e:
            grid_error = f"{type(e).__name__}: {e}"[:2000]
            log.warning("evaluate %s: no grid: %s", run_id, grid_error)

    wall = time.time() - started
    summary = {
        "run_id": run_id,
        **totals.summary(),
        "wall_s": round(wall, 3),
        "scoring_wall_s": round(scored_s, 3),
        "images_per_s": round(sum(totals.counts.values()) / scored_s, 3) if scored_s > 0 else None,
        "parts": evaluated.parts,
        "postprocess_path": path,
        "grid": grid,
        "grid_error": grid_error,
        "grid_keys": [k for k, _ in first.entries()],
        "timing_columns": list(TIMING_COLUMNS),
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "rows": run_prefix,
        "config": to_dict(config),
    }
    markdown = summary_markdown(summary).encode()
    storage.with_retries(
        lambda: storage.atomic_write_bytes(fs, storage.join_key(root, SUMMARY_MARKDOWN_FILE), markdown)
    )
    manifest_lib.write_summary(config.output, run_id, summary, config.endpoint_url)
    print(summary_markdown(summary))
    print(
        f"evaluate {run_id}: {summary['images']} images {summary['counts']} in {wall:.1f}s; rows {run_prefix}"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    return run_main(EvaluateConfig, run, argv, prog_name="python -m jobs.evaluate")


if __name__ == "__main__":
    sys.exit(main())
