"""The evaluation job's scoring stage, its Parquet rows, its summary and its comparison grid.

``evaluate_batch`` runs as Ray Data tasks after the inference actors (which keep each row's input
pixels, ``InpaintPredictor(keep_images=True)``). For every image it builds the five results
``METHODS`` names on the same hole:

- ``model_raw``: the network's output composited into the input (post-processing off);
- ``model_post``: that output through the paper's post-processing as ``jobs.inpaint`` would run
  it with the same ``--postprocess-on`` on the same device (``POSTPROCESS_PATHS``): OpenCV's
  Telea fill + ``seamlessClone`` in the CPU write tasks (``writer``, ``model.postprocess.blend``),
  or the batched torch Poisson solve GPU actors run (``actor``, ``model.poisson.poisson_blend``,
  here on the scoring task's CPU: the same algorithm, to float rounding);
- ``telea`` / ``ns``: OpenCV's fast marching (Telea 2004) and Navier-Stokes fills of the hole,
  radius 3 as in the post-processing (``model.quality.inpaint_baseline``);
- ``patchmatch``: PyPatchMatch's patch-based fill (Barnes et al. 2009), the method the paper
  compares itself with, seeded so a rerun gives the same fill;

and scores each against the input (the truth) with ``model.quality.image_metrics``. Only the
small result rows (no pixels) leave the task. Nothing here raises on bad input: a row that cannot
be scored becomes an ``error`` row (``mask_no_hole``, ``evaluation_failed``).
"""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter

import cv2
import numpy as np
import pyarrow as pa

from pipeline.manifest import STATUS_ERROR, STATUS_OK

METHODS = ("model_raw", "model_post", "telea", "ns", "patchmatch")
METRIC_NAMES = ("psnr", "psnr_hole", "ssim", "hole_l1")  # model.quality.METRICS (no torch import here)
METRIC_COLUMNS = tuple(f"{method}_{metric}" for method in METHODS for metric in METRIC_NAMES)
BASELINE_METHODS = ("telea", "ns", "patchmatch")  # model.quality.BASELINES
TIMING_COLUMNS = ("read_s", "decode_s", "inference_s", "postprocess_s",
                  *(f"{method}_s" for method in BASELINE_METHODS), "metrics_s")  # fmt: skip

EVALUATION_SCHEMA = pa.schema(
    [
        ("input_key", pa.string()),  # relative to --images
        ("input_uri", pa.string()),
        ("mask_key", pa.string()),  # relative to --masks; null when generated
        ("mask_generator", pa.string()),  # null when read from --masks
        ("mask_seed", pa.int64()),
        ("width", pa.int32()),  # the input image's own size
        ("height", pa.int32()),
        ("eval_width", pa.int32()),  # the evaluated view (--crop; the image's size with --crop 0)
        ("eval_height", pa.int32()),
        ("hole_fraction", pa.float32()),  # of the evaluated view
        ("status", pa.string()),  # ok / error
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("checkpoint_id", pa.string()),
        *[(name, pa.float64()) for name in METRIC_COLUMNS],  # null unless ok
        *[(name, pa.float32()) for name in TIMING_COLUMNS],
    ]
)
EVALUATION_COLUMNS = tuple(EVALUATION_SCHEMA.names)

# The comparisons the product's bar is stated in: (method, reference).
COMPARISONS = (
    ("model_raw", "telea"),
    ("model_raw", "ns"),
    ("model_raw", "patchmatch"),
    ("model_post", "model_raw"),
    ("model_post", "telea"),
    ("model_post", "patchmatch"),
)


POSTPROCESS_PATHS = ("writer", "actor")


def postprocessed(image: np.ndarray, mask: np.ndarray, completed: np.ndarray, path: str) -> np.ndarray:
    """``completed`` post-processed as the inpainting job's ``path`` does it (``POSTPROCESS_PATHS``)."""
    if path == "writer":
        from model.postprocess import blend

        return blend(image, completed, mask)
    if path != "actor":
        raise ValueError(f"post-processing path must be one of {POSTPROCESS_PATHS}, not {path!r}")
    from model.completion import images_to_tensor, masks_to_tensor, tensor_to_images
    from model.poisson import poisson_blend

    blended = poisson_blend(images_to_tensor(image[None]), images_to_tensor(completed[None]),
                            masks_to_tensor(mask[None]))  # fmt: skip
    return tensor_to_images(blended)[0]


