"""`glcic export`: the whole completion as one ONNX graph, run by onnxruntime without glcic or torch.

The shipped weights are exported by the console script as a user runs it, fp32 and fp16, and both
files are run with onnxruntime's CPU provider on three sizes (odd ones among them) and random masks
against the torch path (``CompletionNetwork.complete``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from model.completion import images_to_tensor, masks_to_tensor, tensor_to_images
from pipeline.checkpoint import GENERATOR_FILE, load_generator, resolve

REPO = Path(__file__).resolve().parent.parent
SIZES = ((1, 64, 64), (2, 37, 50), (3, 97, 130))  # (N, H, W)
TOLERANCE = {"fp32": 1, "fp16": 2}  # grey levels, in the hole


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("onnx")
    files = {}
    for precision, flags in (("fp32", []), ("fp16", ["--half"])):
        path = out / f"glcic-{precision}.onnx"
        result = subprocess.run(
            [sys.executable, "-m", "jobs.cli", "export", "--output", str(path), *flags],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert f"wrote {path}" in result.stdout and result.stderr == "", result.stderr
        files[precision] = path
    return files


def random_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """A rectangle and scattered pixels per image, of any nonzero value (nonzero = hole)."""
    masks = np.zeros((n, h, w), np.uint8)
    for i in range(n):
        top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
        masks[i, top : top + rng.integers(4, h // 2), left : left + rng.integers(4, w // 2)] = 255
        masks[i][rng.random((h, w)) < 0.05] = rng.integers(1, 256)
    return masks


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnx_file_matches_the_torch_path(exported, photos, precision):
    network, config, checkpoint_id = load_generator("default")
    session = ort.InferenceSession(str(exported[precision]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", "mask"]
    assert [o.name for o in session.get_outputs()] == ["completed"]
    rng = np.random.default_rng(0)
    for n, h, w in SIZES:
        images = np.stack([photos[i][i * 7 : i * 7 + h, i * 11 : i * 11 + w] for i in range(n)])
        masks = random_masks(rng, n, h, w)
        (completed,) = session.run(None, {"image": images, "mask": masks})
        assert completed.shape == (n, h, w, 3) and completed.dtype == np.uint8
        hole = masks > 0
        np.testing.assert_array_equal(completed[~hole], images[~hole])  # known pixels exact
        expected = tensor_to_images(
            network.complete(images_to_tensor(images), masks_to_tensor(masks), config.mean_pixel)
        )
        gap = np.abs(completed.astype(int) - expected.astype(int))[hole]
        assert gap.max() <= TOLERANCE[precision], (precision, (n, h, w), gap.max())
        assert np.abs(completed.astype(int) - images.astype(int))[hole].mean() > 1  # the hole was filled

    # What the file says about itself, read with onnx alone.
    model = onnx.load(str(exported[precision]))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["checkpoint_id"] == checkpoint_id and props["precision"] == precision
    assert props["width"] == str(config.width)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "height", "width", 3]


def test_fp16_file_is_the_size_of_its_weights(exported):
    weights = Path(resolve("default"), GENERATOR_FILE).stat().st_size  # the shipped fp16 safetensors
    assert exported["fp16"].stat().st_size <= weights + 100_000
    assert exported["fp32"].stat().st_size > 1.8 * exported["fp16"].stat().st_size
