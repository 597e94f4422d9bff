"""The GAN maths of training (Iizuka et al. 2017, Sec. 3.4): one update of each kind, and evaluation.

Plain functions of modules and tensors, with no Ray and no storage, so tests run them alone and
``jobs/train.py`` only wires them to Ray Train (``train_step`` runs the update of one phase):

- phase 1, ``completion_step``: the completion network on the weighted MSE (``masked_mse``);
- phase 2, ``discriminator_step``: the context discriminator alone, real vs completed;
- phase 3, ``discriminator_step`` then ``joint_generator_step``: the completion network on
  masked MSE + alpha * adversarial loss through a frozen discriminator.

The discriminator always sees composited images (network output in the hole, input elsewhere),
real and fake concatenated in one batch (``context_logits``), in both networks' steps.

Every step takes ``autocast``, a zero-argument callable returning a context manager (e.g.
``functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)``): only the forward passes
and losses run inside it; backward and the optimizer step run outside, in the parameters' dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from model.completion import composite, prepare_input, tensor_to_images
from model.discriminator import crop_patches
from model.losses import (
    discriminator_loss,
    generator_adversarial_loss,
    hole_l1,
    hole_psnr,
    masked_mse,
    psnr,
    ssim,
)

Autocast = Callable[[], contextlib.AbstractContextManager]


def unwrap(module: nn.Module) -> nn.Module:
    """The bare module inside DistributedDataParallel (``.module``) and torch.compile (``._orig_mod``)
    wrappers, however nested; the module itself when it is not wrapped."""
    while True:
        inner = getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def wants_sync_batchnorm(world_size: int, device: torch.device | str) -> bool:
    """Whether training converts BatchNorm to SyncBatchNorm: only data-parallel over several GPUs.

    With N workers each BatchNorm would see batch_size / N images; SyncBatchNorm normalises over
    the whole batch, as the paper's single-GPU batch of 96 did. Not on CPU (gloo): SyncBatchNorm
    refuses CPU tensors, and one worker has nothing to synchronise.
    """
    return int(world_size) > 1 and torch.device(device).type == "cuda"


def sync_batchnorm(module: nn.Module, world_size: int, device: torch.device | str) -> nn.Module:
    """``module`` with SyncBatchNorm layers when ``wants_sync_batchnorm``, else itself. The
    parameter objects are kept (optimizers built on them stay valid) and so is the state dict."""
    if wants_sync_batchnorm(world_size, device):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Inside the block ``module`` is read-only: no parameter records a gradient, and no BatchNorm
    running statistic moves.

    Its BatchNorm layers stay in training mode, so they still normalise with the statistics of the
    batch at hand (what the module's own update does); momentum 0 keeps ``running_mean`` /
    ``running_var`` as they are (``(1 - 0) * running + 0 * batch``) and ``num_batches_tracked``
    is put back on exit.
    """
    flags = [p.requires_grad for p in module.parameters()]
    norms = _batchnorms(module)
    momenta = [m.momentum for m in norms]
    counts = [None if m.num_batches_tracked is None else m.num_batches_tracked.clone() for m in norms]
    for p in module.parameters():
        p.requires_grad_(False)
    for m in norms:
        m.momentum = 0.0
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        for m, momentum, count in zip(norms, momenta, counts, strict=True):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def complete(generator: nn.Module, images, masks, mean_pixel) -> tuple[torch.Tensor, torch.Tensor]:
    """``(raw network output, composited image)``: what the losses and the discriminator see."""
    output = generator(prepare_input(images, masks, mean_pixel))
    return output, composite(images, masks, output.to(images.dtype))


def phase2_fakes(
    generator: nn.Module, images, masks, mean_pixel, autocast: Autocast = contextlib.nullcontext
):
    """The completed images the discriminator learns on in phase 2, without a graph.

    The generator runs in *training* mode, as in phase 3 (where it is being trained): its
    BatchNorm layers normalise with the batch's statistics, so phase 2 trains the discriminator
    on exactly the kind of fakes it meets in phase 3. Eval mode (running statistics) would give
    it a different distribution of fakes, which switches at the start of phase 3. The running
    statistics still update (the bare module, no DDP buffer broadcast); with the weights fixed in
    phase 2 they only converge to the current weights' statistics, which eval mode later uses.
    """
    module = unwrap(generator)
    module.train()
    with torch.no_grad(), autocast():
        _, completed = complete(module, images, masks, mean_pixel)
    return completed


