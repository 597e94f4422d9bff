"""The GPU run: one prepared command that turns a lent GPU into weights, an evaluation and the GPU table.

    python bench/gpu_run.py --dry-run                 # here, on CPU: the same code, tiny, < 5 minutes
    source .gpu/setup.sh && python3 bench/gpu_run.py --photos .photos --out "$OUT"   # on the GPU

A lent GPU comes for 15 minutes in all, one command at most 10, and nothing on it survives. So
this script runs everything in one process, each stage against its own deadline, and copies each
result into ``--out`` (at most 8 flat files, the generator first) as soon as it has it:

0. environment (at most 60 s): nvidia-smi, pip freeze, df, free, ulimit into the log; the file
   limit raised; Ray started inside this process (explicit CPUs, GPU and object store, no
   dashboard: the GPU image lacks its dependencies); a 3-step TorchTrainer on the GPU (if it
   fails, training runs the same steps in plain torch: ``plain_train``, ``--plain-torch``);
1. training (jobs.train at the paper's width 1.0, bf16, channels_last, batch 96): its
   ``--time-budget-s`` is what is left of ``--total-s`` less what the later stages reserve, with
   ``--schedule-fractions`` so all three phases run; the best validation hole PSNR is exported;
2. export: that generator in fp16 (about 12 MB at width 1.0) and the validation curve (JSON, PNG);
3. evaluate (jobs.evaluate) on the validation photos: raw and post-processed vs Telea, NS and
   PatchMatch (when PyPatchMatch is importable);
4. the GPU table: forward-only time over sizes x precisions x batches x memory formats with CUDA
   events, then the Ray Data pipeline (jobs.inpaint, bf16, batch 64, 256 px JPEGs made here)
   with GPU post-processing off and on, each checked (known pixels bit-exact in the PNGs, the
   manifest's counts), GPU utilisation sampled meanwhile, the CPU ceiling measured beside it;
5. ``gpu_run.json`` with every figure, stage time and the path taken, and ``gpu_run.log``.

Work happens under ``--work`` (/tmp); Ray Train's storage and the evaluation's parts never land
under ``--out``. ``--dry-run`` runs the same stages on CPU with a tiny network and seconds per
stage, writes the same files (figures marked as CPU), and prints what the GPU run would carry.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
CARRY_LIMIT_MIB = 64
CARRY_MARGIN_MIB = 2
OUT_FILES = 8
# Seconds kept back for the stages after training (issue #20's plan), and the same in a dry run.
RESERVE_S = {"export": 10, "evaluate": 75, "table": 60}
DRY_RESERVE_S = {"export": 10, "evaluate": 40, "table": 40}
SETUP_DEADLINE_S = 60
TRAIN_FRACTIONS = "0.8,0.1,0.1"
FORWARD_GRID = {
    "size": (256, 512),
    "precision": ("fp32", "bf16"),
    "batch": (16, 64, 128),
    "channels_last": (True, False),
}
DRY_FORWARD_GRID = {"size": (64,), "precision": ("fp32",), "batch": (2, 4), "channels_last": (True, False)}


class GpuRun:
    """The run's clock, its figures (``gpu_run.json``) and the files it hands back in ``out``."""

    def __init__(self, args):
        self.args = args
        self.started = time.monotonic()
        self.work, self.out = Path(args.work), Path(args.out)
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work / "gpu_run.log"
        self.figures: dict = {
            "dry_run": args.dry_run,
            "device": "cpu (dry run: CPU figures, not GPU ones)" if args.dry_run else "cuda",
            "total_s": args.total_s,
            "stages": {},
            "path": {},
        }
        self.published: list[str] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def log(self, text: str) -> None:
        line = f"[{self.elapsed():7.1f} s] {text}"
        print(line, flush=True)
        with self.log_path.open("a") as f:
            f.write(line + "\n")

    def publish(self, source: Path, name: str) -> None:
        """Copy ``source`` to ``out/name`` now (a flat name; at most ``OUT_FILES`` names)."""
        if name not in self.published:
            if len(self.published) >= OUT_FILES:
                self.log(f"not handed back (already {OUT_FILES} files): {name}")
                return
            self.published.append(name)
        shutil.copyfile(source, self.out / f".{name}.part")
        os.replace(self.out / f".{name}.part", self.out / name)

    def save(self) -> None:
        """``gpu_run.json`` and the log, handed back after every stage."""
        self.figures["elapsed_s"] = round(self.elapsed(), 1)
        path = self.work / "gpu_run.json"
        path.write_text(json.dumps(self.figures, indent=2, default=str))
        self.publish(path, "gpu_run.json")
        self.publish(self.log_path, "gpu_run.log")

    @contextlib.contextmanager
    def stage(self, name: str, deadline_s: float):
        """One stage: its start, end, seconds and outcome recorded; an error is logged, never raised,
        so the stages after it still run."""
        record = {"start_s": round(self.elapsed(), 1), "deadline_s": round(deadline_s, 1)}
        self.figures["stages"][name] = record
        self.log(f"stage {name}: until {deadline_s:.0f} s")
        try:
            yield record
            record["ok"] = True
        except Exception as e:  # noqa: BLE001 - one stage's failure must not cost the others
            record["ok"] = False
            record["error"] = f"{type(e).__name__}: {e}"[:2000]
            self.log(f"stage {name} failed: {record['error']}\n{traceback.format_exc()}")
        record["end_s"] = round(self.elapsed(), 1)
        record["seconds"] = round(record["end_s"] - record["start_s"], 1)
        self.save()


