"""One object per image against shards: the same images as files, as WebDataset tars and as
Parquet files, completed by the same job on local disk and on a local S3 server, side by side.

    python bench/shards.py --images 100000                 # the table in BENCHMARKS.md
    python bench/shards.py --images 100000 --big 1000000   # + 1,000,000 images as tars (local)
    python bench/shards.py                                 # 20,000 images
    python bench/shards.py --quick                         # a smoke run

For each store (a local folder; SeaweedFS over HTTP on 127.0.0.1, whose own metrics count every
request any process made) and each layout (files: 1,000 keys a folder; webdataset: tars of
``--shard-size`` samples, written by the ``webdataset`` library; parquet: img2dataset's columns),
the script measures (``packed``: files in, packed into tars by ``--output-layout webdataset``):

- listing: the job's own listing code run to the end in this process (seconds, requests);
- the first run (``jobs.inpaint.run``, a tiny random network and no post-processing, so the
  pipeline's bookkeeping is measured rather than convolutions): wall time, images/s, S3 requests
  per 1,000 images, the driver's peak RSS, the blocks Ray Data's read stage produced;
- the rerun (everything done: resuming skips it in the listing): wall time and requests.

``--big N`` adds N images as tars on local disk, first run and rerun, for the driver's memory at
that scale beside the smaller run's.
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

# packed: files in, tars out (--output-layout webdataset): one GET an image still, a PUT a shard.
LAYOUTS = ("files", "webdataset", "parquet", "packed")


def parse_args(argv: list[str] | None):
    parser = common.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20_000, help="images per layout and store")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per tar / Parquet file")
    parser.add_argument("--size", type=int, default=32, help="square image side, px")
    parser.add_argument("--stores", default="local,s3", help="local and/or s3 (SeaweedFS on 127.0.0.1)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--big", type=int, default=0, help="also this many images as local tars (0: none)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.shard_size, args.big = (
            min(args.images, 400),
            min(args.shard_size, 100),
            min(args.big, 0),
        )
    return args


def jpegs(count: int, size: int):
    """``count`` distinct JPEGs (photo crops, each with its index in its first pixels), streamed."""
    crops = common.photo_crops(min(count, 64), size)
    for i in range(count):
        rgb = crops[i % len(crops)].copy()
        rgb[0, :3] = [(i >> 16) & 255, (i >> 8) & 255, i & 255]
        yield f"{i:09d}", common.encode_jpeg(rgb)


def write_inputs(fs, root: str, layout: str, count: int, size: int, shard_size: int) -> None:
    """The images under ``root`` (on ``fs``) in ``layout``, a shard (or 1,000 files) at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    batch: list[tuple[str, bytes]] = []
    fs.makedirs(root, exist_ok=True)  # local disk: parents first (object stores have none)

    def flush(index: int) -> None:
        if layout == "files":
            fs.makedirs(f"{root}/{index:05d}", exist_ok=True)
            fs.pipe({f"{root}/{index:05d}/{key}.jpg": data for key, data in batch})
            return
        sink = io.BytesIO()
        if layout == "webdataset":
            with wds.TarWriter(sink) as writer:
                for key, data in batch:
                    writer.write({"__key__": key, "jpg": data, "json": b'{"source": "bench"}'})
        else:
            keys = [k for k, _ in batch]
            table = pa.table({"key": keys, "jpg": pa.array([d for _, d in batch], pa.binary()),
                              "caption": ["bench"] * len(keys), "status": ["success"] * len(keys)})  # fmt: skip
            pq.write_table(table, sink)
        suffix = ".tar" if layout == "webdataset" else ".parquet"
        fs.pipe_file(f"{root}/{index:05d}{suffix}", sink.getvalue())

    per = 1000 if layout == "files" else shard_size
    index = 0
    for key, data in jpegs(count, size):
        batch.append((key, data))
        if len(batch) == per:
            flush(index)
            index, batch = index + 1, []
    if batch:
        flush(index)


READ_STAGES = ("read_decode", "read_shard", "read_pack")


def listing(source: str, layout: str) -> tuple[float, int]:
    """Seconds and entries of the job's own listing, run to the end here."""
    from pipeline.listing import list_images

    started = time.perf_counter()
    entries = sum(len(page["key"]) for page in list_images({"source": [source]}, layout=layout))
    return time.perf_counter() - started, entries