def method_results(
    image: np.ndarray,
    mask: np.ndarray,
    completed: np.ndarray,
    timings: dict | None = None,
    postprocess_path: str = "writer",
) -> dict[str, np.ndarray]:
    """The five ``METHODS``' uint8 results for one image, its hole ``mask`` and the network's
    composited ``completed`` image; ``timings`` (if given) gets each step's seconds."""
    from model.quality import inpaint_baseline

    timings = timings if timings is not None else {}
    results = {"model_raw": completed}
    start = time.perf_counter()
    results["model_post"] = postprocessed(image, mask, completed, postprocess_path)
    timings["postprocess_s"] = time.perf_counter() - start
    for method in BASELINE_METHODS:
        start = time.perf_counter()
        results[method] = inpaint_baseline(image, mask, method)
        timings[f"{method}_s"] = time.perf_counter() - start
    return results


def evaluate_batch(batch: dict[str, np.ndarray], postprocess_path: str = "writer") -> dict[str, np.ndarray]:
    """Score every ``ok`` row (``image``, ``mask``, ``completed``); return the rows without pixels."""
    from model.quality import image_metrics

    n = len(batch["input_key"])
    status = batch["status"].astype(object)
    error_type = batch["error_type"].astype(object)
    error_message = batch["error_message"].astype(object)
    metrics = {name: np.full(n, np.nan, dtype=np.float64) for name in METRIC_COLUMNS}
    timings = {name: np.zeros(n, dtype=np.float32) for name in TIMING_COLUMNS}
    for name in ("read_s", "decode_s", "inference_s"):
        timings[name][:] = batch[name]
    eval_height = np.zeros(n, dtype=np.int32)
    eval_width = np.zeros(n, dtype=np.int32)
    for i in range(n):
        if status[i] != STATUS_OK:
            continue
        image, mask, completed = batch["image"][i], batch["mask"][i], batch["completed"][i]
        eval_height[i], eval_width[i] = image.shape[:2]
        try:
            if not mask.any():
                raise ValueError("the mask has no hole: nothing to evaluate")
            steps: dict[str, float] = {}
            results = method_results(image, mask, completed, steps, postprocess_path)
            start = time.perf_counter()
            scores = image_metrics([results[m] for m in METHODS], image, mask)
            steps["metrics_s"] = time.perf_counter() - start
        except Exception as e:
            status[i] = STATUS_ERROR
            error_type[i] = "mask_no_hole" if not mask.any() else "evaluation_failed"
            error_message[i] = str(e) if not mask.any() else f"{type(e).__name__}: {e}"[:2000]
            continue
        for method, row in zip(METHODS, scores, strict=True):
            for metric, value in row.items():
                metrics[f"{method}_{metric}"][i] = value
        for name, seconds in steps.items():
            timings[name][i] = seconds
    keep = ("input_key", "input_uri", "mask_key", "mask_generator", "mask_seed", "width", "height",
            "hole_fraction", "checkpoint_id")  # fmt: skip
    out = {name: batch[name] for name in keep}
    out.update(
        status=status,
        error_type=error_type,
        error_message=error_message,
        eval_width=eval_width,
        eval_height=eval_height,
        **metrics,
        **timings,
    )
    return out