def within(seconds: float, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a thread, waited for at most ``seconds``: a hung call costs its
    stage, not the run (the thread is left behind)."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(max(0.0, seconds))
    if thread.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not finish within {seconds:.0f} s")
    if "error" in result:
        raise result["error"]
    return result.get("value")


# ---------------------------------------------------------------------------------------------
# Stage 0: the machine and Ray.


def shell(command: str, timeout: float = 20.0) -> str:
    try:
        done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=timeout)
        return (done.stdout + done.stderr).strip()
    except (subprocess.TimeoutExpired, OSError) as e:
        return f"{command}: {e}"


def setup_environment(run: GpuRun) -> dict:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_IB_DISABLE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    for command in (
        "nvidia-smi",
        f"{sys.executable} -m pip freeze",
        "df -h /dev/shm /tmp",
        "free -g",
        "ulimit -n",
    ):
        run.log(f"$ {command}\n{shell(command)}")
    return {"nofile": [soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]], "python": sys.version.split()[0]}


def start_ray(run: GpuRun) -> dict:
    import ray
    import torch

    cores = os.cpu_count() or 2
    gpus = torch.cuda.device_count() if not run.args.dry_run else 0
    store = (512 if run.args.dry_run else 8192) * 2**20
    # Ray's workers inherit this process's environment: the project from the tree, not installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    ray.init(
        num_cpus=cores,
        num_gpus=gpus,
        object_store_memory=store,
        include_dashboard=False,
        log_to_driver=True,
    )
    return {"ray": ray.__version__, "torch": torch.__version__, "cpus": cores, "gpus": gpus,
            "gpu_name": torch.cuda.get_device_name(0) if gpus else None, "object_store_mib": store >> 20}  # fmt: skip


