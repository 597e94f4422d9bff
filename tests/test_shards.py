"""Sharded inputs end to end on a real local Ray: WebDataset tars written by the ``webdataset``
library and Parquet files in img2dataset's column layout, completed shard by shard, read back
with the ``webdataset`` library, pyarrow and DuckDB; on local disk and on the suite's SeaweedFS.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import posixpath
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.config import InpaintConfig
from jobs.inpaint import run
from model.masks import generate_mask
from pipeline import storage
from pipeline.decode import decode_image
from pipeline.manifest import read_manifest
from tests.helpers import tar_of


def encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    sink = io.BytesIO()
    Image.fromarray(array).save(sink, format=fmt, **kwargs)
    return sink.getvalue()


def crop(photo: np.ndarray, h: int, w: int, at: int = 0) -> np.ndarray:
    return np.ascontiguousarray(photo[120 + at : 120 + at + h, 200 + at : 200 + at + w])


def rect_mask(h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[10:30, 12:40] = 1
    return mask


def the_mask(row: dict) -> np.ndarray:
    return generate_mask(
        row["mask_generator"], row["height"], row["width"], seed=row["mask_seed"], key=row["input_key"]
    )


def assert_known_pixels_kept(out: np.ndarray, source: np.ndarray, mask: np.ndarray, exact: bool) -> None:
    known = mask == 0
    assert out.shape == source.shape
    if exact:
        np.testing.assert_array_equal(out[known], source[known])
    else:  # a JPEG output re-encodes them: within JPEG's error
        assert np.abs(out[known].astype(int) - source[known].astype(int)).mean() < 4.0


@pytest.fixture
def webdataset_inputs(tmp_path, photos):
    """Three shards: one by webdataset.TarWriter with good and bad samples, one with split keys,
    one cut short; beside the tars, img2dataset's metadata parquet and stats."""
    import webdataset as wds

    root = tmp_path / "in"
    root.mkdir()
    good_jpg = crop(photos[0], 48, 64)
    good_png = crop(photos[1], 40, 56)
    samples = [
        {"__key__": "000000000", "jpg": encode(good_jpg, "JPEG", quality=95), "json": b'{"caption": "a"}', "txt": b"a"},
        {"__key__": "000000001", "png": encode(good_png, "PNG"), "mask.png": encode(rect_mask(40, 56) * 255, "PNG"),
         "json": b'{"caption": "b"}'},
        {"__key__": "000000002", "jpg": b"this is text, not a jpeg\n" * 20, "json": b'{"caption": "c"}'},
        {"__key__": "000000003", "jpg": b"", "json": b'{"caption": "d"}'},
        {"__key__": "000000004", "jpg": encode(crop(photos[2], 48, 64), "JPEG", quality=95), "cls": b"7"},
    ]  # fmt: skip
    with wds.TarWriter(str(root / "00000.tar")) as writer:
        for sample in samples:
            writer.write(sample)
    (root / "00000.parquet").write_bytes(b"img2dataset's metadata, not images")
    (root / "00000_stats.json").write_text(json.dumps({"count": 5}))
    split = [
        ("000010000.jpg", encode(crop(photos[3], 32, 32), "JPEG")),
        ("000010001.jpg", encode(crop(photos[4], 32, 32), "JPEG")),
        ("000010000.json", b"{}"),
        ("000010002.jpg", encode(crop(photos[5], 32, 40), "JPEG")),
        ("000010002.json", b'{"k": 2}'),
    ]
    (root / "00001.tar").write_bytes(tar_of(split))
    whole = tar_of([(f"00002000{i}.jpg", encode(crop(photos[6 + i], 32, 32), "JPEG")) for i in range(3)])
    cut_at = whole.index(b"000020002.jpg") + 512 + 200  # inside the third image's data
    (root / "00002.tar").write_bytes(whole[:cut_at])
    return root, {"good_jpg": good_jpg, "good_png": good_png}


