"""The jobs' configurations, and the one engine that turns them into command-line flags.

Each job has one dataclass here (``TrainConfig``, ``InpaintConfig``, ``EvaluateConfig``); every
field is a flag, its help text in ``flag(help, default)``, its checks in ``__post_init__``. The two
jobs that run the generator over listed images share ``BatchInferenceConfig``; a subclass may
redefine a shared field to give it its own help text. The same dataclass drives
the job's own ``python -m jobs.X --flag value`` entry point (what a Ray Job runs) and the
``glcic submit-X`` commands, through ``config_parameters`` (typer options, one per field) and
``to_argv`` (a config back to those flags). A newcomer adds a flag in one place: a field here.

This module imports neither torch nor Ray nor NumPy: ``glcic --help`` reads it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from model import schedule

C = TypeVar("C")

# pipeline.decode.DEFAULT_MAX_PIXELS (kept literal so this module need not import the decoder's
# NumPy and Pillow; tests/test_config.py checks that they agree).
DEFAULT_MAX_PIXELS = 4096 * 4096
# model.masks.MASK_KINDS (literal for the same reason; tests/test_config.py checks).
MaskKind = Literal["rectangle", "freeform", "mixed"]


def flag(help: str, default: Any = dataclasses.MISSING) -> Any:
    """A config field: its flag's help text and default (no default: a required flag)."""
    return dataclasses.field(default=default, metadata={"help": help})


# ---------------------------------------------------------------------------------------------
# Training.


