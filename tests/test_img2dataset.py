"""img2dataset itself builds the inputs: it downloads photos from a loopback HTTP server (with a
text file named .jpg and a missing URL among them) into WebDataset tars and into Parquet files, and
the inpainting job completes those folders as users have them.

img2dataset lives in a virtualenv of its own (`make test` makes `.venv-img2dataset`: it pins
albumentations, wandb and others that this project does not need) and runs as its command.
"""

from __future__ import annotations

import csv
import functools
import http.server
import io
import json
import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.config import InpaintConfig
from jobs.inpaint import run
from pipeline.decode import decode_image
from pipeline.manifest import read_manifest
from tests.helpers import REPO, missing_tool
from tests.test_shards import assert_known_pixels_kept, the_mask

INSTALL_HINT = "img2dataset is missing: make .venv-img2dataset/.installed (or set GLCIC_IMG2DATASET)"


def img2dataset_command() -> str:
    found = os.environ.get("GLCIC_IMG2DATASET") or str(REPO / ".venv-img2dataset" / "bin" / "img2dataset")
    if not Path(found).exists():
        missing_tool(INSTALL_HINT, "GLCIC_REQUIRE_IMG2DATASET")
    return found


@pytest.fixture(scope="module")
def served_photos(photos, tmp_path_factory):
    """Six photos, a text file named .jpg and a URL that does not exist, as img2dataset's CSV."""
    www = tmp_path_factory.mktemp("www")
    for i in range(6):
        crop = np.ascontiguousarray(photos[i][100:164, 150:230])
        sink = io.BytesIO()
        Image.fromarray(crop).save(sink, format="JPEG", quality=92)
        (www / f"photo{i}.jpg").write_bytes(sink.getvalue())
    (www / "notes.jpg").write_bytes(b"this is a text file, not a jpeg\n" * 10)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    names = (
        [f"photo{i}.jpg" for i in range(3)]
        + ["notes.jpg", "gone.jpg"]
        + [f"photo{i}.jpg" for i in range(3, 6)]
    )
    table = www.parent / "urls.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        for name in names:
            writer.writerow([f"{base}/{name}", f"a caption for {name}"])
    yield table
    server.shutdown()


def download(urls: Path, output: Path, output_format: str) -> None:
    subprocess.run(
        [
            img2dataset_command(),
            "--url_list",
            str(urls),
            "--input_format",
            "csv",
            "--url_col",
            "url",
            "--caption_col",
            "caption",
            "--output_folder",
            str(output),
            "--output_format",
            output_format,
            "--processes_count",
            "1",
            "--thread_count",
            "2",
            "--number_sample_per_shard",
            "4",
            "--resize_mode",
            "no",
            "--enable_wandb",
            "False",
            "--distributor",
            "multiprocessing",
        ],  # fmt: skip
        check=True,
        timeout=300,
        env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
        capture_output=True,
    )


def test_img2dataset_webdataset_folder_completed_in_place(
    ray_local, served_photos, tmp_path, tiny_checkpoint
):
    import webdataset as wds

    images, out = tmp_path / "wds", tmp_path / "out"
    download(served_photos, images, "webdataset")
    tars = sorted(p.name for p in images.glob("*.tar"))
    assert tars == ["00000.tar", "00001.tar"] and (images / "00000.parquet").exists()  # its metadata beside
    stats = {t: json.loads((images / t.replace(".tar", "_stats.json")).read_text()) for t in tars}

    summary = run(InpaintConfig(images=str(images), output=str(out), checkpoint=tiny_checkpoint, max_side=0))
    assert summary["config"]["input_format"] == "webdataset"
    rows = read_manifest(str(out / "_manifest")).to_pylist()
    # img2dataset keeps only its successes in the tars: each is a sample, each one completed.
    assert summary["counts"] == {"ok": sum(s["successes"] for s in stats.values()), "error": 0, "skipped": 0}
    assert {r["shard"] for r in rows} == set(tars)
    by_key = {r["input_key"]: r for r in rows}
    for tar in tars:
        inputs = list(wds.WebDataset(str(images / tar), shardshuffle=False))
        outputs = list(wds.WebDataset(str(out / tar), shardshuffle=False))
        assert [s["__key__"] for s in outputs] == [s["__key__"] for s in inputs]
        for source, done in zip(inputs, outputs, strict=True):
            assert set(done) == set(source)
            assert done["json"] == source["json"] and done["txt"] == source["txt"]  # byte for byte
            assert json.loads(done["json"])["caption"] == done["txt"].decode()
            row = by_key[source["__key__"]]
            assert row["output_member"] == f"{source['__key__']}.jpg"
            pixels = decode_image(done["jpg"])
            assert_known_pixels_kept(pixels, decode_image(source["jpg"]), the_mask(row), exact=False)
        assert json.loads((out / tar.replace(".tar", "_stats.json")).read_text())["successes"] == len(inputs)


def test_img2dataset_parquet_folder_keeps_its_failed_rows(
    ray_local, served_photos, tmp_path, tiny_checkpoint
):
    import duckdb

    images, out = tmp_path / "parquet", tmp_path / "out"
    download(served_photos, images, "parquet")
    shards = sorted(p.name for p in images.glob("*.parquet"))
    source = pq.read_table(images / shards[0])
    assert {"key", "jpg", "caption", "url", "status"} <= set(source.schema.names)

    summary = run(
        InpaintConfig(
            images=str(images), output=str(out), checkpoint=tiny_checkpoint, max_side=0, output_format="png"
        )
    )
    assert summary["config"]["input_format"] == "parquet"
    rows = read_manifest(str(out / "_manifest")).to_pylist()
    everything = duckdb.sql(
        f"select key, status, jpg is null from read_parquet('{images}/*.parquet')"
    ).fetchall()
    assert len(rows) == len(everything) == 8
    kinds = {r["input_key"]: (r["status"], r["error_type"]) for r in rows}
    for key, status, no_image in everything:
        # img2dataset's failed downloads and undecodable images are rows with a null jpg: null_image rows.
        assert kinds[key] == (("error", "null_image") if no_image else ("ok", None)), (key, status)
        assert (status == "success") == (not no_image)
    assert sum(no_image for *_, no_image in everything) == 2
    for shard in shards:
        before, after = pq.read_table(images / shard), pq.read_table(out / shard)
        assert after.schema.names == before.schema.names  # the input's columns, in its order
        assert after.column("key").to_pylist() == before.column("key").to_pylist()  # failed rows kept
        for name in before.schema.names:
            if name != "jpg":
                assert after.column(name).to_pylist() == before.column(name).to_pylist(), name
        for key, old, new in zip(*(t.column(n).to_pylist() for t, n in
                                   ((before, "key"), (before, "jpg"), (after, "jpg"))), strict=True):  # fmt: skip
            if old is None:
                assert new is None
                continue
            row = next(r for r in rows if r["input_key"] == key)
            assert new.startswith(b"\x89PNG") and row["known_pixels_exact"]
            assert_known_pixels_kept(decode_image(new), decode_image(old), the_mask(row), exact=True)
