"""Scale: the real inpainting job over up to a million tiny images, then the same command again,
with the peak resident memory of the driver, the listing task, the actor and the manifest writers
beside the image count, the first run's images/s and the rerun's wall time.

    python bench/memory.py --counts 100000,1000000  # the table in BENCHMARKS.md (about 40 minutes)
    python bench/memory.py                          # 20,000 and 200,000 images
    python bench/memory.py --quick                  # a smoke run

The images are generated as PNG files in a temporary folder (1,000 per subfolder) and the job
(``jobs.inpaint.run``: listing, read/decode, inference actor, encode/write, Parquet manifest) runs
over them exactly as a user would run it, with a tiny network width so the run measures the
pipeline's bookkeeping rather than convolutions. Listing streams pages of keys, write tasks write
the manifest and the driver receives only counts, so memory should not grow with the number of
images: the JSON holds a timeline of the samples to check that, and the run at each count shows it
side by side. The rerun must add no manifest rows and skip every input (the script checks both).
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


def manifest_size(manifest: Path) -> tuple[int, int]:
    """(parts, bytes) of the manifest's Parquet files."""
    parts = list(manifest.rglob("part-*.parquet"))
    return len(parts), sum(p.stat().st_size for p in parts)


def run_once(args, count: int, work: Path, checkpoint: str) -> dict:
    from dataclasses import replace

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
        task_batch_size=args.task_batch_size,
        num_actors=1,
        num_cpus_per_actor=args.num_cpus_per_actor,
        num_cpus_per_task=args.num_cpus_per_task,
        manifest_rows_per_part=args.manifest_rows_per_part,
        log_every_s=30.0,
    )
    with common.PeakRSS(interval_s=args.sample_s) as rss:
        wall, summary = common.timed(lambda: run(config))
    parts, manifest_bytes = manifest_size(output / "_manifest")
    outputs = count_files(output) - count_files(output / "_manifest")
    if summary["counts"]["ok"] != count or outputs != count:
        raise RuntimeError(f"{count} images in, {summary['counts']} rows and {outputs} outputs out")
    # The same command again: every input is done, so it costs one listing pass (and the resume
    # index, read from the manifest) and adds no rows.
    with common.PeakRSS(interval_s=args.sample_s) as rerun_rss:
        rerun_wall, rerun = common.timed(lambda: run(replace(config)))
    rerun_parts, _ = manifest_size(output / "_manifest")
    if rerun["counts"] != {"ok": 0, "error": 0, "skipped": count} or rerun_parts != parts:
        raise RuntimeError(f"the rerun did work: {rerun['counts']}, {rerun_parts - parts} new parts")
    figures = {
        "images": count,
        "image_size": args.size,
        "generate_s": round(generate_s, 1),
        "wall_s": round(wall, 1),
        "images_per_s": round(count / wall, 1),
        "counts": summary["counts"],
        "outputs_written": outputs,
        **rss.figures(),
        "listing_peak_rss_mib": rss.task_peak_mib("list_todo"),
        "actor_peak_rss_mib": rss.task_peak_mib("InpaintPredictor"),
        "manifest_writer_peak_rss_mib": rss.task_peak_mib("ManifestSink", "Write"),
        "manifest_parts": parts,
        "manifest_bytes": manifest_bytes,
        "rerun_wall_s": round(rerun_wall, 2),
        "rerun_fraction_of_first": round(rerun_wall / wall, 4),
        "rerun_counts": rerun["counts"],
        "rerun_driver_peak_rss_mib": rerun_rss.figures()["driver_peak_rss_mib"],
        "rerun_listing_peak_rss_mib": rerun_rss.task_peak_mib("list_todo"),
        "rerun_resume_index_peak_rss_mib": rerun_rss.task_peak_mib("resume_index"),
        "worker_titles_peak_rss_mib": {k: round(v / 2**20, 1) for k, v in sorted(rss.title_peak.items())},
        "timeline": rss.timeline_mib(),
    }
    print(figures, flush=True)
    started = time.perf_counter()
    shutil.rmtree(images, ignore_errors=True)
    shutil.rmtree(output, ignore_errors=True)
    figures["delete_s"] = round(time.perf_counter() - started, 1)
    return figures


