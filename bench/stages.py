"""Per-image CPU cost of each stage of the inpainting job, and the CPUs a GPU needs to be fed.

Side by side in one run, single-threaded (as each Ray task runs), on real photo crops at
``--sizes``: decode of a JPEG input, mask generation, OpenCV post-processing (Telea + Poisson
``seamlessClone``, model/postprocess.py), and encoding as PNG, JPEG and WebP (pipeline/writer.py).
The last column turns the per-image CPU seconds into the CPUs needed per 1,000 images/s of GPU
throughput: with a GPU doing N images/s, the job needs about N/1000 times that many CPUs for the
read/decode and encode/write tasks (plus post-processing when it runs in the writer).

    python bench/stages.py [--sizes 256,512] [--images 32]
"""

from __future__ import annotations

import time

import common


def per_image_s(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - start) / len(items)


def main(argv: list[str] | None = None) -> dict:
    parser = common.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256,512", help="comma-separated square image sizes")
    parser.add_argument("--images", type=int, default=32, help="images per stage and size")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.images = "64", 4
    import cv2

    from model.masks import generate_mask
    from model.postprocess import blend
    from pipeline.decode import decode_image
    from pipeline.writer import encode

    cv2.setNumThreads(1)
    info = common.machine_info()
    results, rows = {}, []
    for size in (int(s) for s in args.sizes.split(",")):
        crops = common.photo_crops(args.images, size, seed=5)
        jpegs = [common.encode_jpeg(c, 92) for c in crops]
        masks = [generate_mask("rectangle", size, size, seed=0, key=str(i)) for i in range(args.images)]
        # A stand-in completion: the crop with its hole shifted in colour, as a network's output is.
        completed = [
            (c.astype(int) + 25 * m[..., None]).clip(0, 255).astype("uint8")
            for c, m in zip(crops, masks, strict=True)
        ]

        def make_mask(i: int, size: int = size):
            return generate_mask("rectangle", size, size, seed=0, key=str(i))

        def post_process(i: int, completed=completed, masks=masks):
            return blend(completed[i], completed[i], masks[i])

        stages = {
            "decode (JPEG in)": per_image_s(decode_image, jpegs),
            "mask (rectangle)": per_image_s(make_mask, range(args.images)),
            "post-process (OpenCV)": per_image_s(post_process, range(args.images)),
            "encode PNG": per_image_s(lambda c: encode(c, "png"), crops),
            "encode JPEG": per_image_s(lambda c: encode(c, "jpeg"), crops),
            "encode WebP": per_image_s(lambda c: encode(c, "webp"), crops),
        }
        results[size] = {
            name: {"ms_per_image": s * 1e3, "cpus_per_1000_images_s": s * 1000} for name, s in stages.items()
        }
        rows += [(size, name, s * 1e3, s * 1000) for name, s in stages.items()]
    common.print_table(
        f"CPU cost per image, 1 thread (load {common.load_average()[0]:.2f})",
        ("size", "stage", "ms / image", "CPUs per 1000 images/s"),
        rows,
    )
    return common.write_figures("stages", info, args, argv, {"results": results})


if __name__ == "__main__":
    main()
