"""Batch inpainting over object storage: every image under --images completed, every result accounted for.

    python -m jobs.inpaint --images s3://bucket/photos --output s3://bucket/completed \\
        --checkpoint s3://bucket/checkpoints/final

The Ray Data pipeline, one operator per stage (each visible in the dashboard and in the progress
bars with its rows/s)::

    list_images -> read_decode -> InpaintPredictor (actor pool) -> encode_write

and the driver writes the manifest from the small result rows (``pipeline.manifest.ManifestWriter``).

Listing streams pages of keys from one task, so the driver never holds the key set; only the
small per-image result rows (no pixels) come back to the driver, which counts them and writes
them as manifest parts of ``--manifest-rows-per-part`` rows (or every ``--manifest-flush-s``).
Every image ends as exactly one manifest row of this run (``pipeline/manifest.py``).

Resuming (``--skip-existing true``, the default): a task reads every earlier run's manifest and
builds a compact index of the keys already completed; read tasks consult it per image and write
a ``skipped`` row instead of reading the image. Rerunning the same command after a crash or a
partial run therefore completes exactly what is missing, and across all runs each image has
exactly one ``ok`` row. ``--skip-existing false`` redoes everything (outputs are overwritten
atomically).
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal

import numpy as np

from jobs.config import parse_config, print_config, save_config, to_dict
from pipeline import manifest as manifest_lib
from pipeline import metrics as live
from pipeline import storage
from pipeline.decode import DEFAULT_MAX_PIXELS

log = logging.getLogger("glcic.inpaint")

KEY_ROW_BYTES = 256  # a listed row (key + URI), for sizing blocks of keys


@dataclass
class InpaintConfig:
    """Complete every image under --images with a trained generator; write results and a Parquet manifest."""

    images: str = field(metadata={"help": "input images: a prefix (s3://, gs://, local, any fsspec URI) or a list file (.txt/.lst, one key or URI a line)"})  # fmt: skip
    output: str = field(metadata={"help": "prefix for the completed images, at the inputs' relative keys"})
    checkpoint: str = field(metadata={"help": "checkpoint prefix (config.json + generator.safetensors)"})
    masks: str | None = field(default=None, metadata={"help": "prefix of hole masks at the images' relative keys (or with a .png suffix), white = hole; none: generate masks"})  # fmt: skip
    manifest: str | None = field(default=None, metadata={"help": "prefix for the Parquet manifest (default: <output>/_manifest)"})  # fmt: skip
    mask_generator: Literal["rectangle", "freeform"] = field(default="rectangle", metadata={"help": "mask generator when --masks is not given; seeded by --mask-seed and the image key"})  # fmt: skip
    mask_seed: int = field(default=0, metadata={"help": "seed of the generated masks (with the image key: reruns get the same masks)"})  # fmt: skip
    output_format: Literal["png", "same"] = field(default="png", metadata={"help": "png: <key>.png (keys already ending in .png unchanged); same: the input's key and format"})  # fmt: skip
    write_masks: bool = field(default=False, metadata={"help": "also write the mask used, as PNG under <output>/_masks/"})  # fmt: skip
    postprocess: bool = field(default=True, metadata={"help": "the paper's post-processing (fast marching + Poisson blending) on the CPU after inference"})  # fmt: skip
    batch_size: int = field(default=16, metadata={"help": "images per inference batch (split into same-size buckets)"})  # fmt: skip
    task_batch_size: int = field(default=64, metadata={"help": "images per read/decode and encode/write task (and keys per listed block), independent of --batch-size so small inference batches do not multiply task launches"})  # fmt: skip
    num_actors: int = field(default=0, metadata={"help": "inference actors; 0: one per GPU on a GPU cluster, else one per 4 CPUs"})  # fmt: skip
    num_gpus_per_actor: float | None = field(default=None, metadata={"help": "GPUs per inference actor; default: 1 on a cluster with GPUs, else 0"})  # fmt: skip
    num_cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs per inference actor (also its torch threads on CPU)"})  # fmt: skip
    num_cpus_per_task: float = field(default=0.5, metadata={"help": "CPUs per read/decode and encode/write task; fractional so they never starve beside the actors"})  # fmt: skip
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={"help": "larger images are refused with an error row (decompression bombs, out-of-memory)"})  # fmt: skip
    precision: Literal["fp32", "bf16", "fp16"] = field(default="fp32", metadata={"help": "fp32, or bf16/fp16 autocast (meant for GPUs)"})  # fmt: skip
    channels_last: bool = field(default=False, metadata={"help": "channels_last memory format for the network (faster on recent GPUs)"})  # fmt: skip
    skip_existing: bool = field(default=True, metadata={"help": "resume: skip images with an ok row in an earlier run's manifest"})  # fmt: skip
    endpoint_url: str | None = field(default=None, metadata={"help": "S3-compatible endpoint (default: GLCIC_S3_ENDPOINT_URL / AWS_ENDPOINT_URL)"})  # fmt: skip
    run_id: str | None = field(default=None, metadata={"help": "this run's id (a fresh one by default; must not exist under the manifest yet)"})  # fmt: skip
    limit: int | None = field(default=None, metadata={"help": "process at most this many listed images"})
    manifest_rows_per_part: int = field(default=4096, metadata={"help": "rows per manifest Parquet file"})
    manifest_flush_s: float = field(default=30.0, metadata={"help": "write a manifest part at least this often (seconds), full or not"})  # fmt: skip
    log_every_s: float = field(
        default=10.0, metadata={"help": "seconds between progress lines in the job log"}
    )


def manifest_uri(config: InpaintConfig) -> str:
    return config.manifest or f"{config.output.rstrip('/')}/_manifest"


def new_run_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def validate(config: InpaintConfig) -> None:
    if not config.images or not config.output or not config.checkpoint:
        raise ValueError("--images, --output and --checkpoint are required")
    for name in ("batch_size", "task_batch_size", "manifest_rows_per_part", "max_pixels"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if config.num_actors < 0 or config.num_cpus_per_actor < 0 or config.num_cpus_per_task <= 0:
        raise ValueError("--num-actors and --num-cpus-per-actor must be >= 0, --num-cpus-per-task > 0")
    if config.limit is not None and config.limit < 1:
        raise ValueError("--limit must be at least 1")
    if config.run_id is not None:
        storage.safe_relative_key(f"run_id={config.run_id}")
        if "/" in config.run_id:
            raise ValueError("--run-id must not contain '/'")


def actor_resources(config: InpaintConfig, cluster: dict) -> tuple[int, float, float]:
    """``(num_actors, num_gpus, num_cpus)`` per actor, filling in the automatic defaults."""
    gpus = config.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) >= 1 else 0.0
    actors = config.num_actors
    if actors == 0:
        if gpus > 0:
            actors = max(1, int(cluster.get("GPU", 0) // gpus))
        else:
            actors = max(1, int(cluster.get("CPU", 1) // 4))
    return actors, gpus, config.num_cpus_per_actor


def check_checkpoint(config: InpaintConfig) -> None:
    """Fail before any work if the checkpoint is not complete (its config.json is written last)."""
    fs, root = storage.filesystem(config.checkpoint, config.endpoint_url)
    fs.invalidate_cache()
    if not fs.exists(storage.join_key(root, "config.json")):
        raise FileNotFoundError(f"no complete checkpoint at {config.checkpoint!r} (config.json missing)")


def resume_index(manifest: str, endpoint_url: str | None) -> tuple[int, np.ndarray]:
    digests = manifest_lib.completed_key_digests(manifest, endpoint_url)
    return len(digests), digests


def build_dataset(config: InpaintConfig, run_id: str, index_ref):
    import ray

    from pipeline.inference import InpaintPredictor, crash_hook_from_env
    from pipeline.inpaint_data import ReadOptions, read_decode
    from pipeline.writer import WriteOptions, encode_write

    manifest = manifest_uri(config)
    num_actors, num_gpus, num_cpus = actor_resources(config, ray.cluster_resources())
    task_cpus = config.num_cpus_per_task
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
        live.list_images_counted,  # list_images, telling the run's progress board what it listed
        batch_size=1,
        num_cpus=min(0.25, task_cpus),  # it mostly waits on listing calls
        fn_kwargs={
            "endpoint_url": config.endpoint_url,
            "exclude": (config.output, manifest),
            "output_format": config.output_format,
            "run_id": run_id,
        },
    )
    if config.limit is not None:
        ds = ds.limit(config.limit)
    read_options = ReadOptions(
        output=config.output,
        masks=config.masks,
        mask_generator=config.mask_generator,
        mask_seed=config.mask_seed,
        output_format=config.output_format,
        max_pixels=config.max_pixels,
        endpoint_url=config.endpoint_url,
    )
    ds = ds.map_batches(
        read_decode,
        batch_size=config.task_batch_size,
        num_cpus=task_cpus,
        fn_kwargs={"options": read_options, "index_ref": [index_ref] if index_ref is not None else []},
    )
    ds = ds.map_batches(
        InpaintPredictor,
        batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        fn_constructor_kwargs={
            "checkpoint": config.checkpoint,
            "precision": config.precision,
            "channels_last": config.channels_last,
            "endpoint_url": config.endpoint_url,
            "num_threads": max(1, int(round(num_cpus))) if num_gpus == 0 else None,
            **crash_hook_from_env(),
        },
    )
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

    validate(config)
    run_id = config.run_id or new_run_id()
    manifest = manifest_uri(config)
    if manifest_lib.run_exists(manifest, run_id, config.endpoint_url):
        raise ValueError(
            f"run {run_id!r} already has a manifest under {manifest!r}; rerun without --run-id to resume"
        )
    check_checkpoint(config)
    print_config(config)
    run_prefix = manifest_lib.run_prefix(manifest, run_id)
    save_config(config, f"{run_prefix}/{manifest_lib.CONFIG_FILE}", config.endpoint_url)
    if not ray.is_initialized():
        ray.init()

    started = time.time()
    index_ref = None
    if config.skip_existing:
        # Built in a task; the driver only learns its size (and any error) and never holds it.
        # Waiting here, before the pipeline takes every CPU, also means no read task ever blocks on
        # an index task that a small cluster has no CPU left to run.
        count_ref, index_ref = ray.remote(num_cpus=0.25, num_returns=2)(resume_index).remote(
            manifest, config.endpoint_url
        )
        print(f"resuming: {ray.get(count_ref)} images already completed under {manifest}")
    progress = live.InpaintProgress(
        run_id, run_prefix, every_s=config.log_every_s, limit=config.limit, endpoint_url=config.endpoint_url
    ).start()  # a progress line, _progress.json and the gauges every --log-every-s
    ds = build_dataset(config, run_id, index_ref)

    writer = manifest_lib.ManifestWriter(
        manifest, run_id, config.manifest_rows_per_part, config.manifest_flush_s, config.endpoint_url
    )
    counts: Counter = Counter()
    error_types: Counter = Counter()
    stage_s: Counter = Counter()
    checkpoint_ids: set[str] = set()
    # Rows arrive only after their outputs are written (encode_write), so a part never says ok
    # for an object that is not there.
    for batch in progress.follow(ds.iter_batches(batch_size=None, batch_format="numpy")):
        writer.add(manifest_lib.rows_to_table(batch))
        counts.update(batch["status"].tolist())
        error_types.update(t for t in batch["error_type"].tolist() if t)  # "" when none
        checkpoint_ids.update(c for c in set(batch["checkpoint_id"].tolist()) if c)
        for name in ("read_s", "decode_s", "inference_s", "write_s"):
            stage_s[name] += float(np.sum(batch[name]))
    writer.flush()
    progress.finish()

    wall = time.time() - started
    total = sum(counts.values())
    summary = {
        "run_id": run_id,
        "images": total,
        "counts": {status: counts.get(status, 0) for status in manifest_lib.STATUSES},
        "error_types": dict(error_types),
        "wall_s": round(wall, 3),
        "images_per_s": round(total / wall, 3) if wall > 0 else None,
        "completed_per_s": round(counts.get(manifest_lib.STATUS_OK, 0) / wall, 3) if wall > 0 else None,
        "stage_s": {k: round(v, 3) for k, v in stage_s.items()},
        "checkpoint_ids": sorted(checkpoint_ids),
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "manifest": run_prefix,
        "output": config.output,
        "config": to_dict(config),
    }
    manifest_lib.write_summary(manifest, run_id, summary, config.endpoint_url)
    print(
        f"inpaint {run_id}: {total} images {summary['counts']} in {wall:.1f}s "
        f"({summary['images_per_s']} images/s); manifest {run_prefix}"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = parse_config(InpaintConfig, argv)
    summary = run(config)
    print(f"summary: {summary['counts']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
