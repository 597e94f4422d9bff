"""The evaluation job (jobs/evaluate.py) on a local Ray (2 CPUs), and its metric maths alone.

Inputs are the shipped photographs, shrunk; every number of one row is recomputed here directly
(OpenCV's Telea / Navier-Stokes, the trainer's loss functions, the generator in this process) and
must match the job's.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from jobs.config import EvaluateConfig
from model.completion import images_to_tensor, masks_to_tensor
from model.losses import hole_l1, psnr, ssim
from model.masks import rectangle_mask
from model.postprocess import blend
from model.quality import PSNR_CAP, image_metrics, inpaint_baseline
from pipeline.decode import decode_image, scale_and_crop
from pipeline.evaluation import EVALUATION_COLUMNS, METHODS, METRIC_COLUMNS, grid_image
from pipeline.manifest import read_manifest
from tests.helpers import write_objects

CROP, LOCAL, HOLES = 64, 32, (12, 28)


def jpeg(photo: np.ndarray, size: tuple[int, int]) -> bytes:
    sink = io.BytesIO()
    Image.fromarray(photo).resize(size, Image.LANCZOS).save(sink, format="JPEG", quality=92)
    return sink.getvalue()


def test_metrics_oracle_and_known_errors(photos):
    truth = np.ascontiguousarray(photos[0][100:164, 200:264])
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 20:52] = 1
    worse = truth.astype(int)
    worse[mask == 1] += np.where(worse[mask == 1] > 127, -10, 10)  # every hole value off by exactly 10
    worse = worse.astype(np.uint8)
    perfect, off = image_metrics([truth, worse], truth, mask)

    # The oracle: truth against itself.
    assert perfect == {"psnr": PSNR_CAP, "psnr_hole": PSNR_CAP, "ssim": pytest.approx(1.0), "hole_l1": 0.0}
    assert PSNR_CAP == pytest.approx(100.0)
    # Known errors: |diff| = 10/255 on every hole value.
    assert off["hole_l1"] == pytest.approx(10 / 255, rel=1e-5)
    assert off["psnr_hole"] == pytest.approx(20 * math.log10(255 / 10), rel=1e-5)
    # Known pixels agree, so whole-image PSNR is hole PSNR shifted by the hole fraction.
    assert off["psnr"] - off["psnr_hole"] == pytest.approx(-10 * math.log10(mask.mean()), abs=1e-4)
    assert off["ssim"] < 1
    # The definitions are the trainer's (model.gan.evaluate) on [0, 1] tensors.
    x, y, m = images_to_tensor(worse), images_to_tensor(truth), masks_to_tensor(mask)
    assert off["psnr"] == pytest.approx(float(psnr(x, y)[0]), abs=1e-5)
    assert off["ssim"] == pytest.approx(float(ssim(x, y)[0]), abs=1e-6)
    assert off["hole_l1"] == pytest.approx(float(hole_l1(x, y, m)), abs=1e-7)

    # Baselines fill only the hole and never see its truth; an empty hole has no hole metrics.
    for method in ("telea", "ns", "patchmatch"):
        filled = inpaint_baseline(truth, mask, method)
        np.testing.assert_array_equal(filled[mask == 0], truth[mask == 0])
        np.testing.assert_array_equal(filled, inpaint_baseline(worse, mask, method))
    (empty,) = image_metrics([truth], truth, np.zeros_like(mask))
    assert math.isnan(empty["hole_l1"]) and math.isnan(empty["psnr_hole"]) and empty["psnr"] == PSNR_CAP


def test_grid_image_shape():
    panels = [np.full((64, 64, 3), v, np.uint8) for v in (10, 20, 30, 40)]
    wide = [np.full((40, 80, 3), 50, np.uint8)] * 4
    grid = grid_image([panels, wide], height=32, gap=2)
    assert grid.shape == (2 * 32 + 2, max(4 * 32, 4 * 64) + 3 * 2, 3)


def patchmatch_direct(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """PyPatchMatch called as its README does, on the image as it is, seeded as the job seeds it."""
    import patchmatch

    patchmatch.set_random_seed(0)
    return patchmatch.inpaint(image, mask * 255, patch_size=3)


def recompute(data: bytes, key: str, checkpoint: str, seed: int = 0) -> tuple[dict, np.ndarray]:
    """Every metric of one input, computed here without Ray: the expected row."""
    from pipeline.inference import InpaintPredictor

    truth = scale_and_crop(decode_image(data), CROP, None)
    mask = rectangle_mask(CROP, CROP, seed=seed, key=key, hole_range=HOLES, local_size=LOCAL).mask
    raw = InpaintPredictor(checkpoint).complete([truth], [mask])[0]
    results = {
        "model_raw": raw,
        "model_post": blend(truth, raw, mask),
        # OpenCV directly, on the image as it is (the job's baseline zeroes the hole first).
        "telea": cv2.inpaint(truth, mask * 255, 3, cv2.INPAINT_TELEA),
        "ns": cv2.inpaint(truth, mask * 255, 3, cv2.INPAINT_NS),
        "patchmatch": patchmatch_direct(truth, mask),
    }
    y, m = images_to_tensor(truth), masks_to_tensor(mask)
    expected = {}
    for method, out in results.items():
        x = images_to_tensor(out)
        expected[f"{method}_psnr"] = float(psnr(x, y)[0])
        expected[f"{method}_ssim"] = float(ssim(x, y)[0])
        expected[f"{method}_hole_l1"] = float(hole_l1(x, y, m))
    return expected, mask


def test_evaluate_job_rows_summary_grid_and_rerun(ray_local, tmp_path, photos, tiny_checkpoint):
    from jobs.evaluate import run

    good = {f"p/{i:02d}.jpg": jpeg(photos[i], (128, 80)) for i in range(5)}
    good["p/wide.jpg"] = jpeg(photos[6], (160, 72))
    broken = {"p/corrupt.jpg": b"\xff\xd8\xff\xe0 this is no JPEG" * 20, "p/empty.png": b""}
    images = str(tmp_path / "in")
    write_objects(images, {**good, **broken})
    output = str(tmp_path / "eval")
    config = EvaluateConfig(
        images=images, output=output, checkpoint=tiny_checkpoint, crop=CROP, local_size=LOCAL,
        hole_min=HOLES[0], hole_max=HOLES[1], grid_rows=3, batch_size=4, task_batch_size=4, run_id="first",
    )  # fmt: skip
    summary = run(config)

    assert summary["counts"] == {"ok": len(good), "error": len(broken)}
    table = read_manifest(output, "first")
    assert set(EVALUATION_COLUMNS) <= set(table.column_names)
    rows = {r["input_key"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted([*good, *broken])  # one row per input
    assert rows["p/corrupt.jpg"]["error_type"] in ("not_an_image", "corrupt", "truncated")
    assert rows["p/empty.png"]["error_type"] == "empty"
    for key in broken:
        assert rows[key]["status"] == "error" and rows[key]["error_message"]
        assert all(rows[key][c] is None for c in METRIC_COLUMNS)
    for key in good:
        row = rows[key]
        assert row["status"] == "ok" and row["error_type"] is None, row
        assert (row["eval_width"], row["eval_height"]) == (CROP, CROP)
        assert all(math.isfinite(row[c]) for c in METRIC_COLUMNS), row
        assert row["telea_hole_l1"] > 0 and row["model_raw_psnr"] < PSNR_CAP
        assert 0 < row["hole_fraction"] <= (HOLES[1] / CROP) ** 2
        assert row["mask_generator"] == "rectangle" and row["mask_seed"] == 0
        assert row["inference_s"] > 0 and row["telea_s"] > 0 and row["metrics_s"] > 0
        assert row["patchmatch_s"] > 0 and row["patchmatch_hole_l1"] > 0
    assert (rows["p/wide.jpg"]["width"], rows["p/wide.jpg"]["height"]) == (160, 72)

    # One row recomputed from scratch: OpenCV directly, the generator here, the trainer's metrics.
    expected, mask = recompute(good["p/wide.jpg"], "p/wide.jpg", tiny_checkpoint)
    assert rows["p/wide.jpg"]["hole_fraction"] == pytest.approx(mask.mean())
    for name, value in expected.items():
        tolerance = 1e-4 if name.startswith("model") else 1e-6  # the network: another process, same maths
        assert rows["p/wide.jpg"][name] == pytest.approx(value, abs=tolerance), name

    # The summary: means of the rows, the comparisons in the bar's terms, JSON and Markdown.
    frame = table.to_pandas()
    ok = frame[frame.status == "ok"]
    for method in METHODS:
        for metric in ("psnr", "psnr_hole", "ssim", "hole_l1"):
            assert summary["methods"][method][metric] == pytest.approx(
                ok[f"{method}_{metric}"].mean(), abs=1e-5
            )
    raw_vs_telea = summary["comparisons"]["model_raw_vs_telea"]
    assert raw_vs_telea["psnr_delta_db"] == pytest.approx(
        ok.model_raw_psnr.mean() - ok.telea_psnr.mean(), abs=1e-5
    )
    assert raw_vs_telea["hole_l1_ratio"] == pytest.approx(
        ok.model_raw_hole_l1.mean() / ok.telea_hole_l1.mean(), rel=1e-4
    )
    assert set(summary["comparisons"]) >= {"model_raw_vs_telea", "model_post_vs_model_raw"}
    run_dir = Path(output, "run_id=first")
    saved = json.loads((run_dir / "_SUCCESS.json").read_text())
    assert saved["methods"] == summary["methods"] and saved["counts"] == summary["counts"]
    markdown = (run_dir / "_summary.md").read_text()
    assert "| method | PSNR (dB) | hole PSNR (dB) | SSIM | hole L1 |" in markdown
    assert all(f"| {method} |" in markdown for method in METHODS) and "| model_raw vs telea |" in markdown
    assert json.loads((run_dir / "_config.json").read_text())["crop"] == CROP
    # The grid: the first 3 ok keys; input with hole | Telea | PatchMatch | glcic | truth, CROP px
    # each, 2 px apart.
    assert summary["grid_keys"] == sorted(good)[:3]
    grid = np.asarray(Image.open(run_dir / "_grid.png"))
    assert grid.shape == (3 * CROP + 2 * 2, 5 * CROP + 4 * 2, 3)
    first_key = sorted(good)[0]
    first = scale_and_crop(decode_image(good[first_key]), CROP, None)
    np.testing.assert_array_equal(grid[:CROP, -CROP:], first)  # the truth column
    first_mask = rectangle_mask(CROP, CROP, seed=0, key=first_key, hole_range=HOLES, local_size=LOCAL).mask
    column = 2 * (CROP + 2)
    np.testing.assert_array_equal(grid[:CROP, column : column + CROP], patchmatch_direct(first, first_mask))
    # pandas reads the rows of every run under the output prefix (the underscore files are skipped).
    assert len(pd.read_parquet(output)) == len(rows)

    # A rerun scores the same holes: identical numbers.
    again = run(EvaluateConfig(**{**config.__dict__, "run_id": "second", "grid_rows": 0}))
    assert again["methods"] == summary["methods"] and again["grid"] is None
    second = read_manifest(output, "second").to_pandas().set_index("input_key").sort_index()
    first_rows = frame.set_index("input_key").sort_index()
    columns = ["status", "error_type", "hole_fraction", *METRIC_COLUMNS]
    pd.testing.assert_frame_equal(second[columns], first_rows[columns])
    with pytest.raises(ValueError, match="already exists"):
        run(config)


def test_masks_prefix_full_images(ray_local, tmp_path, photos, tiny_checkpoint):
    """--masks and --crop 0: the masks are used as they are, a missing or empty one is an error row."""
    from jobs.evaluate import run

    h, w = 40, 56
    hole = np.zeros((h, w), np.uint8)
    hole[8:24, 10:30] = 255
    images = {f"m/{name}.png": Image.fromarray(np.ascontiguousarray(photos[i][:h, 300 : 300 + w])) for i, name in enumerate(["good", "black", "missing"])}  # fmt: skip
    masks = {"m/good.png": Image.fromarray(hole), "m/black.png": Image.fromarray(np.zeros_like(hole))}

    def png(img: Image.Image) -> bytes:
        sink = io.BytesIO()
        img.save(sink, format="PNG")
        return sink.getvalue()

    write_objects(str(tmp_path / "in"), {k: png(v) for k, v in images.items()})
    write_objects(str(tmp_path / "masks"), {k: png(v) for k, v in masks.items()})
    summary = run(
        EvaluateConfig(images=str(tmp_path / "in"), masks=str(tmp_path / "masks"), output=str(tmp_path / "out"),
                       checkpoint=tiny_checkpoint, crop=0, grid_rows=1, run_id="m")
    )  # fmt: skip
    rows = {r["input_key"]: r for r in read_manifest(str(tmp_path / "out"), "m").to_pylist()}
    assert {k: r["error_type"] for k, r in rows.items()} == {
        "m/good.png": None,
        "m/black.png": "mask_no_hole",
        "m/missing.png": "mask_missing",
    }
    good = rows["m/good.png"]
    assert (good["eval_width"], good["eval_height"], good["mask_key"]) == (w, h, "m/good.png")
    assert good["hole_fraction"] == pytest.approx((hole > 0).mean())
    truth = np.asarray(images["m/good.png"])
    telea = cv2.inpaint(truth, hole, 3, cv2.INPAINT_TELEA)
    (expected,) = image_metrics([telea], truth, hole // 255)
    assert good["telea_psnr_hole"] == pytest.approx(expected["psnr_hole"], abs=1e-6)
    assert np.asarray(Image.open(Path(summary["grid"]))).shape == (h, 5 * w + 4 * 2, 3)


def test_model_post_is_scored_with_the_path_the_job_would_run(ray_local, tmp_path, photos, tiny_checkpoint):
    """On CPU actors submit-inpaint post-processes in the writer (OpenCV), on GPU actors with the
    torch Poisson blend: evaluate scores the one the job would use (``--postprocess-on``)."""
    from jobs.evaluate import run
    from model.completion import images_to_tensor, masks_to_tensor, tensor_to_images
    from model.poisson import poisson_blend
    from pipeline.evaluation import method_results

    truth = scale_and_crop(photos[0], CROP, None)
    mask = rectangle_mask(CROP, CROP, seed=0, key="x", hole_range=HOLES, local_size=LOCAL).mask
    raw = np.where(mask[..., None].astype(bool), 128, truth).astype(np.uint8)
    expected = tensor_to_images(poisson_blend(images_to_tensor(truth[None]), images_to_tensor(raw[None]),
                                              masks_to_tensor(mask[None])))[0]  # fmt: skip
    np.testing.assert_array_equal(
        method_results(truth, mask, raw, postprocess_path="actor")["model_post"], expected
    )
    np.testing.assert_array_equal(method_results(truth, mask, raw)["model_post"], blend(truth, raw, mask))

    images = str(tmp_path / "in")
    write_objects(images, {f"{i}.jpg": jpeg(photos[i], (128, 80)) for i in range(2)})
    base = dict(images=images, checkpoint=tiny_checkpoint, crop=CROP, local_size=LOCAL, hole_min=HOLES[0],
                hole_max=HOLES[1], grid_rows=0)  # fmt: skip
    on_cpu = run(EvaluateConfig(output=str(tmp_path / "cpu"), **base))
    as_gpu = run(EvaluateConfig(output=str(tmp_path / "gpu"), postprocess_on="actor", **base))
    assert (on_cpu["postprocess_path"], as_gpu["postprocess_path"]) == ("writer", "actor")
    assert on_cpu["methods"]["model_raw"] == as_gpu["methods"]["model_raw"]
    assert on_cpu["methods"]["model_post"] != as_gpu["methods"]["model_post"]