def test_webdataset_shards_end_to_end_then_resume_by_shard(
    ray_local, tmp_path, webdataset_inputs, tiny_checkpoint
):
    import duckdb
    import webdataset as wds

    root, sources = webdataset_inputs
    out = tmp_path / "out"
    config = InpaintConfig(images=str(root), output=str(out), checkpoint=tiny_checkpoint, max_side=0)
    summary = run(config)
    assert summary["config"]["input_format"] == "webdataset"
    assert summary["config"]["output_format"] == "same"
    rows = read_manifest(str(out / "_manifest")).to_pylist()
    by_key = {(r["shard"], r["input_key"]): r for r in rows}
    assert len(by_key) == len(rows) == 11  # one row per sample (the cut tar's damage is its last sample's)
    kinds = {k: (r["status"], r["error_type"]) for k, r in by_key.items()}
    assert kinds == {
        ("00000.tar", "000000000"): ("ok", None),
        ("00000.tar", "000000001"): ("ok", None),
        ("00000.tar", "000000002"): ("error", "not_an_image"),
        ("00000.tar", "000000003"): ("error", "empty"),
        ("00000.tar", "000000004"): ("ok", None),
        ("00001.tar", "000010000"): ("error", "split_key"),
        ("00001.tar", "000010001"): ("ok", None),
        ("00001.tar", "000010002"): ("ok", None),
        ("00002.tar", "000020000"): ("ok", None),
        ("00002.tar", "000020001"): ("ok", None),
        ("00002.tar", "000020002"): ("error", "truncated"),
    }
    assert summary["counts"] == {"ok": 7, "error": 4, "skipped": 0}
    # The img2dataset metadata beside the tars is not read as a shard.
    assert {r["shard"] for r in rows} == {"00000.tar", "00001.tar", "00002.tar"}
    png_row = by_key[("00000.tar", "000000001")]
    assert png_row["member"] == png_row["output_member"] == "000000001.png" and png_row["known_pixels_exact"]
    assert png_row["mask_key"] == "000000001.mask.png"
    jpg_row = by_key[("00000.tar", "000000000")]
    assert jpg_row["output_member"] == "000000000.jpg" and jpg_row["known_pixels_exact"] is False
    assert jpg_row["output_uri"].endswith("out/00000.tar")

    # Read back with the webdataset library: the same samples in the same order, minus the failed
    # ones with all their members; metadata members byte for byte; known pixels kept.
    inputs = {s["__key__"]: s for s in wds.WebDataset(str(root / "00000.tar"), shardshuffle=False)}
    outputs = list(wds.WebDataset(str(out / "00000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in outputs] == ["000000000", "000000001", "000000004"]
    for sample in outputs:
        source = inputs[sample["__key__"]]
        assert set(sample) - {"__url__", "__local_path__"} == set(source) - {"__url__", "__local_path__"}
        for ext in ("json", "txt", "cls", "mask.png"):
            if ext in source:
                assert sample[ext] == source[ext], (sample["__key__"], ext)
    first = decode_image(outputs[0]["jpg"])
    assert_known_pixels_kept(first, decode_image(inputs["000000000"]["jpg"]), the_mask(jpg_row), exact=False)
    second = decode_image(outputs[1]["png"])
    assert_known_pixels_kept(second, sources["good_png"], rect_mask(40, 56), exact=True)
    assert not np.array_equal(second, sources["good_png"])  # the hole was filled
    split_out = [s["__key__"] for s in wds.WebDataset(str(out / "00001.tar"), shardshuffle=False)]
    assert split_out == ["000010001", "000010002"]  # 000010000 is left out, its .json too
    with tarfile.open(out / "00001.tar") as tf:
        assert "000010000.json" not in tf.getnames()
    cut_out = [s["__key__"] for s in wds.WebDataset(str(out / "00002.tar"), shardshuffle=False)]
    assert cut_out == ["000020000", "000020001"]  # every complete member before the damage
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["count"] == 5 and stats["successes"] == 3

    # DuckDB over the manifest: per shard, its ok rows are the samples in its output shard.
    per_shard = dict(
        duckdb.sql(
            f"select shard, count(*) filter (where status = 'ok') from read_parquet('{out}/_manifest/*/*.parquet', "
            "hive_partitioning = true) group by shard"
        ).fetchall()
    )
    assert per_shard == {"00000.tar": 3, "00001.tar": 2, "00002.tar": 2}

    # A rerun skips every shard in the listing; a shard whose output is gone is redone alone.
    again = run(config)
    assert again["counts"] == {"ok": 0, "error": 0, "skipped": 11}
    assert again["resume"]["unit"] == "shards" and again["resume"]["skipped"] == 3
    os.remove(out / "00001.tar")
    redo = run(config)
    assert redo["counts"] == {"ok": 2, "error": 1, "skipped": 8}
    assert redo["resume"]["redo_output_missing"] == 1
    all_rows = read_manifest(str(out / "_manifest")).to_pylist()
    ok_per_sample = {}
    for r in all_rows:
        if r["status"] == "ok":
            ok_per_sample[(r["shard"], r["input_key"])] = (
                ok_per_sample.get((r["shard"], r["input_key"]), 0) + 1
            )
    assert sorted(ok_per_sample.values()) == [1] * 5 + [2] * 2  # 00001's good samples: its first and its redo
    assert [s["__key__"] for s in wds.WebDataset(str(out / "00001.tar"), shardshuffle=False)] == split_out


def img2dataset_table(photos, start: int) -> tuple[pa.Table, dict]:
    """A Parquet shard in img2dataset's column layout, with a failed download (null jpg) and a
    corrupt image among good ones."""
    images = {f"{start:05d}{i:04d}": crop(photos[start + i], 40, 48) for i in range(3)}
    keys = [*images, f"{start:05d}0003", f"{start:05d}0004"]
    jpgs = [encode(a, "JPEG", quality=95) for a in images.values()] + [None, b"\xff\xd8\xff garbage"]
    table = pa.table(
        {
            "key": keys,
            "jpg": pa.array(jpgs, pa.binary()),
            "url": [f"http://example.invalid/{k}.jpg" for k in keys],
            "caption": [f"caption {k}" for k in keys],
            "status": ["success"] * 3 + ["failed_to_download", "success"],
            "error_message": [None] * 3 + ["HTTP 404", None],
            "width": pa.array([48] * 3 + [None, 48], pa.int32()),
            "height": pa.array([40] * 3 + [None, 40], pa.int32()),
            "sha256": [f"{i:064x}" for i in range(5)],
        }
    )
    return table, {k: encode(a, "JPEG", quality=95) for k, a in images.items()}


def test_parquet_shards_on_s3_from_a_brace_pattern_as_png_with_masks(
    ray_local, s3_prefix, photos, tiny_checkpoint, tmp_path
):
    import duckdb

    fs, base = storage.filesystem(s3_prefix)
    sources = {}
    for shard in range(2):
        table, jpgs = img2dataset_table(photos, shard * 5)
        sources.update(jpgs)
        sink = io.BytesIO()
        pq.write_table(table, sink)
        storage.atomic_write_bytes(fs, storage.join_key(base, f"in/{shard:05d}.parquet"), sink.getvalue())
    config = InpaintConfig(
        images=f"{s3_prefix}/in/{{00000..00002}}.parquet",  # 00002 does not exist
        output=f"{s3_prefix}/out",
        checkpoint=tiny_checkpoint,
        output_format="png",
        write_masks=True,
        max_side=0,
    )
    summary = run(config)
    assert summary["config"]["input_format"] == "parquet"
    rows = read_manifest(f"{s3_prefix}/out/_manifest").to_pylist()
    kinds = sorted((r["shard"], r["input_key"] or "", r["status"], r["error_type"] or "") for r in rows)
    assert kinds == [
        ("00000.parquet", "000000000", "ok", ""),
        ("00000.parquet", "000000001", "ok", ""),
        ("00000.parquet", "000000002", "ok", ""),
        ("00000.parquet", "000000003", "error", "null_image"),
        ("00000.parquet", "000000004", "error", "not_an_image"),
        ("00001.parquet", "000050000", "ok", ""),
        ("00001.parquet", "000050001", "ok", ""),
        ("00001.parquet", "000050002", "ok", ""),
        ("00001.parquet", "000050003", "error", "null_image"),
        ("00001.parquet", "000050004", "error", "not_an_image"),
        ("00002.parquet", "", "error", "not_found"),
    ]
    assert all(r["known_pixels_exact"] for r in rows if r["status"] == "ok")

    local = tmp_path / "out.parquet"
    local.write_bytes(storage.read_bytes(fs, storage.join_key(base, "out/00000.parquet")))
    source_table, _ = img2dataset_table(photos, 0)
    # The input's schema and column order, plus the mask column; the corrupt row left out, the
    # failed download kept as it was.
    names = [d[0] for d in duckdb.sql(f"select * from read_parquet('{local}')").description]
    assert names == [*source_table.schema.names, "mask"]
    got = duckdb.sql(
        f"select key, url, caption, status, sha256, jpg is null as no_image from read_parquet('{local}')"
    ).fetchall()
    expect = [(k, u, c, s, h, k.endswith("3")) for k, u, c, s, h in zip(*(source_table.column(n).to_pylist() for n in
              ("key", "url", "caption", "status", "sha256")), strict=True) if not k.endswith("4")]  # fmt: skip
    assert got == expect
    out_table = pq.read_table(local)
    meta = pq.ParquetFile(local).metadata.row_group(0)
    compression = {meta.column(j).path_in_schema: meta.column(j).compression for j in range(meta.num_columns)}
    assert compression["jpg"] == compression["mask"] == "UNCOMPRESSED"
    for key, data, mask_png in zip(
        *(out_table.column(n).to_pylist() for n in ("key", "jpg", "mask")), strict=True
    ):
        if data is None:
            assert mask_png is None
            continue
        out = decode_image(data)
        assert data.startswith(b"\x89PNG")
        mask = (decode_image(mask_png)[..., 0] >= 128).astype(np.uint8)
        row = next(r for r in rows if r["input_key"] == key)
        np.testing.assert_array_equal(mask, the_mask(row))
        assert_known_pixels_kept(out, decode_image(sources[key]), mask, exact=True)
    stats = json.loads(storage.read_bytes(fs, storage.join_key(base, "out/00000_stats.json")))
    assert stats["count"] == 5 and stats["successes"] == 3
    assert not fs.exists(storage.join_key(base, "out/00002.parquet"))


def test_a_shard_above_the_multipart_threshold_on_s3(ray_local, s3_prefix, photos, tiny_checkpoint, tmp_path):
    """An output shard larger than twice storage.UPLOAD_CHUNK_BYTES goes up as a multipart upload
    (SeaweedFS's ETag says so) and comes back byte for byte."""
    import webdataset as wds

    fs, base = storage.filesystem(s3_prefix)
    blob = (
        np.random.default_rng(0)
        .integers(0, 256, 2 * storage.UPLOAD_CHUNK_BYTES + 1_000_000, np.uint8)
        .tobytes()
    )
    sink = io.BytesIO()
    with wds.TarWriter(sink) as writer:
        writer.write({"__key__": "big", "jpg": encode(crop(photos[0], 40, 40), "JPEG"), "bin": blob})
    storage.atomic_write_bytes(fs, storage.join_key(base, "in/00000.tar"), sink.getvalue())
    summary = run(
        InpaintConfig(
            images=f"{s3_prefix}/in", output=f"{s3_prefix}/out", checkpoint=tiny_checkpoint, max_side=0
        )
    )
    assert summary["counts"]["ok"] == 1
    path = storage.join_key(base, "out/00000.tar")
    fs.invalidate_cache()
    assert "-" in fs.info(path)["ETag"].strip('"')  # <md5 of the parts' md5s>-<parts>: a multipart upload
    local = tmp_path / "00000.tar"
    local.write_bytes(storage.read_bytes(fs, path))
    (sample,) = list(wds.WebDataset(str(local), shardshuffle=False))
    assert sample["bin"] == blob


def test_killed_driver_redoes_at_most_the_shards_in_flight(ray_local, tmp_path, photos, tiny_checkpoint):
    """Kill the job mid-run: the rerun skips every shard with manifest rows, redoes the rest, and
    each sample ends with exactly one ok row and exactly once in the output shards."""

    import webdataset as wds

    from jobs.config import parse_config
    from tests.helpers import kill_at_first_part

    shards, per_shard = 12, 3
    images = tmp_path / "in"
    images.mkdir()
    for s in range(shards):
        with wds.TarWriter(str(images / f"{s:05d}.tar")) as writer:
            for i in range(per_shard):
                array = crop(photos[(s + i) % 10], 64, 64, at=s)
                writer.write({"__key__": f"{s:05d}{i:04d}", "jpg": encode(array, "JPEG"), "json": b"{}"})
    output = tmp_path / "out"
    argv = ["--images", str(images), "--output", str(output), "--checkpoint", tiny_checkpoint, "--batch-size",
            "2", "--manifest-rows-per-part", "1", "--no-postprocess", "--max-side", "0"]  # fmt: skip
    manifest = output / "_manifest"
    kill_at_first_part(argv, manifest)
    first_rows = read_manifest(str(manifest)).to_pylist()
    done_shards = {r["shard"] for r in first_rows}
    assert 0 < len(done_shards) < shards
    assert len(first_rows) == per_shard * len(done_shards)  # a shard's rows are committed together

    summary = run(parse_config(InpaintConfig, argv))
    assert summary["counts"]["skipped"] == len(first_rows)
    assert summary["counts"]["ok"] == shards * per_shard - len(first_rows)
    rows = read_manifest(str(manifest)).to_pylist()
    ok = sorted((r["shard"], r["input_key"]) for r in rows if r["status"] == "ok")
    expected = sorted((f"{s:05d}.tar", f"{s:05d}{i:04d}") for s in range(shards) for i in range(per_shard))
    assert ok == expected  # exactly one ok row each
    written = sorted(
        (path.name, sample["__key__"])
        for path in sorted(output.glob("*.tar"))
        for sample in wds.WebDataset(str(path), shardshuffle=False)
    )
    assert written == expected  # each sample exactly once in the outputs
    assert not list(output.glob(".glcic-tmp-*"))


def test_masks_come_from_mask_shards_of_the_same_names(ray_local, tmp_path, photos, tiny_checkpoint):
    """--masks with shards: each sample's hole from the mask shard of its shard's name (a tar's
    {key}.mask.png or {key}.png member; a Parquet file's mask column), over the sample's own mask
    member; a sample without one, or a shard without a mask shard, gets mask_missing rows."""
    import webdataset as wds

    images, masks, out = tmp_path / "in", tmp_path / "masks", tmp_path / "out"
    images.mkdir(), masks.mkdir()
    pictures = [crop(photos[i], 40, 56, at=4 * i) for i in range(3)]
    holes = [np.zeros((40, 56), np.uint8) for _ in range(2)]
    holes[0][4:20, 6:30], holes[1][18:36, 20:50] = 1, 1
    for shard in range(2):
        with wds.TarWriter(str(images / f"{shard:05d}.tar")) as writer:
            for i, picture in enumerate(pictures):
                sample = {"__key__": f"{shard}{i:03d}", "png": encode(picture, "PNG"), "json": b"{}"}
                if i == 0:  # its own mask member, which --masks overrides
                    sample["mask.png"] = encode(rect_mask(40, 56) * 255, "PNG")
                writer.write(sample)
    with wds.TarWriter(str(masks / "00000.tar")) as writer:  # no mask shard for 00001.tar
        writer.write({"__key__": "0000", "mask.png": encode(holes[0] * 255, "PNG")})
        writer.write({"__key__": "0001", "png": encode(holes[1] * 255, "PNG")})  # none for 0002
    config = InpaintConfig(
        images=str(images), output=str(out), masks=str(masks), checkpoint=tiny_checkpoint, max_side=0,
        output_format="png",
    )  # fmt: skip
    summary = run(config)
    rows = {(r["shard"], r["input_key"]): r for r in read_manifest(str(out / "_manifest")).to_pylist()}
    assert {k: (r["status"], r["error_type"]) for k, r in rows.items()} == {
        ("00000.tar", "0000"): ("ok", None),
        ("00000.tar", "0001"): ("ok", None),
        ("00000.tar", "0002"): ("error", "mask_missing"),
        **{("00001.tar", f"1{i:03d}"): ("error", "mask_missing") for i in range(3)},
    }
    assert summary["counts"] == {"ok": 2, "error": 4, "skipped": 0}
    assert rows[("00000.tar", "0000")]["mask_key"] == "00000.tar/0000.mask.png"
    assert rows[("00000.tar", "0001")]["mask_key"] == "00000.tar/0001.png"
    outputs = list(wds.WebDataset(str(out / "00000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in outputs] == ["0000", "0001"]
    for sample, picture, hole in zip(outputs, pictures, holes, strict=False):
        completed = decode_image(sample["png"])
        assert_known_pixels_kept(completed, picture, hole, exact=True)
        assert rows[("00000.tar", sample["__key__"])]["hole_fraction"] == pytest.approx(hole.mean(), abs=1e-6)
        assert not np.array_equal(completed[hole == 1], picture[hole == 1])  # this hole was filled

    # Parquet: the mask shard's mask column, by key.
    pq_images, pq_masks, pq_out = tmp_path / "pq", tmp_path / "pq-masks", tmp_path / "pq-out"
    pq_images.mkdir(), pq_masks.mkdir()
    table, _ = img2dataset_table(photos, 0)
    pq.write_table(table, pq_images / "00000.parquet")
    keys = table.column("key").to_pylist()
    hole = np.zeros((40, 48), np.uint8)
    hole[8:24, 10:30] = 1
    pq.write_table(
        pa.table({"key": keys[:2], "mask": pa.array([encode(hole * 255, "PNG")] * 2, pa.binary())}),
        pq_masks / "00000.parquet",
    )
    run(InpaintConfig(images=str(pq_images), output=str(pq_out), masks=str(pq_masks), checkpoint=tiny_checkpoint,
                      max_side=0))  # fmt: skip
    pq_rows = {r["input_key"]: r for r in read_manifest(str(pq_out / "_manifest")).to_pylist()}
    assert [pq_rows[k]["status"] for k in keys[:2]] == ["ok", "ok"]
    assert {pq_rows[k]["mask_key"] for k in keys[:2]} == {"00000.parquet:mask"}
    assert pq_rows[keys[2]]["error_type"] == "mask_missing"
    assert pq_rows[keys[0]]["hole_fraction"] == pytest.approx(hole.mean(), abs=1e-6)


def test_tars_converted_to_parquet_then_resumed_by_output_shard(
    ray_local, tmp_path, webdataset_inputs, tiny_checkpoint
):
    """--output-layout parquet: a Parquet file per tar, a key column and a binary column per member,
    read back with DuckDB; failed samples left out; a rerun finds each shard's output by its new name."""
    import duckdb

    root, sources = webdataset_inputs
    out = tmp_path / "out"
    config = InpaintConfig(
        images=str(root), output=str(out), checkpoint=tiny_checkpoint, max_side=0, output_layout="parquet",
        write_masks=True,
    )  # fmt: skip
    summary = run(config)
    assert summary["config"]["output_layout"] == "parquet"
    assert summary["counts"] == {"ok": 7, "error": 4, "skipped": 0}
    assert sorted(p.name for p in out.glob("*.parquet")) == [
        "00000.parquet",
        "00001.parquet",
        "00002.parquet",
    ]
    assert not list(out.glob("*.tar"))
    rows = {(r["shard"], r["input_key"]): r for r in read_manifest(str(out / "_manifest")).to_pylist()}
    first = rows[("00000.tar", "000000000")]
    assert (first["output_key"], first["output_member"]) == ("00000.parquet", "jpg")
    assert first["output_uri"].endswith("out/00000.parquet")

    got = duckdb.sql(
        f"select key, jpg is not null, png is not null, decode(json), decode(txt), decode(cls), mask is not null "
        f"from read_parquet('{out}/00000.parquet')"
    ).fetchall()
    assert got == [
        ("000000000", True, False, '{"caption": "a"}', "a", None, True),
        ("000000001", False, True, '{"caption": "b"}', None, None, True),
        ("000000004", True, False, None, None, "7", True),
    ]  # 000000002 (text) and 000000003 (empty) are left out with their members
    table = pq.read_table(out / "00000.parquet")
    columns = {name: table.column(name).to_pylist() for name in table.schema.names}
    assert table.schema.names == ["key", "jpg", "json", "txt", "mask", "png", "cls"]  # first-seen order
    png_out = decode_image(columns["png"][1])
    assert_known_pixels_kept(png_out, sources["good_png"], rect_mask(40, 56), exact=True)
    np.testing.assert_array_equal((decode_image(columns["mask"][1])[..., 0] >= 128), rect_mask(40, 56) == 1)
    jpg_mask = (decode_image(columns["mask"][0])[..., 0] >= 128).astype(np.uint8)
    np.testing.assert_array_equal(jpg_mask, the_mask(first))
    assert_known_pixels_kept(decode_image(columns["jpg"][0]), sources["good_jpg"], jpg_mask, exact=False)
    assert json.loads((out / "00000_stats.json").read_text())["successes"] == 3
    cut = duckdb.sql(f"select key from read_parquet('{out}/00002.parquet')").fetchall()
    assert cut == [("000020000",), ("000020001",)]

    again = run(config)
    assert again["counts"] == {"ok": 0, "error": 0, "skipped": 11}
    os.remove(out / "00001.parquet")
    redo = run(config)
    assert redo["counts"] == {"ok": 2, "error": 1, "skipped": 8}
    assert redo["resume"]["redo_output_missing"] == 1
    # Another output layout is another output: nothing is skipped for it.
    mirrored = run(dataclasses.replace(config, output_layout="same", write_masks=False))
    assert mirrored["counts"]["skipped"] == 0 and (out / "00000.tar").exists()


def test_parquet_converted_to_webdataset_read_by_the_webdataset_library(
    ray_local, tmp_path, photos, tiny_checkpoint
):
    """img2dataset's Parquet -> --output-layout webdataset --output-format png: {key}.png members
    whose known pixels are exact, the row's other columns as {key}.json, null images left out."""
    import webdataset as wds

    table, jpgs = img2dataset_table(photos, 0)
    images = tmp_path / "in"
    images.mkdir()
    pq.write_table(table, images / "00000.parquet")
    out = tmp_path / "out"
    config = InpaintConfig(
        images=str(images), output=str(out), checkpoint=tiny_checkpoint, max_side=0,
        output_layout="webdataset", output_format="png",
    )  # fmt: skip
    summary = run(config)
    assert summary["counts"] == {"ok": 3, "error": 2, "skipped": 0}
    rows = {r["input_key"]: r for r in read_manifest(str(out / "_manifest")).to_pylist()}
    assert rows["000000000"]["output_member"] == "000000000.png" and rows["000000000"]["known_pixels_exact"]
    assert rows["000000000"]["output_key"] == "00000.tar"
    assert rows["000000003"]["error_type"] == "null_image"
    samples = list(wds.WebDataset(str(out / "00000.tar"), shardshuffle=False).decode("rgb8"))
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000002"]
    for sample in samples:
        key = sample["__key__"]
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == {"png", "json"}
        source = table.filter(pa.compute.equal(table.column("key"), key)).to_pylist()[0]
        assert sample["json"] == {
            k: v for k, v in source.items() if k not in ("key", "jpg") and v is not None
        }
        assert_known_pixels_kept(sample["png"], decode_image(jpgs[key]), the_mask(rows[key]), exact=True)
    assert json.loads((out / "00000_stats.json").read_text())["count"] == 5


def test_tars_on_s3_converted_to_files_never_escape_the_output(ray_local, s3_prefix, photos, tiny_checkpoint):
    """--output-layout files on SeaweedFS: {stem}/{key}.{field} objects, the stats file as the
    shard's completion marker for a resume, and a member key that would climb out of --output an
    unsafe_key row that writes nothing."""
    import webdataset as wds

    fs, base = storage.filesystem(s3_prefix)
    picture = crop(photos[0], 40, 48)
    sink = io.BytesIO()
    with wds.TarWriter(sink) as writer:
        writer.write(
            {"__key__": "sub/000000000", "jpg": encode(picture, "JPEG", quality=95), "txt": b"a cat"}
        )
        writer.write({"__key__": "000000001", "jpg": encode(crop(photos[1], 40, 48), "JPEG"), "json": b"{}"})
    escape = tar_of([("../../escape.jpg", encode(crop(photos[2], 32, 32), "JPEG"))])
    storage.atomic_write_bytes(fs, storage.join_key(base, "in/00000.tar"), sink.getvalue())
    storage.atomic_write_bytes(fs, storage.join_key(base, "in/00001.tar"), escape)
    config = InpaintConfig(
        images=f"{s3_prefix}/in", output=f"{s3_prefix}/out/", checkpoint=tiny_checkpoint, max_side=0,
        output_layout="files", write_masks=True,
    )  # fmt: skip
    summary = run(config)
    assert summary["counts"] == {"ok": 2, "error": 1, "skipped": 0}
    rows = {r["input_key"]: r for r in read_manifest(f"{s3_prefix}/out/_manifest").to_pylist()}
    assert rows["../../escape"]["error_type"] == "unsafe_key" and not rows["../../escape"]["output_key"]
    first = rows["sub/000000000"]
    assert (first["output_key"], first["mask_output_key"]) == (
        "00000/sub/000000000.jpg",
        "00000/sub/000000000.mask.png",
    )
    found = sorted(
        storage.relative_key(storage.join_key(base, "out"), p) for p in fs.find(storage.join_key(base, "out"))
    )
    outputs = [k for k in found if not k.startswith("_manifest/")]
    assert outputs == [
        "00000/000000001.jpg", "00000/000000001.json", "00000/000000001.mask.png",
        "00000/sub/000000000.jpg", "00000/sub/000000000.mask.png", "00000/sub/000000000.txt",
        "00000_stats.json", "00001_stats.json",
    ]  # fmt: skip
    assert not [p for p in fs.find(base) if posixpath.basename(p).startswith("escape")]
    assert storage.read_bytes(fs, storage.join_key(base, "out/00000/sub/000000000.txt")) == b"a cat"
    out = decode_image(storage.read_bytes(fs, storage.join_key(base, "out/00000/sub/000000000.jpg")))
    assert_known_pixels_kept(
        out, decode_image(encode(picture, "JPEG", quality=95)), the_mask(first), exact=False
    )

    assert run(config)["counts"] == {"ok": 0, "error": 0, "skipped": 3}
    fs.rm(storage.join_key(base, "out/00000_stats.json"))  # the marker gone: the shard is redone
    assert run(config)["counts"] == {"ok": 2, "error": 0, "skipped": 1}


def test_files_packed_into_tars_then_resumed_when_images_are_added(
    ray_local, tmp_path, photos, tiny_checkpoint
):
    """--output-layout webdataset with files in: --shard-size images per tar in listing order, keys
    as img2dataset numbers them, each sample's json naming its file; a rerun after an image is added
    redoes only the pack that changed, and every image stays in exactly one tar."""
    import webdataset as wds

    images, out = tmp_path / "in", tmp_path / "out"
    (images / "b").mkdir(parents=True)
    sources = {}
    for i, name in enumerate(["a0.jpg", "a1.png", "b/c2.jpg", "b/c3.jpg", "b/c4.png", "d5.jpg"]):
        picture = crop(photos[i], 40, 48)
        data = encode(picture, "PNG") if name.endswith(".png") else encode(picture, "JPEG", quality=95)
        (images / name).write_bytes(data)
        sources[name] = decode_image(data)
    (images / "b" / "bad.jpg").write_bytes(b"not a jpeg")
    config = InpaintConfig(
        images=str(images), output=str(out), checkpoint=tiny_checkpoint, max_side=0,
        output_layout="webdataset", shard_size=3,
    )  # fmt: skip
    summary = run(config)
    assert summary["counts"] == {"ok": 6, "error": 1, "skipped": 0}
    rows = {r["input_key"]: r for r in read_manifest(str(out / "_manifest")).to_pylist()}
    packs = {key: (r["shard"], r["status"]) for key, r in rows.items()}
    assert packs == {  # listing order: a folder's files, then its subfolders
        "a0.jpg": ("00000.tar", "ok"), "a1.png": ("00000.tar", "ok"), "d5.jpg": ("00000.tar", "ok"),
        "b/bad.jpg": ("00001.tar", "error"), "b/c2.jpg": ("00001.tar", "ok"), "b/c3.jpg": ("00001.tar", "ok"),
        "b/c4.png": ("00002.tar", "ok"),
    }  # fmt: skip
    assert rows["a1.png"]["output_member"] == "000000001.png" and rows["a1.png"]["known_pixels_exact"]
    assert rows["b/bad.jpg"]["error_type"] == "not_an_image"
    assert rows["a0.jpg"]["input_uri"].endswith("in/a0.jpg") and rows["a0.jpg"]["output_key"] == "00000.tar"

    def read_back() -> dict[str, list]:
        found = {}
        for tar in sorted(out.glob("*.tar")):
            found[tar.name] = list(wds.WebDataset(str(tar), shardshuffle=False).decode("rgb8"))
        return found

    tars = read_back()
    assert {name: [s["__key__"] for s in samples] for name, samples in tars.items()} == {
        "00000.tar": ["000000000", "000000001", "000000002"],
        "00001.tar": ["000010001", "000010002"],  # the bad file (its first sample) is left out
        "00002.tar": ["000020000"],
    }
    for samples in tars.values():
        for sample in samples:
            assert set(sample) - {"__key__", "__url__", "__local_path__"} == {"png", "json"}
            row = rows[sample["json"]["source_key"]]
            assert row["output_member"] == f"{sample['__key__']}.png"
            assert_known_pixels_kept(sample["png"], sources[row["input_key"]], the_mask(row), exact=True)

    assert run(config)["counts"] == {"ok": 0, "error": 0, "skipped": 7}
    late = crop(photos[7], 40, 48)
    (images / "b" / "c5.jpg").write_bytes(
        encode(late, "JPEG", quality=95)
    )  # listed last: joins the third pack
    again = run(config)
    assert again["counts"] == {"ok": 2, "error": 0, "skipped": 6}
    held = [s["json"]["source_key"] for samples in read_back().values() for s in samples]
    assert sorted(held) == sorted([*sources, "b/c5.jpg"])  # each image in exactly one tar


def test_files_packed_into_parquet_on_s3_with_their_masks(
    ray_local, s3_prefix, photos, tiny_checkpoint, tmp_path
):
    import duckdb

    from tests.helpers import write_objects

    files, masks = {}, {}
    for i in range(4):
        files[f"img/{i}.jpg"] = encode(crop(photos[i], 40, 48), "JPEG", quality=95)
        masks[f"img/{i}.png"] = encode(rect_mask(40, 48) * 255, "PNG")  # at the image's key, as .png
    write_objects(f"{s3_prefix}/in", files)
    write_objects(f"{s3_prefix}/masks", masks)
    config = InpaintConfig(
        images=f"{s3_prefix}/in", output=f"{s3_prefix}/out", masks=f"{s3_prefix}/masks", checkpoint=tiny_checkpoint,
        max_side=0, output_layout="parquet", shard_size=3,
    )  # fmt: skip
    assert run(config)["counts"] == {"ok": 4, "error": 0, "skipped": 0}
    fs, base = storage.filesystem(s3_prefix)
    for name in ("00000.parquet", "00001.parquet"):
        (tmp_path / name).write_bytes(storage.read_bytes(fs, storage.join_key(base, f"out/{name}")))
    got = duckdb.sql(
        f"select key, json_extract_string(decode(json), '$.source_key'), png is not null "
        f"from read_parquet('{tmp_path}/*.parquet') order by key"
    ).fetchall()
    assert got == [
        ("000000000", "img/0.jpg", True), ("000000001", "img/1.jpg", True), ("000000002", "img/2.jpg", True),
        ("000010000", "img/3.jpg", True),
    ]  # fmt: skip
    table = pq.read_table(tmp_path / "00000.parquet")
    assert table.schema.names == ["key", "png", "json"]
    rows = {r["input_key"]: r for r in read_manifest(f"{s3_prefix}/out/_manifest").to_pylist()}
    assert rows["img/0.jpg"]["mask_key"] == "img/0.png"
    for key, png in zip(*(table.column(n).to_pylist() for n in ("key", "png")), strict=True):
        source = decode_image(files[f"img/{int(key[-1])}.jpg"])
        assert_known_pixels_kept(decode_image(png), source, rect_mask(40, 48), exact=True)