@dataclass
class TrainConfig:
    """Train the completion network and context discriminator (Iizuka et al. 2017) on Ray Train."""

    images: str = flag(
        "the training images: a URI prefix (s3://, gs://, local) or a list file (.txt/.lst, one key or URI "
        "a line), listed a page at a time"
    )
    output: str = flag("URI of the exported final completion-network checkpoint (what jobs.inpaint loads)")
    input_format: Literal["auto", "files", "webdataset", "parquet"] = flag(
        "what --images (and --val-images) hold, as for glcic inpaint: files, webdataset (.tar shards, or a "
        "brace pattern such as shards/{00000..00999}.tar) or parquet (image bytes in a column, as "
        "img2dataset writes them); auto: what the listing finds (any .tar: webdataset)",
        "auto",
    )
    image_column: str | None = flag(
        "parquet: the column of image bytes (default: the first of jpg, png, webp, image present)", None
    )
    key_column: str = flag("parquet: the column of sample keys", "key")
    image_ext: str | None = flag(
        "webdataset: the image member's extension, exactly (default: the member whose extension ends in "
        "jpg, jpeg, png or webp, never a mask.* one)",
        None,
    )
    shuffle_buffer: int = flag(
        "shards: crops each training worker mixes before it batches them, since a shard's samples arrive "
        "together (about image_size^2 x 3 bytes each); files are shuffled by key instead",
        1024,
    )
    storage_path: str | None = flag(
        "Ray Train run storage (checkpoints, progress images); default: '<output>-runs'", None
    )
    run_name: str = flag("run directory under storage_path; the same name resumes", "glcic-train")
    num_workers: int = flag("Ray Train workers (one GPU each with use_gpu)", 1)
    use_gpu: bool = flag("train on GPUs: DDP over NCCL (CPU: gloo)", False)
    cpus_per_worker: float = flag("CPUs per training worker; leave some for the Ray Data read tasks", 1.0)
    data_cpus: float = flag("CPUs per Ray Data read/decode/crop task", 0.5)
    width: float = flag("channel-width multiplier of both networks (paper: 1.0)", 1.0)
    image_size: int = flag("training crop size (paper: 256)", 256)
    local_size: int = flag("local discriminator patch size (paper: 128)", 128)
    hole_min: int = flag("smallest hole side in pixels (paper: 96)", 96)
    hole_max: int = flag("largest hole side in pixels (paper: 128)", 128)
    train_masks: MaskKind = flag(
        "training holes: rectangle (the paper's: hole_min..hole_max inside a local_size box), freeform "
        "(brush strokes; the local box is centred on their centre of mass) or mixed (each image's "
        "kind drawn from the seed, key and step); validation masks are always rectangles",
        "rectangle",
    )
    batch_size: int = flag("images per step over all workers (paper: 96)", 96)
    tc: int = flag("phase 1 steps: completion network on MSE (paper: 90,000)", 90_000)
    td: int = flag("phase 2 steps: discriminator alone (paper: 10,000)", 10_000)
    t_train: int = flag("total steps; phase 3 (joint) runs until here (paper: 500,000)", 500_000)
    optimizer: Literal["adadelta", "adam"] = flag("optimizer (paper: adadelta)", "adadelta")
    lr_g: float = flag("completion network learning rate (paper: Adadelta's 1.0)", 1.0)
    lr_d: float = flag("discriminator learning rate (paper: Adadelta's 1.0)", 1.0)
    alpha: float = flag(
        "weight of the adversarial loss in phase 3, as the paper's alpha (paper: 0.0004): the generator "
        "minimises L + alpha * adversarial, L = the paper's weighted MSE ||M * (C(x, M) - x)||^2 as a "
        "mean over all pixels and channels (also phase 1's loss) = the hole-pixel mean x the hole's "
        "share of the image (about 0.19 for 96-128 px holes in 256 px crops); runs before this "
        "definition (hole-pixel mean) with alpha a match alpha = a x that share now",
        0.0004,
    )
    val_images: str | None = flag("URI prefix of validation images; default: hold out val_fraction", None)
    val_fraction: float = flag("fraction of images held out for validation when val_images is unset", 0.01)
    val_limit: int = flag("validation images evaluated (the first by key)", 16)
    mean_pixel_images: int = flag(
        "the mean pixel is that of this many training images, a fixed hash-chosen sample (stated in the "
        "checkpoint), so its cost does not grow with the training set",
        2048,
    )
    val_every: int = flag("steps between validations (hole L1, PSNR, SSIM, PNG grid)", 1000)
    checkpoint_every: int = flag("steps between checkpoints (also at phase ends)", 1000)
    keep_checkpoints: int = flag("latest checkpoints kept in storage_path", 3)
    log_every: int = flag("steps between metric reports", 100)
    max_failures: int = flag("worker failures recovered from the latest checkpoint", 3)
    precision: Literal["fp32", "bf16"] = flag("bf16 autocast on GPU", "fp32")
    channels_last: bool = flag("channels_last memory format (faster convs on GPU)", True)
    seed: int = flag("seed of weights, masks and the validation split", 0)
    endpoint_url: str | None = flag("S3-compatible endpoint (else from env)", None)
    min_epoch_steps: int = flag(
        "a small training set is listed several times per epoch so an epoch is at least this many "
        "steps (each copy gets its own random crop); 1 = each image once",
        16,
    )
    resident_max_gib: float = flag(
        "a training set whose decoded copies (scaled for cropping: about 10 bytes x image_size^2 an image) "
        "fit in this many GiB per worker is read and decoded once and held by the workers, which cut fresh "
        "random crops from it every step; larger sets stream through Ray Data, decoded again every epoch; "
        "0: always stream",
        4.0,
    )
    log_shard_keys: bool = flag("write the keys each worker read in its first epoch to <run>/shards/", False)
    init_generator: str | None = flag(
        "start the completion network from this exported checkpoint (an earlier segment's --output, or "
        "'default'), with its mean pixel; the discriminator and the optimizers start fresh. Ignored when "
        "the run resumes from its own checkpoints",
        None,
    )
    start_step: int = flag(
        "the step a fresh run starts at, so a segment that carries a generator forward (--init-generator) "
        "continues the schedule: its phase, its masks and its step count",
        0,
    )
    time_budget_s: float = flag(
        "wall-clock seconds for the whole run from its submission, export included: training stops "
        "cleanly after the step that would overrun it (a final checkpoint, validation and export as at a "
        "normal end), wherever it is in the schedule; 0: no budget",
        0.0,
    )
    schedule_fractions: str | None = flag(
        "with --time-budget-s: the shares of the training time of phases 1, 2 and 3, e.g. 0.8,0.1,0.1; "
        "tc, td and t_train are then planned from the step rates measured on the hardware (each phase "
        "timed once it runs, re-planned at each phase boundary), and validation runs at the phase ends "
        "and 3 times inside phase 1 instead of every --val-every steps; the given tc / td / t_train only "
        "hold until the first plan",
        None,
    )
    export: Literal["best", "last"] = flag(
        "which completion network --output gets: best, the one of the highest validation hole PSNR "
        "(the raw network, no post-processing; phase 3's adversarial loss can lower it), or last, the "
        "final step's; best needs validation images, and falls back to last without them",
        "best",
    )

    def __post_init__(self):
        if self.storage_path is None:
            self.storage_path = self.output.rstrip("/") + "-runs"
        problems = []
        if not 0 <= self.start_step < self.t_train:
            problems.append(f"need 0 <= start_step ({self.start_step}) < t_train ({self.t_train})")
        if not 0 <= self.tc <= self.t_train or not 0 <= self.td or self.tc + self.td > self.t_train:
            problems.append(
                f"need 0 <= tc ({self.tc}) and tc + td ({self.tc + self.td}) <= t_train ({self.t_train})"
            )
        if self.image_size % 4 or self.local_size % 4 or not 4 <= self.local_size <= self.image_size:
            problems.append(
                f"image_size ({self.image_size}) and local_size ({self.local_size}) must be multiples of 4 "
                "with local_size <= image_size"
            )
        problems += hole_problems(self.local_size, self.hole_min, self.hole_max)
        if self.num_workers < 1 or self.batch_size % self.num_workers:
            problems.append(
                f"batch_size ({self.batch_size}) must be a multiple of num_workers ({self.num_workers})"
            )
        if self.resident_max_gib < 0:
            problems.append(f"resident_max_gib must be >= 0, got {self.resident_max_gib}")
        if self.time_budget_s < 0 or not math.isfinite(self.time_budget_s):
            problems.append(f"time_budget_s must be >= 0, got {self.time_budget_s}")
        if self.schedule_fractions is not None:
            try:
                schedule.parse_fractions(self.schedule_fractions)
            except ValueError as e:
                problems.append(str(e))
            if not self.time_budget_s:
                problems.append("schedule_fractions needs time_budget_s: they are shares of that time")
        problems += _at_least_one(
            self,
            "val_every",
            "checkpoint_every",
            "log_every",
            "keep_checkpoints",
            "val_limit",
            "min_epoch_steps",
            "mean_pixel_images",
            "shuffle_buffer",
        )
        _raise_if(self, problems)

    @property
    def hole_range(self) -> tuple[int, int]:
        return (self.hole_min, self.hole_max)

    def schedule(self) -> schedule.Schedule:
        return schedule.Schedule(self.tc, self.td, self.t_train)

    def phase(self, step: int) -> int:
        """The phase that runs the update of ``step`` (0-based)."""
        return self.schedule().phase(step)

    def fractions(self) -> tuple[float, float, float] | None:
        return schedule.parse_fractions(self.schedule_fractions) if self.schedule_fractions else None

    def run_uri(self) -> str:
        from pipeline import storage

        return storage.join_key(self.storage_path.rstrip("/"), self.run_name)


