"""What a rerun of a finished inpainting job costs, next to the first run, in one process.

    python bench/rerun.py                     # 2,000 inputs of 32x32 px on a local prefix
    python bench/rerun.py --images 20000      # more inputs
    python bench/rerun.py --quick             # a smoke run

The same command three times over the same inputs, on one local Ray:

1. first: every input is read, completed (a random width-0.125 checkpoint: the weights' values do
   not change the cost) and written, with one manifest row each;
2. rerun: resuming (the default) drops every input in the listing, so nothing is read, completed
   or written, and the run has no rows, only a ``_SUCCESS.json`` counting them as skipped;
3. half: half the outputs' manifest rows are forgotten (a new manifest prefix that holds only the
   first half of the first run's parts) and the command is rerun: it redoes exactly that half.

Reported: the wall time of each, the rerun's and the half rerun's wall time as a ratio of the
first's, the rows each run added to the manifest, and the manifest's bytes. Small images keep the
first run short, so the ratio is an upper bound: at larger images the first run costs more per
input and the rerun the same (it never opens an image).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common


def parse_args(argv: list[str] | None):
    parser = common.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="inputs (distinct JPEG files)")
    parser.add_argument("--size", type=int, default=32, help="square input side, px")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images = min(args.images, 60)
    return args


def make_inputs(root: Path, count: int, size: int) -> None:
    """``count`` distinct JPEGs: photo crops, each with its index written into its first pixels."""
    crops = common.photo_crops(min(count, 64), size)
    for i in range(count):
        rgb = crops[i % len(crops)].copy()
        rgb[0, :3] = [(i >> 16) & 255, (i >> 8) & 255, i & 255]
        folder = root / f"{i // 1000:04d}"  # 1,000 keys a folder, like a real bucket's layout
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:07d}.jpg").write_bytes(common.encode_jpeg(rgb))


def manifest_bytes(manifest: Path) -> int:
    return sum(p.stat().st_size for p in manifest.rglob("part-*.parquet"))


def main(argv: list[str] | None = None) -> dict:
    import pyarrow.parquet as pq

    from jobs.config import InpaintConfig
    from jobs.inpaint import run
    from pipeline.manifest import read_manifest

    args = parse_args(argv)
    info = common.machine_info()
    work = Path(tempfile.mkdtemp(prefix="glcic-bench-rerun-"))
    try:
        common.start_ray(num_cpus=args.num_cpus)
        images, output = work / "in", work / "out"
        make_inputs(images, args.images, args.size)
        checkpoint = common.random_checkpoint(str(work / "checkpoint"), 0.125)

        def config(manifest: Path) -> InpaintConfig:
            return InpaintConfig(
                images=str(images), output=str(output), manifest=str(manifest), checkpoint=checkpoint,
                postprocess=False, num_actors=1, log_every_s=60.0,
                manifest_rows_per_part=max(1, args.images // 10),  # parts to forget half of
                # blocks of at most a part's rows: the write tasks bundle whole blocks into parts
                task_batch_size=min(64, max(1, args.images // 20)),
            )  # fmt: skip

        manifest = output / "_manifest"
        wall_first, first = common.timed(lambda: run(config(manifest)))
        bytes_first = manifest_bytes(manifest)
        wall_rerun, rerun = common.timed(lambda: run(config(manifest)))
        rerun_rows = read_manifest(str(manifest), rerun["run_id"]).num_rows

        # Forget half of the work: a manifest that holds only the first run's parts up to half its
        # rows, and its _config.json (what a resume compares its settings with).
        half_manifest = work / "half_manifest"
        (first_dir,) = manifest.glob(f"run_id={first['run_id']}")
        (half_manifest / first_dir.name).mkdir(parents=True)
        shutil.copyfile(first_dir / "_config.json", half_manifest / first_dir.name / "_config.json")
        kept = 0
        for part in sorted(first_dir.glob("part-*.parquet")):
            if kept >= args.images // 2:
                break
            target = half_manifest / first_dir.name / part.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(part, target)
            kept += pq.read_metadata(part).num_rows
        wall_half, half = common.timed(lambda: run(config(half_manifest)))
        half_rows = read_manifest(str(half_manifest), half["run_id"]).num_rows

        n = args.images
        figures = {
            "first": {"wall_s": wall_first, "counts": first["counts"], "images_per_s": n / wall_first},
            "rerun": {"wall_s": wall_rerun, "counts": rerun["counts"], "rows_added": rerun_rows},
            "half": {
                "wall_s": wall_half,
                "counts": half["counts"],
                "rows_added": half_rows,
                "kept_rows": kept,
            },
            "rerun_over_first": wall_rerun / wall_first,
            "half_over_first": wall_half / wall_first,
            "manifest_bytes_after_first": bytes_first,
            "manifest_bytes_after_rerun": manifest_bytes(manifest),
        }
        rows = [
            ("first run", n, round(wall_first, 1), 1.0, first["counts"]["ok"], 0, n),
            ("rerun, all done", n, round(wall_rerun, 1), figures["rerun_over_first"], rerun["counts"]["ok"],
             rerun["counts"]["skipped"], rerun_rows),
            ("rerun, half done", n, round(wall_half, 1), figures["half_over_first"], half["counts"]["ok"],
             half["counts"]["skipped"], half_rows),
        ]  # fmt: skip
        common.print_table(
            f"Rerun cost, {n} inputs of {args.size}x{args.size} px, local prefix, "
            f"{info['cpus']} CPUs (load {common.load_average()[0]:.1f})",
            ("run", "inputs", "wall s", "wall / first run", "ok", "skipped", "manifest rows added"),
            rows,
        )
        return common.write_figures("rerun", info, args, argv, figures)
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