def one_case(store: str, layout: str, count: int, args, work: Path, server, checkpoint: str) -> dict:
    import fsspec

    from jobs.config import InpaintConfig
    from jobs.inpaint import run

    if store == "s3":
        fs = server.filesystem()
        base = f"s3://bench/{layout}-{count}"
        root = base[len("s3://") :]
    else:
        fs = fsspec.filesystem("file")
        root = base = str(work / f"{layout}-{count}")
    source_layout = "files" if layout == "packed" else layout
    started = time.perf_counter()
    write_inputs(fs, f"{root}/in", source_layout, count, args.size, args.shard_size)
    prepared_s = time.perf_counter() - started

    def requests() -> int:
        return sum(server.request_counts().values()) if store == "s3" else 0

    before = requests()
    listing_s, entries = listing(f"{base}/in", source_layout)
    listing_requests = requests() - before
    config = InpaintConfig(
        images=f"{base}/in", output=f"{base}/out", checkpoint=checkpoint, postprocess=False, num_actors=1,
        log_every_s=60.0, max_side=0,
        output_format="same",  # JPEG in, JPEG out for every layout: the same encoding work
        output_layout="webdataset" if layout == "packed" else "same", shard_size=args.shard_size,
    )  # fmt: skip
    before = requests()
    with common.PeakRSS() as rss:
        wall, first = common.timed(lambda: run(config))
    first_requests = requests() - before
    before = requests()
    rerun_wall, rerun = common.timed(lambda: run(config))
    rerun_requests = requests() - before
    if first["counts"]["ok"] != count or rerun["counts"]["skipped"] != count:
        raise RuntimeError(
            f"{store}/{layout}: first {first['counts']}, rerun {rerun['counts']} for {count} images"
        )
    read_op = next((n for n in first["ray_data_blocks"] if any(s in n for s in READ_STAGES)), None)
    return {
        "store": store,
        "layout": layout,
        "images": count,
        "inputs_listed": entries,
        "prepare_s": round(prepared_s, 1),
        "listing_s": round(listing_s, 4),
        "listing_requests": listing_requests,
        "wall_s": round(wall, 1),
        "images_per_s": round(count / wall, 1),
        "requests_per_1000_images": round(1000 * first_requests / count, 1) if store == "s3" else None,
        "driver_peak_rss_mib": rss.figures()["driver_peak_rss_mib"],
        "read_stage_blocks": first["ray_data_blocks"].get(read_op) if read_op else None,
        "ray_data_blocks": first["ray_data_blocks"],
        "rerun_wall_s": round(rerun_wall, 1),
        "rerun_requests": rerun_requests if store == "s3" else None,
    }


def main(argv: list[str] | None = None) -> dict:
    from embedded.servers import LocalS3Server

    args = parse_args(argv)
    info = common.machine_info()
    work = Path(tempfile.mkdtemp(prefix="glcic-bench-shards-"))
    stores = args.stores.split(",")
    server = LocalS3Server(buckets=("bench",), metrics=True).start() if "s3" in stores else None
    try:
        if server is not None:
            import os

            os.environ.update(server.env())  # Ray's workers, started next, inherit the endpoint
        common.start_ray(num_cpus=args.num_cpus)
        checkpoint = common.random_checkpoint(str(work / "checkpoint"), 0.125)
        cases = [
            one_case(store, layout, args.images, args, work, server, checkpoint)
            for store in stores
            for layout in args.layouts.split(",")
        ]
        if args.big:
            cases.append(one_case("local", "webdataset", args.big, args, work, server, checkpoint))
        rows = [
            (c["store"], c["layout"], c["images"], c["listing_s"], c["listing_requests"], c["wall_s"],
             c["images_per_s"], c["requests_per_1000_images"], c["driver_peak_rss_mib"], c["read_stage_blocks"],
             c["rerun_wall_s"], c["rerun_requests"])
            for c in cases
        ]  # fmt: skip
        common.print_table(
            f"Files vs shards of {args.shard_size}, {args.size}x{args.size} px JPEGs, {info['cpus']} CPUs "
            f"(load {common.load_average()[0]:.1f})",
            ("store", "layout", "images", "listing s", "listing requests", "wall s", "images/s",
             "S3 requests / 1000 images", "driver peak MiB", "read-stage blocks", "rerun s", "rerun requests"),
            rows,
        )  # fmt: skip
        ratios = {}
        for store in stores:
            by = {c["layout"]: c for c in cases if c["store"] == store and c["images"] == args.images}
            if "files" not in by:
                continue
            for layout in ("webdataset", "parquet", "packed"):
                if layout not in by:
                    continue
                f, s = by["files"], by[layout]
                ratios[f"{store}/{layout}"] = {
                    "listing_s_files_over_shards": round(f["listing_s"] / max(s["listing_s"], 1e-6), 1),
                    "requests_files_over_shards": (
                        round(f["requests_per_1000_images"] / max(s["requests_per_1000_images"], 1e-6), 1)
                        if store == "s3"
                        else None
                    ),  # fmt: skip
                    "images_per_s_shards_over_files": round(s["images_per_s"] / f["images_per_s"], 2),
                    "blocks_files_over_shards": (
                        round(f["read_stage_blocks"] / s["read_stage_blocks"], 1)
                        if f["read_stage_blocks"] and s["read_stage_blocks"]
                        else None
                    ),  # fmt: skip
                }
        common.print_table(
            "Ratios (measured side by side above)",
            ("store/layout", "listing s files/shards", "S3 requests files/shards", "images/s shards/files",
             "blocks files/shards"),
            [(k, v["listing_s_files_over_shards"], v["requests_files_over_shards"],
              v["images_per_s_shards_over_files"], v["blocks_files_over_shards"]) for k, v in ratios.items()],
        )  # fmt: skip
        return common.write_figures("shards", info, args, argv, {"cases": cases, "ratios": ratios})
    finally:
        import ray

        ray.shutdown()
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