class SummaryAccumulator:
    """The run's summary from its result rows, streaming: sums and counts only, no rows kept."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.error_types: Counter = Counter()
        self.sums: Counter = Counter()
        self.valid: Counter = Counter()  # non-NaN values per metric column
        self.wins: Counter = Counter()  # per comparison and metric: images where the method is better
        self.stage_s: Counter = Counter()
        self.hole_fraction_sum = 0.0
        self.checkpoint_ids: set[str] = set()

    def add(self, batch: dict[str, np.ndarray]) -> None:
        status = np.asarray(batch["status"]).astype(str)
        self.counts.update(status.tolist())
        self.error_types.update(t for t in batch["error_type"].tolist() if t)
        self.checkpoint_ids.update(c for c in set(batch["checkpoint_id"].tolist()) if c)
        for name in TIMING_COLUMNS:
            self.stage_s[name] += float(np.sum(batch[name]))
        ok = status == STATUS_OK
        if not ok.any():
            return
        self.hole_fraction_sum += float(np.sum(np.asarray(batch["hole_fraction"], np.float64)[ok]))
        for name in METRIC_COLUMNS:
            values = np.asarray(batch[name], np.float64)[ok]
            finite = values[~np.isnan(values)]
            self.sums[name] += float(finite.sum())
            self.valid[name] += int(finite.size)
        for method, reference in COMPARISONS:
            for metric in METRIC_NAMES:
                a = np.asarray(batch[f"{method}_{metric}"], np.float64)[ok]
                b = np.asarray(batch[f"{reference}_{metric}"], np.float64)[ok]
                better = a < b if metric == "hole_l1" else a > b
                self.wins[(method, reference, metric)] += int(np.sum(better))

    def merge(self, other: SummaryAccumulator) -> None:
        """Add another accumulator's rows (a manifest part's, summed where it was written)."""
        for mine, theirs in (
            (self.counts, other.counts), (self.error_types, other.error_types), (self.sums, other.sums),
            (self.valid, other.valid), (self.wins, other.wins), (self.stage_s, other.stage_s),
        ):  # fmt: skip
            mine.update(theirs)
        self.hole_fraction_sum += other.hole_fraction_sum
        self.checkpoint_ids |= other.checkpoint_ids

    def mean(self, column: str) -> float:
        return self.sums[column] / self.valid[column] if self.valid[column] else math.nan

    def summary(self) -> dict:
        evaluated = self.counts.get(STATUS_OK, 0)
        methods = {m: {k: _round(self.mean(f"{m}_{k}")) for k in METRIC_NAMES} for m in METHODS}
        comparisons = {}
        for method, reference in COMPARISONS:
            a, b = methods[method], methods[reference]
            comparisons[f"{method}_vs_{reference}"] = {
                "psnr_delta_db": _round(a["psnr"] - b["psnr"]),
                "psnr_hole_delta_db": _round(a["psnr_hole"] - b["psnr_hole"]),
                "ssim_delta": _round(a["ssim"] - b["ssim"]),
                "hole_l1_ratio": _round(a["hole_l1"] / b["hole_l1"]) if b["hole_l1"] else None,
                # share of the evaluated images where the method beats the reference
                "psnr_hole_win_rate": _round(self.wins[(method, reference, "psnr_hole")] / evaluated)
                if evaluated
                else None,
                "hole_l1_win_rate": _round(self.wins[(method, reference, "hole_l1")] / evaluated)
                if evaluated
                else None,
            }
        return {
            "images": sum(self.counts.values()),
            "counts": {s: self.counts.get(s, 0) for s in (STATUS_OK, STATUS_ERROR)},
            "error_types": dict(self.error_types),
            "mean_hole_fraction": _round(self.hole_fraction_sum / evaluated) if evaluated else None,
            "methods": methods,
            "comparisons": comparisons,
            "stage_s": {k: round(v, 3) for k, v in self.stage_s.items()},
            "checkpoint_ids": sorted(self.checkpoint_ids),
        }


class FirstKeys:
    """The ``n`` smallest keys (with their URIs) among the ok rows seen: the grid's images."""

    def __init__(self, n: int):
        self.n = n
        self.items: list[tuple[str, str]] = []

    def add(self, batch: dict[str, np.ndarray]) -> None:
        if self.n:
            ok = [(str(k), str(u)) for k, u, s in zip(batch["input_key"], batch["input_uri"], batch["status"],
                                                      strict=True) if s == STATUS_OK]  # fmt: skip
            self.items = heapq.nsmallest(self.n, [*self.items, *ok])

    def merge(self, other: FirstKeys) -> None:
        self.items = heapq.nsmallest(self.n, [*self.items, *other.items])

    def entries(self) -> list[tuple[str, str]]:
        return sorted(self.items)


class EvaluationTotals:
    """What the driver keeps of an evaluation's rows, summed part by part where the parts are
    written (``pipeline.manifest_sink.ManifestDatasink``): the summary's sums and the grid's keys."""

    def __init__(self, grid_rows: int):
        self.parts = 0
        self.summary = SummaryAccumulator()
        self.first = FirstKeys(grid_rows)

    def empty(self) -> EvaluationTotals:
        return EvaluationTotals(self.first.n)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        self.summary.add(batch)
        self.first.add(batch)

    def merge(self, part: EvaluationTotals) -> None:
        self.parts += 1
        self.summary.merge(part.summary)
        self.first.merge(part.first)


