"""Batch inpainting over object storage: every image under --images completed, every result accounted for.

    python -m jobs.inpaint --images s3://bucket/photos --output s3://bucket/completed \\
        --checkpoint s3://bucket/checkpoints/final

The Ray Data pipeline, one operator per stage (each visible in the dashboard and in the progress
bars with its rows/s)::

    list_images -> read_decode -> InpaintPredictor (actor pool) -> encode_write -> ManifestSink

Listing streams pages of keys from one task, so the driver never holds the key set; the write
tasks of ``ManifestSink`` (``pipeline/manifest_sink.py``) write the pixel-free result rows as
manifest parts of ``--manifest-rows-per-part`` rows, and the driver receives only each part's
counts: its memory does not grow with the number of images. Every image still to do ends as
exactly one manifest row of this run (``pipeline/manifest.py``).

Resuming (``--skip-existing true``, the default): a task reads every earlier run's manifest and
builds a compact index of the keys already completed (16 bytes each); the listing task drops those
keys from its pages and counts them, so a completed input never reaches a read task, an actor, a
writer or the manifest: a rerun of a finished job costs one listing pass, and its ``_SUCCESS.json``
says how many it skipped (``counts.skipped``). Rerunning the same command after a crash or a
partial run therefore completes exactly what is missing, and across all runs each input has
exactly one ``ok`` row (or only ``error`` rows). ``--skip-existing false`` redoes everything
(outputs are overwritten atomically).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from jobs.config import BatchInferenceConfig, InpaintConfig, print_config, run_main, save_config, to_dict
from pipeline import manifest as manifest_lib
from pipeline import metrics as live
from pipeline import storage
from pipeline.resume import ResumeRule, list_todo, resume_index, resume_settings

log = logging.getLogger("glcic.inpaint")

KEY_ROW_BYTES = 256  # a listed row (key + URI), for sizing blocks of keys


def new_run_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class ActorPool:
    """The inference actors' pool and what each actor requests from Ray."""

    min_size: int
    max_size: int | None  # None: no cap of our own (the cluster's size caps it)
    initial_size: int
    num_gpus: float
    num_cpus: float

    def strategy(self, tasks_in_flight: int):
        import ray

        return ray.data.ActorPoolStrategy(
            min_size=self.min_size,
            max_size=self.max_size,
            initial_size=self.initial_size,
            max_tasks_in_flight_per_actor=tasks_in_flight,
        )


