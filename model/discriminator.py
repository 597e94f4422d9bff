"""The context discriminators of Iizuka, Simo-Serra and Ishikawa (SIGGRAPH 2017), Table 2.

The global discriminator sees the whole (training-size) image, the local one the patch around the
hole. Each ends in a 1024-wide fully connected layer; ``ContextDiscriminator`` concatenates both and
maps them to one logit per image (no sigmoid: trainers use ``BCEWithLogitsLoss``, which is stable
where sigmoid + BCE is not).

``width`` scales every channel count and the FC width, like ``CompletionNetwork``'s.
"""

from __future__ import annotations

import torch
from torch import nn

from model.completion import scaled

# (kernel, stride, outputs): every layer is a 5x5 stride-2 convolution + BatchNorm + ReLU.
GLOBAL_LAYERS: tuple[tuple[int, int, int], ...] = (
    (5, 2, 64),
    (5, 2, 128),
    (5, 2, 256),
    (5, 2, 512),
    (5, 2, 512),
    (5, 2, 512),
)
LOCAL_LAYERS: tuple[tuple[int, int, int], ...] = (
    (5, 2, 64),
    (5, 2, 128),
    (5, 2, 256),
    (5, 2, 512),
    (5, 2, 512),
)
FC_FEATURES = 1024

# Same constraint as the completion network, so any training size the generator accepts works.
SIZE_MULTIPLE = 4


def _feature_size(size: int, layers: int) -> int:
    """Spatial size after ``layers`` 5x5 stride-2 convolutions with padding 2 (ceil halving)."""
    for _ in range(layers):
        size = (size + 1) // 2
    return size


def _check_size(name: str, size: int) -> None:
    if size < SIZE_MULTIPLE or size % SIZE_MULTIPLE:
        raise ValueError(
            f"{name} must be a positive multiple of {SIZE_MULTIPLE} (paper: 256 and 128), got {size}"
        )


class _ConvFeatures(nn.Module):
    """Conv stack + FC: an image of ``size`` x ``size`` -> a ``scaled(1024)`` feature vector."""

    def __init__(self, layers: tuple[tuple[int, int, int], ...], size: int, width: float):
        super().__init__()
        self.size = size
        convs: list[nn.Module] = []
        c_in = 3
        for k, stride, c_out in layers:
            c_out = scaled(c_out, width)
            convs += [
                nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2),
                nn.BatchNorm2d(c_out),
                nn.ReLU(True),
            ]
            c_in = c_out
        self.convs = nn.Sequential(*convs)
        spatial = _feature_size(size, len(layers))
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in * spatial * spatial, scaled(FC_FEATURES, width)), nn.ReLU(True)
        )
        self.out_features = scaled(FC_FEATURES, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-2:] != (self.size, self.size):
            raise ValueError(
                f"{type(self).__name__} expects (N, 3, {self.size}, {self.size}) images, got {tuple(x.shape)}"
            )
        return self.fc(self.convs(x))


class GlobalDiscriminator(_ConvFeatures):
    def __init__(self, image_size: int = 256, width: float = 1.0):
        _check_size("image_size", image_size)
        super().__init__(GLOBAL_LAYERS, image_size, width)


class LocalDiscriminator(_ConvFeatures):
    def __init__(self, patch_size: int = 128, width: float = 1.0):
        _check_size("patch_size", patch_size)
        super().__init__(LOCAL_LAYERS, patch_size, width)


class ContextDiscriminator(nn.Module):
    def __init__(self, image_size: int = 256, patch_size: int = 128, width: float = 1.0):
        super().__init__()
        if patch_size > image_size:
            raise ValueError(f"patch_size {patch_size} is larger than image_size {image_size}")
        self.image_size, self.patch_size, self.width = image_size, patch_size, float(width)
        self.global_net = GlobalDiscriminator(image_size, width)
        self.local_net = LocalDiscriminator(patch_size, width)
        self.classifier = nn.Linear(self.global_net.out_features + self.local_net.out_features, 1)

    def forward(self, images: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """``images`` (N, 3, S, S) and ``patches`` (N, 3, P, P) in [0, 1] -> logits (N, 1)."""
        features = torch.cat([self.global_net(images), self.local_net(patches)], dim=1)
        return self.classifier(features)


def crop_patches(images: torch.Tensor, boxes, size: int | None = None) -> torch.Tensor:
    """The local discriminator's input: each image's ``(y, x, h, w)`` box (``RectangleMask.local_box``).

    One gather for the whole batch, so training on a GPU pays no per-image Python loop. Given
    ``size`` (square boxes of that side, as training draws them) nothing is checked on the host, so
    nothing waits for the device; without it the boxes are checked first (inside the image, all one
    size) and the size is read from them.
    """
    boxes = torch.as_tensor(boxes, dtype=torch.long, device=images.device).reshape(-1, 4)
    if size is not None:
        h = w = size
    else:
        listed = boxes.tolist()
        if len(listed) != images.shape[0]:
            raise ValueError(f"{len(listed)} boxes for {images.shape[0]} images")
        if len({(bh, bw) for _, _, bh, bw in listed}) > 1:
            raise ValueError(
                f"boxes must all have the same size, got {sorted({(bh, bw) for _, _, bh, bw in listed})}"
            )
        height, width = images.shape[-2:]
        for y, x, bh, bw in listed:
            if y < 0 or x < 0 or y + bh > height or x + bw > width:
                raise ValueError(f"box {(y, x, bh, bw)} is outside the {height}x{width} image")
        h, w = listed[0][2:] if listed else (0, 0)
    ys = (boxes[:, 0:1] + torch.arange(h, device=images.device))[:, :, None]  # (N, h, 1)
    xs = (boxes[:, 1:2] + torch.arange(w, device=images.device))[:, None, :]  # (N, 1, w)
    n = torch.arange(images.shape[0], device=images.device)[:, None, None]
    return images.permute(0, 2, 3, 1)[n, ys, xs].permute(0, 3, 1, 2)
