"""The demo end to end, as `make demo` runs it but with its fast schedule: local S3, local Ray head,
`glcic submit-train`, `glcic submit-inpaint`, manifest and contact sheet, nothing left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def _processes_mentioning(texts: list[str]) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if any(text in cmdline for text in texts):
                found.append(f"{entry}: {cmdline[:120]}")
    return found


def test_fast_demo_trains_completes_every_photo_and_cleans_up(tmp_path, photo_paths):
    from embedded.demo import PHOTO_SIZE, SHEET_COLUMNS, contact_sheet_size

    out = tmp_path / "demo_out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-m", "embedded.demo", "--fast", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "$ glcic submit-train" in result.stdout and "$ glcic submit-inpaint" in result.stdout
    assert "SUCCEEDED" in result.stdout and "manifest: 11 images" in result.stdout

    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(row["input_key"] for row in manifest) == sorted(p.name for p in photo_paths)
    assert [row["status"] for row in manifest] == ["ok"] * len(photo_paths)
    assert all(0 < row["hole_fraction"] < 0.2 for row in manifest)

    sheet = np.asarray(Image.open(out / "contact_sheet.png").convert("RGB"))
    assert (sheet.shape[1], sheet.shape[0]) == contact_sheet_size(len(photo_paths))
    assert sheet.std() > 20, "the contact sheet is blank"
    # Every row's output column is a photograph, not a hole: it differs from the grey fill and the mask.
    width, height = PHOTO_SIZE
    for r in range(len(photo_paths)):
        y = 24 + r * (height + 4)
        holed, mask, output = (
            sheet[y : y + height, 4 + c * (width + 4) : 4 + c * (width + 4) + width] for c in range(3)
        )
        assert set(np.unique(mask)) <= {0, 255} and 0 < (mask == 255).mean() < 0.2
        hole = mask[..., 0] == 255
        assert np.all(holed[hole] == 128), "the input column shows the hole"
        assert np.abs(output[~hole].astype(int) - holed[~hole].astype(int)).mean() < 8, (
            "outside the hole: the input"
        )
        assert output[hole].std() > 1 or np.abs(output[hole].astype(int) - 128).mean() > 5
    assert len(SHEET_COLUMNS) == 3

    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["counts"]["ok"] == len(photo_paths) and summary["counts"]["error"] == 0
    # Ray's processes and SeaweedFS name their state directories on their command lines.
    assert len(summary["state_dirs"]) == 2
    assert _processes_mentioning(summary["state_dirs"]) == [], "the demo left Ray or the S3 server running"
    assert not any(Path(d).exists() for d in summary["state_dirs"])
    for url in summary["servers"]:  # the S3 endpoint and the Ray dashboard: nobody answers
        try:
            urllib.request.urlopen(url, timeout=5)
        except urllib.error.HTTPError:
            pytest.fail(f"{url} still answers")
        except OSError:
            continue
        pytest.fail(f"{url} still answers")
