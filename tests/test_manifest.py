"""The manifest's format and the resume index built from it (no Ray needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline import manifest as m
from pipeline.naming import contains, key_digests
from pipeline.resume import ResumeRule, resume_index, resume_settings


def rows(keys: list[str], statuses: list[str]) -> dict[str, list]:
    n = len(keys)
    ok = [s == "ok" for s in statuses]
    return {
        "input_key": keys,
        "input_uri": [f"s3://bucket/in/{k}" for k in keys],
        "mask_key": [""] * n,
        "mask_generator": ["rectangle"] * n,
        "mask_seed": [3] * n,
        "output_key": [f"{k}.png" if o else "" for k, o in zip(keys, ok, strict=True)],
        "output_uri": [f"s3://bucket/out/{k}.png" if o else "" for k, o in zip(keys, ok, strict=True)],
        "mask_output_key": [""] * n,
        "width": [64 if o else 0 for o in ok],
        "height": [48 if o else 0 for o in ok],
        "hole_fraction": [0.25 if o else float("nan") for o in ok],
        "known_pixels_exact": ok,
        "status": statuses,
        "error_type": ["" if o else "not_an_image" for o in ok],
        "error_message": ["" if o else "not a recognised image format" for o in ok],
        "checkpoint_id": ["abc123"] * n,
        "read_s": np.full(n, 0.01, np.float32),
        "decode_s": np.full(n, 0.02, np.float32),
        "inference_s": np.full(n, 0.03, np.float32),
        "write_s": np.full(n, 0.04, np.float32),
        "node_id": ["node"] * n,
        "inference_worker": ["actor"] * n,
        "gpu_id": [""] * n,
    }


def test_in_flight_placeholders_become_nulls():
    table = m.rows_to_table(rows(["a.jpg", "b.jpg"], ["ok", "error"]))
    assert table.schema == m.MANIFEST_SCHEMA
    ok, err = table.to_pylist()
    assert ok["output_key"] == "a.jpg.png" and ok["width"] == 64 and ok["mask_seed"] == 3
    assert ok["error_type"] is None and ok["mask_key"] is None and ok["gpu_id"] is None
    assert err["output_key"] is None and err["width"] is None and err["hole_fraction"] is None
    assert err["error_type"] == "not_an_image"
    masked = rows(["c.jpg"], ["ok"])
    masked["mask_generator"], masked["mask_key"] = [""], ["c.png"]
    (row,) = m.rows_to_table(masked).to_pylist()
    assert row["mask_seed"] is None and row["mask_generator"] is None and row["mask_key"] == "c.png"


def test_parts_are_idempotent_and_runs_are_separate(tmp_path):
    manifest = str(tmp_path / "manifest")
    table = m.rows_to_table(rows(["x/1.jpg", "x/2.jpg", "x/3.jpg"], ["ok", "error", "ok"]))
    first = m.write_part(manifest, "run-a", table)
    assert m.write_part(manifest, "run-a", table) == first  # a retried task rewrites the same part
    other = m.rows_to_table(rows(["x/1.jpg", "x/2.jpg", "x/3.jpg"], ["skipped", "ok", "skipped"]))
    m.write_part(manifest, "run-b", other)
    assert pq.read_table(first).num_rows == 3
    assert sorted(p.name for p in tmp_path.glob("manifest/*")) == ["run_id=run-a", "run_id=run-b"]
    assert m.run_exists(manifest, "run-a") and not m.run_exists(manifest, "run-c")
    assert not list(tmp_path.rglob(".glcic-tmp-*"))

    every = m.read_manifest(manifest).to_pandas()
    assert len(every) == 6 and set(every.run_id) == {"run-a", "run-b"}
    assert len(m.read_manifest(manifest, "run-b")) == 3

    # Resume index: ok rows of any run with the same settings, nothing else.
    for run in ("run-a", "run-b"):
        write_run_config(manifest, run, SETTINGS)
    report, done = resume_index(manifest, None, ResumeRule(settings=resume_settings(SETTINGS)))
    assert len(done) == 3 and list(done) == sorted(done) and report.skipped == 3
    probe = key_digests(["x/1.jpg", "x/2.jpg", "x/3.jpg", "x/4.jpg", "ünï/ ✓.jpg"])
    assert contains(done, probe).tolist() == [True, True, True, False, False]
    assert contains(np.empty(0, "S16"), probe).tolist() == [False] * 5


SETTINGS = {"images": "s3://bucket/in", "output": "s3://bucket/out", "output_format": "png", "masks": None,
            "mask_generator": "rectangle", "mask_seed": 3, "postprocess": True, "max_side": 1024,
            "write_masks": False}  # fmt: skip


def write_run_config(manifest: str, run: str, settings: dict) -> None:
    path = Path(manifest, f"run_id={run}", m.RUN_CONFIG_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"type": "InpaintConfig", **settings}))


def test_unreadable_part_is_ignored_by_resume(tmp_path):
    manifest = str(tmp_path / "manifest")
    m.write_part(manifest, "good", m.rows_to_table(rows(["a.jpg"], ["ok"])))
    write_run_config(manifest, "good", SETTINGS)
    bad = tmp_path / "manifest" / "run_id=crashed" / "part-000.parquet"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"PAR1 this is not a parquet file")
    write_run_config(manifest, "crashed", SETTINGS)
    rule = ResumeRule(settings=resume_settings(SETTINGS))
    assert contains(resume_index(manifest, None, rule)[1], key_digests(["a.jpg"])).tolist() == [True]
    assert len(resume_index(str(tmp_path / "nothing here"), None, rule)[1]) == 0


def test_resume_skips_only_what_is_still_right(tmp_path):
    """An earlier ok row is skipped only when its run had the same output-deciding settings (read
    from its _config.json), its output exists, and (with --redo-other-checkpoint) its weights."""
    manifest, out = str(tmp_path / "manifest"), tmp_path / "out"
    ours = {**SETTINGS, "output": str(out)}
    m.write_part(manifest, "png", m.rows_to_table(rows(["a.jpg", "b.jpg", "c.jpg"], ["ok", "ok", "error"])))
    write_run_config(manifest, "png", ours)
    jpeg_rows = rows(["d.jpg"], ["ok"])
    m.write_part(manifest, "jpeg", m.rows_to_table(jpeg_rows))
    write_run_config(manifest, "jpeg", {**ours, "output_format": "jpeg", "mask_seed": 4})
    other = rows(["e.jpg"], ["ok"])
    other["checkpoint_id"] = ["other9"]
    m.write_part(manifest, "weights", m.rows_to_table(other))
    write_run_config(manifest, "weights", ours)
    out.mkdir()
    for name in ("a.jpg.png", "e.jpg.png", "d.jpg.png"):  # b.jpg's output was deleted
        (out / name).write_bytes(b"x")

    rule = ResumeRule(settings=resume_settings(ours), checkpoint_id="abc123", verify_output=str(out))
    report, done = resume_index(manifest, None, rule)
    assert contains(done, key_digests(["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"])).tolist() == [
        True, False, False, False, True]  # fmt: skip
    assert (report.skipped, report.skipped_other_checkpoint, report.redo_output_missing) == (2, 1, 1)
    assert report.redo_other_settings == 1
    assert report.runs_other_settings == {"jpeg": ["output_format", "mask_seed"]}
    assert any("--redo-other-checkpoint" in line for line in report.lines("abc123"))

    redo = ResumeRule(**{**rule.__dict__, "redo_other_checkpoint": True})
    report, done = resume_index(manifest, None, redo)
    assert contains(done, key_digests(["a.jpg", "e.jpg"])).tolist() == [True, False]
    assert report.redo_other_checkpoint == 1 and report.skipped == 1
    # The same place spelled another way is the same setting.
    spelled = resume_settings({**ours, "output": str(out) + "/"})
    assert resume_index(manifest, None, ResumeRule(settings=spelled))[0].skipped == 3


def test_summary_and_readers(tmp_path):
    import duckdb
    import pandas as pd

    manifest = str(tmp_path / "manifest")
    m.write_part(manifest, "r1", m.rows_to_table(rows(["a.jpg", "b.jpg"], ["ok", "error"])))
    path = m.write_summary(manifest, "r1", {"counts": {"ok": 1, "error": 1, "skipped": 0}})
    assert json.loads(open(path).read())["counts"]["ok"] == 1
    (tmp_path / "manifest" / "run_id=r1" / m.RUN_CONFIG_FILE).write_text("{}")
    # _SUCCESS.json and _config.json sit beside the parts; readers skip names starting with "_".
    frame = pd.read_parquet(manifest)
    assert sorted(frame.input_key) == ["a.jpg", "b.jpg"] and set(frame.run_id) == {"r1"}
    got = duckdb.sql(
        f"select input_key, status, run_id from read_parquet('{manifest}/*/*.parquet', hive_partitioning=true) order by 1"
    ).fetchall()
    assert got == [("a.jpg", "ok", "r1"), ("b.jpg", "error", "r1")]


def test_input_states_and_the_documented_duckdb_query_agree(tmp_path):
    """Across runs an input is ok once any run completed it, else it keeps the latest run's error;
    README's DuckDB query (the same rule, streaming) gives the same states."""
    import duckdb

    manifest = str(tmp_path / "manifest")
    first = rows(["a.jpg", "b.jpg", "c.jpg", "d.jpg"], ["ok", "error", "error", "error"])
    # Written before shards existed: no shard columns at all.
    old_part = m.rows_to_table(first).drop_columns(list(m.SHARD_COLUMNS))
    m.write_part(manifest, "20260101T000000Z-aaaa", old_part)
    second = rows(["b.jpg", "c.jpg"], ["ok", "error"])
    second["error_type"][1] = "read_failed"
    m.write_part(manifest, "20260102T000000Z-bbbb", m.rows_to_table(second))
    # An older manifest's skipped row (before resuming moved into the listing) is ignored.
    m.write_part(manifest, "20260103T000000Z-cccc", m.rows_to_table(rows(["a.jpg"], ["skipped"])))
    # Sharded samples: the same key in two shards is two inputs.
    sharded = rows(["000001", "000001"], ["ok", "error"])
    sharded["shard"] = ["s0.tar", "s1.tar"]
    m.write_part(manifest, "20260104T000000Z-dddd", m.rows_to_table(sharded))

    all_states = m.input_states(manifest).to_pylist()
    assert {(r["shard"], r["input_key"], r["status"]) for r in all_states if r["shard"]} == {
        ("s0.tar", "000001", "ok"), ("s1.tar", "000001", "error")}  # fmt: skip
    states = {r["input_key"]: r for r in all_states if not r["shard"]}
    assert sorted(states) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert (states["a.jpg"]["status"], states["a.jpg"]["run_id"], states["a.jpg"]["attempts"]) == (
        "ok", "20260101T000000Z-aaaa", 1
    )  # fmt: skip
    assert (states["b.jpg"]["status"], states["b.jpg"]["run_id"], states["b.jpg"]["output_uri"]) == (
        "ok", "20260102T000000Z-bbbb", "s3://bucket/out/b.jpg.png"
    )  # fmt: skip
    assert (states["c.jpg"]["status"], states["c.jpg"]["error_type"], states["c.jpg"]["attempts"]) == (
        "error", "read_failed", 2
    )  # fmt: skip
    assert (states["d.jpg"]["status"], states["d.jpg"]["error_type"]) == ("error", "not_an_image")
    assert m.input_states(str(tmp_path / "nothing")).num_rows == 0

    rows_sql = f"read_parquet('{manifest}/*/*.parquet', hive_partitioning=true, union_by_name=true)"
    latest = f"""
        select shard, input_key,
               count(*) filter (status = 'ok') as ok_rows,
               arg_max(status, (status = 'ok', run_id)) as status,
               arg_max_null(error_type, (status = 'ok', run_id)) as error_type,
               arg_max(input_uri, (status = 'ok', run_id)) as input_uri
        from {rows_sql} where status in ('ok', 'error') group by shard, input_key"""
    every = {(sh, k): (s, e) for sh, k, _, s, e, _ in duckdb.sql(latest).fetchall()}
    assert every == {(r["shard"], r["input_key"]): (r["status"], r["error_type"]) for r in all_states}
    got = {k: v for (sh, k), v in every.items() if sh is None}
    assert got["a.jpg"] == ("ok", None) and got["c.jpg"] == ("error", "read_failed")
    assert duckdb.sql(f"select count(*) from ({latest}) where ok_rows > 1").fetchall() == [(0,)]
    todo = sorted(
        u for (u,) in duckdb.sql(f"select input_uri from ({latest}) where status = 'error'").fetchall()
    )
    assert todo == ["s3://bucket/in/000001", "s3://bucket/in/c.jpg", "s3://bucket/in/d.jpg"]

    runs = m.run_summaries(manifest)
    assert [r for r, _ in runs] == [
        "20260101T000000Z-aaaa", "20260102T000000Z-bbbb", "20260103T000000Z-cccc", "20260104T000000Z-dddd"]  # fmt: skip
    assert all(summary is None for _, summary in runs)  # no _SUCCESS.json: none finished


def test_runs_from_before_output_layouts_still_resume_and_shard_size_counts_only_for_packing():
    old_files = {"images": "/d/in", "output": "/d/out", "output_format": "png"}  # a _config.json of before
    now = {**old_files, "input_format": "files", "output_layout": "files", "shard_size": 1000}
    assert resume_settings(old_files) == resume_settings(now)
    old_tars = {**old_files, "input_format": "webdataset", "output_format": "same"}
    assert resume_settings(old_tars) == resume_settings(
        {**old_tars, "output_layout": "webdataset", "shard_size": 5}
    )
    assert resume_settings(old_tars) != resume_settings({**old_tars, "output_layout": "parquet"})
    packed = {**now, "output_layout": "webdataset"}
    assert resume_settings(packed) != resume_settings({**packed, "shard_size": 500})
