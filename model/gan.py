"""The GAN maths of training (Iizuka et al. 2017, Sec. 3.4): one update of each kind, and evaluation.

Plain functions of modules and tensors, with no Ray and no storage, so tests run them alone and
``jobs/train.py`` only wires them to Ray Train:

- phase 1, ``completion_step``: the completion network on the hole MSE;
- phase 2, ``discriminator_step``: the context discriminator alone, real vs completed;
- phase 3, ``discriminator_step`` then ``joint_generator_step``: the completion network on
  MSE + alpha * adversarial loss through a frozen discriminator.

The discriminator always sees composited images (network output in the hole, input elsewhere).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from model.completion import composite, prepare_input, tensor_to_images
from model.discriminator import crop_patches
from model.losses import discriminator_loss, generator_adversarial_loss, hole_l1, hole_mse, psnr, ssim


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
    with frozen(unwrap(discriminator)) as critic:
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
    module = unwrap(generator)
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
    return tensor_to_images(grid[None])[0]
