"""Batch inpainting over object storage: every image under --images completed, every result accounted for.

    python -m jobs.inpaint --images s3://bucket/photos --output s3://bucket/completed \\
        --checkpoint s3://bucket/checkpoints/final

The Ray Data pipeline, one operator per stage (each visible in the dashboard and in the progress
bars with its rows/s)::

    list_images -> read_decode -> InpaintPredictor (actor pool) -> encode_write -> ManifestSink

What it shares with the evaluation (the run id, the checkpoint located once, the listing and its
resume filter, the actor pool, the manifest sink) is ``pipeline/batch_run.py``; this file wires
the inpainting's own stages (encode + write) and its summary. Listing streams pages of keys from
one task, so the driver never holds the key set; the write tasks of ``ManifestSink`` write the
pixel-free result rows as manifest parts of ``--manifest-rows-per-part`` rows, and the driver
receives only each part's counts. Every image still to do ends as exactly one manifest row of
this run (``pipeline/manifest.py``).

Resuming (``--skip-existing true``, the default; ``pipeline/resume.py``): a task reads the earlier
runs' manifests and builds a compact index of the keys completed with the same output settings
and whose outputs still exist (16 bytes each); the listing task drops those keys from its pages
and counts them, so a completed input never reaches a read task, an actor, a writer or the
manifest. The job prints at its start how many it skips and why (another checkpoint, other
settings, outputs gone), and ``_SUCCESS.json`` keeps that report. ``--skip-existing false``
redoes everything (outputs are overwritten atomically).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from datetime import datetime, timezone

from jobs.config import InpaintConfig, print_config, run_main, to_dict, to_json
from pipeline import manifest as manifest_lib
from pipeline import metrics as live
from pipeline import storage
from pipeline.batch_run import (
    inference_stage,
    listing_stage,
    read_stage,
    shard_inference_stage,
    start_run,
    write_manifest,
)
from pipeline.resume import ResumeRule, resume_index, resume_settings, shard_resume_index

log = logging.getLogger("glcic.inpaint")
# Sharded runs write a manifest part per this many rows / this many (a row there is a shard's rows).
SHARD_ROWS_GUESS = 1000


def read_options(config: InpaintConfig):
    from pipeline.inpaint_data import ReadOptions

    return ReadOptions(
        output=config.output,
        masks=config.masks,
        mask_generator=config.mask_generator,
        mask_seed=config.mask_seed,
        output_format=config.output_format,
        max_pixels=config.max_pixels,
        endpoint_url=config.endpoint_url,
        write_masks=config.write_masks,
        hole_range=config.hole_range,
        local_size=config.local_size,
    )


def build_dataset(config: InpaintConfig, run_id: str, index_ref):
    """list -> read/decode -> inference actors -> encode/write: the rows the manifest sink takes."""
    from pipeline.writer import WriteOptions, encode_write

    if config.sharded:
        return build_shard_dataset(config, run_id, index_ref)
    ds = listing_stage(
        config,
        exclude=(config.output, config.manifest_uri),
        output_format=config.output_format,
        run_id=run_id,
        index_ref=index_ref,
    )
    ds = read_stage(ds, config, read_options(config))
    ds = inference_stage(ds, config, postprocess=config.postprocess_on if config.postprocess else "none")
    write_options = WriteOptions(
        output=config.output,
        postprocess=config.postprocess,
        write_masks=config.write_masks,
        endpoint_url=config.endpoint_url,
        run_id=run_id,
    )
    return ds.map_batches(
        encode_write,
        batch_size=config.task_batch_size,
        num_cpus=config.num_cpus_per_task,
        fn_kwargs={"options": write_options},
    )


def build_shard_dataset(config: InpaintConfig, run_id: str, index_ref):
    """Sharded inputs: list shards -> read a shard -> inference actors -> write its output shard.
    Files packed into shards (``config.packing``): the listing groups ``--shard-size`` images into
    a row, and ``read_pack`` reads them into the row ``read_shard`` would make.

    A shard travels as one row (``pipeline/shard_data.py``), so every stage gets whole shards:
    one a read task, one an actor call (its images batched ``--batch-size`` at a time), one a
    write task. The rows the manifest sink takes are each shard's packed manifest rows."""
    from pipeline.shard_data import ShardOptions, read_pack, read_shard
    from pipeline.shard_writer import ShardWriteOptions, write_shard

    ds = listing_stage(
        config, exclude=(config.output, config.manifest_uri, *([config.masks] if config.masks else [])),
        output_format=None, run_id=run_id,
        index_ref=index_ref, layout=config.input_format,
        pack=(config.output_layout, config.shard_size) if config.packing else None,
    )  # fmt: skip
    options = ShardOptions(
        layout=config.input_format,
        read=read_options(config),
        image_column=config.image_column,
        key_column=config.key_column,
        mask_column=config.mask_column,
        image_ext=config.image_ext,
        run_id=run_id,
    )
    ds = ds.map_batches(
        read_pack if config.packing else read_shard,
        batch_size=1,
        num_cpus=config.num_cpus_per_task,
        fn_kwargs={"options": options},
    )
    ds = shard_inference_stage(
        ds, config, postprocess=config.postprocess_on if config.postprocess else "none"
    )
    write_options = ShardWriteOptions(
        layout=config.input_format,
        output=config.output,
        output_format=config.output_format,
        postprocess=config.postprocess,
        write_masks=config.write_masks,
        mask_generator=config.mask_generator,
        mask_seed=config.mask_seed,
        endpoint_url=config.endpoint_url,
        run_id=run_id,
        image_ext=config.image_ext,
        mask_column=config.mask_column,
        key_column=config.key_column,
        output_layout=config.output_layout,
        shard_size=config.shard_size,
    )
    return ds.map_batches(
        write_shard, batch_size=1, num_cpus=config.num_cpus_per_task, fn_kwargs={"options": write_options}
    )


