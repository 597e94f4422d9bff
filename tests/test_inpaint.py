"""The inpainting job end to end on a local Ray (2 CPUs) and a real S3 server on 127.0.0.1.

Inputs are crops of the shipped photographs in several sizes, formats and modes, plus a prepared
set of broken inputs; every manifest row is checked against what the job must have done, and
every ``ok`` output is decoded and compared with its input outside the hole.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.config import InpaintConfig
from jobs.inpaint import run
from model.completion import CompletionNetwork
from model.masks import generate_mask
from pipeline import storage
from pipeline.checkpoint import ModelConfig, save_checkpoint
from pipeline.decode import decode_image
from pipeline.manifest import MANIFEST_COLUMNS, input_states, read_manifest
from tests.helpers import job_env, kill_at_first_part, write_objects

REPO = Path(__file__).resolve().parent.parent


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    sink = io.BytesIO()
    img.save(sink, format=fmt, **kwargs)
    return sink.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""
    data = encode(Image.new("L", (1, 1)), "PNG")
    at = data.index(b"IHDR")
    body = bytearray(data[at : at + 17])
    body[4:12] = struct.pack(">II", width, height)
    return data[:at] + bytes(body) + struct.pack(">I", zlib.crc32(bytes(body))) + data[at + 21 :]


def crop(photo: np.ndarray, h: int, w: int, at: int = 0) -> np.ndarray:
    return np.ascontiguousarray(photo[137 + at : 137 + at + h, 291 + at : 291 + at + w])


def good_inputs(photos) -> dict[str, bytes]:
    """Real photographs: several sizes (two share a padded size), formats and modes."""
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 56 wide x 40 tall, viewed 40 x 56
    rgba = np.dstack([crop(photos[3], 40, 40), np.full((40, 40), 200, np.uint8)])
    return {
        "a/photo 1.jpg": encode(Image.fromarray(crop(photos[0], 48, 64)), "JPEG", quality=92),
        "a/photo 2.png": encode(Image.fromarray(crop(photos[1], 48, 64)), "PNG"),
        "a/odd size.png": encode(Image.fromarray(crop(photos[2], 45, 62)), "PNG"),  # pads to 48x64
        "b/grey.png": encode(Image.fromarray(crop(photos[4], 40, 40)).convert("L"), "PNG"),
        "b/rgba.png": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "b/cmyk.jpg": encode(Image.fromarray(crop(photos[5], 40, 48)).convert("CMYK"), "JPEG", quality=95),
        "b/deep16.png": encode(
            Image.fromarray(crop(photos[6], 36, 36)[..., 0].astype(np.uint16) * 257), "PNG"
        ),
        "b/rotated.jpg": encode(
            Image.fromarray(crop(photos[7], 40, 56)), "JPEG", quality=92, exif=exif.tobytes()
        ),
        "c/ünïcødé ✓/sky 雲.webp": encode(Image.fromarray(crop(photos[8], 32, 44)), "WEBP", quality=90),
        "c/" + "/".join(f"d{i}" for i in range(12)) + "/deep.jpg": encode(
            Image.fromarray(crop(photos[9], 32, 32)), "JPEG"
        ),
    }


def broken_inputs(photos) -> dict[str, tuple[bytes, str]]:
    jpeg = encode(Image.fromarray(crop(photos[0], 48, 64, at=5)), "JPEG", quality=90)
    return {
        "broken/empty.jpg": (b"", "empty"),
        "broken/notes.txt": (b"not an image at all\n" * 10, "not_an_image"),
        "broken/truncated.jpg": (jpeg[: int(len(jpeg) * 0.8)], "truncated"),
        "broken/bomb.png": (bomb_png(30_000, 30_000), "too_large"),
    }


@pytest.fixture(scope="session")
def checkpoint(tiny_checkpoint) -> str:
    return tiny_checkpoint


def ok_rows(table) -> dict:
    return {r["input_key"]: r for r in table.to_pylist() if r["status"] == "ok"}


def check_ok_output(row: dict, source: bytes, output_root: str, mask: np.ndarray | None = None) -> np.ndarray:
    """The output exists, decodes to the input's size, and equals the input outside the hole."""
    fs, base = storage.filesystem(output_root)
    out_bytes = storage.read_bytes(fs, storage.join_key(base, row["output_key"]))
    out = decode_image(out_bytes)
    image = decode_image(source)
    assert out.shape == image.shape == (row["height"], row["width"], 3), row["input_key"]
    if mask is None:
        mask = generate_mask(
            row["mask_generator"], row["height"], row["width"], seed=row["mask_seed"], key=row["input_key"]
        )
    assert abs(mask.mean() - row["hole_fraction"]) < 1e-6
    known = mask == 0
    if row["output_key"].endswith(".png"):
        np.testing.assert_array_equal(out[known], image[known], err_msg=row["input_key"])
    return out


