"""Training input per CPU core: what a training step needs from the CPU, streamed vs resident.

Side by side in one run, single-threaded, on the shipped photographs (full size, as they are
stored): the streamed path (``crop_images``: decode the JPEG, rescale, crop, every epoch), the
resident path (``ResidentImages``: the photos decoded and scaled once, each crop cut and resized
from that copy), and the seeded masks every step draws (rectangle and freeform). Each figure is
crops (or masks) per second per core; the table multiplies them out to what a 16-core GPU node
feeds, against the ~2,000 crops/s an H200 trains on at 256 px (issue #20's estimate).

    python bench/train_input.py [--size 256] [--photos 48] [--crops 960]
"""

from __future__ import annotations

import io
import os
import time

import common

NODE_CORES = 16
GPU_CROPS_PER_S = 2000  # an H200 in bf16 at batch 96, 256 px: 65 GFLOP x 3 a crop (phase 1)


def per_second(fn, count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        fn(i)
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = common.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="crop side (paper: 256)")
    parser.add_argument("--photos", type=int, default=48, help="shipped photos read")
    parser.add_argument("--crops", type=int, default=960, help="crops (and masks) per measurement")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.photos, args.crops = 64, 6, 48
    import cv2
    import numpy as np

    from pipeline.decode import crop_scaled, decode_image, scale_and_crop, scale_for_crops
    from pipeline.train_data import batch_masks

    cv2.setNumThreads(1)  # one core, as one Ray task or the prefetch thread runs
    info = common.machine_info()
    paths = sorted(common.PHOTOS.glob("*.jpg"))[: args.photos]
    blobs = [p.read_bytes() for p in paths]
    rng = np.random.default_rng(0)
    size = args.size

    streamed = per_second(
        lambda i: scale_and_crop(decode_image(blobs[i % len(blobs)]), size, rng), args.crops
    )
    # The same photos as samples of one WebDataset tar (pipeline/train_shards.py): the shard read
    # once and taken apart, each sample decoded, rescaled and cropped; and the survey's pass over
    # it (sample keys only, nothing decoded), per sample.
    import tarfile
    import tempfile

    from pipeline.train_shards import ShardInput, sample_keys, shard_images

    tar_path = os.path.join(tempfile.mkdtemp(prefix="glcic-bench-"), "00000.tar")
    with tarfile.open(tar_path, "w") as archive:
        for i, blob in enumerate(blobs):
            info_ = tarfile.TarInfo(f"{i:06d}.jpg")
            info_.size = len(blob)
            archive.addfile(info_, io.BytesIO(blob))
    tar_input = ShardInput("webdataset")
    passes = max(1, args.crops // len(blobs))
    start = time.perf_counter()
    for _ in range(passes):
        for _key, image in shard_images("00000.tar", tar_path, tar_input, lambda uri: True):
            scale_and_crop(image, size, rng)
    from_tar = passes * len(blobs) / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(passes):
        sample_keys("00000.tar", tar_path, tar_input, None)
    survey_per_s = passes * len(blobs) / (time.perf_counter() - start)

    started = time.perf_counter()
    scaled = [scale_for_crops(decode_image(b), size) for b in blobs]
    load_s = time.perf_counter() - started
    resident = per_second(lambda i: crop_scaled(scaled[i % len(scaled)], size, rng), args.crops)

    def masks_per_s(kind: str) -> float:
        keys = [f"k{i}" for i in range(96)]  # a step's batch, as the worker draws them
        steps = max(1, args.crops // len(keys))
        start = time.perf_counter()
        for step in range(steps):
            batch_masks(
                keys, step=step, seed=0, image_size=size, local_size=size // 2,
                hole_range=(size * 3 // 8, size // 2), kind=kind,
            )  # fmt: skip
        return steps * len(keys) / (time.perf_counter() - start)

    rectangle, freeform = masks_per_s("rectangle"), masks_per_s("freeform")

    # What the training worker runs: whole steps' inputs (crops + masks) from a resident set, made
    # by 1 and by all the cores' threads at once (prefetched_map), batch 96.
    from pipeline.train_data import ResidentImages, prefetched_map

    held = ResidentImages([f"k{i}" for i in range(len(scaled))], scaled, size, seed=0)
    batch = min(96, len(scaled))
    steps = max(2, args.crops // batch)

    def step_input(step: int):
        keys, crops = held.batch(step, batch)
        return (
            keys,
            crops,
            *batch_masks(
                keys,
                step=step,
                seed=0,
                image_size=size,
                local_size=size // 2,
                hole_range=(size * 3 // 8, size // 2),
            ),
        )

    threaded = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        start = time.perf_counter()
        for _ in prefetched_map(step_input, iter(range(steps)), threads=threads):
            pass
        threaded[threads] = steps * batch / (time.perf_counter() - start)

    def with_mask(crops_per_s: float, masks: float) -> float:
        return 1.0 / (1.0 / crops_per_s + 1.0 / masks)

    pixels = np.mean([im.shape[0] * im.shape[1] for im in scaled])
    rows, results = [], {}
    for name, per_core in (
        ("streamed: decode + scale + crop", streamed),
        ("streamed from a tar shard: read + split + decode + scale + crop", from_tar),
        ("survey of a tar shard: sample keys, no decoding", survey_per_s),
        ("resident: crop from the decoded copy", resident),
        ("mask (rectangle)", rectangle),
        ("mask (freeform)", freeform),
        ("streamed step input (crop + rectangle mask)", with_mask(streamed, rectangle)),
        ("resident step input (crop + rectangle mask)", with_mask(resident, rectangle)),
        *(
            (f"resident step inputs, {t} thread(s) on {os.cpu_count()} cores, per core", v / t)
            for t, v in threaded.items()
        ),
    ):
        node = per_core * NODE_CORES
        results[name] = {
            "per_core_per_s": per_core,
            "node_16_cores_per_s": node,
            "gpu_ratio": node / GPU_CROPS_PER_S,
        }
        rows.append((name, per_core, node, node / GPU_CROPS_PER_S))
    common.print_table(
        f"training input at {size} px, 1 thread a core (load {common.load_average()[0]:.2f})",
        ("stage", "per s per core", f"per s, {NODE_CORES} cores", f"x {GPU_CROPS_PER_S} crops/s"),
        rows,
    )
    ratio = resident / streamed
    print(
        f"resident / streamed crops per core: {ratio:.1f}x; decoding {len(blobs)} photos once took "
        f"{load_s:.2f} s; held: {pixels * 3 / 2**20:.2f} MiB an image on average"
    )
    return common.write_figures(
        "train_input",
        info,
        args,
        argv,
        {
            "results": results,
            "resident_over_streamed": ratio,
            "resident_bytes_per_image": float(pixels * 3),
            "threaded_step_inputs_per_s": {str(t): v for t, v in threaded.items()},
            "tar_over_files_streamed": from_tar / streamed,
        },
    )


if __name__ == "__main__":
    main()
