"""The completion network of Iizuka, Simo-Serra and Ishikawa (SIGGRAPH 2017), Table 1.

A fully convolutional encoder / dilated middle / decoder. Input: RGB in [0, 1] whose hole pixels
hold the training set's mean pixel, plus the mask (1 = hole) as a fourth channel. Output: RGB in
[0, 1]; only its hole pixels are used (``composite``).

``width`` scales every channel count (1.0 is the paper, about 6.07 M parameters); small widths
make the test and demo models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# (kind, kernel, dilation, stride, outputs) -- the paper's Table 1, row by row.
# "deconv" is a 4x4 transposed convolution with stride 1/2 (upsampling by 2).
COMPLETION_LAYERS: tuple[tuple[str, int, int, int, int], ...] = (
    ("conv", 5, 1, 1, 64),
    ("conv", 3, 1, 2, 128),
    ("conv", 3, 1, 1, 128),
    ("conv", 3, 1, 2, 256),
    ("conv", 3, 1, 1, 256),
    ("conv", 3, 1, 1, 256),
    ("dilated", 3, 2, 1, 256),
    ("dilated", 3, 4, 1, 256),
    ("dilated", 3, 8, 1, 256),
    ("dilated", 3, 16, 1, 256),
    ("conv", 3, 1, 1, 256),
    ("conv", 3, 1, 1, 256),
    ("deconv", 4, 1, 2, 128),
    ("conv", 3, 1, 1, 128),
    ("deconv", 4, 1, 2, 64),
    ("conv", 3, 1, 1, 32),
    ("output", 3, 1, 1, 3),
)

# The network downsamples twice by 2, so H and W must be multiples of 4.
SIZE_MULTIPLE = 4


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class CompletionNetwork(nn.Module):
    def __init__(self, width: float = 1.0, in_channels: int = 4):
        super().__init__()
        self.width = float(width)
        layers: list[nn.Module] = []
        c_in = in_channels
        for kind, k, dil, stride, c_out in COMPLETION_LAYERS:
            if kind == "output":
                layers += [nn.Conv2d(c_in, c_out, k, padding=k // 2), nn.Sigmoid()]
                continue
            c_out = scaled(c_out, width)
            if kind == "deconv":
                conv = nn.ConvTranspose2d(c_in, c_out, k, stride=stride, padding=1)
            else:
                conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=dil * (k // 2), dilation=dil)
            layers += [conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (N, 4, H, W), H and W multiples of 4. Returns (N, 3, H, W) in [0, 1]."""
        return self.net(x)

    @torch.no_grad()
    def complete(self, image: torch.Tensor, mask: torch.Tensor, mean_pixel: Sequence[float]) -> torch.Tensor:
        """Fill the holes of ``image`` (N, 3, H, W) in [0, 1] where ``mask`` (N, 1, H, W) is 1.

        Any H and W: the input is reflect-padded to a multiple of 4 and the output cropped back,
        never resized. Known pixels are returned exactly as given.
        """
        # One rule for what is a hole, shared by the input and the composite: any mask value > 0.
        mask = (mask > 0).to(image.dtype)
        x = prepare_input(image, mask, mean_pixel)
        x, (h, w) = pad_to_multiple(x, SIZE_MULTIPLE)
        out = self(x)[..., :h, :w]
        return composite(image, mask, out.to(image.dtype))


def prepare_input(image: torch.Tensor, mask: torch.Tensor, mean_pixel: Sequence[float]) -> torch.Tensor:
    """Replace hole pixels by the mean pixel and append the mask as a fourth channel."""
    mean = torch.as_tensor(mean_pixel, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    mask = mask.to(image.dtype)
    return torch.cat([image * (1 - mask) + mean * mask, mask], dim=1)


def composite(image: torch.Tensor, mask: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Known pixels from ``image``, hole pixels from ``output``.

    ``torch.where`` rather than arithmetic blending so known pixels come back bit for bit.
    """
    return torch.where(mask.bool(), output, image)


def pad_to_multiple(x: torch.Tensor, multiple: int = SIZE_MULTIPLE) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad the bottom/right of ``x`` to multiples of ``multiple``; return it and (H, W)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        # Reflect padding needs pad < size; images under 4 px wide fall back to replicate.
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


def padded_size(height: int, width: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    return (math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple)


def images_to_tensor(images: np.ndarray, device=None, channels_last: bool = False) -> torch.Tensor:
    """uint8 HxWx3 or NxHxWx3 RGB -> float32 (N, 3, H, W) in [0, 1], on ``device``.

    The uint8 pixels cross to the device (a quarter of the float bytes) and are converted there.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 HxWx3 or NxHxWx3 images, got {images.dtype} {images.shape}")
    batch = images[None] if images.ndim == 3 else images
    # A writable copy when needed: Ray hands out read-only views of its object store.
    source = torch.from_numpy(batch if batch.flags.writeable and batch.flags.c_contiguous else batch.copy())
    device = torch.device(device or "cpu")
    if device.type == "cuda":  # page-locked: the copy runs asynchronously, overlapping the host's work
        source = source.pin_memory()
    x = source.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def masks_to_tensor(masks: np.ndarray, device=None) -> torch.Tensor:
    """uint8 HxW or NxHxW masks (nonzero = hole) -> float32 (N, 1, H, W) in {0, 1}, on ``device``."""
    masks = np.asarray(masks)
    batch = masks[None] if masks.ndim == 2 else masks
    source = torch.from_numpy(np.ascontiguousarray(batch != 0))
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        source = source.pin_memory()
    return source.to(device, non_blocking=True).unsqueeze(1).float()


def tensor_to_images(images: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [0, 1] -> uint8 NxHxWx3.

    Rounds, so ``tensor_to_images(images_to_tensor(x)) == x`` exactly: known pixels that went
    through the network's composite come back bit for bit.
    """
    return (
        images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
