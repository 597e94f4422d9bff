"""The picture at the top of README.md: the evaluate grid of the shipped weights on the validation split.

    make eval-grid                     # PHOTOS=../shared/photos by default
    python bench/eval_grid.py --photos photos/   # the set data/build_photos.py rebuilds

Copies the 30 validation photographs (``data/photos_split.tsv``) to a temporary folder, runs
``glcic submit-evaluate --local`` on them with ``--checkpoint default`` (every flag at its default:
256 px crops, seeded rectangle holes), then writes the grid (input with hole | Telea | PatchMatch |
glcic | truth, the first 8 photos by key) as ``model/weights/default/eval_grid.jpg`` and prints the
summary table that goes under it in README.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
GRID = REPO / "model" / "weights" / "default" / "eval_grid.jpg"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--photos", default=str(REPO.parent / "shared" / "photos"), help="the 271 photographs"
    )
    parser.add_argument("--grid", default=str(GRID), help="where the JPEG goes")
    args = parser.parse_args()
    with open(REPO / "data" / "photos_split.tsv", newline="") as f:
        val = [row["file"] for row in csv.DictReader(f, delimiter="\t") if row["split"] == "val"]
    with tempfile.TemporaryDirectory() as tmp:
        images, output = Path(tmp, "val"), Path(tmp, "eval")
        images.mkdir()
        for name in val:
            shutil.copy(Path(args.photos, name), images / name)
        command = [sys.executable, "-m", "jobs.cli", "submit-evaluate", "--local", "--images", str(images),
                   "--output", str(output), "--checkpoint", "default"]  # fmt: skip
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if result.returncode:
            sys.exit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
        (run,) = output.glob("run_id=*")
        summary = json.loads((run / "_SUCCESS.json").read_text())
        Image.open(run / "_grid.png").convert("RGB").save(args.grid, quality=85, optimize=True)
        print((run / "_summary.md").read_text())
    print(
        f"wrote {args.grid}: {len(val)} validation photos, checkpoint {', '.join(summary['checkpoint_ids'])}"
    )


if __name__ == "__main__":
    main()