def _round(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_markdown(summary: dict) -> str:
    """The summary as a Markdown report: one row per method, then the comparisons."""
    counts = summary["counts"]
    lines = [
        f"# glcic evaluation {summary.get('run_id', '')}".rstrip(),
        "",
        f"{summary['images']} images: {counts['ok']} evaluated, {counts['error']} errors"
        + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(summary['error_types'].items()))})" if summary["error_types"] else "")
        + f"; mean hole fraction {_fmt(summary['mean_hole_fraction'], 4)}; checkpoint "
        + (", ".join(summary["checkpoint_ids"]) or "-")
        + ".",
        "",
        *(
            [f"model_post: post-processed as submit-inpaint's `{summary['postprocess_path']}` path.", ""]
            if summary.get("postprocess_path")
            else []
        ),
        "| method | PSNR (dB) | hole PSNR (dB) | SSIM | hole L1 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for method, m in summary["methods"].items():
        lines.append(
            f"| {method} | {_fmt(m['psnr'], 2)} | {_fmt(m['psnr_hole'], 2)} | {_fmt(m['ssim'], 4)} "
            f"| {_fmt(m['hole_l1'], 4)} |"
        )
    lines += [
        "",
        "| comparison | PSNR delta (dB) | hole PSNR delta (dB) | SSIM delta | hole L1 ratio "
        "| hole PSNR win rate | hole L1 win rate |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, c in summary["comparisons"].items():
        lines.append(
            f"| {name.replace('_vs_', ' vs ')} | {_fmt(c['psnr_delta_db'], 2)} | {_fmt(c['psnr_hole_delta_db'], 2)} "
            f"| {_fmt(c['ssim_delta'], 4)} | {_fmt(c['hole_l1_ratio'], 3)} | {_fmt(c['psnr_hole_win_rate'], 3)} "
            f"| {_fmt(c['hole_l1_win_rate'], 3)} |"
        )
    lines += [
        "",
        "PSNR and SSIM over the whole evaluated image, hole PSNR and hole L1 over the hole pixels, all "
        "in [0, 1] scale (PSNR capped at 100 dB). Deltas are method minus reference of the means; the "
        "hole L1 ratio is method over reference (below 1: the method is closer to the truth).",
        "",
    ]
    return "\n".join(lines)


HOLE_COLOUR = (255, 255, 255)


GRID_PANELS = ("input with hole", "Telea", "PatchMatch", "glcic", "truth")


def grid_row(image: np.ndarray, mask: np.ndarray, completed: np.ndarray) -> list[np.ndarray]:
    """One grid row, ``GRID_PANELS``: the input with its hole painted white | Telea | PatchMatch |
    glcic (raw) | truth."""
    from model.quality import inpaint_baseline

    hole = mask.astype(bool)[..., None]
    masked = np.where(hole, np.array(HOLE_COLOUR, np.uint8), image)
    fills = [inpaint_baseline(image, mask, method) for method in ("telea", "patchmatch")]
    return [masked, *fills, completed, image]


def grid_image(rows: list[list[np.ndarray]], height: int = 256, gap: int = 2) -> np.ndarray:
    """Panels to one RGB uint8 image: each row's panels scaled to ``height`` px (aspect kept),
    ``gap`` px of black between panels, rows left-aligned and padded to the widest."""
    strips = []
    for panels in rows:
        scaled = []
        for p in panels:
            h, w = p.shape[:2]
            new_w = max(1, round(w * height / h))
            interp = cv2.INTER_AREA if height < h else cv2.INTER_NEAREST
            scaled.append(
                cv2.resize(p, (new_w, height), interpolation=interp) if (h, w) != (height, new_w) else p
            )
            scaled.append(np.zeros((height, gap, 3), np.uint8))
        strips.append(np.concatenate(scaled[:-1], axis=1))
    width = max(s.shape[1] for s in strips)
    out = np.zeros((len(strips) * (height + gap) - gap, width, 3), np.uint8)
    for r, strip in enumerate(strips):
        out[r * (height + gap) : r * (height + gap) + height, : strip.shape[1]] = strip
    return out
