"""The whole completion as one ONNX graph: uint8 image and mask in, uint8 completed image out.

GLCIC is convolutions, batch norm and ReLUs only (no FFT, no attention), so every step of
``CompletionNetwork.complete`` exports, and a user needs neither glcic nor torch to run it::

    image      uint8  N x H x W x 3  RGB
    mask       uint8  N x H x W      nonzero = hole
    completed  uint8  N x H x W x 3  RGB: the known pixels are the input's, bit for bit

Inside, as ``CompletionNetwork.complete`` and ``pipeline.inference.InpaintPredictor`` do it: the
hole filled with the training set's mean pixel, the mask as a fourth channel, reflect padding to
a multiple of 4, the network, the crop back, rounding to uint8 and the composite that keeps the
known pixels (on the uint8 values, so no float rounding can touch them). N, H and W are dynamic;
H and W must be at least 4 (reflect padding needs pad < size; the torch path falls back to
replicate padding below that, which no real image needs). ``half=True`` stores the weights and
runs the network in fp16 (half the file); the inputs and outputs stay uint8. The checkpoint's id,
width and mean pixel are in the file's metadata (``metadata_props``).

Needs the ``export`` extra (onnx, onnxscript: torch's exporter builds the graph with them).
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from model.completion import SIZE_MULTIPLE, CompletionNetwork

OPSET = 18
INPUT_NAMES = ("image", "mask")
OUTPUT_NAME = "completed"
MIN_SIDE = SIZE_MULTIPLE


class CompletionGraph(nn.Module):
    """``CompletionNetwork.complete`` on uint8 NHWC tensors: what the ONNX file computes."""

    def __init__(self, network: CompletionNetwork, mean_pixel, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.network = network.to(dtype).eval()
        self.dtype = dtype
        self.register_buffer("mean", torch.tensor(tuple(mean_pixel), dtype=dtype).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        known = image.permute(0, 3, 1, 2)
        hole = (mask > 0).unsqueeze(1)
        x = known.to(self.dtype) / 255
        m = hole.to(self.dtype)
        # model.completion.prepare_input and pad_to_multiple, with the shapes symbolic.
        x = torch.cat([x * (1 - m) + self.mean * m, m], dim=1)
        h, w = x.shape[-2], x.shape[-1]
        x = F.pad(x, (0, (-w) % SIZE_MULTIPLE, 0, (-h) % SIZE_MULTIPLE), mode="reflect")
        out = self.network(x)[..., :h, :w]
        # model.completion.tensor_to_images, then the composite on uint8 values.
        out = (out.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return torch.where(hole, out, known).permute(0, 2, 3, 1)


def export_onnx(
    network: CompletionNetwork,
    mean_pixel,
    path: str,
    *,
    half: bool = False,
    metadata: dict[str, str] | None = None,
    opset: int = OPSET,
) -> None:
    """Write ``network``'s whole completion (``CompletionGraph``) to the local file ``path``."""
    import onnx

    graph = CompletionGraph(network, mean_pixel, torch.float16 if half else torch.float32).eval()
    batch = torch.export.Dim("batch", min=1)
    height = torch.export.Dim("height", min=MIN_SIDE)
    width = torch.export.Dim("width", min=MIN_SIDE)
    # An example with odd sides, so the exporter sees padding and cropping happen.
    example = (torch.zeros(2, 37, 51, 3, dtype=torch.uint8), torch.zeros(2, 37, 51, dtype=torch.uint8))
    sizes = {0: batch, 1: height, 2: width}
    # The exporter's chatter (torchvision's ops it skips, axis renames, deprecations inside torch)
    # says nothing about this graph; onnx.checker below says whether the file is sound.
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                graph,
                example,
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"image": sizes, "mask": sizes},
                opset_version=opset,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
    finally:
        exporter_log.setLevel(level)
    model = program.model_proto
    onnx.helper.set_model_props(model, {"producer": "glcic", **(metadata or {})})
    onnx.checker.check_model(model)
    onnx.save_model(model, path)
