"""How close the inpainting job gets to the compute limit, and how much it beats the naive loop.

    python bench/inpaint.py                                  # 256 and 512, CPU, fp32
    python bench/inpaint.py --device cuda --precision bf16 --peak-tflops 989
    python bench/inpaint.py --quick                          # a smoke run

In one run, with the same checkpoint, width, precision, batch size, thread count and images, for
each image size and each repeat, side by side:

1. limit: the generator's forward pass alone (``complete``: mean-pixel fill, network, composite) in
   a tight loop over batches already in memory, as float tensors on the device;
2. pipeline: ``jobs.inpaint.run`` end to end (list, read, decode, mask, pad, forward,
   post-process if asked, encode, atomic write, Parquet manifest, ``_SUCCESS.json``) from a local
   prefix and from a local S3-compatible server (SeaweedFS on 127.0.0.1); its wall time includes
   starting the actor and loading the checkpoint;
3. naive: one process, one image at a time: read, decode, mask, forward (batch of 1), encode,
   write, as the popular PyTorch port's predict script does; it uses the pipeline's own decoder,
   mask generator and encoder, so the difference is the architecture only.

The limit and the naive loop run in this process with the same torch thread count as the
inference actor, over the first ``--rate-images`` images (steady rates: they have no start-up to
amortise); the pipeline always does all ``--images``, start-up included. Reported: images/s of each (median of the repeats, with their spread), the ratios
pipeline/limit and pipeline/naive, the FLOPs per image (counted by torch.utils.flop_counter) and the
GFLOP/s they imply, and where the pipeline's time went (its manifest's per-stage seconds).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench import common

AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}


def autocast(device: str, precision: str):
    import torch

    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device, dtype=getattr(torch, AUTOCAST[precision]))


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def load_network(checkpoint: str, device: str, channels_last: bool):
    """The generator exactly as ``InpaintPredictor`` loads it."""
    import torch

    from pipeline.checkpoint import load_generator

    net, config, _ = load_generator(checkpoint, device=torch.device(device))
    net = net.eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, tuple(float(v) for v in config.mean_pixel)


def make_inputs(work: Path, size: int, count: int, s3) -> tuple[Path, str, list[np.ndarray]]:
    """``count`` JPEG crops of the demo photographs in a local folder and on the S3 server."""
    crops = common.photo_crops(count, size, seed=size)
    local = work / f"inputs-{size}"
    local.mkdir(parents=True)
    fs = s3.filesystem()
    s3_prefix = f"bench/inputs-{size}"
    for i, crop in enumerate(crops):
        data = common.encode_jpeg(crop)
        (local / f"img{i:05d}.jpg").write_bytes(data)
        fs.pipe_file(f"{s3_prefix}/img{i:05d}.jpg", data)
    return local, f"s3://{s3_prefix}", crops


def measure_limit(net, mean_pixel, crops, args) -> float:
    """images/s of the forward pass alone on batches already on the device."""
    import torch

    from model.completion import images_to_tensor, masks_to_tensor
    from model.masks import generate_mask

    size = crops[0].shape[0]
    masks = [generate_mask("rectangle", size, size, seed=0, key=f"img{i:05d}.jpg") for i in range(len(crops))]
    batches = []
    for start in range(0, min(len(crops), 4 * args.batch_size), args.batch_size):
        x = images_to_tensor(np.stack(crops[start : start + args.batch_size])).to(args.device)
        m = masks_to_tensor(np.stack(masks[start : start + args.batch_size])).to(args.device)
        if args.channels_last:
            x, m = (t.contiguous(memory_format=torch.channels_last) for t in (x, m))
        batches.append((x, m))
    with torch.inference_mode(), autocast(args.device, args.precision):
        net.complete(*batches[0], mean_pixel)  # warm-up: allocator, oneDNN/cuDNN kernel choice
        synchronize(args.device)
        done = 0
        start = time.perf_counter()
        while done < min(len(crops), args.rate_images):
            x, m = batches[(done // args.batch_size) % len(batches)]
            net.complete(x, m, mean_pixel)
            done += x.shape[0]
        synchronize(args.device)
        return done / (time.perf_counter() - start)


def measure_naive(net, mean_pixel, inputs: Path, output: Path, args) -> float:
    """images/s of one image at a time: read, decode, mask, forward, post-process, encode, write."""
    import torch

    from model.completion import images_to_tensor, masks_to_tensor, tensor_to_images
    from model.masks import generate_mask
    from model.postprocess import blend
    from pipeline.decode import decode_image
    from pipeline.writer import encode

    output.mkdir(parents=True, exist_ok=True)
    paths = sorted(inputs.iterdir())[: args.rate_images]
    start = time.perf_counter()
    for path in paths:
        image = decode_image(path.read_bytes())
        mask = generate_mask("rectangle", *image.shape[:2], seed=0, key=path.name)
        with torch.inference_mode(), autocast(args.device, args.precision):
            out = net.complete(
                images_to_tensor(image).to(args.device), masks_to_tensor(mask).to(args.device), mean_pixel
            )
        completed = tensor_to_images(out)[0]
        if args.postprocess:
            completed = blend(completed, completed, mask)
        (output / f"{path.name}.png").write_bytes(encode(completed, "png"))
    return len(paths) / (time.perf_counter() - start)


def measure_pipeline(images: str, output: str, checkpoint: str, args, endpoint_url: str | None) -> dict:
    from jobs.config import InpaintConfig
    from jobs.inpaint import run

    gpus = 1.0 if args.device == "cuda" else 0.0
    config = InpaintConfig(
        images=images,
        output=output,
        checkpoint=checkpoint,
        batch_size=args.batch_size,
        task_batch_size=args.task_batch_size,
        num_actors=args.num_actors,
        num_gpus_per_actor=gpus,
        num_cpus_per_actor=args.num_cpus_per_actor,
        num_cpus_per_task=args.num_cpus_per_task,
        precision=args.precision,
        channels_last=args.channels_last,
        postprocess=args.postprocess,
        skip_existing=False,
        endpoint_url=endpoint_url,
        log_every_s=3600.0,
    )
    wall, summary = common.timed(lambda: run(config))
    if summary["counts"]["ok"] != args.images:
        raise RuntimeError(f"the pipeline completed {summary['counts']} of {args.images} images")
    stage_s = summary["stage_s"]
    return {
        "images_per_s": args.images / wall,
        "wall_s": wall,
        "stage_s": stage_s,
        # Busy time of the inference actors over the run: 1.0 means the network never waited.
        "actor_busy": stage_s.get("inference_s", 0.0) / (wall * max(1, args.num_actors)),
    }


def threads_for(args) -> int:
    """The actors' torch threads in all (``InpaintPredictor``: ``round(num_cpus)`` each on CPU); the
    limit and the naive loop use as many, so all three use the same cores."""
    if args.device != "cpu":
        return 1
    per_actor = max(1, int(round(args.num_cpus_per_actor)))
    return min(os.cpu_count() or 1, per_actor * args.num_actors)


def parse_args(argv: list[str] | None):
    cpus = os.cpu_count() or 1
    parser = common.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256,512", help="comma-separated square image sizes")
    parser.add_argument("--images", type=int, default=240, help="images per size")
    parser.add_argument(
        "--rate-images",
        type=int,
        default=96,
        help="images timed in the limit and naive loops (steady rates: no start-up to amortise); "
        "the pipeline always does all --images",
    )
    parser.add_argument("--width", type=float, default=0.125, help="network width multiplier (paper: 1.0)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (all three)")
    parser.add_argument(
        "--task-batch-size", type=int, default=64, help="images per read/decode and encode/write task"
    )
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--channels-last", action=__import__("argparse").BooleanOptionalAction, default=False)
    parser.add_argument("--postprocess", action="store_true", help="the paper's post-processing too")
    parser.add_argument("--repeats", type=int, default=3, help="repeats; medians are reported")
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument(
        "--num-cpus-per-actor",
        type=float,
        default=max(1.0, cpus - 0.5),
        help="Ray CPUs of the inference actor; its torch threads are this rounded (default: all but "
        "half a CPU, which the read/write tasks share)",
    )
    parser.add_argument("--num-cpus-per-task", type=float, default=0.5)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak at this precision (e.g. H100 SXM dense bf16: 989): adds the FLOPs-based limit",
    )
    parser.add_argument("--skip-s3", action="store_true", help="only the local prefix")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.images, args.width, args.batch_size, args.repeats = "64", 16, 0.125, 4, 1
        args.rate_images = 16
    args.size_list = [int(s) for s in args.sizes.split(",")]
    if (
        args.images < 1
        or args.rate_images < 1
        or args.repeats < 1
        or args.batch_size < 1
        or args.task_batch_size < 1
        or min(args.size_list) < 4
    ):
        parser.error("--images, --repeats, --batch-size must be >= 1 and sizes >= 4")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible to torch")
        args.num_cpus_per_actor = min(args.num_cpus_per_actor, 1.0)
    return args


def main(argv: list[str] | None = None) -> dict:
    import torch

    from embedded.servers import LocalS3Server

    args = parse_args(argv)
    threads = threads_for(args)
    torch.set_num_threads(threads)
    info = common.machine_info(args.device)
    work = Path(tempfile.mkdtemp(prefix="glcic-bench-inpaint-"))
    (work / "s3").mkdir()
    s3 = LocalS3Server(data_dir=str(work / "s3"), buckets=("bench",)).start()
    os.environ.update(s3.env())  # the Ray workers started below inherit the endpoint
    try:
        common.start_ray(
            num_cpus=args.num_cpus, num_gpus=torch.cuda.device_count() if args.device == "cuda" else 0
        )
        checkpoint = common.random_checkpoint(str(work / "checkpoint"), args.width)
        net, mean_pixel = load_network(checkpoint, args.device, args.channels_last)
        results = {}
        for size in args.size_list:
            local, s3_uri, crops = make_inputs(work, size, args.images, s3)
            runs: dict[str, list] = {"limit": [], "pipeline_local": [], "pipeline_s3": [], "naive": []}
            load: list[float] = []
            for repeat in range(args.repeats):
                load.append(common.load_average()[0])
                runs["limit"].append(measure_limit(net, mean_pixel, crops, args))
                out = work / f"out-{size}-{repeat}"
                runs["pipeline_local"].append(measure_pipeline(str(local), str(out), checkpoint, args, None))
                shutil.rmtree(out, ignore_errors=True)
                if not args.skip_s3:
                    runs["pipeline_s3"].append(
                        measure_pipeline(
                            f"{s3_uri}", f"s3://bench/out-{size}-{repeat}", checkpoint, args, s3.endpoint_url
                        )
                    )
                runs["naive"].append(
                    measure_naive(net, mean_pixel, local, work / f"naive-{size}-{repeat}", args)
                )
                shutil.rmtree(work / f"naive-{size}-{repeat}", ignore_errors=True)
                print(
                    f"{size}x{size} repeat {repeat + 1}/{args.repeats}: limit {runs['limit'][-1]:.2f}, "
                    f"pipeline local {runs['pipeline_local'][-1]['images_per_s']:.2f}"
                    + (f", s3 {runs['pipeline_s3'][-1]['images_per_s']:.2f}" if runs["pipeline_s3"] else "")
                    + f", naive {runs['naive'][-1]:.2f} images/s (load {load[-1]:.1f})",
                    flush=True,
                )
            results[size] = summarize(size, runs, load, args)
    finally:
        import ray

        ray.shutdown()
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    return report(results, info, args, threads, argv)


def summarize(size: int, runs: dict, load: list[float], args) -> dict:
    flops = common.completion_flops(args.width, size)
    out = {"size": size, "flops_per_image": flops, "load_average_1m": load}
    for name, values in runs.items():
        if not values:
            continue
        rates = [v if isinstance(v, float) else v["images_per_s"] for v in values]
        out[name] = {"images_per_s": common.median(rates), "spread": common.spread(rates), "repeats": rates}
        if not isinstance(values[0], float):
            out[name]["actor_busy"] = common.median([v["actor_busy"] for v in values])
            out[name]["stage_s_per_image"] = {
                stage: common.median([v["stage_s"].get(stage, 0.0) for v in values]) / args.images
                for stage in values[0]["stage_s"]
            }
            out[name]["wall_s"] = common.median([v["wall_s"] for v in values])
    limit, naive = out["limit"]["images_per_s"], out["naive"]["images_per_s"]
    out["gflops_per_image"] = flops / 1e9
    out["limit_gflops_per_s"] = flops * limit / 1e9
    if args.peak_tflops:
        out["limit_fraction_of_peak"] = flops * limit / (args.peak_tflops * 1e12)
    for name in ("pipeline_local", "pipeline_s3"):
        if name in out:
            rate = out[name]["images_per_s"]
            out[f"{name}_over_limit"] = rate / limit
            out[f"{name}_over_naive"] = rate / naive
            # Ratios per repeat (limit and pipeline measured side by side) show how stable they are.
            out[f"{name}_over_limit_repeats"] = [
                p / lim for p, lim in zip(out[name]["repeats"], out["limit"]["repeats"], strict=True)
            ]
    return out


def report(results: dict, info: dict, args, threads: int, argv) -> dict:
    header = ["size", "limit img/s", "pipeline local", "pipeline S3", "naive", "local/limit", "S3/limit", "local/naive", "S3/naive", "GFLOP/img", "limit GFLOP/s", "spread"]  # fmt: skip
    rows = []
    for size, r in results.items():
        spread = max(r[k]["spread"] for k in ("limit", "pipeline_local", "pipeline_s3", "naive") if k in r)
        rows.append([
            f"{size}x{size}", r["limit"]["images_per_s"], r["pipeline_local"]["images_per_s"],
            r.get("pipeline_s3", {}).get("images_per_s", "-"), r["naive"]["images_per_s"],
            r["pipeline_local_over_limit"], r.get("pipeline_s3_over_limit", "-"),
            r["pipeline_local_over_naive"], r.get("pipeline_s3_over_naive", "-"),
            r["gflops_per_image"], r["limit_gflops_per_s"], f"{spread:.0%}",
        ])  # fmt: skip
    title = (
        f"Inpainting on {args.device} ({info['cpu'] if args.device == 'cpu' else info.get('gpu')}): width "
        f"{args.width}, {args.precision}, batch {args.batch_size}, task batch {args.task_batch_size}, channels_last {args.channels_last}, "
        f"post-processing {'on' if args.postprocess else 'off'}, {threads} torch threads, "
        f"{args.images} JPEGs per size, median of {args.repeats}"
    )
    table = common.print_table(title, header, rows)
    profile_rows = []
    for size, r in results.items():
        for name in ("pipeline_local", "pipeline_s3"):
            if name in r:
                s = r[name]["stage_s_per_image"]
                profile_rows.append([
                    f"{size}x{size}", name.split("_")[1], r[name]["wall_s"], r[name]["actor_busy"],
                    1e3 * s.get("read_s", 0), 1e3 * s.get("decode_s", 0), 1e3 * s.get("inference_s", 0),
                    1e3 * s.get("write_s", 0), 1e3 / r["limit"]["images_per_s"],
                ])  # fmt: skip
    profile = common.print_table(
        "Where the pipeline's time goes (ms per image, summed over tasks; actor busy = inference time / wall)",
        [
            "size",
            "source",
            "wall s",
            "actor busy",
            "read",
            "decode+mask",
            "inference",
            "post+encode+write",
            "limit ms/img",
        ],  # fmt: skip
        profile_rows,
    )
    return common.write_figures(
        "inpaint", info, args, argv,
        {"torch_threads": threads, "results": {str(k): v for k, v in results.items()}, "tables": [table, profile]},
        skip=("size_list",),
    )  # fmt: skip


if __name__ == "__main__":
    main()
