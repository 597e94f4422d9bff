"""The shard formats without Ray: WebDataset's sample rules (checked against the ``webdataset``
library's own reader), damaged tars, Parquet row groups, the layout a listing finds."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import parquet_shard, shard_layout, tar_shard
from pipeline.shard_writer import output_member, sniffed_encoder
from tests.helpers import tar_of


def test_sample_keys_are_webdatasets(tmp_path):
    import webdataset as wds

    path = tmp_path / "000.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write(
            {"__key__": "a/b/x001", "jpg": b"1", "json": b"{}", "mask.png": b"m", "meta.v2.json": b"s"}
        )
        writer.write({"__key__": "a/b/x002", "png": b"2", "txt": b"t"})
        writer.write({"__key__": "y", "webp": b"3"})
    ours = [(s.key, sorted(s.extensions())) for s in tar_shard.read_tar(path.read_bytes()).samples]
    theirs = [
        (sample["__key__"], sorted(k for k in sample if not k.startswith("__")))
        for sample in wds.WebDataset(str(path), shardshuffle=False)
    ]
    assert ours == theirs
    sample = tar_shard.read_tar(path.read_bytes()).samples[0]
    assert tar_shard.image_member(sample).name == "a/b/x001.jpg"  # never the mask
    assert tar_shard.mask_member(sample).name == "a/b/x001.mask.png"


def test_an_image_member_is_chosen_by_the_last_part_of_its_extension():
    contents = tar_shard.read_tar(tar_of([("k.seg.png", b"s"), ("k.json", b"{}"), ("k.mask.png", b"m")]))
    assert tar_shard.image_member(contents.samples[0]).name == "k.seg.png"
    two = tar_shard.read_tar(tar_of([("k.jpg", b"1"), ("k.png", b"2")])).samples[0]
    with pytest.raises(ValueError, match="--image-ext"):
        tar_shard.image_member(two)
    assert tar_shard.image_member(two, "png").name == "k.png"
    none = tar_shard.read_tar(tar_of([("k.json", b"{}")])).samples[0]
    with pytest.raises(ValueError, match="no member"):
        tar_shard.image_member(none)


def test_split_keys_and_duplicate_members_are_errors_of_their_sample_never_merged():
    contents = tar_shard.read_tar(
        tar_of([("a.jpg", b"1"), ("b.jpg", b"2"), ("a.json", b"{}"), ("c.jpg", b"3"), ("c.jpg", b"4")])
    )
    errors = {s.key: s.error[0] if s.error else None for s in contents.samples}
    assert errors == {"a": "split_key", "b": None, "c": "duplicate_member"}
    assert [m.name for m in contents.samples[0].members] == ["a.jpg", "a.json"]  # all of a, left out together


def test_a_truncated_tar_keeps_every_complete_member_before_the_damage():
    members = [(f"{k}.{ext}", bytes([i]) * 3000) for i, k in enumerate("abc") for ext in ("jpg", "json")]
    data = tar_of(members)
    # Cut inside c.jpg's data: a and b are whole, c is a truncated sample.
    cut = data[: data.index(b"c.jpg") + 512 + 1000]
    contents = tar_shard.read_tar(cut)
    assert [(s.key, s.error and s.error[0]) for s in contents.samples] == [
        ("a", None),
        ("b", None),
        ("c", "truncated"),
    ]
    assert [len(m.data) for s in contents.samples[:2] for m in s.members] == [3000] * 4
    assert contents.damage is not None
    # Cut between b.json and c.jpg's header: a damaged header after whole samples.
    mid = data[: data.index(b"c.jpg") + 100]
    contents = tar_shard.read_tar(mid)
    assert [s.key for s in contents.samples] == ["a", "b"] and contents.damage
    assert tar_shard.read_tar(b"this is not a tar").damage
    assert tar_shard.read_tar(b"").damage


def test_output_member_names_and_sniffed_formats():
    assert output_member("x/0001.jpg", "same") == ("x/0001.jpg", "jpeg")
    assert output_member("x/0001.jpg", "png") == ("x/0001.png", "png")
    assert output_member("0001.seg.jpeg", "webp") == ("0001.seg.webp", "webp")
    assert output_member("0001.JPG", "jpeg") == ("0001.JPG", "jpeg")
    assert sniffed_encoder(b"\x89PNG\r\n\x1a\n...") == "png"
    assert sniffed_encoder(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert sniffed_encoder(b"\xff\xd8\xff\xe0") == "jpeg"


def test_parquet_row_groups_are_bounded_by_bytes_and_images_stored_uncompressed(tmp_path, monkeypatch):
    monkeypatch.setattr(parquet_shard, "ROW_GROUP_BYTES", 10_000)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, 4_000, dtype=np.uint8).tobytes() for _ in range(7)] + [None]
    table = pa.table({"key": [f"{i:03d}" for i in range(8)], "jpg": images, "caption": ["c"] * 8})
    path = tmp_path / "x.parquet"
    parquet_shard.write_parquet(str(path), table, ("jpg",))
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [2, 2, 2, 2]
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        by_name = {group.column(j).path_in_schema: group.column(j) for j in range(group.num_columns)}
        assert by_name["jpg"].compression == "UNCOMPRESSED"
        assert by_name["caption"].compression == "ZSTD"
    assert pq.read_table(path).equals(table)


def test_the_layout_is_what_the_listing_finds(tmp_path):
    wds_dir, pq_dir, files_dir = tmp_path / "w", tmp_path / "p", tmp_path / "f"
    for folder in (wds_dir, pq_dir, files_dir):
        folder.mkdir()
    # img2dataset's WebDataset output: the tars are the data, the parquet beside is metadata.
    for name in ("00000.tar", "00000.parquet", "00000_stats.json"):
        (wds_dir / name).write_bytes(b"x")
    (pq_dir / "00000.parquet").write_bytes(b"x")
    (pq_dir / "00000_stats.json").write_text(json.dumps({}))
    (files_dir / "a.jpg").write_bytes(b"x")
    (files_dir / "meta.parquet").write_bytes(b"x")
    assert shard_layout.detect_layout(str(wds_dir)) == "webdataset"
    assert shard_layout.detect_layout(str(pq_dir)) == "parquet"
    assert shard_layout.detect_layout(str(files_dir)) == "files"
    assert shard_layout.detect_layout(str(files_dir), forced="parquet") == "parquet"
    assert shard_layout.detect_layout(f"{tmp_path}/w/{{00000..00003}}.tar") == "webdataset"
    assert [k for k, _ in shard_layout.shard_entries(str(wds_dir), "webdataset")] == ["00000.tar"]
    pattern = f"{tmp_path}/w/{{00000..00002}}.tar"
    assert list(shard_layout.shard_entries(pattern, "webdataset")) == [
        (f"{i:05d}.tar", f"{tmp_path}/w/{i:05d}.tar") for i in range(3)
    ]
    assert shard_layout.stats_key("a/00007.tar") == "a/00007_stats.json"
