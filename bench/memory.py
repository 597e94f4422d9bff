"""Bounded memory: the real inpainting job over a few hundred thousand tiny images, with the peak
resident memory of the driver and of Ray's worker processes printed beside the image count.

    python bench/memory.py                      # 250,000 images of 16x16 (many minutes)
    python bench/memory.py --counts 25000,250000 # two counts: peaks that do not grow with the count
    python bench/memory.py --quick               # a smoke run

The images are generated as PNG files in a temporary folder (1,000 per subfolder) and the job
(``jobs.inpaint.run``: listing, read/decode, inference actor, encode/write, Parquet manifest) runs
over them exactly as a user would run it, with a tiny network width so the run measures the
pipeline's bookkeeping rather than convolutions. Listing streams pages of keys and only small status
rows come back to the driver, so memory should not grow with the number of images: the JSON holds
a timeline of the samples to check that, and the run at each count shows it side by side.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

PER_FOLDER = 1000


def write_tiny_images(root: Path, count: int, size: int) -> float:
    """``count`` distinct-looking ``size`` x ``size`` PNGs under ``root``; returns seconds taken."""
    import cv2

    started = time.perf_counter()
    # A few thousand different crops, reused round-robin: encoding is not what we measure here.
    crops = [
        cv2.imencode(".png", cv2.cvtColor(c, cv2.COLOR_RGB2BGR))[1].tobytes()
        for c in common.photo_crops(min(count, 2000), size, seed=size)
    ]
    for i in range(count):
        folder = root / f"d{i // PER_FOLDER:04d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:07d}.png").write_bytes(crops[i % len(crops)])
    return time.perf_counter() - started


def count_files(root: Path) -> int:
    total = 0
    for _, _, files in os.walk(root):
        total += sum(1 for f in files if not f.startswith("."))
    return total


def run_once(args, count: int, work: Path, checkpoint: str) -> dict:
    from jobs.config import InpaintConfig
    from jobs.inpaint import run

    images, output = work / f"images-{count}", work / f"completed-{count}"
    generate_s = write_tiny_images(images, count, args.size)
    print(f"wrote {count} {args.size}x{args.size} PNGs in {generate_s:.1f} s", flush=True)
    config = InpaintConfig(
        images=str(images),
        output=str(output),
        checkpoint=checkpoint,
        postprocess=args.postprocess,
        batch_size=args.batch_size,
        num_actors=1,
        num_cpus_per_actor=args.num_cpus_per_actor,
        num_cpus_per_task=args.num_cpus_per_task,
        manifest_rows_per_part=args.manifest_rows_per_part,
        log_every_s=30.0,
    )
    with common.PeakRSS(interval_s=args.sample_s) as rss:
        wall, summary = common.timed(lambda: run(config))
    outputs = count_files(output) - count_files(output / "_manifest")
    figures = {
        "images": count,
        "image_size": args.size,
        "generate_s": round(generate_s, 1),
        "wall_s": round(wall, 1),
        "images_per_s": round(count / wall, 1),
        "counts": summary["counts"],
        "outputs_written": outputs,
        **rss.figures(),
        "driver_lifetime_peak_rss_mib": round(
            (common.PeakRSS._status(os.getpid()) or {}).get("VmHWM", 0) / 2**20, 1
        ),
        "timeline": rss.timeline_mib(),
    }
    if summary["counts"]["ok"] != count or outputs != count:
        raise RuntimeError(f"{count} images in, {summary['counts']} rows and {outputs} outputs out")
    shutil.rmtree(images, ignore_errors=True)
    shutil.rmtree(output, ignore_errors=True)
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = common.base_parser(__doc__.split("\n")[0])
    parser.add_argument(
        "--counts",
        default=None,
        help="comma-separated image counts, one run each with the same settings (default: 20000,200000; "
        "--quick: 500)",
    )
    parser.add_argument("--size", type=int, default=16, help="image side in pixels")
    parser.add_argument("--width", type=float, default=0.125, help="network width multiplier")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--postprocess", action="store_true", help="the paper's post-processing too")
    parser.add_argument("--num-cpus-per-actor", type=float, default=0.5)
    parser.add_argument("--num-cpus-per-task", type=float, default=0.5)
    parser.add_argument("--manifest-rows-per-part", type=int, default=8192)
    parser.add_argument("--sample-s", type=float, default=0.5, help="seconds between RSS samples")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    parser.add_argument("--work-dir", default=None, help="where the images go (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.quick:
        args.counts, args.batch_size = args.counts or "500", 128
    counts = [int(c) for c in (args.counts or "20000,200000").split(",")]
    if not counts or min(counts) < 1:
        parser.error("--counts must be positive integers")

    info = common.machine_info()
    common.start_ray(num_cpus=args.num_cpus)
    work = Path(tempfile.mkdtemp(prefix="glcic-bench-memory-", dir=args.work_dir))
    try:
        checkpoint = common.random_checkpoint(str(work / "checkpoint"), args.width)
        runs = [run_once(args, count, work, checkpoint) for count in counts]
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    header = ["images", "wall s", "images/s", "driver peak MiB", "largest worker MiB", "workers sum MiB", "Ray system MiB", "all MiB"]  # fmt: skip
    rows = [
        [
            r["images"],
            r["wall_s"],
            r["images_per_s"],
            r["driver_peak_rss_mib"],
            r["worker_peak_rss_mib"],
            r["workers_peak_rss_sum_mib"],
            r["ray_system_peak_rss_sum_mib"],
            r["all_processes_peak_rss_sum_mib"],
        ]  # fmt: skip
        for r in runs
    ]
    table = common.print_table(
        f"Bounded memory: {args.size}x{args.size} PNGs, width {args.width}, batch {args.batch_size}, "
        f"post-processing {'on' if args.postprocess else 'off'} (peak RSS)",
        header,
        rows,
    )
    return common.write_figures("memory", info, args, argv, {"runs": runs, "table": table})


if __name__ == "__main__":
    main()
