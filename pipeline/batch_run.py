"""A batch run of the generator over listed images: what the inpainting and the evaluation jobs
share, so each job plugs in only its own last stages (inpaint: encode + write; evaluate: score).

    start_run -> listing_stage (+ the resume index) -> read_decode -> inference_stage
        -> <the job's stages> -> write_manifest (ManifestDatasink: parts + the driver's totals)

``config`` is a ``jobs.config.BatchInferenceConfig`` (this layer reads its fields and imports no
job code). The run id, the checkpoint (located once: ``pipeline.checkpoint.locate``), the run's
``_config.json``, the actor pool sized from the config and the manifest parts are all decided
here, in one place for both jobs.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from pipeline import manifest as manifest_lib
from pipeline import storage
from pipeline.checkpoint import LocatedCheckpoint, locate


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


def actor_pool(config, cluster: dict, reachable: dict | None = None) -> ActorPool:
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


def listing_stage(
    config,
    exclude: tuple[str, ...],
    output_format: str | None,
    run_id: str,
    index_ref=None,
    layout: str = "files",
    pack: tuple[str, int] | None = None,
):
    """A dataset of ``{"key", "uri", "collides_with"}`` rows: every input under ``config.images``
    (with a shard ``layout``: every shard; with ``pack``: the images grouped into shards to write)
    but those in the resume index ``index_ref`` (an ObjectRef, or None: list everything)."""
    import ray

    from pipeline.resume import list_todo

    ds = ray.data.from_items([{"source": config.images}])
    # Blocks of about one task's worth of keys. Ray Data merges a task's output into blocks of up to
    # 128 MiB by default, which would put a whole listing (tiny rows) into one block, and so into one
    # read task. Decoded images are bigger than this, so they travel one per block and each stage
    # bundles its own batch of them: task_batch_size for the tasks, batch_size for the actor. Task
    # launches cost milliseconds each, so sizing tasks by the (often small, on CPU) inference batch
    # made them the bottleneck (BENCHMARKS.md). (A streaming repartition would also split the keys,
    # but its one-CPU task waits, backpressured, for the whole run and starves a small cluster.)
    ds.context.target_max_block_size = config.task_batch_size * storage.KEY_ROW_BYTES
    ds = ds.map_batches(
        list_todo,  # list_images without the resume index's keys, telling the progress board
        batch_size=1,
        num_cpus=min(0.25, config.num_cpus_per_task),  # it mostly waits on listing calls
        fn_kwargs={
            "endpoint_url": config.endpoint_url,
            "exclude": exclude,
            "output_format": output_format,
            "layout": layout,
            "pack": pack,
            "run_id": run_id,
            # In a list, so Ray hands the task the reference and the task fetches the index itself.
            "index_ref": [index_ref] if index_ref is not None else [],
        },
    )
    return ds.limit(config.limit) if config.limit is not None else ds


def postprocess_path(config, pool: ActorPool) -> str:
    """Where ``--postprocess-on`` puts the post-processing for this pool, as the actors decide it:
    ``actor`` (the torch Poisson blend, on the device) or ``writer`` (OpenCV, in the CPU tasks)."""
    on_gpu = config.device == "cuda" or (config.device == "auto" and pool.num_gpus > 0)
    return (
        "actor"
        if config.postprocess_on == "actor" or (config.postprocess_on == "auto" and on_gpu)
        else "writer"
    )


def predictor_kwargs(config, pool: ActorPool, **extra) -> dict:
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


def inference_stage(ds, config, **predictor_options):
    """``ds`` through the ``InpaintPredictor`` actor pool (``predictor_options``: e.g. postprocess,
    keep_images), sized by ``actor_pool``."""
    from pipeline.inference import InpaintPredictor

    return _actor_stage(ds, config, InpaintPredictor, None, **predictor_options)


def shard_inference_stage(ds, config, **predictor_options):
    """``ds`` (one row per shard) through the ``ShardInpaintPredictor`` actor pool: a shard per
    call, its images completed ``inference_batch_size`` at a time."""
    from pipeline.inference import ShardInpaintPredictor

    return _actor_stage(ds, config, ShardInpaintPredictor, 1, **predictor_options)


def _actor_stage(ds, config, predictor, rows_per_call: int | None, **predictor_options):
    """``ds`` through an actor pool of ``predictor`` sized by ``actor_pool``: ``rows_per_call``
    rows a call (a shard's row), or None: the inference batch of images itself."""
    import ray

    from pipeline.faults import forwarded

    pool = actor_pool(config, ray.cluster_resources(), reachable_resources())
    per_call = ", a shard per call" if rows_per_call else ""
    print(
        f"inference actors: {pool.min_size} to {pool.max_size or 'as many as the cluster grows to'} "
        f"(starting with {pool.initial_size}), {pool.num_gpus} GPU and {pool.num_cpus} CPU each, "
        f"computing on {config.device}{per_call}"
    )
    images_per_batch = config.inference_batch_size(pool.num_gpus)
    if rows_per_call:
        predictor_options["batch_size"] = images_per_batch  # the actor batches a shard's images
    return ds.map_batches(
        predictor,
        batch_size=rows_per_call or images_per_batch,
        compute=pool.strategy(config.actor_tasks_in_flight),
        fn_constructor_kwargs=predictor_kwargs(config, pool, **predictor_options),
        **forwarded({"num_gpus": pool.num_gpus, "num_cpus": pool.num_cpus}),  # + the test-only faults
    )


@dataclass(frozen=True)
class BatchRun:
    """One run of a batch job: where its rows go and which weights it runs."""

    run_id: str
    root: str  # the manifest (inpaint: --manifest; evaluate: --output), holding run_id=<id>/ folders
    prefix: str  # <root>/run_id=<id>
    checkpoint: LocatedCheckpoint


def start_run(config, root: str, config_json: str) -> BatchRun:
    """Before any work: a new run id (``--run-id`` must not exist yet), the checkpoint located and
    checked, and ``config_json`` saved as the run's ``_config.json`` (what a resume compares)."""
    run_id = config.run_id or new_run_id()
    if manifest_lib.run_exists(root, run_id, config.endpoint_url):
        raise ValueError(
            f"run {run_id!r} already exists under {storage.redact(root)!r}; rerun without --run-id to resume"
        )
    checkpoint = locate(config.checkpoint, config.endpoint_url)
    prefix = manifest_lib.run_prefix(root, run_id)
    fs, path = storage.filesystem(storage.join_key(prefix, manifest_lib.RUN_CONFIG_FILE), config.endpoint_url)
    storage.with_retries(lambda: storage.atomic_write_bytes(fs, path, config_json.encode()))
    return BatchRun(run_id=run_id, root=root, prefix=prefix, checkpoint=checkpoint)


def read_stage(ds, config, options):
    """``ds`` (listed keys) through ``read_decode`` tasks: pixels, masks and the rows' first fields."""
    from pipeline.inpaint_data import read_decode

    return ds.map_batches(
        read_decode, batch_size=config.task_batch_size, num_cpus=config.num_cpus_per_task,
        fn_kwargs={"options": options},
    )  # fmt: skip


def write_manifest(ds, run: BatchRun, config, *, schema=None, totals=None, per_row: int = 1):
    """The last stage: ``ds``'s rows as Parquet parts under ``run.prefix``, written by Ray Data
    write tasks (``ManifestDatasink``); returns the driver's totals of the parts (``totals``, a
    fresh ``RunTotals`` by default), never the rows themselves. ``per_row``: about how many
    manifest rows one row of ``ds`` holds (a shard's), to size the parts."""
    from pipeline.manifest_sink import ManifestDatasink

    rows_per_part = max(1, config.manifest_rows_per_part // per_row)
    sink = ManifestDatasink(
        run.root, run.run_id, rows_per_part, config.endpoint_url, schema=schema, totals=totals
    )
    # By default no CPU: a part is what commits finished work (a rerun skips what the manifest
    # holds), and on a small cluster the read, actor and write stages hold every CPU, so a sink task
    # that waited for a fraction of one committed nothing until the run's end (bench/commit_lag.py).
    ds.write_datasink(sink, ray_remote_args={"num_cpus": config.manifest_num_cpus})
    # What each stage handed on (Ray Data's own count, public in Dataset.stats()): one block per
    # image for files, one per shard for shards, the driver's bookkeeping grows with it.
    sink.totals.blocks = blocks_produced(ds.stats())
    return sink.totals


_OPERATOR_BLOCKS = re.compile(r"^Operator \d+ (.+?): \d+ tasks executed, (\d+) blocks produced", re.MULTILINE)


def blocks_produced(stats: str) -> dict[str, int]:
    """``{operator: blocks}`` from ``Dataset.stats()`` text (empty if Ray Data words it otherwise)."""
    return {name: int(blocks) for name, blocks in _OPERATOR_BLOCKS.findall(stats)}
