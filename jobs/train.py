"""GAN training on Ray Train: the paper's three phases, sharded, checkpointed, resumable.

    python -m jobs.train --images s3://bucket/photos --output s3://bucket/models/glcic

Phase 1 trains the completion network alone on the hole MSE for ``tc`` steps; phase 2 trains the
context discriminator alone for ``td`` steps; phase 3 trains both, the completion network on
MSE + ``alpha`` * adversarial loss, until step ``t_train`` (Iizuka et al. 2017, Sec. 3.4).

Each Ray Train worker holds both networks as separate DDP modules with their own optimizers. The
discriminator always sees composited images (network output in the hole, input elsewhere), and
its parameters are frozen while the completion network's adversarial loss is back-propagated, so
no gradient of the generator's loss ever reaches the discriminator's next step.

Checkpoints (model/checkpoint.py's safetensors + JSON) go to ``storage_path/run_name`` through
``ray.train.report``; a restart, automatic (``FailureConfig``) or by running the job again with the
same ``run_name``, resumes from the latest one in the right phase and step with optimizer state.
The final completion network is exported to ``output``, a checkpoint the inpainting job loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import posixpath
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from jobs.config import parse_config, print_config, save_config, to_dict
from model.checkpoint import CONFIG_FILE, ModelConfig, load_checkpoint, save_checkpoint
from model.completion import CompletionNetwork, composite, prepare_input
from model.discriminator import ContextDiscriminator
from model.losses import (
    discriminator_loss,
    generator_adversarial_loss,
    hole_l1,
    hole_mse,
    psnr,
    ssim,
)
from pipeline import storage, train_data
from pipeline.metrics import TrainReporter

# Test-only fault injection, read by the workers (propagated to them by ``run``): the worker of
# rank 0 calls os._exit at the given step, once (the marker file records that it happened).
KILL_AT_STEP_ENV = "GLCIC_TEST_KILL_AT_STEP"  # in the training loop, after that step's update
KILL_IN_UPLOAD_ENV = "GLCIC_TEST_KILL_IN_UPLOAD_AT_STEP"  # while uploading that step's checkpoint
KILL_MARKER_ENV = "GLCIC_TEST_KILL_MARKER"


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class TrainConfig:
    """Train the completion network and context discriminator (Iizuka et al. 2017) on Ray Train."""

    images: str = field(metadata=_help("URI prefix of the training images (s3://, gs://, local)"))
    output: str = field(
        metadata=_help("URI of the exported final completion-network checkpoint (what jobs.inpaint loads)")
    )
    storage_path: str | None = field(
        default=None,
        metadata=_help("Ray Train run storage (checkpoints, progress images); default: '<output>-runs'"),
    )
    run_name: str = field(
        default="glcic-train", metadata=_help("run directory under storage_path; the same name resumes")
    )
    num_workers: int = field(default=1, metadata=_help("Ray Train workers (one GPU each with use_gpu)"))
    use_gpu: bool = field(default=False, metadata=_help("train on GPUs: DDP over NCCL (CPU: gloo)"))
    cpus_per_worker: float = field(
        default=1.0, metadata=_help("CPUs per training worker; leave some for the Ray Data read tasks")
    )
    data_cpus: float = field(default=0.5, metadata=_help("CPUs per Ray Data read/decode/crop task"))
    width: float = field(
        default=1.0, metadata=_help("channel-width multiplier of both networks (paper: 1.0)")
    )
    image_size: int = field(default=256, metadata=_help("training crop size (paper: 256)"))
    local_size: int = field(default=128, metadata=_help("local discriminator patch size (paper: 128)"))
    hole_min: int = field(default=96, metadata=_help("smallest hole side in pixels (paper: 96)"))
    hole_max: int = field(default=128, metadata=_help("largest hole side in pixels (paper: 128)"))
    batch_size: int = field(default=96, metadata=_help("images per step over all workers (paper: 96)"))
    tc: int = field(
        default=90_000, metadata=_help("phase 1 steps: completion network on MSE (paper: 90,000)")
    )
    td: int = field(default=10_000, metadata=_help("phase 2 steps: discriminator alone (paper: 10,000)"))
    t_train: int = field(
        default=500_000, metadata=_help("total steps; phase 3 (joint) runs until here (paper: 500,000)")
    )
    optimizer: Literal["adadelta", "adam"] = field(
        default="adadelta", metadata=_help("optimizer (paper: adadelta)")
    )
    lr_g: float = field(
        default=1.0, metadata=_help("completion network learning rate (paper: Adadelta's 1.0)")
    )
    lr_d: float = field(default=1.0, metadata=_help("discriminator learning rate (paper: Adadelta's 1.0)"))
    alpha: float = field(
        default=0.0004, metadata=_help("weight of the adversarial loss in phase 3 (paper: 0.0004)")
    )
    val_images: str | None = field(
        default=None, metadata=_help("URI prefix of validation images; default: hold out val_fraction")
    )
    val_fraction: float = field(
        default=0.01, metadata=_help("fraction of images held out for validation when val_images is unset")
    )
    val_limit: int = field(default=16, metadata=_help("validation images evaluated (the first by key)"))
    val_every: int = field(
        default=1000, metadata=_help("steps between validations (hole L1, PSNR, SSIM, PNG grid)")
    )
    checkpoint_every: int = field(
        default=1000, metadata=_help("steps between checkpoints (also at phase ends)")
    )
    keep_checkpoints: int = field(default=3, metadata=_help("latest checkpoints kept in storage_path"))
    log_every: int = field(default=100, metadata=_help("steps between metric reports"))
    max_failures: int = field(
        default=3, metadata=_help("worker failures recovered from the latest checkpoint")
    )
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata=_help("bf16 autocast on GPU"))
    channels_last: bool = field(
        default=True, metadata=_help("channels_last memory format (faster convs on GPU)")
    )
    seed: int = field(default=0, metadata=_help("seed of weights, masks and the validation split"))
    endpoint_url: str | None = field(default=None, metadata=_help("S3-compatible endpoint (else from env)"))
    min_epoch_steps: int = field(
        default=16,
        metadata=_help(
            "a small training set is listed several times per epoch so an epoch is at least this many "
            "steps (each copy gets its own random crop); 1 = each image once"
        ),
    )
    log_shard_keys: bool = field(
        default=False, metadata=_help("write the keys each worker read in its first epoch to <run>/shards/")
    )

    def __post_init__(self):
        if self.storage_path is None:
            self.storage_path = self.output.rstrip("/") + "-runs"
        problems = []
        if not 0 <= self.tc <= self.t_train or not 0 <= self.td or self.tc + self.td > self.t_train:
            problems.append(
                f"need 0 <= tc ({self.tc}) and tc + td ({self.tc + self.td}) <= t_train ({self.t_train})"
            )
        if self.image_size % 4 or self.local_size % 4 or not 4 <= self.local_size <= self.image_size:
            problems.append(
                f"image_size ({self.image_size}) and local_size ({self.local_size}) must be multiples of 4 "
                "with local_size <= image_size"
            )
        if not 1 <= self.hole_min <= self.hole_max <= self.local_size:
            problems.append(
                f"need 1 <= hole_min <= hole_max <= local_size, got {self.hole_min}..{self.hole_max}"
            )
        if self.num_workers < 1 or self.batch_size % self.num_workers:
            problems.append(
                f"batch_size ({self.batch_size}) must be a multiple of num_workers ({self.num_workers})"
            )
        for name in (
            "val_every",
            "checkpoint_every",
            "log_every",
            "keep_checkpoints",
            "val_limit",
            "min_epoch_steps",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if problems:
            raise ValueError("bad TrainConfig: " + "; ".join(problems))

    @property
    def hole_range(self) -> tuple[int, int]:
        return (self.hole_min, self.hole_max)

    def phase(self, step: int) -> int:
        """The phase that runs the update of ``step`` (0-based)."""
        if step < self.tc:
            return 1
        return 2 if step < self.tc + self.td else 3

    def run_uri(self) -> str:
        return storage.join_key(self.storage_path.rstrip("/"), self.run_name)


# ---------------------------------------------------------------------------------------------
# One update of each kind. Plain functions of modules and tensors, so tests can run them alone.


def crop_patches(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size`` x ``size`` local patch at ``boxes[:, :2]`` (y, x) of every image, gathered at once."""
    offsets = torch.arange(size, device=images.device)
    ys = (boxes[:, 0:1] + offsets)[:, :, None]  # (N, P, 1)
    xs = (boxes[:, 1:2] + offsets)[:, None, :]  # (N, 1, P)
    n = torch.arange(images.shape[0], device=images.device)[:, None, None]
    return images.permute(0, 2, 3, 1)[n, ys, xs].permute(0, 3, 1, 2)