def resume(config: InpaintConfig, checkpoint_id: str):
    """The resume index, built in a task: ``(report, ObjectRef of its digests)``, or ``(None, None)``
    with ``--skip-existing false``. The driver learns only the report (``pipeline/resume.py``)."""
    import ray

    if not config.skip_existing:
        return None, None
    rule = ResumeRule(
        settings=resume_settings(to_dict(config)),
        checkpoint_id=checkpoint_id,
        redo_other_checkpoint=config.redo_other_checkpoint,
        verify_output=config.output if config.verify_outputs else None,
        exclude=(config.manifest_uri,),
        layouts=(config.input_format, config.output_layout),
    )
    index = shard_resume_index if config.sharded else resume_index
    report_ref, index_ref = ray.remote(num_cpus=0.25, num_returns=2)(index).remote(
        config.manifest_uri, config.endpoint_url, rule
    )
    # Waited for here, before the pipeline takes every CPU: no read task ever blocks on an index
    # task that a small cluster has no CPU left to run.
    report = ray.get(report_ref)
    for line in report.lines(checkpoint_id):
        print(line)
    return report, index_ref


def run(config: InpaintConfig) -> dict:
    """Run the job to the end; return the summary also written as ``_SUCCESS.json``."""
    import ray

    from pipeline.shard_layout import detect_layout

    # The layout decided once, before anything is written: the run's _config.json records it.
    config = config.resolved(detect_layout(config.images, config.endpoint_url, config.input_format))
    run = start_run(config, config.manifest_uri, to_json(config))
    print_config(config)
    if not ray.is_initialized():
        ray.init()

    started = time.time()
    report, index_ref = resume(config, run.checkpoint.checkpoint_id)
    progress = live.InpaintProgress(
        run.run_id,
        run.prefix,
        every_s=config.log_every_s,
        limit=None if config.sharded else config.limit,  # sharded: --limit counts shards
        endpoint_url=config.endpoint_url,
    ).start()  # a progress line, _progress.json and the gauges every --log-every-s
    try:
        # Write tasks turn the rows into manifest parts where they are made and hand the driver
        # only each part's counts. Rows reach them only after their outputs are written
        # (encode_write), so a part never says ok for an object that is not there.
        totals = write_manifest(
            build_dataset(config, run.run_id, index_ref),
            run,
            config,
            per_row=SHARD_ROWS_GUESS if config.sharded else 1,
        )
    except BaseException:
        progress.failed()
        raise
    progress.set_rows(totals.counts, totals.error_types)
    final = progress.finish() or {}
    counts = totals.counts
    # Inputs an earlier run completed are not rows of this run: the listing counted them.
    counts[manifest_lib.STATUS_SKIPPED] = final.get("counts", {}).get(manifest_lib.STATUS_SKIPPED, 0)
    if config.skip_existing and not final.get("listing_done"):
        log.warning("the listing's count of completed inputs did not arrive: skipped is a lower bound")

    wall = time.time() - started
    total = sum(counts.values())
    summary = {
        "run_id": run.run_id,
        "images": total,
        "counts": {status: counts.get(status, 0) for status in manifest_lib.STATUSES},
        "skipped_counted": bool(final.get("listing_done")) or not config.skip_existing,
        "error_types": dict(totals.error_types),
        "manifest_parts": totals.parts,
        "wall_s": round(wall, 3),
        # One definition with the progress line and the gauge: ok + error images per second since
        # the pipeline started (skipped inputs cost nothing and are counted apart).
        "images_per_s": final.get("images_per_s"),
        "completed_per_s": round(counts.get(manifest_lib.STATUS_OK, 0) / wall, 3) if wall > 0 else None,
        "stage_s": {k: round(v, 3) for k, v in totals.stage_s.items()},
        "ray_data_blocks": getattr(totals, "blocks", {}),
        "checkpoint_ids": sorted(totals.checkpoint_ids),
        "resume": dataclasses.asdict(report) if report is not None else None,
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "manifest": storage.redact(run.prefix),
        "output": storage.redact(config.output),
        "config": to_dict(config),
    }
    manifest_lib.write_summary(config.manifest_uri, run.run_id, summary, config.endpoint_url)
    print(
        f"inpaint {run.run_id}: {total} images {summary['counts']} in {wall:.1f}s "
        f"({summary['images_per_s']} images/s); manifest {summary['manifest']}"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    return run_main(InpaintConfig, run, argv, prog_name="python -m jobs.inpaint")


if __name__ == "__main__":
    sys.exit(main())
