"""GAN training on Ray Train: the paper's three phases, sharded, checkpointed, resumable.

    python -m jobs.train --images s3://bucket/photos --output s3://bucket/models/glcic

Phase 1 trains the completion network alone on the paper's weighted MSE for ``tc`` steps; phase 2
trains the context discriminator alone for ``td`` steps; phase 3 trains both, the completion
network on MSE + ``alpha`` * adversarial loss, until step ``t_train`` (Iizuka et al. 2017, Sec. 3.4).
The maths of each update is model/gan.py's ``train_step``.

Each Ray Train worker holds both networks as separate DDP modules with their own optimizers. The
discriminator always sees composited images (network output in the hole, input elsewhere), and
its parameters are frozen while the completion network's adversarial loss is back-propagated, so
no gradient of the generator's loss ever reaches the discriminator's next step.

Checkpoints (pipeline/checkpoint.py's safetensors + JSON) go to ``storage_path/run_name`` through
``ray.train.report``; a restart, automatic (``FailureConfig``) or by running the job again with the
same ``run_name``, resumes from the latest one in the right phase and step with optimizer state.
The final completion network is exported to ``output``, a checkpoint the inpainting job loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import os
import posixpath
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import torch

from jobs.config import TrainConfig, parse_config, print_config, save_config, to_dict
from model.completion import CompletionNetwork, images_to_tensor
from model.discriminator import ContextDiscriminator
from model.gan import evaluate, make_optimizer, progress_grid, sync_batchnorm, train_step
from model.schedule import BudgetPlanner, Schedule
from pipeline import faults, storage, train_data
from pipeline.checkpoint import (
    CONFIG_FILE,
    ModelConfig,
    load_checkpoint,
    save_checkpoint,
    unwrapped_state_dict,
)
from pipeline.faults import KILL_AT_STEP_ENV, KILL_IN_UPLOAD_ENV
from pipeline.metrics import TrainReporter


def write_png(uri: str, rgb: np.ndarray, endpoint_url: str | None) -> None:
    from pipeline.writer import encode

    fs, path = storage.filesystem(uri, endpoint_url)
    data = encode(rgb, "png")
    storage.with_retries(lambda: storage.atomic_write_bytes(fs, path, data))


# ---------------------------------------------------------------------------------------------
# The Ray Train worker.


def _maybe_kill(env_name: str, step: int) -> None:
    import ray.train

    faults.maybe_kill_training_worker(env_name, step, ray.train.get_context().get_world_rank())


def upload_checkpoint(checkpoint, dir_name: str):
    """A ``checkpoint_upload_fn`` that writes ``config.json`` last (and removes an old one first).

    Ray Train registers a checkpoint only once this returns, so a worker killed mid-upload leaves
    a directory that is never restored from; and because ``config.json`` marks a complete
    checkpoint, nothing else (the inpainting job, a user) mistakes it for one either.
    """
    import ray.train
    from pyarrow import fs as pafs
    from ray.train import Checkpoint

    run_storage = ray.train.get_context().get_storage()
    fs = run_storage.storage_filesystem
    dest = posixpath.join(run_storage.experiment_fs_path, dir_name)
    fs.create_dir(dest, recursive=True)
    config_path = posixpath.join(dest, CONFIG_FILE)
    if fs.get_file_info(config_path).type != pafs.FileType.NotFound:
        fs.delete_file(config_path)
    for name in sorted(os.listdir(checkpoint.path), key=lambda name: name == CONFIG_FILE):
        if name == CONFIG_FILE:
            _maybe_kill(KILL_IN_UPLOAD_ENV, int(dir_name.rsplit("-", 1)[-1]))
        source = os.path.join(checkpoint.path, name)
        storage.with_retries(
            lambda source=source, name=name: pafs.copy_files(
                source, posixpath.join(dest, name), pafs.LocalFileSystem(), fs
            )
        )
    return Checkpoint(dest, filesystem=fs)


def endless_batches(
    shard, batch_size: int, keys_log: list | None, shuffle_buffer: int = 0
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Batches of this worker's shard, epoch after epoch (fresh random crops each epoch), mixed
    in a local buffer of ``shuffle_buffer`` crops when the rows arrive in runs (samples of shards)."""
    epoch = 0
    while True:
        produced = 0
        for batch in shard.iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=shuffle_buffer or None,
        ):
            produced += 1
            keys = [str(k) for k in batch["key"]]
            if keys_log is not None and epoch == 0:
                keys_log.extend(keys)
            yield keys, batch["image"]
        if produced == 0:
            raise ValueError(
                f"a training worker's shard holds fewer images than its batch ({batch_size}): "
                "lower batch_size or num_workers, or add images"
            )
        epoch += 1


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    config = TrainConfig(**loop_config["config"])
    endpoint_url = loop_config["endpoint_url"]
    mean_pixel = tuple(loop_config["mean_pixel"])
    # Every checkpoint says what its mean pixel was computed from (a sample of how many images).
    mean_from = {"mean_pixel_from": loop_config.get("mean_pixel_from") or {}}
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if not on_gpu:
        # Ray sets OMP_NUM_THREADS=1 for fractional CPUs; use what the worker was given, rounded up.
        torch.set_num_threads(max(1, math.ceil(config.cpus_per_worker)))
    if config.precision == "bf16" and not on_gpu and rank == 0:
        print("precision=bf16 applies on GPU only; this CPU worker trains in fp32")
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    # A factory: model/gan.py enters it around forward passes and losses only, never around
    # backward or the optimizer step.
    autocast = (
        functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
        if config.precision == "bf16" and on_gpu
        else contextlib.nullcontext
    )

    torch.manual_seed(config.seed)  # the same initial weights on every worker
    generator = CompletionNetwork(config.width).to(device, memory_format=memory_format)
    discriminator = ContextDiscriminator(config.image_size, config.local_size, config.width)
    discriminator = discriminator.to(device, memory_format=memory_format)
    # Several GPUs: BatchNorm over the whole batch, not batch_size / world images per GPU. Before
    # the optimizers and prepare_model (DDP), so both see the converted modules.
    generator = sync_batchnorm(generator, world, device)
    discriminator = sync_batchnorm(discriminator, world, device)
    opt_g = make_optimizer(config.optimizer, generator.parameters(), config.lr_g)
    opt_d = make_optimizer(config.optimizer, discriminator.parameters(), config.lr_d)

    # Unless resumed from a run checkpoint: the step, the best validation so far, the schedule.
    start_step, best_psnr, plan = config.start_step, -math.inf, config.schedule()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            loaded = load_checkpoint(directory, device=device)
        generator.load_state_dict(loaded.generator.state_dict())
        loaded.restore_discriminator(discriminator)
        loaded.restore_optimizer("generator", opt_g)
        loaded.restore_optimizer("discriminator", opt_d)
        start_step = int(loaded.config.step)
        # The weights were trained against this mean; keep it even if the images changed since.
        mean_pixel = tuple(loaded.config.mean_pixel)
        mean_from["mean_pixel_from"] = (
            loaded.config.extra.get("mean_pixel_from") or mean_from["mean_pixel_from"]
        )
        best_psnr = float(loaded.config.extra.get("best_val_hole_psnr", -math.inf))
        if config.fractions() is not None and "schedule" in loaded.config.extra:
            plan = Schedule(**loaded.config.extra["schedule"])  # planned before the restart
        print(f"[rank {rank}] resumed from step {start_step} (phase {plan.phase(start_step)})")
    elif config.init_generator:
        # A new segment of a longer schedule: only the completion network travels between segments
        # (its fp16 export is small); the discriminator and the optimizer states start fresh.
        loaded = load_checkpoint(config.init_generator, endpoint_url, device, training_state=False)
        generator.load_state_dict(loaded.generator.state_dict())  # fp16 export -> the run's fp32
        # The mean pixel is the checkpoint's: the driver read it and passed it in loop_config.
        print(
            f"[rank {rank}] generator from {config.init_generator} (its step {loaded.config.step}); "
            f"starting at step {start_step} (phase {plan.phase(start_step)})"
        )

    generator = ray.train.torch.prepare_model(generator, move_to_device=False)
    discriminator = ray.train.torch.prepare_model(discriminator, move_to_device=False)

    val = loop_config.get("val")
    if val is not None and rank == 0:
        val_images = images_to_tensor(val["image"], device, config.channels_last)
        val_masks_np, _ = train_data.validation_masks(
            val["key"], seed=config.seed, image_size=config.image_size, local_size=config.local_size,
            hole_range=config.hole_range,
        )  # fmt: skip
        val_masks = torch.from_numpy(val_masks_np).to(device)

    run_uri = config.run_uri()
    per_worker_batch = config.batch_size // world
    keys_log: list[str] | None = [] if config.log_shard_keys else None
    shard = ray.train.get_dataset_shard("train")

    def masks_for(keys, step):
        return train_data.batch_masks(
            keys, step=step, seed=config.seed, image_size=config.image_size,
            local_size=config.local_size, hole_range=config.hole_range, kind=config.train_masks,
        )  # fmt: skip

    # The next steps' crops and masks are made in threads while this one computes: a resident set
    # by several (each step's batch is a function of its step), a streamed one by one.
    if loop_config.get("resident"):
        held = train_data.ResidentImages.from_shard(
            shard, config.image_size, seed=[config.seed, rank, start_step]
        )
        print(f"[rank {rank}] holds {len(held.keys)} training images decoded ({held.nbytes / 2**20:.0f} MiB)")
        if keys_log is not None:
            keys_log.extend(held.keys)

        def step_input(step):
            keys, crops = held.batch(step - start_step, per_worker_batch)
            return (keys, crops, *masks_for(keys, step))

        # On a GPU the worker's CPUs but one (the loop's) make inputs; on CPU torch needs them.
        threads = max(1, math.ceil(config.cpus_per_worker) - 1) if on_gpu else 1
        inputs = train_data.prefetched_map(step_input, itertools.count(start_step), threads=threads)
    else:
        batches = endless_batches(shard, per_worker_batch, keys_log, loop_config.get("shuffle_buffer", 0))
        inputs = train_data.prefetched(train_data.step_inputs(batches, start_step, masks_for))
    # Rank 0's live figures: Ray metrics and <run>/_progress.json (pipeline.metrics).
    reporter = TrainReporter(config.run_name, run_uri, plan.t_train, endpoint_url) if rank == 0 else None
    deadline = loop_config.get("deadline")
    # Rank 0 plans (model/schedule.py); every rank follows the plan it broadcasts.
    planner = (
        BudgetPlanner(plan, start_step, deadline, config.fractions())
        if deadline is not None and rank == 0
        else None
    )
    planned = config.fractions() is not None
    best_state: dict[str, torch.Tensor] | None = None  # the generator of best_psnr, on the CPU
    validations: list[dict] = []  # this attempt's validation curve, stated in the export
    inside_phase1 = 0  # validations inside a planned phase 1 so far (Schedule.validation_due)

    window_start, window_steps = time.perf_counter(), 0
    last: dict[str, float] = {}
    step = start_step
    while step < plan.t_train:
        phase = plan.phase(step)
        keys, images_u8, masks_np, boxes_np = next(inputs)
        step_started = time.perf_counter()
        images = images_to_tensor(images_u8, device, config.channels_last)
        masks = torch.from_numpy(masks_np).to(device, non_blocking=True)
        boxes = torch.from_numpy(boxes_np).to(device)

        last = train_step(
            phase, generator, discriminator, opt_g, opt_d, images, masks, boxes,
            mean_pixel=mean_pixel, local_size=config.local_size, alpha=config.alpha, autocast=autocast,
        )  # fmt: skip
        if not all(math.isfinite(v) for v in last.values()):
            # Stop rather than checkpoint NaN weights over the last good ones.
            raise FloatingPointError(
                f"non-finite loss at step {step} (phase {phase}): {last}; lower the learning rates"
            )
        window_steps += 1
        step = done = step + 1  # steps completed: what a checkpoint taken now records
        if deadline is not None:
            # The losses' .item() waited for the GPU: this is the step's whole time.
            new_plan = planner.after_step(done, time.perf_counter() - step_started) if planner else plan
            plan = agree(new_plan, world, device)
            if reporter is not None:
                reporter.t_train = plan.t_train
        _maybe_kill(KILL_AT_STEP_ENV, done)

        is_checkpoint = done % config.checkpoint_every == 0 or done in plan.phase_ends
        validation_due = plan.validation_due(done, inside_phase1) if planned else done % config.val_every == 0
        is_val = val is not None and (validation_due or done == plan.t_train)
        if is_val and done < plan.tc:
            inside_phase1 += 1  # on every rank alike: the next due point follows from it
        if not (is_checkpoint or is_val or done % config.log_every == 0):
            continue

        overhead_started = time.perf_counter()
        elapsed = overhead_started - window_start
        metrics = {
            "step": done,
            "phase": phase,
            "start_step": start_step,
            "steps_per_s": window_steps / elapsed,
            "images_per_s_per_worker": window_steps * per_worker_batch / elapsed,
            **last,
        }
        if is_val and rank == 0:
            val_metrics, completed = evaluate(generator, val_images, val_masks, mean_pixel)
            metrics.update(val_metrics)
            validations.append({"step": done, "phase": phase, **val_metrics})
            grid = progress_grid(val_images, val_masks, completed, mean_pixel)
            write_png(storage.join_key(run_uri, f"progress/step-{done:09d}.png"), grid, endpoint_url)
            if val_metrics["val_hole_psnr"] > best_psnr:
                best_psnr = val_metrics["val_hole_psnr"]
                best_state = {
                    k: t.detach().to("cpu", copy=True) for k, t in unwrapped_state_dict(generator).items()
                }
                save_checkpoint(
                    storage.join_key(run_uri, "best"),
                    model_config(config, plan, mean_pixel, done, {**mean_from, "val": val_metrics}),
                    generator,
                    endpoint_url=endpoint_url,
                )
        if best_psnr > -math.inf:
            metrics["best_val_hole_psnr"] = best_psnr
        if reporter is not None:
            reporter.report(metrics, world=world, final=done == plan.t_train)

        if is_checkpoint:
            with tempfile.TemporaryDirectory() as directory:
                reported = None
                if rank == 0:
                    save_checkpoint(
                        directory,
                        model_config(
                            config,
                            plan,
                            mean_pixel,
                            done,
                            {**mean_from, "best_val_hole_psnr": best_psnr, "attempt_start_step": start_step},
                        ),
                        generator,
                        discriminator,
                        {"generator": opt_g, "discriminator": opt_d},
                    )
                    reported = Checkpoint.from_directory(directory)
                ray.train.report(
                    metrics,
                    checkpoint=reported,
                    checkpoint_dir_name=f"checkpoint-{done:09d}",
                    checkpoint_upload_fn=upload_checkpoint,
                )
        # No metrics-only ray.train.report: Ray Train 2.60 keeps one pending report per worker
        # (a queue of 1) that its controller drains every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S),
        # so a report sooner than 2 s after the last blocks the step until then (measured: 2.01 s
        # a call back to back), and Ray Train 2 keeps metrics only with checkpoints anyway. The
        # live figures go out through ``reporter`` (Ray metrics and _progress.json) instead.
        if planner is not None:
            planner.note_overhead(time.perf_counter() - overhead_started)
        window_start, window_steps = time.perf_counter(), 0

    if keys_log is not None:
        import json

        fs, path = storage.filesystem(storage.join_key(run_uri, f"shards/rank-{rank}.json"), endpoint_url)
        storage.atomic_write_bytes(fs, path, json.dumps(sorted(keys_log)).encode())
    if rank == 0:
        extra = {**mean_from, "validations": validations, "best_val_hole_psnr": best_psnr}
        if planner is not None:
            extra["schedule_plans"] = planner.plans
            extra["stopped_at_deadline"] = planner.stopped
        exported, exported_step = generator, plan.t_train
        if config.export == "best" and best_psnr > -math.inf:
            exported, exported_step = best_generator(config, best_state, run_uri, endpoint_url, device)
        extra["exported"] = {"which": config.export, "step": exported_step}
        save_checkpoint(
            config.output, model_config(config, plan, mean_pixel, exported_step, extra), exported,
            endpoint_url=endpoint_url,
        )  # fmt: skip


