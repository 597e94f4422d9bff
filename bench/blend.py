"""The paper's post-processing: OpenCV's ``blend`` (one image at a time) vs the batched torch Poisson
blend (``model.poisson``), side by side in one run.

    python bench/blend.py                       # 256 and 512, batch 32, CPU (and CUDA if visible)
    python bench/blend.py --no-cuda             # CPU only even where a GPU is visible
    python bench/blend.py --quick               # a smoke run

For each image size the same ``--batch`` photo crops, each with a rectangular hole of random sides
in ``--hole-min``..``--hole-max`` px at a random place, and a flawed completion in the hole (the
truth with a colour cast and a blur, composited as ``model.completion.composite`` does) go through:

1. ``opencv``: ``model.postprocess.blend`` (Telea fill + ``cv2.seamlessClone``), one image after
   the other, uint8 in and out, as the writer stage calls it;
2. ``torch_cpu``: ``model.poisson.poisson_solve`` on the whole batch as float (N, 3, H, W) tensors
   already in memory (as in the inference actor), with torch's threads;
3. ``torch_cuda`` (when torch sees a GPU): the same on the GPU, timed between
   ``torch.cuda.synchronize()`` calls after one warm-up batch.

Reported: ms per image (median of ``--repeats``, with their spread), the most CG iterations an
image needed, and the mean |difference| in the holes between the torch result (rounded to uint8)
and OpenCV's, in 1/255 units. The default tolerance of the solver is used throughout.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench import common

CAST = np.array([30, -20, 25])


def parse_args(argv: list[str] | None):
    parser = common.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256,512", help="comma-separated square image sizes")
    parser.add_argument("--batch", type=int, default=32, help="images per size (one torch batch)")
    parser.add_argument("--hole-min", type=int, default=64, help="smallest hole side, px")
    parser.add_argument("--hole-max", type=int, default=128, help="largest hole side, px")
    parser.add_argument("--repeats", type=int, default=3, help="repeats; medians are reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the GPU even if one is visible")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.batch, args.hole_min, args.hole_max, args.repeats = "64", 4, 8, 24, 1
    args.size_list = [int(s) for s in args.sizes.split(",")]
    if args.batch < 1 or args.repeats < 1 or not 1 <= args.hole_min <= args.hole_max <= min(args.size_list):
        parser.error("--batch, --repeats >= 1 and 1 <= --hole-min <= --hole-max <= every size")
    return args


def inputs(size: int, args) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W, 3) flawed completions and (N, H, W) masks."""
    import cv2

    rng = np.random.default_rng(size)
    completed, masks = [], []
    for truth in common.photo_crops(args.batch, size, seed=size):
        h, w = (int(v) for v in rng.integers(args.hole_min, args.hole_max + 1, size=2))
        y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        mask = np.zeros((size, size), np.uint8)
        mask[y : y + h, x : x + w] = 1
        flawed = np.clip(cv2.GaussianBlur(truth, (0, 0), 2).astype(np.int16) + CAST, 0, 255).astype(np.uint8)
        completed.append(np.where(mask[..., None] > 0, flawed, truth))
        masks.append(mask)
    return np.stack(completed), np.stack(masks)


def run_opencv(completed: np.ndarray, masks: np.ndarray) -> tuple[float, np.ndarray]:
    from model.postprocess import blend

    start = time.perf_counter()
    out = np.stack([blend(c, c, m) for c, m in zip(completed, masks, strict=True)])
    return time.perf_counter() - start, out


def run_torch(completed: np.ndarray, masks: np.ndarray, device: str, warm_up: bool):
    import torch

    from model.poisson import poisson_solve

    image = torch.from_numpy(completed).permute(0, 3, 1, 2).float().div(255).to(device)
    mask = torch.from_numpy(masks)[:, None].float().to(device)

    def once():
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = poisson_solve(image, image, mask)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, result

    if warm_up:
        once()
    seconds, result = once()
    out = (result.image * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return seconds, out, int(result.iterations.max())


def hole_mad(a: np.ndarray, b: np.ndarray, masks: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32))[masks > 0].mean())


def main(argv: list[str] | None = None) -> dict:
    import torch

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.no_cuda else [])
    info = common.machine_info("cuda" if "cuda" in devices else "cpu")
    results = {}
    for size in args.size_list:
        completed, masks = inputs(size, args)
        runs: dict[str, list[float]] = {"opencv": [], **{f"torch_{d}": [] for d in devices}}
        r: dict = {}
        for repeat in range(args.repeats):
            seconds, reference = run_opencv(completed, masks)
            runs["opencv"].append(seconds)
            for d in devices:
                seconds, out, iterations = run_torch(completed, masks, d, warm_up=repeat == 0)
                runs[f"torch_{d}"].append(seconds)
                r[f"torch_{d}_cg_iterations_max"] = iterations
                r[f"torch_{d}_mad_vs_opencv"] = hole_mad(out, reference, masks)
        r["raw_mad_vs_opencv"] = hole_mad(completed, reference, masks)
        for name, secs in runs.items():
            r[name] = {
                "ms_per_image": 1e3 * common.median(secs) / args.batch,
                "repeats_ms_per_image": [1e3 * s / args.batch for s in secs],
                "spread": common.spread(secs),
            }
        results[size] = r
        print(f"{size}x{size}: " + ", ".join(f"{k} {v['ms_per_image']:.2f} ms/img" for k, v in r.items() if isinstance(v, dict)), flush=True)  # fmt: skip
    return report(results, info, args, devices, argv)


def report(results: dict, info: dict, args, devices: list[str], argv) -> dict:
    header = ["size", "holes px", "batch", "opencv ms/img"]
    for d in devices:
        header += [f"torch {d} ms/img", f"opencv/torch {d}", f"{d} CG iters max", f"{d} vs opencv /255"]
    header += ["raw vs opencv /255", "spread"]
    rows = []
    for size, r in results.items():
        row = [f"{size}x{size}", f"{args.hole_min}-{args.hole_max}", args.batch, r["opencv"]["ms_per_image"]]
        for d in devices:
            t = r[f"torch_{d}"]["ms_per_image"]
            row += [t, r["opencv"]["ms_per_image"] / t, r[f"torch_{d}_cg_iterations_max"], r[f"torch_{d}_mad_vs_opencv"]]  # fmt: skip
        spread = max(v["spread"] for v in r.values() if isinstance(v, dict))
        rows.append(row + [r["raw_mad_vs_opencv"], f"{spread:.0%}"])
    where = info["cpu"] + (f" + {info['gpu']}" if "gpu" in info else "")
    import torch

    title = (
        f"Post-processing ms per image: OpenCV blend one at a time vs batched torch Poisson blend "
        f"({where}, {torch.get_num_threads()} torch threads, median of {args.repeats})"
    )
    table = common.print_table(title, header, rows)
    return common.write_figures(
        "blend", info, args, argv,
        {"devices": devices, "results": {str(k): v for k, v in results.items()}, "tables": [table]},
        skip=("size_list",),
    )  # fmt: skip


if __name__ == "__main__":
    main()
