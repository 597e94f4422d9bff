"""Training throughput on Ray Train for 1 and 2 workers, against the forward+backward limit of the
same model in one process.

    python bench/train.py                  # width 0.125, 128 px crops, batch 16, phases 1 and 3
    python bench/train.py --quick          # a smoke run

Each measured run is the training job's own worker loop (``jobs.train.train_loop_per_worker``, DDP
over gloo on CPU) fed by its own Ray Data pipeline (``pipeline.train_data.training_dataset``: read,
decode, random crop, epoch after epoch) under ``TorchTrainer``, driven here rather than through
``jobs.train.run`` so the per-window ``steps_per_s`` the loop reports come back (they travel with
the checkpoints, one per window); the first window (start-up, DDP set-up, first reads) is dropped
and the median of the others is reported. The global batch is the same for 1 and 2 workers (the
paper's batch is global), so 2 workers each do half of it.

The limit is one update of the same kind (model/gan.py's ``train_step`` of phase 1 or 3, what
the job runs) in a tight loop in this process on
tensors already in memory, with as many torch threads as the workers have in total.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

MEAN_PIXEL = (0.45, 0.43, 0.40)


def write_training_images(root: Path, count: int, size: int) -> None:
    root.mkdir(parents=True)
    for i, crop in enumerate(common.photo_crops(count, size, seed=7)):
        (root / f"img{i:04d}.jpg").write_bytes(common.encode_jpeg(crop))


def train_config(args, images: Path, work: Path, phase: int, workers: int):
    from jobs.config import TrainConfig

    steps = args.windows * args.window
    return TrainConfig(
        images=str(images),
        output=str(work / f"final-p{phase}-w{workers}"),
        storage_path=str(work / "runs"),
        run_name=f"bench-p{phase}-w{workers}",
        num_workers=workers,
        cpus_per_worker=cpus_per_worker(args, workers),
        data_cpus=args.data_cpus,
        width=args.width,
        image_size=args.image_size,
        local_size=args.image_size // 2,
        hole_min=args.image_size // 8,
        hole_max=args.image_size // 4,
        batch_size=args.batch_size,
        # All steps in the phase being measured: phase 3 is the joint update (most of the paper's steps).
        tc=steps if phase == 1 else 0,
        td=0,
        t_train=steps,
        val_fraction=0.0,
        checkpoint_every=args.window,
        log_every=args.window,
        keep_checkpoints=args.windows + 1,
        max_failures=0,
        channels_last=args.channels_last,
    )


def cpus_per_worker(args, workers: int) -> float:
    """All CPUs but ``--data-reserve`` shared by the workers: 1 worker on 2 CPUs gets 1.5 (2 torch
    threads: the job rounds up), 2 workers 0.75 each (1 thread each), so both use the same cores."""
    if args.cpus_per_worker is not None:
        return args.cpus_per_worker
    return max(0.1, ((args.num_cpus or os.cpu_count() or 1) - args.data_reserve) / workers)


def torch_threads(cpus: float) -> int:
    """What ``train_loop_per_worker`` gives each CPU worker: its CPUs rounded up."""
    return max(1, math.ceil(cpus))


def measure_job(config) -> dict:
    """Steady-state steps/s of the job's worker loop under TorchTrainer (median over windows)."""
    from jobs.train import build_trainer
    from pipeline import train_data

    images = len(train_data.list_image_uris(config.images))
    everything = train_data.Split(0.0, config.seed)  # no validation: every image trains
    dataset = train_data.training_dataset(
        config.images, everything, config.image_size, images=images, num_cpus=config.data_cpus
    )
    trainer = build_trainer(config, dataset, MEAN_PIXEL, val=None, endpoint_url=None)
    wall, result = common.timed(trainer.fit)
    if result.error is not None:
        raise result.error
    windows = sorted((m for _, m in result.best_checkpoints), key=lambda m: m["step"])
    rates = [m["steps_per_s"] for m in windows]
    steady = rates[1:] or rates  # the first window holds start-up
    return {
        "steps_per_s": common.median(steady),
        "images_per_s": common.median(steady) * config.batch_size,
        "window_steps_per_s": rates,
        "wall_s": wall,
        "steps": config.t_train,
    }