@contextlib.contextmanager
def frozen(module: nn.Module):
    """No parameter of ``module`` records a gradient inside the block."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def bare(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return getattr(module, "module", module)


def complete(generator: nn.Module, images, masks, mean_pixel) -> tuple[torch.Tensor, torch.Tensor]:
    """``(raw network output, composited image)``: what the losses and the discriminator see."""
    output = generator(prepare_input(images, masks, mean_pixel))
    return output, composite(images, masks, output.to(images.dtype))


def completion_step(generator, optimizer, images, masks, mean_pixel) -> float:
    """Phase 1: one update of the completion network on the hole MSE."""
    output, _ = complete(generator, images, masks, mean_pixel)
    loss = hole_mse(output, images, masks)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def discriminator_step(discriminator, optimizer, images, completed, boxes, local_size: int) -> float:
    """One update of the context discriminator: real images vs completed (composited) ones.

    Real and fake go through one forward pass so BatchNorm normalises both with the same batch
    statistics (the discriminator cannot tell them apart by batch statistics alone) and DDP
    reduces once. ``completed`` is detached: this step never touches the completion network.
    """
    fake = completed.detach()
    both = torch.cat([images, fake])
    patches = crop_patches(both, torch.cat([boxes, boxes]), local_size)
    logits = discriminator(both, patches)
    n = images.shape[0]
    loss = discriminator_loss(logits[:n], logits[n:])
    # set_to_none: nothing but this loss contributes to the step below.
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def joint_generator_step(
    generator_optimizer, discriminator, output, completed, images, masks, boxes, local_size: int, alpha: float
) -> tuple[float, float]:
    """Phase 3: update the completion network on MSE + alpha * adversarial loss.

    The discriminator's bare module runs with its parameters frozen: the adversarial gradient
    flows through it into the completion network but leaves no ``.grad`` on it (and, outside DDP,
    no gradient all-reduce of the discriminator is triggered).
    """
    mse = hole_mse(output, images, masks)
    with frozen(bare(discriminator)) as critic:
        adversarial = generator_adversarial_loss(
            critic(completed, crop_patches(completed, boxes, local_size))
        )
    loss = mse + alpha * adversarial
    generator_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    generator_optimizer.step()
    return mse.item(), adversarial.item()


def make_optimizer(kind: str, params, lr: float) -> torch.optim.Optimizer:
    if kind == "adadelta":
        return torch.optim.Adadelta(params, lr=lr)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999))
    raise ValueError(f"unknown optimizer {kind!r}")


@torch.no_grad()
def evaluate(generator: nn.Module, images, masks, mean_pixel) -> tuple[dict[str, float], torch.Tensor]:
    """Hole L1, PSNR and SSIM of the completed validation images; also returns the completions."""
    module = bare(generator)
    was_training = module.training
    module.eval()
    try:
        _, completed = complete(module, images, masks, mean_pixel)
    finally:
        module.train(was_training)
    metrics = {
        "val_hole_l1": hole_l1(completed, images, masks).item(),
        "val_psnr": psnr(completed, images).mean().item(),
        "val_ssim": ssim(completed, images).mean().item(),
    }
    return metrics, completed


def progress_grid(images, masks, completed, mean_pixel, rows: int = 8) -> np.ndarray:
    """input | mask | output | truth, one validation image per row, as RGB uint8."""
    n = min(rows, images.shape[0])
    masked = prepare_input(images[:n], masks[:n], mean_pixel)[:, :3]
    columns = [masked, masks[:n].expand(-1, 3, -1, -1), completed[:n], images[:n]]
    grid = torch.cat([torch.cat(list(c.float().cpu()), dim=1) for c in columns], dim=2)  # (3, n*S, 4*S)
    return (grid.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def write_png(uri: str, rgb: np.ndarray, endpoint_url: str | None) -> None:
    import cv2

    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"could not encode {uri}")
    fs, path = storage.filesystem(uri, endpoint_url)
    storage.with_retries(lambda: storage.atomic_write_bytes(fs, path, encoded.tobytes()))


# ---------------------------------------------------------------------------------------------
# The Ray Train worker.


def _maybe_kill(env_name: str, step: int) -> None:
    """Test-only fault injection: die like a preempted worker (no cleanup, no exception)."""
    at = os.environ.get(env_name)
    marker = os.environ.get(KILL_MARKER_ENV)
    if at is None or int(at) != step or not marker or os.path.exists(marker):
        return
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        return
    with open(marker, "w") as f:
        f.write(f"{env_name}={step}\n")
    os._exit(1)


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


def endless_batches(shard, batch_size: int, keys_log: list | None) -> Iterator[tuple[list[str], np.ndarray]]:
    """Batches of this worker's shard, epoch after epoch (fresh random crops each epoch)."""
    epoch = 0
    while True:
        produced = 0
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True):
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