def s3_listing(count: int) -> dict:
    """List ``count`` keys from a real local S3 server (SeaweedFS) the way the listing task does,
    and time it: the per-request cost behind the 10 M / 100 M listing estimates."""
    import resource
    from concurrent.futures import ThreadPoolExecutor

    from embedded.servers import LocalS3Server
    from pipeline import storage

    server = LocalS3Server(buckets=("bench",)).start()
    saved = dict(os.environ)
    os.environ.update(server.env())  # its endpoint and credentials, as for the job's processes
    try:
        fs, root = storage.filesystem("s3://bench/keys", server.endpoint_url)
        paths = [f"{root}/d{i // PER_FOLDER:04d}/img{i:07d}.png" for i in range(count)]
        started = time.perf_counter()
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda p: fs.pipe_file(p, b"x"), paths))
        put_s = time.perf_counter() - started
        del paths
        fs.invalidate_cache()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        listed = pages = 0
        for page in storage.iter_object_pages(fs, root):
            listed += len(page)
            pages += 1
        list_s = time.perf_counter() - started
        grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved)
    if listed != count:
        raise RuntimeError(f"listed {listed} of {count} keys")
    return {
        "keys": count,
        "put_s": round(put_s, 1),
        "list_s": round(list_s, 2),
        "requests": pages,
        "ms_per_request": round(1000 * list_s / pages, 1),
        "keys_per_s": round(count / list_s),
        "peak_rss_growth_mib": round(grew_kib / 1024, 1),
        "dircache_entries": len(fs.dircache),
    }


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
    parser.add_argument("--task-batch-size", type=int, default=256, help="images per read and write task")
    parser.add_argument("--postprocess", action="store_true", help="the paper's post-processing too")
    parser.add_argument("--num-cpus-per-actor", type=float, default=0.5)
    parser.add_argument("--num-cpus-per-task", type=float, default=0.5)
    parser.add_argument("--manifest-rows-per-part", type=int, default=8192)
    parser.add_argument("--sample-s", type=float, default=0.5, help="seconds between RSS samples")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    parser.add_argument("--work-dir", default=None, help="where the images go (default: a temp dir)")
    parser.add_argument(
        "--s3-keys", type=int, default=100000, help="keys listed from a local S3 server (0: skip that part)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.counts, args.batch_size, args.s3_keys = args.counts or "500", 128, min(args.s3_keys, 2500)
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

    header = ["images", "first run s", "images/s", "driver peak MiB", "listing MiB", "actor MiB", "manifest writer MiB", "workers sum MiB", "all MiB", "manifest MiB", "rerun s", "rerun / first", "rerun driver MiB", "rerun listing MiB", "resume index MiB"]  # fmt: skip
    rows = [
        [
            r["images"],
            r["wall_s"],
            r["images_per_s"],
            r["driver_peak_rss_mib"],
            r["listing_peak_rss_mib"],
            r["actor_peak_rss_mib"],
            r["manifest_writer_peak_rss_mib"],
            r["workers_peak_rss_sum_mib"],
            r["all_processes_peak_rss_sum_mib"],
            round(r["manifest_bytes"] / 2**20, 1),
            r["rerun_wall_s"],
            f"{100 * r['rerun_fraction_of_first']:.1f}%",
            r["rerun_driver_peak_rss_mib"],
            r["rerun_listing_peak_rss_mib"],
            r["rerun_resume_index_peak_rss_mib"],
        ]  # fmt: skip
        for r in runs
    ]
    table = common.print_table(
        f"Bounded memory: {args.size}x{args.size} PNGs, width {args.width}, batch {args.batch_size}, "
        f"post-processing {'on' if args.postprocess else 'off'} (peak RSS)",
        header,
        rows,
    )
    figures = {"runs": runs, "table": table}
    if args.s3_keys:
        figures["s3_listing"] = s3_listing(args.s3_keys)
        print(f"S3 listing: {figures['s3_listing']}")
    return common.write_figures("memory", info, args, argv, figures)


if __name__ == "__main__":
    main()