def actor_pool(config: BatchInferenceConfig, cluster: dict, reachable: dict | None = None) -> ActorPool:
    """Size the actor pool and its requests from the config.

    ``cluster`` is what is up now (``ray.cluster_resources()``); ``reachable`` what the autoscaler
    reports it can grow to (``None`` where it reports nothing, as Ray's default autoscaler). The
    GPUs an actor requests come from the config (``--num-gpus-per-actor``, else ``--device``); only
    the automatic default of ``--device auto`` looks at the cluster. The pool then starts with as
    many actors as the nodes up now hold and autoscales up to ``max_size``: pending GPU actors are
    the demand that makes the cluster autoscaler start GPU nodes, and the pool uses each as it comes.
    """
    gpus = config.num_gpus_per_actor
    if gpus is None:
        if config.device == "auto":
            has_gpus = cluster.get("GPU", 0) >= 1 or (reachable or {}).get("GPU", 0) >= 1
            gpus = 1.0 if has_gpus else 0.0
        else:
            gpus = 1.0 if config.device == "cuda" else 0.0
    cpus = config.num_cpus_per_actor
    if gpus > 0:
        fits_now = int(cluster.get("GPU", 0) // gpus)
        reachable_gpus = max(cluster.get("GPU", 0), (reachable or {}).get("GPU", 0))
        auto_max = int(reachable_gpus // gpus) or None  # None: the autoscaler's max_workers caps it
    else:
        fits_now = auto_max = max(1, int(cluster.get("CPU", 1) // 4))
    if config.num_actors:
        size = config.num_actors
        return ActorPool(size, size, size, gpus, cpus)
    low = config.min_actors
    high = config.max_actors or auto_max
    if high is not None:
        high = max(high, low)
    initial = max(low, fits_now)
    if high is not None:
        initial = min(initial, high)
    return ActorPool(low, high, initial, gpus, cpus)


def reachable_resources() -> dict | None:
    """What the autoscaler says the cluster can grow to (None: it says nothing)."""
    from pipeline.ray_internals import autoscaler_max_resources

    return autoscaler_max_resources()


def locate_checkpoint(config: BatchInferenceConfig):
    """Fail before any work if the checkpoint is not complete; its id for the run's records."""
    from pipeline.checkpoint import locate

    return locate(config.checkpoint, config.endpoint_url)


def listing_stage(
    config: BatchInferenceConfig,
    exclude: tuple[str, ...],
    output_format: str | None,
    run_id: str,
    index_ref=None,
):
    """A dataset of ``{"key", "uri", "collides_with"}`` rows: every input under ``config.images``
    but those in the resume index ``index_ref`` (an ObjectRef, or None: list everything)."""
    import ray

    ds = ray.data.from_items([{"source": config.images}])
    # Blocks of about one task's worth of keys. Ray Data merges a task's output into blocks of up to
    # 128 MiB by default, which would put a whole listing (tiny rows) into one block, and so into one
    # read task. Decoded images are bigger than this, so they travel one per block and each stage
    # bundles its own batch of them: task_batch_size for the tasks, batch_size for the actor. Task
    # launches cost milliseconds each, so sizing tasks by the (often small, on CPU) inference batch
    # made them the bottleneck (BENCHMARKS.md). (A streaming repartition would also split the keys,
    # but its one-CPU task waits, backpressured, for the whole run and starves a small cluster.)
    ds.context.target_max_block_size = config.task_batch_size * KEY_ROW_BYTES
    ds = ds.map_batches(
        list_todo,  # list_images without the resume index's keys, telling the progress board
        batch_size=1,
        num_cpus=min(0.25, config.num_cpus_per_task),  # it mostly waits on listing calls
        fn_kwargs={
            "endpoint_url": config.endpoint_url,
            "exclude": exclude,
            "output_format": output_format,
            "run_id": run_id,
            # In a list, so Ray hands the task the reference and the task fetches the index itself.
            "index_ref": [index_ref] if index_ref is not None else [],
        },
    )
    return ds.limit(config.limit) if config.limit is not None else ds


def predictor_kwargs(config: BatchInferenceConfig, pool: ActorPool, **extra) -> dict:
    """``InpaintPredictor``'s constructor arguments for this config."""
    return {
        "checkpoint": config.checkpoint,
        "device": config.device,
        "precision": config.precision,
        "channels_last": config.channels_last,
        "max_side": config.max_side or None,
        "endpoint_url": config.endpoint_url,
        "num_threads": max(1, int(round(pool.num_cpus))),  # used when computing on the CPU
        **extra,
    }


def inference_stage(ds, config: BatchInferenceConfig, **predictor_options):
    """``ds`` through the ``InpaintPredictor`` actor pool (``predictor_options``: e.g. postprocess,
    keep_images), sized by ``actor_pool``."""
    import ray

    from pipeline.faults import forwarded
    from pipeline.inference import InpaintPredictor

    pool = actor_pool(config, ray.cluster_resources(), reachable_resources())
    print(
        f"inference actors: {pool.min_size} to {pool.max_size or 'as many as the cluster grows to'} "
        f"(starting with {pool.initial_size}), {pool.num_gpus} GPU and {pool.num_cpus} CPU each, "
        f"computing on {config.device}"
    )
    return ds.map_batches(
        InpaintPredictor,
        batch_size=config.inference_batch_size(pool.num_gpus),
        compute=pool.strategy(config.actor_tasks_in_flight),
        fn_constructor_kwargs=predictor_kwargs(config, pool, **predictor_options),
        **forwarded({"num_gpus": pool.num_gpus, "num_cpus": pool.num_cpus}),  # + the test-only faults
    )


def build_dataset(config: InpaintConfig, run_id: str, index_ref):
    from pipeline.inpaint_data import ReadOptions, read_decode
    from pipeline.writer import WriteOptions, encode_write

    task_cpus = config.num_cpus_per_task
    ds = listing_stage(
        config,
        exclude=(config.output, config.manifest_uri),
        output_format=config.output_format,
        run_id=run_id,
        index_ref=index_ref,
    )
    read_options = ReadOptions(
        output=config.output,
        masks=config.masks,
        mask_generator=config.mask_generator,
        mask_seed=config.mask_seed,
        output_format=config.output_format,
        max_pixels=config.max_pixels,
        endpoint_url=config.endpoint_url,
        write_masks=config.write_masks,
    )
    ds = ds.map_batches(
        read_decode,
        batch_size=config.task_batch_size,
        num_cpus=task_cpus,
        fn_kwargs={"options": read_options},
    )
    ds = inference_stage(ds, config, postprocess=config.postprocess_on if config.postprocess else "none")
    write_options = WriteOptions(
        output=config.output,
        postprocess=config.postprocess,
        write_masks=config.write_masks,
        endpoint_url=config.endpoint_url,
        run_id=run_id,
    )
    ds = ds.map_batches(
        encode_write,
        batch_size=config.task_batch_size,
        num_cpus=task_cpus,
        fn_kwargs={"options": write_options},
    )
    return ds


def run(config: InpaintConfig) -> dict:
    """Run the job to the end; return the summary also written as ``_SUCCESS.json``."""
    import ray

    from pipeline.manifest_sink import ManifestDatasink

    run_id = config.run_id or new_run_id()
    manifest = config.manifest_uri
    if manifest_lib.run_exists(manifest, run_id, config.endpoint_url):
        raise ValueError(
            f"run {run_id!r} already has a manifest under {manifest!r}; rerun without --run-id to resume"
        )
    checkpoint = locate_checkpoint(config)
    print_config(config)
    run_prefix = manifest_lib.run_prefix(manifest, run_id)
    save_config(config, f"{run_prefix}/{manifest_lib.RUN_CONFIG_FILE}", config.endpoint_url)
    if not ray.is_initialized():
        ray.init()

    started = time.time()
    index_ref = None
    resume = None
    if config.skip_existing:
        # Built in a task; the driver only learns its report (and any error) and never holds it.
        # Waiting here, before the pipeline takes every CPU, also means no read task ever blocks on
        # an index task that a small cluster has no CPU left to run.
        rule = ResumeRule(
            settings=resume_settings(to_dict(config)),
            checkpoint_id=checkpoint.checkpoint_id,
            redo_other_checkpoint=config.redo_other_checkpoint,
            verify_output=config.output if config.verify_outputs else None,
            exclude=(manifest,),
        )
        report_ref, index_ref = ray.remote(num_cpus=0.25, num_returns=2)(resume_index).remote(
            manifest, config.endpoint_url, rule
        )
        resume = ray.get(report_ref)
        for line in resume.lines(checkpoint.checkpoint_id):
            print(line)
    progress = live.InpaintProgress(
        run_id, run_prefix, every_s=config.log_every_s, limit=config.limit, endpoint_url=config.endpoint_url
    ).start()  # a progress line, _progress.json and the gauges every --log-every-s
    ds = build_dataset(config, run_id, index_ref)

    sink = ManifestDatasink(manifest, run_id, config.manifest_rows_per_part, config.endpoint_url)
    try:
        # Write tasks turn the rows into manifest parts where they are made and hand the driver
        # only each part's counts. Rows reach them only after their outputs are written
        # (encode_write), so a part never says ok for an object that is not there.
        ds.write_datasink(sink, ray_remote_args={"num_cpus": min(0.25, config.num_cpus_per_task)})
    except BaseException:
        progress.failed()
        raise
    totals = sink.totals
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
        "run_id": run_id,
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
        "checkpoint_ids": sorted(totals.checkpoint_ids),
        "resume": dataclasses.asdict(resume) if resume is not None else None,
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "manifest": storage.redact(run_prefix),
        "output": storage.redact(config.output),
        "config": to_dict(config),
    }
    manifest_lib.write_summary(manifest, run_id, summary, config.endpoint_url)
    print(
        f"inpaint {run_id}: {total} images {summary['counts']} in {wall:.1f}s "
        f"({summary['images_per_s']} images/s); manifest {summary['manifest']}"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    return run_main(InpaintConfig, run, argv, prog_name="python -m jobs.inpaint")


if __name__ == "__main__":
    sys.exit(main())