def smoke_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        loss = model(torch.randn(4, 8, device=device)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ray.train.report({"step": step + 1, "loss": float(loss)})
    # Ray Train 2's result keeps metrics only with checkpoints: say what ran in a file.
    Path(config["done"]).write_text(json.dumps({"steps": step + 1, "device": str(device)}))


def smoke_train(run: GpuRun) -> dict:
    """A 3-step TorchTrainer on the device the real training uses (its process group included)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    done = run.work / "smoke.json"
    trainer = TorchTrainer(
        smoke_loop,
        train_loop_config={"done": str(done)},
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=not run.args.dry_run),
        run_config=ray.train.RunConfig(name="smoke", storage_path=str(run.work / "ray-train")),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return json.loads(done.read_text())


# ---------------------------------------------------------------------------------------------
# Stage 1: training.


def split_photos(run: GpuRun, photos: Path) -> tuple[Path, Path]:
    """data/photos_split.tsv's train and val photos of ``photos`` as two folders of links."""
    split = {}
    for line in (REPO / "data" / "photos_split.tsv").read_text().splitlines()[1:]:
        name, _, side = line.split("\t")[:3]
        split[name] = side
    train, val = run.work / "photos" / "train", run.work / "photos" / "val"
    for folder in (train, val):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    for path in sorted(p for p in photos.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")):
        # Photos the project's split does not name (your own) are split as it was made: a fixed
        # 10% held out by the sha256 of the file name.
        side = split.get(path.name) or (
            "val" if hashlib.sha256(path.name.encode()).digest()[0] < 26 else "train"
        )
        if side in ("train", "val"):
            (train if side == "train" else val).joinpath(path.name).symlink_to(path.resolve())
    counts = (len(list(train.iterdir())), len(list(val.iterdir())))
    if not all(counts):
        raise RuntimeError(
            f"{photos}: {counts[0]} training and {counts[1]} validation photos by photos_split.tsv"
        )
    return train, val


def train_config(run: GpuRun, train: Path, val: Path, budget_s: float):
    from jobs.config import TrainConfig

    dry = run.args.dry_run
    sizes = dict(width=0.125, image_size=64, local_size=32, hole_min=12, hole_max=24, batch_size=4) if dry else dict(
        width=1.0, image_size=256, local_size=128, hole_min=96, hole_max=128, batch_size=run.args.batch_size
    )  # fmt: skip
    return TrainConfig(
        images=str(train), output=str(run.work / "model"), storage_path=str(run.work / "runs"), run_name="gpu-run",
        num_workers=1, use_gpu=not dry, cpus_per_worker=1 if dry else 8, data_cpus=0.5 if dry else 1.0,
        precision="fp32" if dry else "bf16", channels_last=True, optimizer="adadelta", lr_g=1.0, lr_d=1.0,
        val_images=str(val), val_limit=64, checkpoint_every=10**9, keep_checkpoints=1,
        log_every=10 if dry else 100, time_budget_s=budget_s, schedule_fractions=TRAIN_FRACTIONS, export="best",
        mean_pixel_images=64 if dry else 2048, **sizes,
    )  # fmt: skip


def train(run: GpuRun, photos: Path, deadline_s: float) -> dict:
    import jobs.train

    train_dir, val_dir = split_photos(run, photos)
    budget = deadline_s - run.elapsed()
    if budget < 20:
        raise RuntimeError(f"{budget:.0f} s left for training: too little to start it")
    config = train_config(run, train_dir, val_dir, budget)
    run.log(
        f"training for {budget:.0f} s: width {config.width}, batch {config.batch_size}, {config.precision}"
    )
    jobs.train.run(config)
    return {"budget_s": round(budget, 1), "output": config.output}


def plain_train(run: GpuRun, photos: Path, deadline_s: float) -> dict:
    """Ray Train failed its smoke run: the same model/gan.py steps, schedule planner, resident
    crops, validation and best export, in plain torch in this process (the weights matter more
    than the path). Its export is the same checkpoint ``train`` writes."""
    import functools
    import itertools
    import math

    import numpy as np
    import torch

    from jobs.train import model_config
    from model.completion import CompletionNetwork, images_to_tensor
    from model.discriminator import ContextDiscriminator
    from model.gan import evaluate, make_optimizer, train_step
    from model.schedule import BudgetPlanner
    from pipeline import train_data
    from pipeline.checkpoint import save_checkpoint, unwrapped_state_dict
    from pipeline.decode import decode_image, scale_and_crop, scale_for_crops

    train_dir, val_dir = split_photos(run, photos)
    config = train_config(run, train_dir, val_dir, deadline_s - run.elapsed())
    deadline = time.time() + config.time_budget_s
    device = torch.device("cpu" if run.args.dry_run else "cuda")
    torch.backends.cudnn.benchmark = True
    paths = sorted(train_dir.iterdir())
    decoded = [decode_image(p.read_bytes()) for p in paths]
    sums = np.sum([im.reshape(-1, 3).sum(0, dtype=np.float64) for im in decoded], axis=0)
    mean = tuple(float(v) for v in sums / (sum(im.shape[0] * im.shape[1] for im in decoded) * 255.0))
    held = train_data.ResidentImages(
        [p.name for p in paths], [scale_for_crops(im, config.image_size) for im in decoded], config.image_size, [config.seed]
    )  # fmt: skip
    val_paths = sorted(val_dir.iterdir())[: config.val_limit]
    val_crops = [scale_and_crop(decode_image(p.read_bytes()), config.image_size, None) for p in val_paths]
    val_images = images_to_tensor(np.stack(val_crops), device, config.channels_last)
    val_masks = torch.from_numpy(
        train_data.validation_masks([p.name for p in val_paths], seed=config.seed, image_size=config.image_size,
                                    local_size=config.local_size, hole_range=config.hole_range)[0]
    ).to(device)  # fmt: skip

    def masks_for(keys, step):
        return train_data.batch_masks(
            keys, step=step, seed=config.seed, image_size=config.image_size,
            local_size=config.local_size, hole_range=config.hole_range, kind=config.train_masks,
        )  # fmt: skip

    def step_input(step):
        keys, crops = held.batch(step, config.batch_size)
        return (keys, crops, *masks_for(keys, step))

    fmt = torch.channels_last
    torch.manual_seed(config.seed)
    generator = CompletionNetwork(config.width).to(device, memory_format=fmt)
    discriminator = ContextDiscriminator(config.image_size, config.local_size, config.width).to(
        device, memory_format=fmt
    )
    opt_g = make_optimizer(config.optimizer, generator.parameters(), config.lr_g)
    opt_d = make_optimizer(config.optimizer, discriminator.parameters(), config.lr_d)
    autocast = (
        functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
        if config.precision == "bf16" and device.type == "cuda"
        else contextlib.nullcontext
    )
    plan = config.schedule()
    planner = BudgetPlanner(plan, 0, deadline, config.fractions())
    inputs = train_data.prefetched_map(
        step_input, itertools.count(0), threads=max(1, (os.cpu_count() or 2) - 2)
    )
    best, best_step, best_state, validations, step, inside_phase1 = -math.inf, 0, None, [], 0, 0
    while step < plan.t_train:
        phase = plan.phase(step)
        keys, crops, masks_np, boxes_np = next(inputs)
        started = time.perf_counter()
        losses = train_step(
            phase, generator, discriminator, opt_g, opt_d, images_to_tensor(crops, device, config.channels_last),
            torch.from_numpy(masks_np).to(device), torch.from_numpy(boxes_np).to(device),
            mean_pixel=mean, local_size=config.local_size, alpha=config.alpha, autocast=autocast,
        )  # fmt: skip
        if not all(math.isfinite(v) for v in losses.values()):
            raise FloatingPointError(f"non-finite loss at step {step} (phase {phase}): {losses}")
        step += 1
        plan = planner.after_step(step, time.perf_counter() - started)
        if plan.validation_due(step, inside_phase1) or step == plan.t_train:
            inside_phase1 += step < plan.tc
            started = time.perf_counter()
            metrics, _ = evaluate(generator, val_images, val_masks, mean)
            validations.append({"step": step, "phase": phase, **metrics})
            if metrics["val_hole_psnr"] > best:
                best, best_step = metrics["val_hole_psnr"], step
                best_state = {
                    k: t.detach().to("cpu", copy=True) for k, t in unwrapped_state_dict(generator).items()
                }
            planner.note_overhead(time.perf_counter() - started)
    if best_state is not None:
        generator.load_state_dict(best_state)
    extra = {"validations": validations, "schedule_plans": planner.plans, "stopped_at_deadline": planner.stopped,
             "exported": {"which": "best", "step": best_step}, "best_val_hole_psnr": best, "path": "plain_torch"}  # fmt: skip
    save_checkpoint(config.output, model_config(config, plan, mean, best_step, extra), generator)
    return {"budget_s": round(config.time_budget_s, 1), "output": config.output, "steps": step}


# ---------------------------------------------------------------------------------------------
# Stage 2: export.


def curve_png(validations: list[dict], schedule: dict, path: Path) -> None:
    """Validation hole PSNR against step, phase ends as vertical lines (OpenCV: no matplotlib)."""
    import cv2
    import numpy as np

    w, h, pad = 800, 400, 50
    image = np.full((h, w, 3), 255, np.uint8)
    if validations:
        steps = [v["step"] for v in validations]
        values = [v["val_hole_psnr"] for v in validations]
        lo, hi = min(values) - 0.5, max(values) + 0.5
        last = max(max(steps), schedule.get("t_train", 1))

        def at(step, value):
            return (
                int(pad + (w - 2 * pad) * step / last),
                int(h - pad - (h - 2 * pad) * (value - lo) / (hi - lo)),
            )

        for end in (schedule.get("tc", 0), schedule.get("tc", 0) + schedule.get("td", 0)):
            x = at(end, lo)[0]
            cv2.line(image, (x, pad), (x, h - pad), (200, 200, 200), 1)
        points = [at(s, v) for s, v in zip(steps, values, strict=True)]
        cv2.polylines(image, [np.array(points, np.int32)], False, (200, 60, 30), 2)
        for p in points:
            cv2.circle(image, p, 3, (200, 60, 30), -1)
        cv2.putText(image, f"{hi:.1f} dB", (2, pad), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
        cv2.putText(image, f"{lo:.1f} dB", (2, h - pad), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
        cv2.putText(
            image, f"step {last}", (w - pad - 60, h - pad + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1
        )
    cv2.putText(
        image, "validation hole PSNR (raw network)", (pad, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1
    )
    cv2.imwrite(str(path), image[..., ::-1])


def export(run: GpuRun) -> dict:
    import torch

    from pipeline.checkpoint import load_checkpoint, save_checkpoint

    trained = load_checkpoint(str(run.work / "model"), training_state=False)
    fp16 = run.work / "export-fp16"
    shutil.rmtree(fp16, ignore_errors=True)
    save_checkpoint(str(fp16), trained.config, trained.generator, generator_dtype=torch.float16)
    run.publish(fp16 / "generator.safetensors", "generator.safetensors")
    run.publish(fp16 / "config.json", "generator_config.json")
    extra = trained.config.extra
    curve = {
        "validations": extra.get("validations", []),
        "schedule": extra.get("schedule", {}),
        "schedule_plans": extra.get("schedule_plans", []),
        "exported": extra.get("exported"),
        "stopped_at_deadline": extra.get("stopped_at_deadline"),
    }
    (run.work / "val_curve.json").write_text(json.dumps(curve, indent=2))
    run.publish(run.work / "val_curve.json", "val_curve.json")
    curve_png(curve["validations"], curve["schedule"], run.work / "val_curve.png")
    run.publish(run.work / "val_curve.png", "val_curve.png")
    best = max(curve["validations"], key=lambda v: v["val_hole_psnr"], default={})
    return {
        "generator_bytes": (fp16 / "generator.safetensors").stat().st_size,
        "schedule": curve["schedule"],
        "exported": curve["exported"],
        "best_validation": best,
        "validations": len(curve["validations"]),
    }


# ---------------------------------------------------------------------------------------------
# Stage 3: evaluate.


def evaluate(run: GpuRun) -> dict:
    from jobs.config import EvaluateConfig
    from jobs.evaluate import run as run_evaluate

    dry = run.args.dry_run
    config = EvaluateConfig(
        images=str(run.work / "photos" / "val"), output=str(run.work / "evaluate"),
        checkpoint=str(run.work / "export-fp16"), crop=64 if dry else 256, local_size=32 if dry else 128,
        hole_min=12 if dry else 64, hole_max=24 if dry else 128, num_actors=1,
        num_gpus_per_actor=0 if dry else 1, precision="fp32" if dry else "bf16", grid_rows=0,
        num_cpus_per_task=0.5,
    )  # fmt: skip
    summary = run_evaluate(config)
    markdown = next(Path(config.output).rglob("_summary.md"), None)
    if markdown is not None:
        run.publish(markdown, "evaluate.md")
    return {
        k: summary.get(k)
        for k in ("images", "counts", "methods", "comparisons", "wall_s", "postprocess_path")
    }


# ---------------------------------------------------------------------------------------------
# Stage 4: the GPU table.


def forward_table(run: GpuRun, deadline_s: float) -> list[dict]:
    """Forward-only seconds per image of the completion network (``complete``: fill, network,
    composite) over the grid, timed with CUDA events (wall clock in a dry run)."""
    import itertools

    import torch

    from model.completion import CompletionNetwork
    from model.gan import complete

    dry = run.args.dry_run
    device = "cpu" if dry else "cuda"
    grid = DRY_FORWARD_GRID if dry else FORWARD_GRID
    torch.backends.cudnn.benchmark = True
    net = CompletionNetwork(0.125 if dry else 1.0).to(device).eval()
    rows = []
    for size, precision, batch, channels_last in itertools.product(*grid.values()):
        if run.elapsed() > deadline_s:
            rows.append({"size": size, "precision": precision, "batch": batch, "channels_last": channels_last,
                         "skipped": "stage deadline"})  # fmt: skip
            continue
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        net = net.to(memory_format=fmt)
        images = torch.rand(batch, 3, size, size, device=device).to(memory_format=fmt)
        masks = torch.zeros(batch, 1, size, size, device=device)
        masks[:, :, size // 4 : size // 2, size // 4 : size // 2] = 1
        cast = (
            torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        )
        times = []
        with torch.no_grad(), cast:
            for i in range(2 + 5):
                if dry:
                    start = time.perf_counter()
                    complete(net, images, masks, (0.5, 0.5, 0.5))
                    seconds = time.perf_counter() - start
                else:
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    begin.record()
                    complete(net, images, masks, (0.5, 0.5, 0.5))
                    end.record()
                    end.synchronize()
                    seconds = begin.elapsed_time(end) / 1e3
                if i >= 2:
                    times.append(seconds)
                if run.elapsed() > deadline_s:
                    break
        if times:
            best = sorted(times)[len(times) // 2]
            rows.append({"size": size, "precision": precision, "batch": batch, "channels_last": channels_last,
                         "ms_per_batch": round(best * 1e3, 3), "images_per_s": round(batch / best, 1)})  # fmt: skip
    return rows


class GpuSampler:
    """GPU utilisation (nvidia-smi, every 0.5 s) while a block runs; nothing on CPU."""

    def __init__(self, enabled: bool):
        self.enabled, self.samples, self.stop = enabled, [], threading.Event()

    def __enter__(self):
        if self.enabled:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.5):
            text = shell("nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits", 5)
            with contextlib.suppress(ValueError):
                self.samples.append(float(text.splitlines()[0]))

    def __exit__(self, *exc):
        self.stop.set()

    def summary(self) -> dict:
        if not self.samples:
            return {"gpu_util_samples": 0}
        return {"gpu_util_mean": round(sum(self.samples) / len(self.samples), 1),
                "gpu_util_max": max(self.samples), "gpu_util_samples": len(self.samples)}  # fmt: skip


def make_jpegs(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` JPEGs of ``size`` px made here from the shipped photos' crops."""
    import cv2

    from bench import common

    folder.mkdir(parents=True, exist_ok=True)
    crops = common.photo_crops(min(count, 64), size, seed=3)
    paths = []
    for i in range(count):
        path = folder / f"img-{i:06d}.jpg"
        cv2.imwrite(str(path), crops[i % len(crops)][..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(path)
    return paths


def cpu_ms_per_image(paths: list[Path], size: int) -> float:
    """One core's read + decode + PNG encode per image: the pipeline's CPU work besides the network."""
    import cv2

    from pipeline.decode import decode_image
    from pipeline.writer import encode

    cv2.setNumThreads(1)
    start = time.perf_counter()
    for path in paths[:64]:
        encode(decode_image(path.read_bytes()), "png")
    return (time.perf_counter() - start) / min(64, len(paths)) * 1e3


def pipeline_run(run: GpuRun, images: Path, postprocess: bool, count: int) -> dict:
    import numpy as np
    from PIL import Image

    from jobs.config import InpaintConfig
    from jobs.inpaint import run as run_inpaint
    from pipeline.decode import decode_image
    from pipeline.manifest import read_manifest

    dry = run.args.dry_run
    output = run.work / f"inpaint-{'post' if postprocess else 'raw'}"
    shutil.rmtree(output, ignore_errors=True)
    config = InpaintConfig(
        images=str(images), output=str(output), checkpoint=str(run.work / "export-fp16"),
        batch_size=4 if dry else 64, num_actors=1, num_gpus_per_actor=0 if dry else 1,
        precision="fp32" if dry else "bf16", postprocess=postprocess, write_masks=True,
        num_cpus_per_task=0.5, skip_existing=False, log_every_s=3600.0, max_side=0,
    )  # fmt: skip
    with GpuSampler(not dry) as sampler:
        started = time.perf_counter()
        summary = run_inpaint(config)
        wall = time.perf_counter() - started
    counts = summary["counts"]
    rows = read_manifest(str(output / "_manifest"), summary.get("run_id")).num_rows
    checked = exact = 0
    for path in sorted(images.glob("*.jpg"))[:16]:
        done = output / (path.name + ".png")
        mask_path = output / "_masks" / (path.name + ".png")
        if not done.exists() or not mask_path.exists():
            continue
        source = decode_image(path.read_bytes())
        result = np.asarray(Image.open(done).convert("RGB"))
        known = np.asarray(Image.open(mask_path).convert("L")) == 0
        checked += 1
        exact += bool((result[known] == source[known]).all())
    return {
        "postprocess": postprocess,
        "images": count,
        "images_per_s": round(count / wall, 1),
        "wall_s": round(wall, 1),
        "counts": counts,
        "manifest_rows": rows,
        "counts_right": counts.get("ok") == count and rows == count,
        "known_pixels_exact": f"{exact}/{checked}",
        **sampler.summary(),
    }


def gpu_table(run: GpuRun, deadline_s: float) -> dict:
    dry = run.args.dry_run
    forward_deadline = run.elapsed() + (deadline_s - run.elapsed()) * 0.4
    table = {"forward": forward_table(run, forward_deadline)}
    run.figures["gpu_table"] = table
    run.save()
    size, count = (64, 16) if dry else (256, run.args.pipeline_images)
    images = run.work / "jpegs"
    paths = make_jpegs(images, count, size)
    cores = os.cpu_count() or 2
    ms = cpu_ms_per_image(paths, size)
    table["cpu_ms_per_image"] = round(ms, 3)
    table["cpu_ceiling_images_per_s"] = round(cores * 1e3 / ms, 1)
    bf16_64 = [r for r in table["forward"] if r.get("batch") == (4 if dry else 64) and r.get("size") == size
               and r.get("precision") == ("fp32" if dry else "bf16") and r.get("channels_last")]  # fmt: skip
    table["gpu_limit_images_per_s"] = bf16_64[0]["images_per_s"] if bf16_64 else None
    table["pipeline"] = []
    for postprocess in (False, True):
        if run.elapsed() > deadline_s - (5 if dry else 15):
            table["pipeline"].append({"postprocess": postprocess, "skipped": "stage deadline"})
            continue
        result = pipeline_run(run, images, postprocess, count)
        limits = [v for v in (table["gpu_limit_images_per_s"], table["cpu_ceiling_images_per_s"]) if v]
        result["over_smaller_limit"] = round(result["images_per_s"] / min(limits), 3) if limits else None
        table["pipeline"].append(result)
        run.save()
    return table


# ---------------------------------------------------------------------------------------------
# The carry budget and the run.


def tree_mib(path: Path) -> float:
    if not path.exists():
        return 0.0
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20


def carry_budget(photos: Path) -> dict:
    """What the GPU run carries: the tracked tree, ``.gpu`` (its Ray bundle; ~33 MiB when not built
    here yet) and the photos, with the margin, against the 64 MiB that travel."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True).stdout
    tracked = sum((REPO / p).stat().st_size for p in listed.split("\0") if p and (REPO / p).is_file()) / 2**20
    bundle = tree_mib(REPO / ".gpu") or 33.0
    photos_mib = tree_mib(photos)
    total = tracked + bundle + photos_mib + CARRY_MARGIN_MIB
    return {"tracked_mib": round(tracked, 2), "gpu_bundle_mib": round(bundle, 2),
            "bundle_measured": (REPO / ".gpu").exists(), "photos_mib": round(photos_mib, 2),
            "margin_mib": CARRY_MARGIN_MIB, "total_mib": round(total, 2), "limit_mib": CARRY_LIMIT_MIB,
            "fits": total <= CARRY_LIMIT_MIB}  # fmt: skip


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same stages on CPU, tiny, in seconds")
    parser.add_argument("--carry-only", action="store_true", help="print what the GPU run carries, and stop")
    parser.add_argument(
        "--plain-torch", action="store_true", help="train without Ray Train, as after a failed smoke run"
    )
    parser.add_argument(
        "--photos", default=None, help="the photo set (default: ../shared/photos, else data/photos)"
    )
    parser.add_argument("--out", default=os.environ.get("OUT", str(REPO / "bench_out" / "gpu_run")))
    parser.add_argument("--work", default="/tmp/glcic-gpu-run")
    parser.add_argument(
        "--total-s", type=float, default=None, help="the whole run ends by then (560; dry: 200)"
    )
    parser.add_argument("--batch-size", type=int, default=96, help="training batch (paper: 96)")
    parser.add_argument("--pipeline-images", type=int, default=2000, help="JPEGs per pipeline run")
    args = parser.parse_args(argv)
    if args.total_s is None:
        args.total_s = 200.0 if args.dry_run else 560.0
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    photos = Path(args.photos) if args.photos else next(
        p for p in (REPO.parent / "shared" / "photos", REPO / ".photos", REPO / "data" / "photos") if p.is_dir()
    )  # fmt: skip
    if args.carry_only:
        budget = carry_budget(photos)
        print(json.dumps(budget, indent=1))
        return budget
    shutil.rmtree(args.work, ignore_errors=True)
    run = GpuRun(args)
    reserve = DRY_RESERVE_S if args.dry_run else RESERVE_S
    run.figures["carry"] = budget = carry_budget(photos)
    run.log(f"photos {photos}; carry {budget}")
    total = args.total_s
    train_deadline = total - sum(reserve.values())

    with run.stage("setup", SETUP_DEADLINE_S):
        run.figures["environment"] = setup_environment(run)
        run.figures["environment"].update(start_ray(run))
    ray_train = False
    with run.stage("smoke", SETUP_DEADLINE_S) as record:
        if args.plain_torch:
            raise RuntimeError("--plain-torch: Ray Train is not used")
        record.update(within(SETUP_DEADLINE_S - run.elapsed(), smoke_train, run))
        ray_train = True
    run.figures["path"]["training"] = (
        "ray_train"
        if ray_train
        else f"plain_torch: {'--plain-torch' if args.plain_torch else 'Ray Train failed its smoke run'}"
    )
    trained = False
    with run.stage("train", train_deadline) as record:
        # A training that never finishes (a data path starved, a hung collective) must not hold
        # the stages after it: they get the machine at their time.
        record.update(
            within(
                train_deadline + 20 - run.elapsed(),
                train if ray_train else plain_train,
                run,
                photos,
                train_deadline,
            )
        )
        trained = True
    exported = False
    if trained:
        with run.stage("export", train_deadline + reserve["export"]) as record:
            record.update(export(run))
            exported = True
    if exported:
        with run.stage("evaluate", train_deadline + reserve["export"] + reserve["evaluate"]) as record:
            record.update(
                within(
                    train_deadline + reserve["export"] + reserve["evaluate"] - run.elapsed(), evaluate, run
                )
            )
    if exported:
        with run.stage("table", total) as record:
            run.figures["gpu_table"] = gpu_table(run, total)
            record["rows"] = len(run.figures["gpu_table"].get("forward", []))
    run.log(f"done in {run.elapsed():.0f} s; handed back: {', '.join(run.published)}")
    run.save()
    print(json.dumps({"carry": budget, "stages": run.figures["stages"]}, indent=1))
    return run.figures


if __name__ == "__main__":
    main()