def test_local_prefix_end_to_end_then_rerun_skips(ray_local, tmp_path, photos, checkpoint):
    good, broken = good_inputs(photos), broken_inputs(photos)
    images = str(tmp_path / "in")
    write_objects(images, {**good, **{k: v for k, (v, _) in broken.items()}})
    output = str(tmp_path / "out")
    config = InpaintConfig(
        images=images, output=output, checkpoint=checkpoint, postprocess=False, batch_size=4, write_masks=True,
        manifest_rows_per_part=5,
    )  # fmt: skip
    summary = run(config)

    assert summary["counts"] == {"ok": len(good), "error": len(broken), "skipped": 0}
    # Write tasks bundle rows into parts of at least --manifest-rows-per-part (the last one may be
    # short), and the summary's counts are the parts' own.
    parts = sorted(Path(output, "_manifest", f"run_id={summary['run_id']}").glob("part-*.parquet"))
    sizes = sorted((pq.read_metadata(p).num_rows for p in parts), reverse=True)
    assert summary["manifest_parts"] == len(parts) and sum(sizes) == len(good) + len(broken)
    assert all(size >= 5 for size in sizes[:-1]) and len(parts) < len(good) + len(broken)
    table = read_manifest(f"{output}/_manifest", summary["run_id"])
    assert set(MANIFEST_COLUMNS) <= set(table.column_names)
    rows = {r["input_key"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted([*good, *broken])  # exactly one row per input, keys preserved
    for key, (_, kind) in broken.items():
        assert rows[key]["status"] == "error" and rows[key]["error_type"] == kind, rows[key]
        assert rows[key]["error_message"] and rows[key]["output_key"] is None
    for key, data in good.items():
        row = rows[key]
        assert row["status"] == "ok" and row["error_type"] is None, row
        assert row["output_key"] == (key if key.endswith(".png") else key + ".png")
        assert 0 < row["hole_fraction"] < 1 and row["mask_generator"] == "rectangle"
        assert row["checkpoint_id"] and row["inference_worker"] and row["node_id"]
        assert row["read_s"] >= 0 and row["inference_s"] > 0 and row["write_s"] > 0
        out = check_ok_output(row, data, output)
        hole = generate_mask("rectangle", row["height"], row["width"], seed=0, key=key).astype(bool)
        assert np.abs(out[hole].astype(int) - decode_image(data)[hole]).mean() > 1  # the hole was filled
        fs, base = storage.filesystem(output)
        written_mask = np.asarray(
            Image.open(io.BytesIO(storage.read_bytes(fs, f"{base}/{row['mask_output_key']}")))
        )
        np.testing.assert_array_equal(written_mask > 127, hole)
    assert (rows["b/rotated.jpg"]["width"], rows["b/rotated.jpg"]["height"]) == (40, 56)  # EXIF applied

    # Summary beside the manifest, readable by pandas and DuckDB with the run as a column.
    import duckdb
    import pandas as pd

    assert Path(output, "_manifest", f"run_id={summary['run_id']}", "_SUCCESS.json").exists()
    frame = pd.read_parquet(f"{output}/_manifest")
    assert len(frame) == len(good) + len(broken) and set(frame["run_id"]) == {summary["run_id"]}
    by_status = dict(
        duckdb.sql(
            f"select status, count(*) from read_parquet('{output}/_manifest/*/*.parquet', hive_partitioning=true) group by status"
        ).fetchall()
    )
    assert by_status == {"ok": len(good), "error": len(broken)}

    # Rerun: everything done is skipped (nothing rewritten), the errors are tried again.
    mtimes = {p: p.stat().st_mtime_ns for p in Path(output).rglob("*.png") if "_manifest" not in p.parts}
    again = run(config)
    assert again["run_id"] != summary["run_id"]
    assert again["counts"] == {"ok": 0, "error": len(broken), "skipped": len(good)}
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # Completed inputs never reach the rerun's rows: only the ones it worked on (the errors).
    rerun_rows = read_manifest(f"{output}/_manifest", again["run_id"]).to_pylist()
    assert sorted(r["input_key"] for r in rerun_rows) == sorted(broken)
    assert {r["status"] for r in rerun_rows} == {"error"}
    every_run = read_manifest(f"{output}/_manifest").to_pandas()
    assert every_run[every_run.status == "ok"].input_key.value_counts().max() == 1
    # The latest state of every input across both runs: the good ones done, the broken ones to do.
    states = {r["input_key"]: r for r in input_states(f"{output}/_manifest").to_pylist()}
    assert sorted(states) == sorted(rows)
    assert all(states[k]["status"] == "ok" and states[k]["run_id"] == summary["run_id"] for k in good)
    assert all(
        states[k]["status"] == "error"
        and states[k]["run_id"] == again["run_id"]
        and states[k]["attempts"] == 2
        for k in broken
    )
    assert not list(Path(output).rglob(".glcic-tmp-*"))


def test_masks_prefix_same_format_and_postprocess(ray_local, tmp_path, photos, checkpoint):
    """Masks read from a prefix: matching, missing, wrong-size, empty and full masks."""
    h, w = 48, 64
    hole = np.zeros((h, w), np.uint8)
    hole[10:30, 20:44] = 255
    names = ["good", "pngmask", "missing", "small", "black", "white"]
    images = {f"m/{name}.jpg": encode(Image.fromarray(crop(photos[i], h, w)), "JPEG", quality=95) for i, name in zip([0, 2, 3, 5, 6, 7], names, strict=True)}  # fmt: skip
    masks = {
        "m/good.jpg": encode(Image.fromarray(hole), "PNG"),
        "m/pngmask.png": encode(Image.fromarray(hole).convert("RGB"), "PNG"),  # same stem, .png
        "m/small.jpg": encode(Image.fromarray(hole[:40]), "PNG"),
        "m/black.jpg": encode(Image.fromarray(np.zeros_like(hole)), "PNG"),
        "m/white.jpg": encode(Image.fromarray(np.full_like(hole, 255)), "PNG"),
    }
    write_objects(str(tmp_path / "in"), images)
    write_objects(str(tmp_path / "masks"), masks)
    output = str(tmp_path / "out")
    summary = run(
        InpaintConfig(
            images=str(tmp_path / "in"), masks=str(tmp_path / "masks"), output=output, checkpoint=checkpoint,
            output_format="same", postprocess=True, batch_size=3, manifest=str(tmp_path / "manifest"),
        )
    )  # fmt: skip
    rows = {
        r["input_key"]: r for r in read_manifest(str(tmp_path / "manifest"), summary["run_id"]).to_pylist()
    }
    assert len(rows) == len(images)
    expect = {
        "m/good.jpg": ("ok", None),
        "m/pngmask.jpg": ("ok", None),
        "m/black.jpg": ("ok", None),
        "m/missing.jpg": ("error", "mask_missing"),
        "m/small.jpg": ("error", "mask_size_mismatch"),
        "m/white.jpg": ("error", "mask_all_hole"),
    }
    assert {k: (r["status"], r["error_type"]) for k, r in rows.items()} == expect
    assert (
        rows["m/pngmask.jpg"]["mask_key"] == "m/pngmask.png"
        and rows["m/good.jpg"]["mask_key"] == "m/good.jpg"
    )
    assert rows["m/good.jpg"]["mask_generator"] is None and rows["m/good.jpg"][
        "hole_fraction"
    ] == pytest.approx((hole > 0).mean())
    assert "no hole" in rows["m/black.jpg"]["error_message"]
    known = hole == 0
    for key in ("m/good.jpg", "m/pngmask.jpg", "m/black.jpg"):
        assert rows[key]["output_key"] == key  # same key, same format
        out_bytes = (Path(output) / key).read_bytes()
        assert Image.open(io.BytesIO(out_bytes)).format == "JPEG"
        out = decode_image(out_bytes).astype(int)
        original = decode_image(images[key]).astype(int)
        # JPEG re-encoding is lossy: known pixels stay close; the all-black mask changes nothing
        assert np.abs(out[known] - original[known]).mean() < 4
        if key == "m/black.jpg":
            assert np.abs(out - original).mean() < 4

    # The same without post-processing: only the hole differs (the blend takes the surroundings' colours).
    raw_output = str(tmp_path / "raw")
    run(InpaintConfig(images=str(tmp_path / "in"), masks=str(tmp_path / "masks"), output=raw_output,
                      checkpoint=checkpoint, output_format="same", postprocess=False, batch_size=3))  # fmt: skip
    blended = decode_image((Path(output) / "m/good.jpg").read_bytes()).astype(int)
    raw = decode_image((Path(raw_output) / "m/good.jpg").read_bytes()).astype(int)
    assert np.abs(blended[known] - raw[known]).mean() < 2
    assert np.abs(blended[~known] - raw[~known]).mean() > 2


def test_s3_prefix_and_list_file(ray_local, s3_prefix, photos, checkpoint, tmp_path):
    """Inputs, masks-free generation, outputs, manifest and checkpoint all on the S3 server."""
    good = good_inputs(photos)
    picked = ["a/photo 1.jpg", "a/odd size.png", "c/ünïcødé ✓/sky 雲.webp"]
    files = {f"imgs/{k}": good[k] for k in picked}
    lines = [*picked, "../escape.jpg", "a/never uploaded.jpg", "", "# comments are ignored", picked[0]]
    listing = "\n".join(lines) + "\n"
    files["imgs/list.txt"] = listing.encode()
    write_objects(s3_prefix, files)
    s3_ckpt = f"{s3_prefix}/ckpt"
    fs, base = storage.filesystem(checkpoint)
    write_objects(
        s3_ckpt,
        {name: storage.read_bytes(fs, f"{base}/{name}") for name in ("config.json", "generator.safetensors")},
    )

    config = InpaintConfig(
        images=f"{s3_prefix}/imgs/list.txt", output=f"{s3_prefix}/out", checkpoint=s3_ckpt, postprocess=False,
        mask_generator="freeform", mask_seed=7, batch_size=2,
    )  # fmt: skip
    summary = run(config)
    table = read_manifest(f"{s3_prefix}/out/_manifest", summary["run_id"])
    assert summary["counts"] == {"ok": 3, "error": 3, "skipped": 0}, table.select(
        ["input_key", "status", "error_type"]
    ).to_pylist()
    duplicate = [r for r in table.to_pylist() if r["error_type"] == "duplicate_key"]
    assert [r["input_key"] for r in duplicate] == [picked[0]]
    rows = {r["input_key"]: r for r in table.to_pylist() if r["error_type"] != "duplicate_key"}
    assert rows["../escape.jpg"]["error_type"] == "unsafe_key"
    assert rows["a/never uploaded.jpg"]["error_type"] == "not_found"
    for key in picked:
        assert (
            rows[key]["status"] == "ok"
            and rows[key]["mask_generator"] == "freeform"
            and rows[key]["mask_seed"] == 7
        )
        assert rows[key]["output_uri"] == f"{s3_prefix}/out/{rows[key]['output_key']}"
        check_ok_output(rows[key], good[key], f"{s3_prefix}/out")
    out_fs, out_base = storage.filesystem(f"{s3_prefix}/out")
    assert out_fs.exists(f"{out_base}/_manifest/run_id={summary['run_id']}/_SUCCESS.json")
    assert out_fs.exists(f"{out_base}/_manifest/run_id={summary['run_id']}/_config.json")

    # The prefix itself (not the list file): the list file is now an input that is not an image.
    again = run(
        InpaintConfig(images=f"{s3_prefix}/imgs", output=f"{s3_prefix}/out", checkpoint=s3_ckpt, postprocess=False,
                      mask_generator="freeform", mask_seed=7)
    )  # fmt: skip
    assert again["counts"] == {"ok": 0, "error": 1, "skipped": 3}


def test_precision_channels_last_and_size_buckets(ray_local, checkpoint, photos):
    """bf16 / channels_last stay within tolerance of fp32; a mixed-size batch equals images alone."""
    from pipeline.inference import InpaintPredictor

    fp32 = InpaintPredictor(checkpoint)
    images = [crop(photos[0], 48, 64), crop(photos[1], 45, 62), crop(photos[2], 48, 64)]
    masks = [generate_mask("rectangle", *im.shape[:2], seed=1, key=str(i)) for i, im in enumerate(images)]
    together = fp32.complete(images, masks)
    for image, mask, out in zip(images, masks, together, strict=True):
        alone = fp32.complete([image], [mask])[0]
        assert out.shape == image.shape
        assert np.abs(out.astype(int) - alone.astype(int)).max() <= 1
        np.testing.assert_array_equal(out[mask == 0], image[mask == 0])

    # An image the network cannot take (here: a mask of the wrong shape) fails alone, as a row.
    n = len(images) + 1
    batch = {
        "input_key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "status": np.array(["ok"] * n, dtype=object),
        "error_type": np.array([""] * n, dtype=object),
        "error_message": np.array([""] * n, dtype=object),
        "hole_fraction": np.full(n, 0.2, np.float32),
        "image": [*images, images[0]],
        "mask": [*masks, masks[0][:40]],
    }
    out = fp32(batch)
    assert list(out["status"]) == ["ok"] * len(images) + ["error"]
    assert out["error_type"][-1] == "inference_failed" and out["error_message"][-1]
    for got, expected in zip(out["completed"], together, strict=False):
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1

    for kwargs, tolerance in (
        ({"channels_last": True}, 1),
        ({"precision": "bf16"}, 12),
        ({"precision": "fp16"}, 2),
    ):
        other = InpaintPredictor(checkpoint, **kwargs).complete(images, masks)
        for a, b, mask in zip(together, other, masks, strict=True):
            diff = np.abs(a.astype(int) - b.astype(int))[mask == 1]
            assert diff.max() <= tolerance and diff.mean() <= tolerance / 4, (kwargs, diff.max(), diff.mean())


def test_gpu_actors_pinned_and_killed_actor_recovers(tmp_path, photos):
    """Logical GPUs: each actor holds its own GPU id; an actor killed mid-batch is restarted."""
    images = str(tmp_path / "in")
    write_objects(
        images,
        {
            f"g/{i:02d}.png": encode(Image.fromarray(crop(photos[i % 10], 96, 96, at=i)), "PNG")
            for i in range(24)
        },
    )
    # A model wide enough that inference, not reading, is the slow stage: batches queue, both actors work.
    checkpoint = str(tmp_path / "ckpt")
    save_checkpoint(
        checkpoint, ModelConfig(width=0.5, mean_pixel=(0.5, 0.5, 0.5)), CompletionNetwork(0.5).eval()
    )
    output = str(tmp_path / "out")
    script = f"""
import ray
from jobs.config import InpaintConfig
from jobs.inpaint import run
ray.init(num_cpus=2, num_gpus=2, include_dashboard=False)
ray.data.DataContext.get_current().wait_for_min_actors_s = 120  # both actors up before any batch
run(InpaintConfig(images={images!r}, output={output!r}, checkpoint={checkpoint!r}, postprocess=False,
                  batch_size=2, num_actors=2, num_cpus_per_actor=0.5, manifest_rows_per_part=4, run_id="gpu"))
"""
    marker = tmp_path / "crashed"
    env = job_env({"GLCIC_TEST_CRASH_AFTER_BATCHES": "2", "GLCIC_TEST_CRASH_MARKER": str(marker)})
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert marker.exists()  # the hook did kill an actor
    rows = read_manifest(f"{output}/_manifest", "gpu").to_pylist()
    assert sorted(r["input_key"] for r in rows) == [f"g/{i:02d}.png" for i in range(24)]
    assert all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert decode_image((Path(output) / r["output_key"]).read_bytes()).shape == (96, 96, 3)
    gpus_by_worker: dict[str, set] = {}
    for r in rows:
        gpus_by_worker.setdefault(r["inference_worker"], set()).add(r["gpu_id"])
    assert all(len(g) == 1 for g in gpus_by_worker.values()), gpus_by_worker
    assert {g for gs in gpus_by_worker.values() for g in gs} == {"0", "1"}


def test_killed_driver_then_resume(ray_local, tmp_path, photos, checkpoint):
    """Kill the job's process mid-run; the same command completes exactly what is missing."""
    n = 40
    images = str(tmp_path / "in")
    write_objects(
        images,
        {
            f"k/{i:02d}.jpg": encode(Image.fromarray(crop(photos[i % 10], 64, 64, at=i)), "JPEG")
            for i in range(n)
        },
    )
    output = str(tmp_path / "out")
    # Small task batches too: with the default 64, all 40 images travel as one block and the run
    # is over (bar _SUCCESS.json) by the time its first manifest part appears.
    argv = ["--images", images, "--output", output, "--checkpoint", checkpoint, "--batch-size", "2",
            "--task-batch-size", "2", "--manifest-rows-per-part", "2", "--no-postprocess"]  # fmt: skip
    manifest = Path(output, "_manifest")
    first_run = kill_at_first_part(argv, manifest)
    done_before = sum(pq.read_table(p).num_rows for p in first_run.glob("part-*.parquet"))
    assert 0 < done_before < n

    from jobs.config import parse_config

    summary = run(parse_config(InpaintConfig, argv))
    assert summary["counts"]["ok"] + summary["counts"]["skipped"] == n and summary["counts"]["error"] == 0
    assert summary["counts"]["skipped"] == done_before
    every_run = read_manifest(str(manifest)).to_pandas()
    ok = every_run[every_run.status == "ok"]
    assert sorted(ok.input_key) == [f"k/{i:02d}.jpg" for i in range(n)]  # exactly one ok row each
    for key in ok.output_key:  # no partial object under a final key
        assert decode_image((Path(output) / key).read_bytes()).shape == (64, 64, 3)


def test_postprocess_in_the_actor_matches_the_writers_and_lossy_formats(
    ray_local, tmp_path, photos, checkpoint
):
    """Where a GPU runs it (--postprocess-on actor: the torch Poisson blend, batched on the inference
    device), the post-processing agrees with the CPU writer's OpenCV blend; jpeg/webp name and encode
    what they say."""
    images = {f"p{i}.png": encode(Image.fromarray(crop(photos[i], 64, 64)), "PNG") for i in range(4)}
    write_objects(str(tmp_path / "in"), images)
    common = dict(images=str(tmp_path / "in"), checkpoint=checkpoint, batch_size=4, mask_seed=3)
    outputs = {}
    for where, fmt in (
        ("writer", "png"),
        ("actor", "png"),
        ("none", "png"),
        ("actor", "jpeg"),
        ("writer", "webp"),
    ):
        out = str(tmp_path / f"{where}-{fmt}")
        run(InpaintConfig(output=out, output_format=fmt, postprocess=where != "none",
                          postprocess_on="writer" if where == "none" else where, **common))  # fmt: skip
        outputs[where, fmt] = out
    for key in images:
        image = decode_image(images[key]).astype(int)
        hole = generate_mask("rectangle", 64, 64, seed=3, key=key).astype(bool)
        writer, actor, raw = (
            decode_image((Path(outputs[w, "png"]) / f"{key}").read_bytes()).astype(int)
            for w in ("writer", "actor", "none")
        )
        assert np.array_equal(actor[~hole], image[~hole])  # known pixels bit-exact (PNG)
        gap_blends = np.abs(actor[hole] - writer[hole]).mean()
        assert gap_blends < np.abs(raw[hole] - writer[hole]).mean() / 2, key  # a blend, near OpenCV's
        for fmt, pil_name in (("jpeg", "JPEG"), ("webp", "WEBP")):
            suffix = ".jpg" if fmt == "jpeg" else ".webp"
            data = (
                Path(outputs["actor" if fmt == "jpeg" else "writer", fmt]) / f"{key}{suffix}"
            ).read_bytes()
            assert Image.open(io.BytesIO(data)).format == pil_name
            assert np.abs(decode_image(data)[~hole].astype(int) - image[~hole]).mean() < 4  # quality 95


def test_large_images_are_completed_small_and_pasted_into_the_full_resolution(
    ray_local, tmp_path, photos, checkpoint
):
    """--max-side: the network completes a copy whose longer side is max_side; only the hole is
    upscaled and pasted, so every known pixel is the full-resolution original."""
    from pipeline.inference import paste, shrink

    image = crop(photos[0], 120, 160)
    mask = np.zeros((120, 160), np.uint8)
    mask[40:43, 50:110] = 1  # 3 px tall: it must survive a 4x reduction as a hole
    small, small_mask = shrink(image, mask, 40)
    assert small.shape == (30, 40, 3) and small_mask[10:11, 13:27].all() and small_mask.sum() < mask.sum()
    assert shrink(image, mask, 160)[0] is image  # small enough: untouched
    pasted = paste(image, mask, np.zeros_like(small))
    assert np.array_equal(pasted[mask == 0], image[mask == 0]) and not pasted[mask == 1].any()

    write_objects(str(tmp_path / "in"), {"big.png": encode(Image.fromarray(image), "PNG")})
    for max_side, out in ((40, "small"), (0, "full")):
        run(InpaintConfig(images=str(tmp_path / "in"), output=str(tmp_path / out), checkpoint=checkpoint,
                          postprocess=False, max_side=max_side, mask_seed=1))  # fmt: skip
    hole = generate_mask("rectangle", 120, 160, seed=1, key="big.png").astype(bool)
    small_run, full_run = (decode_image((tmp_path / d / "big.png").read_bytes()) for d in ("small", "full"))
    assert np.array_equal(small_run[~hole], image[~hole])
    assert (
        np.abs(small_run[hole].astype(int) - full_run[hole].astype(int)).mean() > 1
    )  # a different, smaller view


def test_a_file_name_that_is_not_utf8_is_one_error_row(ray_local, tmp_path, photos, checkpoint):
    """A local name in another encoding (Latin-1 ``café.jpg``) once failed every run in the
    manifest writer: now it is an error row with a printable URI, and the other images complete."""
    images = tmp_path / "in"
    images.mkdir()
    good = encode(Image.fromarray(crop(photos[0], 40, 48)), "PNG")
    (images / "a.png").write_bytes(good)
    (images / "b.png").write_bytes(good)
    os.close(os.open(os.fsencode(str(images)) + b"/caf\xe9.jpg", os.O_CREAT | os.O_WRONLY))
    config = InpaintConfig(images=str(images), output=str(tmp_path / "out"), checkpoint=checkpoint,
                           postprocess=False)  # fmt: skip
    for attempt in range(2):  # the rerun too: the good ones are skipped, the bad name is tried again
        summary = run(config)
        rows = {
            r["input_key"]: r
            for r in read_manifest(f"{tmp_path}/out/_manifest", summary["run_id"]).to_pylist()
        }
        bad = rows.pop("caf\\xe9.jpg")
        assert bad["status"] == "error" and bad["error_type"] == "unsafe_key", bad
        assert bad["input_uri"].endswith("caf\\xe9.jpg") and bad["input_uri"].isprintable()
        assert {k: r["status"] for k, r in rows.items()} == (
            {"a.png": "ok", "b.png": "ok"} if attempt == 0 else {}
        )


def test_with_write_masks_an_input_in_the_masks_folder_is_an_output_collision(
    ray_local, tmp_path, photos, checkpoint
):
    """``_masks/a.png`` (an input) and the mask of ``a.png`` once landed on one key, both rows ok."""
    data = encode(Image.fromarray(crop(photos[1], 40, 48)), "PNG")
    write_objects(str(tmp_path / "in"), {"a.png": data, "_masks/a.png": data})
    config = InpaintConfig(images=str(tmp_path / "in"), output=str(tmp_path / "out"), checkpoint=checkpoint,
                           postprocess=False, write_masks=True)  # fmt: skip
    summary = run(config)
    rows = {
        r["input_key"]: r for r in read_manifest(f"{tmp_path}/out/_manifest", summary["run_id"]).to_pylist()
    }
    assert rows["a.png"]["status"] == "ok" and rows["a.png"]["mask_output_key"] == "_masks/a.png"
    assert rows["_masks/a.png"]["status"] == "error"
    assert rows["_masks/a.png"]["error_type"] == "output_collision"
    mask = np.asarray(Image.open(tmp_path / "out" / "_masks" / "a.png"))
    assert set(np.unique(mask)) <= {0, 255}  # the mask, not a completed photo


def test_resume_redoes_what_other_settings_weights_or_deleted_outputs_made_stale(
    ray_local, tmp_path, photos, checkpoint
):
    """A rerun once skipped every input whatever changed: now another output format redoes them,
    other weights are named (and redone with --redo-other-checkpoint), a deleted output is redone."""
    import torch

    images = str(tmp_path / "in")
    write_objects(
        images, {f"p{i}.png": encode(Image.fromarray(crop(photos[i], 40, 48)), "PNG") for i in range(3)}
    )
    base = dict(images=images, output=str(tmp_path / "out"), postprocess=False, batch_size=4)
    first = run(InpaintConfig(checkpoint=checkpoint, **base))
    assert first["counts"] == {"ok": 3, "error": 0, "skipped": 0}

    jpeg = run(InpaintConfig(checkpoint=checkpoint, output_format="jpeg", **base))
    assert jpeg["counts"] == {"ok": 3, "error": 0, "skipped": 0}  # other outputs: made, not skipped
    assert jpeg["resume"]["redo_other_settings"] == 3
    assert sorted(p.name for p in Path(base["output"]).glob("*.jpg")) == [
        "p0.png.jpg",
        "p1.png.jpg",
        "p2.png.jpg",
    ]

    torch.manual_seed(1)
    other = str(tmp_path / "other-weights")
    save_checkpoint(
        other, ModelConfig(width=0.125, mean_pixel=(0.5, 0.5, 0.5)), CompletionNetwork(0.125).eval()
    )
    kept = run(InpaintConfig(checkpoint=other, **base))
    assert kept["counts"]["skipped"] == 3 and kept["resume"]["skipped_other_checkpoint"] == 3
    (Path(base["output"]) / "p1.png").unlink()
    redone = run(InpaintConfig(checkpoint=other, redo_other_checkpoint=True, **base))
    assert redone["counts"] == {"ok": 3, "error": 0, "skipped": 0}
    assert redone["resume"]["redo_other_checkpoint"] == 2 and redone["resume"]["redo_output_missing"] == 1
    assert set(redone["checkpoint_ids"]) != set(first["checkpoint_ids"])
    again = run(InpaintConfig(checkpoint=other, **base))
    assert again["counts"] == {"ok": 0, "error": 0, "skipped": 3}
    assert again["resume"]["skipped_other_checkpoint"] == 0


def test_alpha_colour_profiles_and_exactness_survive_the_job(ray_local, tmp_path, photos, checkpoint):
    """Alpha and the ICC profile come back with the completion; the manifest says, per output,
    whether its known pixels are the input's bit for bit (8-bit source, lossless output)."""
    from PIL import ImageCms

    rgb = crop(photos[2], 48, 64)
    alpha = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    deep = crop(photos[3], 48, 64)[..., 0].astype(np.uint16) * 257
    inputs = {
        "rgba.png": encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG", icc_profile=srgb),
        "rgb.png": encode(Image.fromarray(rgb), "PNG"),
        "deep.png": encode(Image.fromarray(deep), "PNG"),
        "photo.jpg": encode(Image.fromarray(rgb), "JPEG", quality=90),
    }
    write_objects(str(tmp_path / "in"), inputs)
    config = InpaintConfig(images=str(tmp_path / "in"), output=str(tmp_path / "out"), checkpoint=checkpoint,
                           output_format="same")  # fmt: skip
    summary = run(config)
    rows = {
        r["input_key"]: r for r in read_manifest(f"{tmp_path}/out/_manifest", summary["run_id"]).to_pylist()
    }
    assert {k: r["known_pixels_exact"] for k, r in rows.items()} == {
        "rgba.png": True, "rgb.png": True, "deep.png": False, "photo.jpg": False}  # fmt: skip
    out = Image.open(tmp_path / "out" / "rgba.png")
    assert out.mode == "RGBA" and out.info.get("icc_profile") == srgb
    pixels = np.asarray(out)
    np.testing.assert_array_equal(pixels[..., 3], alpha)  # alpha whole, hole included
    hole = generate_mask("rectangle", 48, 64, seed=0, key="rgba.png").astype(bool)
    np.testing.assert_array_equal(pixels[..., :3][~hole], rgb[~hole])
    plain = np.asarray(Image.open(tmp_path / "out" / "rgb.png"))
    assert plain.shape == (48, 64, 3) and np.array_equal(plain[~generate_mask(
        "rectangle", 48, 64, seed=0, key="rgb.png").astype(bool)], rgb[~generate_mask(
        "rectangle", 48, 64, seed=0, key="rgb.png").astype(bool)])  # fmt: skip
