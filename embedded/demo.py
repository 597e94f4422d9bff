"""The end-to-end demo on the embedded default: what ``make demo`` runs, no cloud and no GPU needed.

1. starts a local S3 server (SeaweedFS on 127.0.0.1) and a local Ray head with its dashboard;
2. uploads the photographs of data/photos (licenses in data/photos/LICENSE.md) and one hole
   mask per photo to the bucket ``glcic-demo``;
3. runs ``glcic submit-train --wait`` for a short schedule (a demonstration of the training job),
   then ``glcic submit-inpaint --wait`` over the bucket prefix with the shipped weights
   (``--checkpoint default``), exactly as a user would type them;
4. prints the manifest summary, saves the manifest as demo_out/manifest.parquet and writes
   demo_out/contact_sheet.png: one row per photo, input with its hole | mask | output;
5. stops Ray and the S3 server, also when a step fails or on Ctrl-C.

``--fast`` is the CI variant: a tinier network and schedule, the same steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from embedded.servers import LocalRayHead, LocalS3Server

REPO = Path(__file__).resolve().parent.parent
BUCKET = "glcic-demo"
PHOTOS_URI = f"s3://{BUCKET}/photos"
MASKS_URI = f"s3://{BUCKET}/masks"
MODEL_URI = f"s3://{BUCKET}/model/final"
RUNS_URI = f"s3://{BUCKET}/model/runs"
COMPLETED_URI = f"s3://{BUCKET}/completed"
MANIFEST_URI = f"s3://{BUCKET}/manifest"
RUN_ID = "demo"

# Photos are uploaded at half their size: a CPU trains and completes them in minutes.
PHOTO_SIZE = (320, 200)
HEADER_HEIGHT = 24
GAP = 4
SHEET_COLUMNS = ("input with hole", "mask", "output")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The demo's training run: the paper's three phases, shrunk to minutes on two CPUs."""

    width: float
    image_size: int
    local_size: int
    hole_min: int
    hole_max: int
    batch_size: int
    tc: int
    td: int
    t_train: int

    def train_flags(self) -> list[str]:
        flags = []
        for name, value in dataclasses.asdict(self).items():
            flags += [f"--{name.replace('_', '-')}", str(value)]
        every = str(max(1, self.t_train // 4))
        return flags + ["--val-every", every, "--checkpoint-every", every, "--log-every", every]


FULL = Schedule(width=0.25, image_size=96, local_size=48, hole_min=24, hole_max=40, batch_size=8, tc=240, td=60, t_train=400)  # fmt: skip
FAST = Schedule(width=0.125, image_size=64, local_size=32, hole_min=12, hole_max=24, batch_size=4, tc=6, td=2, t_train=10)  # fmt: skip

# The masks the demo uploads: a hole of the size training used, scaled to the uploaded photos.
MASK_HOLE_RANGE = (36, 60)
MASK_LOCAL_SIZE = 72


def contact_sheet_size(rows: int) -> tuple[int, int]:
    """(width, height) of the contact sheet for ``rows`` photos."""
    width = len(SHEET_COLUMNS) * PHOTO_SIZE[0] + (len(SHEET_COLUMNS) + 1) * GAP
    height = HEADER_HEIGHT + rows * (PHOTO_SIZE[1] + GAP) + GAP
    return width, height


def log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def upload_inputs(fs, photos: list[Path]) -> list[str]:
    """Photos (at PHOTO_SIZE) and their masks (``<stem>.png``, white = hole); returns the keys."""
    from model.masks import rectangle_mask

    keys = []
    for path in photos:
        image = Image.open(path).convert("RGB").resize(PHOTO_SIZE, Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=92)
        key = path.name
        fs.pipe_file(f"{PHOTOS_URI}/{key}", buffer.getvalue())
        hole = rectangle_mask(
            PHOTO_SIZE[1],
            PHOTO_SIZE[0],
            seed=0,
            key=key,
            hole_range=MASK_HOLE_RANGE,
            local_size=MASK_LOCAL_SIZE,
        ).mask
        buffer = io.BytesIO()
        Image.fromarray(hole.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
        fs.pipe_file(f"{MASKS_URI}/{path.stem}.png", buffer.getvalue())
        keys.append(key)
    return keys


def glcic(args: list[str], env: dict[str, str]) -> None:
    """Run the CLI as a user would; a failed command fails the demo."""
    print(f"$ glcic {shlex.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, check=True, cwd=REPO)


def read_image(fs, uri: str, mode: str = "RGB") -> Image.Image:
    return Image.open(io.BytesIO(fs.cat_file(uri))).convert(mode)


def contact_sheet(fs, rows) -> Image.Image:
    """One row per manifest row: the input with its hole greyed out | the mask | the output."""
    sheet = Image.new("RGB", contact_sheet_size(len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(SHEET_COLUMNS):
        draw.text((GAP + c * (PHOTO_SIZE[0] + GAP) + 4, 6), title, fill="black")
    for r, row in enumerate(rows):
        image = read_image(fs, row["input_uri"]).resize(PHOTO_SIZE)
        mask = read_image(fs, f"{MASKS_URI}/{row['mask_key']}", "L").resize(
            PHOTO_SIZE, Image.Resampling.NEAREST
        )
        output = read_image(fs, row["output_uri"]).resize(PHOTO_SIZE)
        holed = Image.composite(Image.new("RGB", PHOTO_SIZE, (128, 128, 128)), image, mask)
        y = HEADER_HEIGHT + r * (PHOTO_SIZE[1] + GAP)
        for c, tile in enumerate((holed, mask.convert("RGB"), output)):
            sheet.paste(tile, (GAP + c * (PHOTO_SIZE[0] + GAP), y))
    return sheet


def run(out: Path, fast: bool, photos_dir: Path, num_cpus: int) -> dict:
    from pipeline.manifest import read_manifest

    schedule = FAST if fast else FULL
    photos = sorted(photos_dir.glob("*.jpg"))
    if not photos:
        raise SystemExit(f"error: no .jpg photographs in {photos_dir}")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with LocalS3Server(buckets=(BUCKET,)) as s3:
        log(f"S3 server (SeaweedFS) at {s3.endpoint_url}, bucket {BUCKET}")
        os.environ.update(s3.env())  # this process reads the manifest and outputs back too
        env = dict(os.environ)
        # The head gets the credentials in its environment; submitted jobs inherit them from there.
        with LocalRayHead(num_cpus=num_cpus, env=s3.env()) as head:
            log(f"Ray dashboard at {head.address}")
            env["RAY_ADDRESS"] = head.address
            fs = s3.filesystem()
            keys = upload_inputs(fs, photos)
            log(f"uploaded {len(keys)} photographs to {PHOTOS_URI}/ and their masks to {MASKS_URI}/")

            train_started = time.monotonic()
            glcic(
                ["submit-train", "--images", PHOTOS_URI, "--output", MODEL_URI, "--storage-path", RUNS_URI,
                 "--num-workers", "1", "--cpus-per-worker", "1", "--data-cpus", "0.5", "--val-fraction", "0.1",
                 "--no-channels-last", *schedule.train_flags(), "--wait"],
                env,
            )  # fmt: skip
            train_s = time.monotonic() - train_started

            # The few minutes of training above demonstrate the training job; the photographs are
            # completed with the weights that ship with glcic (model/weights/default/MODEL_CARD.md).
            inpaint_started = time.monotonic()
            glcic(
                ["submit-inpaint", "--images", PHOTOS_URI, "--masks", MASKS_URI, "--output", COMPLETED_URI,
                 "--checkpoint", "default", "--manifest", MANIFEST_URI, "--run-id", RUN_ID,
                 "--num-actors", "1", "--num-cpus-per-actor", "1", "--batch-size", "4", "--wait"],
                env,
            )  # fmt: skip
            inpaint_s = time.monotonic() - inpaint_started

            table = read_manifest(MANIFEST_URI, RUN_ID, s3.endpoint_url)
            pq.write_table(table, out / "manifest.parquet")
            summary = json.loads(fs.cat_file(f"{MANIFEST_URI}/run_id={RUN_ID}/_SUCCESS.json"))
            rows = sorted((r for r in table.to_pylist() if r["status"] == "ok"), key=lambda r: r["input_key"])
            sheet = contact_sheet(fs, rows)
            sheet.save(out / "contact_sheet.png")
    report = {
        "photos": len(keys),
        "counts": summary["counts"],
        "train_s": round(train_s, 1),
        "inpaint_s": round(inpaint_s, 1),
        "total_s": round(time.monotonic() - started, 1),
        "schedule": dataclasses.asdict(schedule),
        "manifest": str(out / "manifest.parquet"),
        "contact_sheet": str(out / "contact_sheet.png"),
        # Where the servers kept their state (removed now): lets a test check nothing outlived them.
        "state_dirs": [s3.data_dir, head.temp_dir],
        "servers": [s3.endpoint_url, head.address],
    }
    (out / "demo_summary.json").write_text(json.dumps(report, indent=2))
    log(f"manifest: {summary['images']} images, {summary['counts']}, {summary['images_per_s']} images/s")
    per_image = ", ".join(
        f"{k[:-2]} {v / max(1, summary['images']):.3f}s" for k, v in summary["stage_s"].items()
    )
    log(f"  per image: {per_image}; checkpoint {', '.join(summary['checkpoint_ids'])}")
    log(f"  rows: {MANIFEST_URI}/run_id={RUN_ID}/ (a copy in {out / 'manifest.parquet'})")
    log(f"training {train_s:.0f}s, inpainting {inpaint_s:.0f}s, all {report['total_s']:.0f}s")
    log(f"contact sheet: {out / 'contact_sheet.png'} ({len(rows)} rows: {', '.join(SHEET_COLUMNS)})")
    log("Ray and the S3 server are stopped")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", default=os.environ.get("GLCIC_DEMO_FAST") == "1",
                        help="the CI variant: a tinier network and schedule (default: $GLCIC_DEMO_FAST=1)")  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=REPO / "demo_out", help="where the results go (default: demo_out)"
    )
    parser.add_argument(
        "--photos", type=Path, default=REPO / "data" / "photos", help="a folder of .jpg photographs"
    )
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray head (default: 2)")
    args = parser.parse_args(argv)
    try:
        run(args.out, args.fast, args.photos, args.num_cpus)
    except subprocess.CalledProcessError as e:
        print(
            f"error: the demo step `glcic {shlex.join(e.cmd[3:])}` failed (exit {e.returncode})",
            file=sys.stderr,
        )
        return 1
    except RuntimeError as e:  # a server that would not start says which and why
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; Ray and the S3 server are stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
