"""Training losses and validation metrics for the completion network and the discriminators.

The paper's objective (Sec. 3.4): the weighted MSE ``masked_mse`` (the squared error of the hole
pixels, averaged over every pixel of the image), plus ``alpha`` times the GAN loss of the context
discriminator. Images are float in [0, 1], NCHW; masks are (N, 1, H, W) with
1 = hole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _hole_mean(per_pixel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_pixel`` (N, C, H, W) over the hole pixels of every image of the batch."""
    mask = mask.to(per_pixel.dtype).expand_as(per_pixel)
    # clamp: a batch without any hole pixel has zero loss, not NaN.
    return (per_pixel * mask).sum() / mask.sum().clamp_min(1.0)


def masked_mse(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The paper's weighted MSE ``L(x, M) = ||M * (C(x, M) - x)||^2`` as a mean over *every*
    element (N x C x H x W) of the batch: the training loss of both generator phases.

    Averaging over the whole image, not the hole, keeps the balance against the adversarial loss
    that the paper's ``alpha`` = 0.0004 was tuned for. It equals ``hole_mse`` times the hole's
    share of the batch's pixels (about 0.19 for 96..128 px holes in 256 px crops).
    """
    mask = mask.to(torch.float32).expand_as(output)
    return ((output.float() - target.float()).square() * mask).mean()


def hole_mse(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The squared error averaged over hole pixels only (a metric; training uses ``masked_mse``)."""
    return _hole_mean((output.float() - target.float()).square(), mask)


def hole_l1(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _hole_mean((output.float() - target.float()).abs(), mask)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``-[log D(x) + log(1 - D(C(x)))]``: real images are 1, completed images 0."""
    real = F.binary_cross_entropy_with_logits(real_logits.float(), torch.ones_like(real_logits.float()))
    fake = F.binary_cross_entropy_with_logits(fake_logits.float(), torch.zeros_like(fake_logits.float()))
    return real + fake


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """``-log D(C(x))``: the non-saturating form of the paper's ``log(1 - D(C(x)))``.

    It has the same fixed point but strong gradients while the discriminator still wins easily,
    which is the usual situation right after phase 2 trained it alone.
    """
    return F.binary_cross_entropy_with_logits(fake_logits.float(), torch.ones_like(fake_logits.float()))


def psnr(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (N,), for images in [0, 1]."""
    mse = (output.float() - target.float()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def hole_psnr(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image (N,) over its hole pixels only (``hole_mse`` of each image); an image
    without a hole pixel scores the 1e-10 clamp's 100 dB."""
    mask = mask.to(torch.float32).expand_as(output)
    squared = (output.float() - target.float()).square() * mask
    mse = squared.flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1.0)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(output: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image (N,), Gaussian window, images in [0, 1].

    The window shrinks for images smaller than 11 px so tiny test images still get a score.
    """
    x, y = output.float(), target.float()
    channels = x.shape[1]
    window = min(window, x.shape[-2], x.shape[-1])
    w = _gaussian_window(window, sigma, channels, x.device, x.dtype)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)
