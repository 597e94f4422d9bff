"""How far the manifest (what a rerun trusts) lags behind the outputs, by the CPUs a manifest
write task requests: the same sharded run with ``--manifest-num-cpus 0.25`` (the old default) and
``0`` (the default now), back to back in one process.

    python bench/commit_lag.py                      # 100 tars of 1,000 32 px JPEGs, 2 CPUs
    python bench/commit_lag.py --quick              # a smoke run

While each run goes, a thread counts every second the output shards on disk and the shards whose
manifest rows are in parts (a part holds whole shards). The gap between the two is what a killed
run would redo although its outputs were written; the issue (#22) allows only the shards in flight.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common


def parse_args(argv: list[str] | None):
    parser = common.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--settings", default="0.25,0", help="--manifest-num-cpus values to compare")
    args = parser.parse_args(argv)
    if args.quick:  # 5 shards of 200
        args.images, args.shard_size = 1000, 200
    return args


def committed_shards(manifest: Path) -> int:
    import pyarrow.parquet as pq

    shards = set()
    for part in manifest.glob("run_id=*/*.parquet"):
        try:
            shards.update(pq.read_table(part, columns=["shard"]).column("shard").to_pylist())
        except Exception:  # a part being renamed into place: counted next time
            continue
    return len(shards)


def one_run(inputs: Path, work: Path, checkpoint: str, sink_cpus: float) -> dict:
    from jobs.config import InpaintConfig
    from jobs.inpaint import run

    out = work / f"out-{sink_cpus}"
    config = InpaintConfig(
        images=str(inputs), output=str(out), checkpoint=checkpoint, postprocess=False, num_actors=1,
        log_every_s=60.0, max_side=0, output_format="same", manifest_num_cpus=sink_cpus,
    )  # fmt: skip
    timeline: list[tuple[float, int, int]] = []  # (s, shards written, shards committed)
    stop = threading.Event()

    def watch() -> None:
        start = time.perf_counter()
        while not stop.wait(1.0):
            # Parts before outputs: a shard's part lands after its output, so what is counted as
            # committed is always among what is counted as written a moment later.
            committed = committed_shards(out / "_manifest")
            written = len(list(out.glob("*.tar")))
            timeline.append((round(time.perf_counter() - start, 1), written, committed))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    wall, summary = common.timed(lambda: run(config))
    stop.set()
    watcher.join()
    gaps = [w - c for _, w, c in timeline]
    first = next((t for t, _, c in timeline if c > 0), None)
    return {
        "manifest_num_cpus": sink_cpus,
        "wall_s": round(wall, 1),
        "ok": summary["counts"]["ok"],
        "first_part_s": first,
        "max_uncommitted_shards": max(gaps, default=0),
        "mean_uncommitted_shards": round(sum(gaps) / max(1, len(gaps)), 1),
        "timeline": timeline,
    }


def main(argv: list[str] | None = None) -> dict:
    import fsspec

    from bench.shards import write_inputs

    args = parse_args(argv)
    info = common.machine_info()
    work = Path(tempfile.mkdtemp(prefix="glcic-bench-commit-"))
    try:
        inputs = work / "in"
        write_inputs(fsspec.filesystem("file"), str(inputs), "webdataset", args.images, 32, args.shard_size)
        common.start_ray(num_cpus=args.num_cpus)
        checkpoint = common.random_checkpoint(str(work / "checkpoint"), 0.125)
        runs = [one_run(inputs, work, checkpoint, float(c)) for c in args.settings.split(",")]
        shards = -(-args.images // args.shard_size)
        for r in runs:
            if r["ok"] != args.images:
                raise RuntimeError(
                    f"--manifest-num-cpus {r['manifest_num_cpus']}: {r['ok']} of {args.images} ok"
                )
        common.print_table(
            f"Manifest commit lag, {shards} tars of {args.shard_size}, {args.num_cpus} CPUs "
            f"(load {common.load_average()[0]:.1f})",
            ("--manifest-num-cpus", "wall s", "first part at s", "most shards written, not committed",
             "mean shards written, not committed"),
            [(r["manifest_num_cpus"], r["wall_s"], r["first_part_s"], r["max_uncommitted_shards"],
              r["mean_uncommitted_shards"]) for r in runs],
        )  # fmt: skip
        base = runs[0]
        common.print_table(
            "Ratios against the first setting (measured side by side above)",
            ("--manifest-num-cpus", "wall", "most uncommitted"),
            [(r["manifest_num_cpus"], round(r["wall_s"] / base["wall_s"], 2),
              round(r["max_uncommitted_shards"] / max(1, base["max_uncommitted_shards"]), 2)) for r in runs],
        )  # fmt: skip
        return common.write_figures("commit_lag", info, args, argv, {"runs": runs})
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