def best_generator(
    config: TrainConfig, best_state, run_uri: str, endpoint_url, device
) -> tuple[torch.nn.Module, int]:
    """The completion network of the best validation and its step: this attempt's copy in memory,
    or (it was found before a restart) the run's ``best/`` checkpoint."""
    best = load_checkpoint(storage.join_key(run_uri, "best"), endpoint_url, device, training_state=False)
    if best_state is not None:
        best.generator.load_state_dict(best_state)  # the same weights, in the run's fp32
    return best.generator, int(best.config.step)


def agree(plan: Schedule, world: int, device) -> Schedule:
    """Rank 0's ``plan`` on every rank: each must run the same number of steps of each phase, or
    DDP's collectives wait forever for the rank that stopped."""
    if world == 1:
        return plan
    import torch.distributed as dist

    lengths = torch.tensor([plan.tc, plan.td, plan.t_train], dtype=torch.int64, device=device)
    dist.broadcast(lengths, src=0)
    tc, td, t_train = (int(v) for v in lengths.tolist())
    return Schedule(tc, td, t_train)


def model_config(config: TrainConfig, plan: Schedule, mean_pixel, step: int, extra: dict) -> ModelConfig:
    """A checkpoint's config: ``train_config`` states the schedule ``plan`` that ran."""
    ran = dataclasses.replace(config, tc=plan.tc, td=plan.td, t_train=plan.t_train)
    return ModelConfig(
        width=config.width,
        mean_pixel=mean_pixel,
        image_size=config.image_size,
        local_size=config.local_size,
        phase=plan.phase(max(step - 1, 0)),
        step=step,
        extra={**extra, "schedule": plan.to_dict(), "train_config": to_dict(ran)},
    )