def to_tensor(images_u8: np.ndarray, device, channels_last: bool) -> torch.Tensor:
    # A copy: Ray hands out read-only views of its object store.
    x = torch.from_numpy(np.array(images_u8, copy=True)).to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    config = TrainConfig(**loop_config["config"])
    endpoint_url = loop_config["endpoint_url"]
    mean_pixel = tuple(loop_config["mean_pixel"])
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
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if config.precision == "bf16" and on_gpu
        else contextlib.nullcontext()
    )

    torch.manual_seed(config.seed)  # the same initial weights on every worker
    generator = CompletionNetwork(config.width).to(device, memory_format=memory_format)
    discriminator = ContextDiscriminator(config.image_size, config.local_size, config.width)
    discriminator = discriminator.to(device, memory_format=memory_format)
    opt_g = make_optimizer(config.optimizer, generator.parameters(), config.lr_g)
    opt_d = make_optimizer(config.optimizer, discriminator.parameters(), config.lr_d)

    start_step, best_l1 = 0, math.inf
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
        best_l1 = float(loaded.config.extra.get("best_val_hole_l1", math.inf))
        print(f"[rank {rank}] resumed from step {start_step} (phase {config.phase(start_step)})")

    generator = ray.train.torch.prepare_model(generator, move_to_device=False)
    discriminator = ray.train.torch.prepare_model(discriminator, move_to_device=False)

    val = loop_config.get("val")
    if val is not None and rank == 0:
        val_images = to_tensor(val["image"], device, config.channels_last)
        val_masks_np, _ = train_data.validation_masks(
            val["key"], seed=config.seed, image_size=config.image_size, local_size=config.local_size,
            hole_range=config.hole_range,
        )  # fmt: skip
        val_masks = torch.from_numpy(val_masks_np).to(device)

    run_uri = config.run_uri()
    per_worker_batch = config.batch_size // world
    keys_log: list[str] | None = [] if config.log_shard_keys else None
    batches = endless_batches(ray.train.get_dataset_shard("train"), per_worker_batch, keys_log)
    phase_ends = {config.tc, config.tc + config.td, config.t_train}
    # Rank 0's live figures: Ray metrics and <run>/_progress.json (pipeline.metrics).
    reporter = TrainReporter(config.run_name, run_uri, config.t_train, endpoint_url) if rank == 0 else None

    window_start, window_steps = time.perf_counter(), 0
    last: dict[str, float] = {}
    for step in range(start_step, config.t_train):
        phase = config.phase(step)
        keys, images_u8 = next(batches)
        masks_np, boxes_np = train_data.batch_masks(
            keys, step=step, seed=config.seed, image_size=config.image_size,
            local_size=config.local_size, hole_range=config.hole_range,
        )  # fmt: skip
        images = to_tensor(images_u8, device, config.channels_last)
        masks = torch.from_numpy(masks_np).to(device, non_blocking=True)
        boxes = torch.from_numpy(boxes_np).to(device)

        with autocast:
            if phase == 1:
                last = {"loss_mse": completion_step(generator, opt_g, images, masks, mean_pixel)}
            elif phase == 2:
                # The completion network is fixed in phase 2: its bare module, no graph.
                with torch.no_grad():
                    _, completed = complete(bare(generator).eval(), images, masks, mean_pixel)
                bare(generator).train()
                last = {
                    "loss_d": discriminator_step(
                        discriminator, opt_d, images, completed, boxes, config.local_size
                    )
                }
            else:
                output, completed = complete(generator, images, masks, mean_pixel)
                loss_d = discriminator_step(discriminator, opt_d, images, completed, boxes, config.local_size)
                mse, adversarial = joint_generator_step(
                    opt_g,
                    discriminator,
                    output,
                    completed,
                    images,
                    masks,
                    boxes,
                    config.local_size,
                    config.alpha,
                )
                last = {"loss_mse": mse, "loss_adv": adversarial, "loss_d": loss_d}
        if not all(math.isfinite(v) for v in last.values()):
            # Stop rather than checkpoint NaN weights over the last good ones.
            raise FloatingPointError(
                f"non-finite loss at step {step} (phase {phase}): {last}; lower the learning rates"
            )
        window_steps += 1
        done = step + 1  # steps completed: what a checkpoint taken now records
        _maybe_kill(KILL_AT_STEP_ENV, done)

        is_checkpoint = done % config.checkpoint_every == 0 or done in phase_ends
        is_val = val is not None and (done % config.val_every == 0 or done == config.t_train)
        if not (is_checkpoint or is_val or done % config.log_every == 0):
            continue

        elapsed = time.perf_counter() - window_start
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
            grid = progress_grid(val_images, val_masks, completed, mean_pixel)
            write_png(storage.join_key(run_uri, f"progress/step-{done:09d}.png"), grid, endpoint_url)
            if val_metrics["val_hole_l1"] < best_l1:
                best_l1 = val_metrics["val_hole_l1"]
                save_checkpoint(
                    storage.join_key(run_uri, "best"),
                    model_config(config, mean_pixel, done, {"val": val_metrics}),
                    generator,
                    endpoint_url=endpoint_url,
                )
        if best_l1 < math.inf:
            metrics["best_val_hole_l1"] = best_l1
        if reporter is not None:
            reporter.report(metrics, world=world, final=done == config.t_train)

        if is_checkpoint:
            with tempfile.TemporaryDirectory() as directory:
                reported = None
                if rank == 0:
                    save_checkpoint(
                        directory,
                        model_config(
                            config,
                            mean_pixel,
                            done,
                            {"best_val_hole_l1": best_l1, "attempt_start_step": start_step},
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
        else:
            ray.train.report(metrics)
        window_start, window_steps = time.perf_counter(), 0

    if keys_log is not None:
        import json

        fs, path = storage.filesystem(storage.join_key(run_uri, f"shards/rank-{rank}.json"), endpoint_url)
        storage.atomic_write_bytes(fs, path, json.dumps(sorted(keys_log)).encode())
    if rank == 0:
        save_checkpoint(
            config.output,
            model_config(config, mean_pixel, config.t_train, {}),
            generator,
            endpoint_url=endpoint_url,
        )


def model_config(config: TrainConfig, mean_pixel, step: int, extra: dict) -> ModelConfig:
    return ModelConfig(
        width=config.width,
        mean_pixel=mean_pixel,
        image_size=config.image_size,
        local_size=config.local_size,
        phase=config.phase(max(step - 1, 0)),
        step=step,
        extra={**extra, "train_config": to_dict(config)},
    )


# ---------------------------------------------------------------------------------------------
# The driver.


def run(config: TrainConfig) -> str:
    """Train and export; return the URI of the final completion-network checkpoint."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    print_config(config)
    if not ray.is_initialized():
        ray.init()
    endpoint_url = config.endpoint_url or storage.endpoint_url_from_env()

    uris = train_data.list_images(config.images, endpoint_url)
    if config.val_images:
        train_uris, val_uris = uris, train_data.list_images(config.val_images, endpoint_url)
        val_root = config.val_images
    else:
        train_uris, val_uris = train_data.split_validation(uris, config.val_fraction, config.seed)
        val_root = config.images
    print(f"{len(train_uris)} training images, {len(val_uris)} validation images")
    save_config(config, storage.join_key(config.run_uri(), "train_config.json"), endpoint_url)
    save_config(config, config.output.rstrip("/") + ".train_config.json", endpoint_url)

    started = time.perf_counter()
    mean_pixel = train_data.mean_pixel(train_uris, endpoint_url)
    print(
        f"mean pixel of the training set: {tuple(round(v, 4) for v in mean_pixel)} "
        f"({time.perf_counter() - started:.1f} s)"
    )
    val = None
    if val_uris:
        val = train_data.validation_arrays(
            val_uris, val_root, config.image_size, endpoint_url, config.val_limit
        )
    # Every epoch restarts the Ray Data pipeline (a fraction of a second); on a handful of photos
    # that would cost more than the steps themselves.
    copies = max(1, math.ceil(config.min_epoch_steps * config.batch_size / len(train_uris)))
    dataset = train_data.training_dataset(
        train_uris * copies, config.images, config.image_size, endpoint_url, num_cpus=config.data_cpus
    )

    storage_fs, storage_path = storage.pyarrow_filesystem(config.storage_path, endpoint_url)
    test_hooks = {k: v for k, v in os.environ.items() if k.startswith("GLCIC_TEST_")}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": dataclasses.asdict(config),
            "endpoint_url": endpoint_url,
            "mean_pixel": list(mean_pixel),
            "val": val,
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
    started = time.perf_counter()
    result = trainer.fit()
    print(f"training took {time.perf_counter() - started:.1f} s")
    if result.error is not None:
        raise result.error
    print(f"final metrics: {result.metrics}")
    print(f"exported the completion network to {config.output}")
    return config.output


def main(argv: list[str] | None = None) -> str:
    return run(parse_config(TrainConfig, argv))


if __name__ == "__main__":
    main()