def completion_step(
    generator, optimizer, images, masks, mean_pixel, autocast: Autocast = contextlib.nullcontext
) -> float:
    """Phase 1: one update of the completion network on the weighted MSE (``masked_mse``)."""
    with autocast():
        output, _ = complete(generator, images, masks, mean_pixel)
        loss = masked_mse(output, images, masks)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def context_logits(discriminator, images, fake, boxes, local_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(real_logits, fake_logits)`` of the context discriminator on real and fake images
    concatenated into one batch (each image's local patch cropped from its ``boxes`` row).

    Both networks' steps go through here, so the discriminator's BatchNorm normalises every fake
    with the same batch statistics (those of real + fake) in the generator's adversarial loss as
    in its own update: the generator is scored by the discriminator that was trained, not by one
    that sees a fake-only batch's statistics (which alone could tell it the batch is fake).
    """
    both = torch.cat([images, fake.to(images.dtype)])
    patches = crop_patches(both, torch.cat([boxes, boxes]), local_size)
    logits = discriminator(both, patches)
    n = images.shape[0]
    return logits[:n], logits[n:]


def discriminator_step(
    discriminator,
    optimizer,
    images,
    completed,
    boxes,
    local_size: int,
    autocast: Autocast = contextlib.nullcontext,
) -> float:
    """One update of the context discriminator: real images vs completed (composited) ones.

    One forward pass of real + fake (``context_logits``), so DDP reduces once. ``completed`` is
    detached: this step never touches the completion network. BatchNorm running statistics update
    here (once per step, from the real + fake batch) and nowhere else.
    """
    with autocast():
        real_logits, fake_logits = context_logits(
            discriminator, images, completed.detach(), boxes, local_size
        )
        loss = discriminator_loss(real_logits, fake_logits)
    # set_to_none: nothing but this loss contributes to the step below.
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def joint_generator_step(
    generator_optimizer,
    discriminator,
    output,
    completed,
    images,
    masks,
    boxes,
    local_size: int,
    alpha: float,
    autocast: Autocast = contextlib.nullcontext,
) -> tuple[float, float]:
    """Phase 3: update the completion network on ``masked_mse + alpha * adversarial``.

    The adversarial loss scores the fake half of the same real + fake batch the discriminator
    trains on (``context_logits``), through the discriminator's bare module ``frozen``: the
    gradient flows through it into the completion network but leaves no ``.grad`` on it (and,
    outside DDP, no gradient all-reduce of the discriminator is triggered), and its BatchNorm
    layers normalise with the real + fake batch's statistics without moving their running
    statistics (those update only in ``discriminator_step``). ``output`` and ``completed`` come
    from a forward pass of the generator run under the same ``autocast``.
    """
    with autocast():
        reconstruction = masked_mse(output, images, masks)
        with frozen(unwrap(discriminator)) as critic:
            _, fake_logits = context_logits(critic, images, completed, boxes, local_size)
        adversarial = generator_adversarial_loss(fake_logits)
        loss = reconstruction + alpha * adversarial
    generator_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    generator_optimizer.step()
    return reconstruction.item(), adversarial.item()


def train_step(
    phase: int,
    generator,
    discriminator,
    opt_g,
    opt_d,
    images,
    masks,
    boxes,
    *,
    mean_pixel,
    local_size: int,
    alpha: float,
    autocast: Autocast = contextlib.nullcontext,
) -> dict[str, float]:
    """The update of one step of ``phase`` (1, 2 or 3); returns its losses by metric name."""
    if phase == 1:
        return {"loss_mse": completion_step(generator, opt_g, images, masks, mean_pixel, autocast)}
    if phase == 2:
        completed = phase2_fakes(generator, images, masks, mean_pixel, autocast)
        return {
            "loss_d": discriminator_step(discriminator, opt_d, images, completed, boxes, local_size, autocast)
        }
    if phase != 3:
        raise ValueError(f"no phase {phase!r}")
    with autocast():
        output, completed = complete(generator, images, masks, mean_pixel)
    loss_d = discriminator_step(discriminator, opt_d, images, completed, boxes, local_size, autocast)
    mse, adversarial = joint_generator_step(
        opt_g, discriminator, output, completed, images, masks, boxes, local_size, alpha, autocast
    )
    return {"loss_mse": mse, "loss_adv": adversarial, "loss_d": loss_d}


def make_optimizer(kind: str, params, lr: float) -> torch.optim.Optimizer:
    if kind == "adadelta":
        return torch.optim.Adadelta(params, lr=lr)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999))
    raise ValueError(f"unknown optimizer {kind!r}")


@torch.no_grad()
def evaluate(generator: nn.Module, images, masks, mean_pixel) -> tuple[dict[str, float], torch.Tensor]:
    """Hole L1, hole PSNR (the mean of each image's), whole-image PSNR and SSIM of the completed
    validation images, the raw network composited without post-processing; also returns the
    completions."""
    module = unwrap(generator)
    was_training = module.training
    module.eval()
    try:
        _, completed = complete(module, images, masks, mean_pixel)
    finally:
        module.train(was_training)
    metrics = {
        "val_hole_l1": hole_l1(completed, images, masks).item(),
        "val_hole_psnr": hole_psnr(completed, images, masks).mean().item(),
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
    return tensor_to_images(grid[None])[0]