# ---------------------------------------------------------------------------------------------
# The driver.


def build_trainer(
    config: TrainConfig,
    dataset,
    mean_pixel,
    val: dict | None,
    endpoint_url: str | None,
    mean_from: dict | None = None,
    deadline: float | None = None,
    resident: bool = False,
    shuffle_buffer: int = 0,
):
    """The ``TorchTrainer`` of ``train_loop_per_worker`` over ``dataset`` (what ``run`` and
    bench/train.py fit): scaling, run storage, failure handling and checkpoint retention from
    ``config``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    storage_fs, storage_path = storage.pyarrow_filesystem(config.storage_path, endpoint_url)
    test_hooks = faults.test_env()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": dataclasses.asdict(config),
            "endpoint_url": endpoint_url,
            "mean_pixel": list(mean_pixel),
            "mean_pixel_from": mean_from or {},  # stated in every checkpoint's config
            "val": val,
            "deadline": deadline,  # time.time() by which the run ends, export included (--time-budget-s)
            "resident": resident,  # the dataset is train_data.scaled_images rows, read once
            "shuffle_buffer": shuffle_buffer,  # > 0: the rows come a shard at a time
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
        ),
        datasets={"train": dataset},
        run_config=ray.train.RunConfig(
            name=config.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            worker_runtime_env={"env_vars": test_hooks} if test_hooks else None,
        ),
    )


def shard_inputs(config: TrainConfig, endpoint_url: str | None):
    """How the training and the validation images are read: ``train_shards.ShardInput`` of the
    layout found (or forced by ``--input-format``), or None for one object per image. Validation
    images held out of ``--images`` are read as those are."""
    from pipeline.shard_layout import detect_layout
    from pipeline.train_shards import ShardInput

    def of(source: str | None):
        if source is None:
            return None
        layout = detect_layout(source, endpoint_url, config.input_format)
        if layout == "files":
            return None
        return ShardInput(layout, config.image_column, config.key_column, config.image_ext)

    images = of(config.images)
    return images, (of(config.val_images) if config.val_images else images)


def run(config: TrainConfig) -> str:
    """Train and export; return the URI of the final completion-network checkpoint."""
    import ray

    # The budget counts from here: Ray's start-up, the survey and the workers' start are part of it.
    deadline = time.time() + config.time_budget_s if config.time_budget_s else None
    print_config(config)
    if not ray.is_initialized():
        ray.init()
    endpoint_url = config.endpoint_url or storage.endpoint_url_from_env()
    shards, val_shards = shard_inputs(config, endpoint_url)
    if shards is not None:
        print(f"the training images are samples of {shards.layout} shards")

    # One streaming pass over the listing, in a task: the driver gets counts and a few URIs.
    survey = ray.get(
        ray.remote(num_cpus=0.25)(train_data.survey).remote(
            config.images,
            fraction=config.val_fraction,
            seed=config.seed,
            val_limit=config.val_limit,
            sample_size=config.mean_pixel_images,
            val_source=config.val_images,
            endpoint_url=endpoint_url,
            shards=shards,
            val_shards=val_shards,
        )
    )
    print(f"{survey.train_count} training images, {survey.val_count} validation images")
    save_config(config, storage.join_key(config.run_uri(), "train_config.json"), endpoint_url)
    save_config(config, config.output.rstrip("/") + ".train_config.json", endpoint_url)

    started = time.perf_counter()
    if config.init_generator:
        # Checked here, before any worker starts: the generator keeps the mean it was trained with.
        init = load_checkpoint(config.init_generator, endpoint_url, training_state=False)
        if init.config.width != config.width:
            raise ValueError(
                f"--init-generator {config.init_generator!r} has width {init.config.width}, "
                f"this run --width {config.width}"
            )
        mean_pixel = tuple(init.config.mean_pixel)
        mean_from = init.config.extra.get("mean_pixel_from", {"init_generator": config.init_generator})
        print(f"mean pixel of --init-generator: {tuple(round(v, 4) for v in mean_pixel)}")
    else:
        mean_pixel, sampled = train_data.mean_pixel(
            survey.sample_uris, endpoint_url, shards, survey.sample_keys
        )
        mean_from = {"images": sampled, "of": survey.train_count, "sample": "lowest hash of ('mean', uri)"}
        print(
            f"mean pixel of {sampled} of the {survey.train_count} training images: "
            f"{tuple(round(v, 4) for v in mean_pixel)} ({time.perf_counter() - started:.1f} s)"
        )
    val = None
    if survey.val_uris:
        val = train_data.validation_arrays(
            survey.val_keys, survey.val_uris, config.image_size, endpoint_url, val_shards
        )
    resident = config.resident_max_gib > 0 and train_data.fits_in_memory(
        survey.train_count, config.image_size, config.num_workers, config.resident_max_gib
    )
    # Every epoch restarts the Ray Data pipeline (a fraction of a second); on a handful of photos
    # that would cost more than the steps themselves. A resident set is read once.
    copies = (
        1 if resident else max(1, math.ceil(config.min_epoch_steps * config.batch_size / survey.train_count))
    )
    print(
        "the training images are decoded once and held by the workers"
        if resident
        else f"the training images stream through Ray Data ({copies} cop{'y' if copies == 1 else 'ies'} an epoch)"
    )
    dataset = train_data.training_dataset(
        config.images,
        survey.split,
        config.image_size,
        images=survey.train_count,
        copies=copies,
        seed=config.seed,
        endpoint_url=endpoint_url,
        num_cpus=config.data_cpus,
        resident=resident,
        shards=shards,
    )

    if config.export == "best" and val is None:
        print("--export best needs validation images (val_fraction or val_images); exporting the last step")
    shuffle_buffer = config.shuffle_buffer if shards is not None and not resident else 0
    trainer = build_trainer(
        config, dataset, mean_pixel, val, endpoint_url, mean_from, deadline, resident, shuffle_buffer
    )
    started = time.perf_counter()
    result = trainer.fit()
    print(f"training took {time.perf_counter() - started:.1f} s")
    if result.error is not None:
        raise result.error
    print(f"final metrics: {result.metrics}")
    print(f"exported the completion network to {storage.redact(config.output)}")
    return config.output


def main(argv: list[str] | None = None) -> str:
    return run(parse_config(TrainConfig, argv, prog_name="python -m jobs.train"))


if __name__ == "__main__":
    main()