# ---------------------------------------------------------------------------------------------
# The generator over a listing: what inpainting and evaluation share.


@dataclass(kw_only=True)
class BatchInferenceConfig:
    """The fields of every job that runs the generator over listed images with Ray Data: inputs,
    masks, the actor pool, precision, the manifest's part sizes. Not a job itself."""

    images: str = flag(
        "input images: a prefix (s3://, gs://, local, any fsspec URI) or a list file (.txt/.lst, one key "
        "or URI a line)"
    )
    output: str = flag("prefix for the completed images, at the inputs' relative keys")
    checkpoint: str = flag(
        "checkpoint prefix (config.json + generator.safetensors); 'default': the weights shipped with "
        "glcic (model/weights/default, see its MODEL_CARD.md)",
        "default",
    )
    masks: str | None = flag(
        "prefix of hole masks at the images' relative keys (or with a .png suffix), white = hole; with "
        "shards, a prefix of mask shards of the same names and keys (a tar's {key}.mask.png or {key}.png "
        "members, a Parquet file's --mask-column), used instead of the samples' own mask members; "
        "none: generate masks",
        None,
    )
    mask_generator: MaskKind = flag(
        "mask generator when --masks is not given (model/masks.py, the same as training's --train-masks); "
        "seeded by --mask-seed and the image key",
        "rectangle",
    )
    mask_seed: int = flag("seed of the generated masks (with the image key: reruns get the same masks)", 0)
    local_size: int | None = flag(
        "generated holes lie inside a box of this side (the local discriminator's patch), clipped to the "
        "image's shorter side; default: the paper's 128 px, scaled down for images under 256 px",
        None,
    )
    hole_min: int | None = flag(
        "smallest generated rectangle hole side in pixels (with --hole-max); default: the paper's 96 "
        "of 128, scaled with the box",
        None,
    )
    hole_max: int | None = flag("largest generated rectangle hole side in pixels (with --hole-min)", None)
    batch_size: int = flag(
        "images per inference batch (split into same-size buckets); 0: 64 for GPU actors, 16 on CPU", 0
    )
    task_batch_size: int = flag(
        "images per read/decode and encode/write task (and keys per listed block), independent of "
        "--batch-size so small inference batches do not multiply task launches",
        64,
    )
    num_actors: int = flag(
        "a fixed pool of this many inference actors; 0: an autoscaling pool of --min-actors to --max-actors",
        0,
    )
    min_actors: int = flag(
        "fewest inference actors of the autoscaling pool (Ray Data keeps at least 1); it starts with as many "
        "as the nodes up at submit time hold, and grows while its actors are busy",
        1,
    )
    max_actors: int = flag(
        "most inference actors of the autoscaling pool: with GPUs per actor, GPU nodes the autoscaler starts "
        "for them; 0: GPU job: as many as the GPUs Ray reports the cluster has or can add (uncapped when the "
        "autoscaler reports none, e.g. Ray's default autoscaler: then its max_workers caps the pool), CPU "
        "job: one per 4 CPUs",
        0,
    )
    num_gpus_per_actor: float | None = flag(
        "GPUs each inference actor requests: a GPU job makes the autoscaler start GPU nodes even from zero. "
        "Default: 1 with --device cuda, 0 with --device cpu; with --device auto, 1 if the cluster has GPUs "
        "or reports GPU nodes it can add (Ray's default autoscaler does not: pass 1 or --device cuda on a "
        "cluster whose GPU workers start at 0), else 0",
        None,
    )
    device: Literal["auto", "cpu", "cuda"] = flag(
        "where each inference actor computes: cuda, cpu, or auto (cuda when the actor sees a GPU); "
        "independent of --num-gpus-per-actor, which decides what the actors request (a test asks for fake "
        "GPUs and computes on the CPU)",
        "auto",
    )
    num_cpus_per_actor: float = flag("CPUs per inference actor (also its torch threads on CPU)", 1.0)
    num_cpus_per_task: float = flag(
        "CPUs per read/decode and encode/write task; fractional so they never starve beside the actors", 0.5
    )
    max_side: int = flag(
        "complete a copy whose longer side is at most this many pixels, then upscale the hole only and "
        "paste it into the full-resolution known pixels (the network sees ~300 px around a pixel, so "
        "holes of large photos are completed better and far cheaper); 0: the full resolution",
        1024,
    )
    max_pixels: int = flag(
        "larger images are refused with an error row (decompression bombs, out-of-memory)", DEFAULT_MAX_PIXELS
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = flag(
        "fp32, or bf16/fp16 autocast; auto: bf16 when the actor computes on a GPU, else fp32", "auto"
    )
    channels_last: bool | None = flag(
        "channels_last memory format for the network; default: on when the actor computes on a GPU", None
    )
    postprocess_on: Literal["auto", "actor", "writer"] = flag(
        "where post-processing runs: actor = Poisson blending in torch on the inference device, batched "
        "(model/poisson.py); writer = OpenCV's fast marching + seamlessClone in the CPU write tasks "
        "(model/postprocess.py); auto = actor when the actor computes on a GPU, else writer",
        "auto",
    )
    actor_tasks_in_flight: int = flag(
        "batches queued at each inference actor, so the next one is fetched while the current one computes",
        4,
    )
    endpoint_url: str | None = flag(
        "S3-compatible endpoint (default: GLCIC_S3_ENDPOINT_URL / AWS_ENDPOINT_URL)", None
    )
    run_id: str | None = flag(
        "this run's id (a fresh one by default; must not exist under the manifest yet)", None
    )
    limit: int | None = flag("process at most this many listed images still to do", None)
    manifest_rows_per_part: int = flag("rows per manifest Parquet file", 4096)
    manifest_num_cpus: float = flag(
        "CPUs each manifest write task requests; 0: none, so the parts that commit finished work never wait "
        "for a CPU the pipeline's own tasks hold (bench/commit_lag.py)",
        0.0,
    )
    log_every_s: float = flag("seconds between progress lines in the job log", 10.0)

    def __post_init__(self):
        _raise_if(self, self.problems())

    def problems(self) -> list[str]:
        """What is wrong with the flags (a subclass adds its own checks to these)."""
        problems = []
        if not self.images or not self.output or not self.checkpoint:
            problems.append("--images, --output and --checkpoint are required")
        problems += _at_least_one(
            self, "task_batch_size", "manifest_rows_per_part", "max_pixels", "actor_tasks_in_flight"
        )
        if self.max_side < 0:
            problems.append("--max-side must be >= 0 (0: the full resolution)")
        if self.batch_size < 0:
            problems.append("--batch-size must be at least 1 (or 0: automatic)")
        if self.manifest_num_cpus < 0:
            problems.append(f"--manifest-num-cpus must be >= 0, got {self.manifest_num_cpus}")
        if self.num_actors < 0 or self.num_cpus_per_actor < 0 or self.num_cpus_per_task <= 0:
            problems.append("--num-actors and --num-cpus-per-actor must be >= 0, --num-cpus-per-task > 0")
        if self.min_actors < 1 or self.max_actors < 0:
            problems.append("--min-actors must be at least 1 and --max-actors at least 0")
        if self.max_actors and self.max_actors < self.min_actors:
            problems.append("--max-actors must be at least --min-actors (or 0: automatic)")
        if self.num_gpus_per_actor is not None and self.num_gpus_per_actor < 0:
            problems.append("--num-gpus-per-actor must be >= 0")
        if self.device == "cuda" and self.num_gpus_per_actor == 0:
            problems.append(
                "--device cuda needs --num-gpus-per-actor > 0: Ray gives an actor only the GPUs it requests"
            )
        if self.limit is not None and self.limit < 1:
            problems.append("--limit must be at least 1")
        problems += self.overlapping_prefixes()
        problems += hole_problems(self.local_size, self.hole_min, self.hole_max)
        if self.run_id is not None:
            from pipeline.storage import UnsafeKeyError, safe_relative_key

            try:
                safe_relative_key(f"run_id={self.run_id}")
            except UnsafeKeyError as e:
                problems.append(f"--run-id: {e}")
            if "/" in self.run_id:
                problems.append("--run-id must not contain '/'")
        return problems

    def written_prefixes(self) -> dict[str, str]:
        """The flags naming where this job writes, and their URIs."""
        return {"--output": self.output}

    def overlapping_prefixes(self) -> list[str]:
        """A prefix this job writes under that is (or holds, or lies inside) one it reads: a
        completion would replace its own input. Refused before anything is written."""
        from pipeline.storage import keys_root, overlaps

        if not self.images or not self.output:
            return []
        read = {"--images": keys_root(self.images), **({"--masks": self.masks} if self.masks else {})}
        return [
            f"{w_flag} {w_uri!r} and {r_flag} {r_uri!r} overlap (one is, or lies inside, the other): "
            f"writing there would replace inputs; choose an {w_flag} outside {r_flag}"
            for w_flag, w_uri in self.written_prefixes().items()
            for r_flag, r_uri in read.items()
            if overlaps(w_uri, r_uri)
        ]

    @property
    def hole_range(self) -> tuple[int, int] | None:
        return (self.hole_min, self.hole_max) if self.hole_min is not None else None

    def inference_batch_size(self, gpus_per_actor: float) -> int:
        """``batch_size``, or its automatic value: 64 images fill a GPU's batch at 256x256 far
        better than the 16 that keep a CPU actor's latency and memory low."""
        return self.batch_size or (64 if gpus_per_actor > 0 else 16)


# ---------------------------------------------------------------------------------------------
# Inpainting.


@dataclass(kw_only=True)
class InpaintConfig(BatchInferenceConfig):
    """Complete every image under --images with a trained generator; write results and a Parquet manifest."""

    manifest: str | None = flag("prefix for the Parquet manifest (default: <output>/_manifest)", None)
    input_format: Literal["auto", "files", "webdataset", "parquet"] = flag(
        "what --images holds: files (one object per image), webdataset (.tar shards; --images may be a brace "
        "pattern such as shards/{00000..00999}.tar) or parquet (files with the image bytes in a column, as "
        "img2dataset writes them); auto: what the listing finds (any .tar: webdataset)",
        "auto",
    )
    output_format: Literal["auto", "png", "same", "jpeg", "webp"] = flag(
        "png: <key>.png (keys already ending in .png unchanged; in a shard, the image member becomes "
        "<key>.png), known pixels then exact; same: the input's key and format; jpeg / webp: <key>.jpg / "
        "<key>.webp, lossy (quality 95); JPEG encodes about 25x faster than PNG, the writer's main CPU cost "
        "when post-processing runs in the actor (bench/stages.py); auto: png for files, same for shards "
        "(readers' to_tuple('jpg') keeps working; a JPEG re-encodes the known pixels too, and the manifest "
        "says so in known_pixels_exact)",
        "auto",
    )
    output_layout: Literal["same", "files", "webdataset", "parquet"] = flag(
        "shards: what --output holds; same: one output shard per input shard, of its layout and name; "
        "webdataset / parquet: the same, converted (00000.parquet -> 00000.tar: members {key}.{field}, or "
        "a key column and a binary column per field; a Parquet row's other columns travel as one json "
        "field); files: {shard stem}/{key}.{field} objects, as img2dataset's files layout. With files in, "
        "webdataset / parquet packs them: --shard-size images per shard in listing order, 00000.tar, ...",
        "same",
    )
    shard_size: int = flag(
        "packing files into shards (files in, --output-layout webdataset / parquet): images per output shard",
        1000,
    )
    image_column: str | None = flag(
        "parquet: the column of image bytes (default: the first of jpg, png, webp, image present)", None
    )
    key_column: str = flag("parquet: the column of sample keys", "key")
    mask_column: str = flag("parquet: a column of PNG hole masks (white = hole), used where present", "mask")
    image_ext: str | None = flag(
        "webdataset: the image member's extension, exactly (default: the member whose extension ends in "
        "jpg, jpeg, png or webp, never a mask.* one); a {key}.mask.png member is the sample's hole mask",
        None,
    )
    write_masks: bool = flag("also write the mask used, as PNG under <output>/_masks/", False)
    postprocess: bool = flag(
        "the paper's post-processing (fast marching + Poisson blending) of every output", True
    )
    skip_existing: bool = flag(
        "resume: skip inputs with an ok row in an earlier run of the manifest that had the same output, "
        "format, masks, mask seed and post-processing, and whose output still exists",
        True,
    )
    redo_other_checkpoint: bool = flag(
        "resume: also redo inputs an earlier run completed with another checkpoint (by default they are "
        "skipped, and the run says how many)",
        False,
    )
    verify_outputs: bool = flag(
        "resume: list --output once (a request per 1,000 objects) and redo inputs whose output is gone",
        True,
    )

    @property
    def manifest_uri(self) -> str:
        return self.manifest or f"{self.output.rstrip('/')}/_manifest"

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.shard_size < 1:
            problems.append(f"--shard-size must be >= 1, got {self.shard_size}")
        return problems

    @property
    def packing(self) -> bool:
        """Files in, shards out: the listing groups the images into shards of ``shard_size``."""
        from pipeline.shard_layout import packs_files

        return packs_files(self.input_format, self.output_layout)

    @property
    def sharded(self) -> bool:
        """The run goes shard by shard: shards in, or files packed into shards."""
        return self.input_format in ("webdataset", "parquet") or self.packing

    def resolved(self, layout: str) -> InpaintConfig:
        """This config with ``input_format`` the layout found and ``output_format`` decided: what
        the run's ``_config.json`` records and a resume compares."""
        output_format = self.output_format
        if output_format == "auto":
            output_format = "png" if layout == "files" else "same"
        output_layout = layout if self.output_layout == "same" else self.output_layout
        return dataclasses.replace(
            self, input_format=layout, output_format=output_format, output_layout=output_layout
        )

    def written_prefixes(self) -> dict[str, str]:
        return {"--output": self.output, **({"--manifest": self.manifest} if self.manifest else {})}


# ---------------------------------------------------------------------------------------------
# Evaluation.


@dataclass(kw_only=True)
class EvaluateConfig(BatchInferenceConfig):
    """Score the generator against OpenCV's Telea and Navier-Stokes fills and PatchMatch on the same seeded holes:
    hole PSNR, SSIM and hole L1 per image as Parquet rows, a summary (JSON + Markdown) and a grid PNG."""

    output: str = flag(
        "prefix of the evaluation: <output>/run_id=<id>/ holds the Parquet rows, _SUCCESS.json (the "
        "summary), _summary.md and _grid.png"
    )
    crop: int = flag(
        "evaluate a square of this side: the shorter side resized to it, then a centre crop (the trainer's "
        "validation view); 0 = the full image",
        256,
    )
    local_size: int | None = flag(
        "generated holes lie inside a box of this side (the local discriminator's patch), clipped to the "
        "image's shorter side",
        128,
    )
    hole_min: int | None = flag("smallest generated rectangle hole side in pixels", 64)
    hole_max: int | None = flag("largest generated rectangle hole side in pixels", 128)
    postprocess_on: Literal["auto", "actor", "writer"] = flag(
        "the post-processing model_post is scored with, as submit-inpaint would run it: writer = OpenCV's "
        "fast marching + seamlessClone (CPU write tasks), actor = the batched torch Poisson blend GPU "
        "actors run (model/poisson.py); auto = actor when the inference actors get GPUs, else writer",
        "auto",
    )
    grid_rows: int = flag(
        "rows of the comparison grid (input with hole | Telea | PatchMatch | glcic | truth), the first ok images "
        "by key; 0 = no grid",
        8,
    )

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.crop < 0:
            problems.append("--crop must be >= 0 (0 = the full image)")
        if self.crop and self.local_size and self.local_size > self.crop:
            problems.append(f"--local-size ({self.local_size}) must fit in --crop ({self.crop})")
        if self.grid_rows < 0:
            problems.append("--grid-rows must be >= 0")
        return problems


def hole_problems(local_size: int | None, hole_min: int | None, hole_max: int | None) -> list[str]:
    """The one check of the hole flags, for training, evaluation and inpainting alike."""
    if (hole_min is None) != (hole_max is None):
        return ["give --hole-min and --hole-max together (or neither: the paper's sizes)"]
    if local_size is not None and local_size < 1:
        return ["--local-size must be at least 1"]
    if hole_min is None:
        return []
    box = local_size if local_size is not None else 128  # model.masks.PAPER_LOCAL_SIZE
    if not 1 <= hole_min <= hole_max <= box:
        return [f"need 1 <= hole_min <= hole_max <= local_size, got {hole_min}..{hole_max} in {box}"]
    return []


def _at_least_one(config: Any, *names: str) -> list[str]:
    return [f"--{name.replace('_', '-')} must be at least 1" for name in names if getattr(config, name) < 1]


def _raise_if(config: Any, problems: list[str]) -> None:
    if problems:
        raise ValueError(f"bad {type(config).__name__}: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# The flags engine: dataclass fields <-> typer options <-> argv.


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return inspect.Parameter.empty


def _option_type(hint: Any) -> Any:
    """``int | None`` -> ``int``; ``Literal[...]``, ``bool``, ``int``, ``float``, ``str`` as they are."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else str
    if typing.get_origin(hint) is Literal or hint in (bool, int, float, str):
        return hint
    raise TypeError(f"no command-line flag for a {hint!r} field")


def config_parameters(cls: type) -> list[inspect.Parameter]:
    """One keyword-only typer option per field of ``cls``: its type, default and help."""
    import typer

    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        tp = _option_type(hints[f.name])
        default = _default(f)
        optional = tp if typing.get_origin(tp) is Literal or tp is bool else tp | None
        annotation = Annotated[optional, typer.Option(help=f.metadata.get("help", ""))]
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
        )
    return params


def with_signature(function: Callable, params: list[inspect.Parameter]) -> Callable:
    """``function(**values)`` presented to typer as taking ``params``."""
    function.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    function.__annotations__ = {p.name: p.annotation for p in params}
    return function


def parse_config(cls: type[C], argv: list[str] | None = None, prog_name: str | None = None) -> C:
    """The config that ``argv`` describes; bad flags print click's usage error and exit 2."""
    import typer

    command = with_signature(lambda **values: cls(**values), config_parameters(cls))
    command.__doc__ = cls.__doc__
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(command)
    click_command = typer.main.get_command(app)
    try:
        result = click_command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except ValueError as e:  # __post_init__'s checks
        raise SystemExit(f"error: {e}") from None
    except Exception as e:
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # click's usage errors
            e.show()
            raise SystemExit(e.exit_code) from None
        raise
    if not isinstance(result, cls):  # --help printed; click returns its exit code
        raise SystemExit(result or 0)
    return result


def run_main(cls: type[C], run: Callable[[C], dict], argv: list[str] | None, prog_name: str) -> int:
    """A batch job's ``python -m`` entry point: flags -> config -> ``run`` -> its counts, exit 0."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    summary = run(parse_config(cls, argv, prog_name=prog_name))
    print(f"summary: {summary['counts']}")
    return 0


def to_argv(config: Any) -> list[str]:
    """Flags that ``parse_config`` turns back into an equal config (defaults left out)."""
    argv: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None or value == _default(f):
            continue
        if isinstance(value, bool):
            argv.append(flag_name(f.name) if value else "--no-" + f.name.replace("_", "-"))
        else:
            argv += [flag_name(f.name), str(value)]
    return argv


def to_dict(config: Any) -> dict[str, Any]:
    """The config as shown and stored (printed, ``_config.json``, summaries, checkpoints): URLs
    without their ``user:password@``. The job itself gets the config whole."""
    from pipeline.storage import redact

    return {k: redact(v) if isinstance(v, str) else v for k, v in dataclasses.asdict(config).items()}


def to_json(config: Any) -> str:
    return json.dumps(
        {"type": type(config).__name__, **to_dict(config)}, indent=2, sort_keys=True, default=str
    )


def print_config(config: Any, log=print) -> None:
    log(f"{type(config).__name__}:")
    for key, value in to_dict(config).items():
        log(f"  {key} = {value!r}")


def save_config(config: Any, uri: str, endpoint_url: str | None = None) -> None:
    """Write the config as JSON at ``uri`` (any fsspec URI), whole or not at all."""
    from pipeline.storage import atomic_write_bytes, filesystem

    fs, path = filesystem(uri, endpoint_url)
    atomic_write_bytes(fs, path, to_json(config).encode())