def measure_limit(args, phase: int, threads: int) -> float:
    """steps/s of the same update in a tight loop in this process, data already in memory."""
    import torch

    from model import gan as job
    from model.completion import CompletionNetwork, images_to_tensor
    from model.discriminator import ContextDiscriminator
    from pipeline import train_data

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    size, local = args.image_size, args.image_size // 2
    generator = CompletionNetwork(args.width).to(memory_format=fmt).train()
    critic = ContextDiscriminator(size, local, args.width).to(memory_format=fmt).train()
    opt_g = job.make_optimizer("adadelta", generator.parameters(), 1.0)
    opt_d = job.make_optimizer("adadelta", critic.parameters(), 1.0)
    crops = common.photo_crops(args.batch_size, size, seed=11)
    images = images_to_tensor(__import__("numpy").stack(crops), "cpu", args.channels_last)
    keys = [f"img{i:04d}.jpg" for i in range(args.batch_size)]
    masks_np, boxes_np = train_data.batch_masks(
        keys, step=0, seed=0, image_size=size, local_size=local, hole_range=(size // 8, size // 4)
    )
    masks, boxes = torch.from_numpy(masks_np), torch.from_numpy(boxes_np)

    def step() -> None:
        job.train_step(
            phase, generator, critic, opt_g, opt_d, images, masks, boxes,
            mean_pixel=MEAN_PIXEL, local_size=local, alpha=0.0004,
        )  # fmt: skip

    step()  # warm-up
    steps = args.windows * args.window
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def parse_args(argv):
    parser = common.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--width", type=float, default=0.125, help="network width multiplier")
    parser.add_argument("--image-size", type=int, default=128, help="training crop size")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch (split over workers)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--phases", default="1,3", help="1: completion network alone; 3: joint GAN update")
    parser.add_argument("--window", type=int, default=5, help="steps per reported window")
    parser.add_argument("--windows", type=int, default=4, help="windows per run (the first is dropped)")
    parser.add_argument("--images", type=int, default=64, help="training images generated")
    parser.add_argument("--channels-last", action=__import__("argparse").BooleanOptionalAction, default=True)
    parser.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="Ray CPUs per worker (default: all CPUs but --data-reserve, shared by the workers)",
    )
    parser.add_argument("--data-reserve", type=float, default=0.5, help="CPUs left to the read/crop tasks")
    parser.add_argument("--data-cpus", type=float, default=0.25, help="Ray CPUs per read/crop task")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.image_size, args.batch_size = 0.0625, 32, 4
        args.phases, args.window, args.windows, args.images = "1", 2, 2, 16
    args.worker_list = [int(w) for w in args.workers.split(",")]
    args.phase_list = [int(p) for p in args.phases.split(",")]
    if any(p not in (1, 3) for p in args.phase_list) or min(args.worker_list) < 1:
        parser.error("--phases takes 1 and/or 3, --workers positive counts")
    if any(args.batch_size % w for w in args.worker_list):
        parser.error("--batch-size must be a multiple of every worker count")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    info = common.machine_info()
    work = Path(tempfile.mkdtemp(prefix="glcic-bench-train-"))
    try:
        images = work / "images"
        write_training_images(images, args.images, args.image_size + args.image_size // 4)
        common.start_ray(num_cpus=args.num_cpus)
        results = {}
        for phase in args.phase_list:
            limit_threads = {
                w: min(os.cpu_count() or 1, w * torch_threads(cpus_per_worker(args, w)))
                for w in args.worker_list
            }
            limits = {t: measure_limit(args, phase, t) for t in sorted(set(limit_threads.values()))}
            phase_out: dict = {"limit_steps_per_s_by_threads": {str(t): v for t, v in limits.items()}}
            for workers in args.worker_list:
                load = common.load_average()[0]
                run = measure_job(train_config(args, images, work, phase, workers))
                limit = limits[limit_threads[workers]]
                run.update(
                    load_average_1m=load,
                    limit_threads=limit_threads[workers],
                    limit_steps_per_s=limit,
                    over_limit=run["steps_per_s"] / limit,
                )
                phase_out[str(workers)] = run
                print(
                    f"phase {phase}, {workers} worker(s): {run['steps_per_s']:.3f} steps/s, limit "
                    f"{limit:.3f} on {limit_threads[workers]} thread(s) (load {load:.1f})",
                    flush=True,
                )
            first = phase_out[str(args.worker_list[0])]["steps_per_s"]
            for workers in args.worker_list[1:]:
                phase_out[f"speedup_{workers}_over_{args.worker_list[0]}"] = (
                    phase_out[str(workers)]["steps_per_s"] / first
                )
            results[str(phase)] = phase_out
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return report(results, info, args, argv)


def report(results: dict, info: dict, args, argv) -> dict:
    rows = []
    for phase, r in results.items():
        for workers in args.worker_list:
            run = r[str(workers)]
            speedup = r.get(f"speedup_{workers}_over_{args.worker_list[0]}", 1.0)
            rows.append([
                phase, workers, run["steps_per_s"], run["images_per_s"], run["limit_threads"],
                run["limit_steps_per_s"], run["limit_steps_per_s"] * args.batch_size, run["over_limit"], speedup,
            ])  # fmt: skip
    table = common.print_table(
        f"Training on Ray Train ({info['cpu']}, {info['cpus']} CPUs): width {args.width}, {args.image_size} px, "
        f"global batch {args.batch_size}, channels_last {args.channels_last}, fp32, "
        f"median of {args.windows - 1} windows of {args.window} steps",
        [
            "phase",
            "workers",
            "steps/s",
            "images/s",
            "limit threads",
            "limit steps/s",
            "limit images/s",
            "job/limit",
            "speedup",
        ],  # fmt: skip
        rows,
    )
    return common.write_figures(
        "train", info, args, argv, {"results": results, "table": table}, skip=("worker_list", "phase_list")
    )


if __name__ == "__main__":
    main()
