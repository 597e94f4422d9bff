"""The write stage of sharded inputs: WriteShard, one output shard per input shard.

The output shard has the input's name under ``--output``, the same samples in the same order, the
image member (or the Parquet image column) replaced by the completion, and every other member
(``.json``, ``.txt``, ...) and every other column passed through byte for byte, in the input's
schema and column order. A sample that failed on its content is left out with all its members (a
``.json`` without its image breaks readers); a Parquet row whose image is null (img2dataset's
failed download) is kept as it was. The shard is built in a local spill file and uploaded whole
(``storage.atomic_put_file``), then its ``{shard}_stats.json``, as img2dataset writes one.

The stage returns each shard's manifest rows packed in one value (``manifest_table``), so the
manifest sink writes all of a shard's rows into one part: a shard's output and its rows are
committed together, and a shard in the manifest is a shard done.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from pipeline import layout_convert, parquet_shard, storage, tar_shard
from pipeline import manifest as manifest_lib
from pipeline.manifest import STATUS_ERROR, STATUS_OK
from pipeline.metrics import RowTally
from pipeline.shard_data import pack, pixels, unpack
from pipeline.shard_layout import output_shard_key, shard_stem, stats_key
from pipeline.writer import LOSSLESS_ENCODERS, encode, postprocessed

EXTENSION_ENCODERS = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp"}
FORMAT_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


@dataclass(frozen=True)
class ShardWriteOptions:
    layout: str
    output: str
    output_format: str = "same"  # same: the input member's format; png / jpeg / webp
    postprocess: bool = True
    write_masks: bool = False
    mask_generator: str = "rectangle"
    mask_seed: int = 0
    endpoint_url: str | None = None
    run_id: str = ""
    image_ext: str | None = None  # what the read stage used, to find the same members again
    mask_column: str = parquet_shard.MASK_COLUMN
    key_column: str = parquet_shard.KEY_COLUMN
    output_layout: str = ""  # --output-layout: files / webdataset / parquet; "": the input's
    shard_size: int = 1000  # packed files (layout "files"): the samples a shard holds, for their keys

    @property
    def converting(self) -> bool:
        return bool(self.output_layout) and self.output_layout != self.layout


def sniffed_encoder(data: bytes | None) -> str:
    """The format of image bytes from their signature (Parquet columns do not name it)."""
    head = bytes(data[:12]) if data else b""
    if head.startswith(b"\x89PNG"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return "jpeg"


def output_member(member: str, output_format: str) -> tuple[str, str]:
    """``(output member name, encoder)`` of a tar's image member: the same name by default
    (``to_tuple("jpg")`` keeps working), else its extension's last part changed."""
    key, ext = tar_shard.key_and_extension(member)
    head, _, last = ext.rpartition(".")
    if output_format == "same":
        return member, EXTENSION_ENCODERS.get(last.lower(), "png")
    new_last = FORMAT_EXTENSIONS[output_format]
    if EXTENSION_ENCODERS.get(last.lower()) == output_format:
        return member, output_format
    return f"{key}.{head + '.' if head else ''}{new_last}", output_format


def _encode_sample(row: dict, encoder: str, postprocess: bool) -> tuple[bytes, bool]:
    h, w = row["height"], row["width"]
    completed = np.array(pixels(row["completed"], h, w))
    mask = pixels(row["mask"], h, w, channels=1)
    final = postprocessed(completed, mask, postprocess and not row["blended"])
    alpha = pixels(row["alpha"], h, w, channels=1) if row["alpha"] else None
    data = encode(final, encoder, alpha, row["icc_profile"] or None)
    exact = bool(row["source_exact"]) and encoder in LOSSLESS_ENCODERS
    return data, exact


def _mask_png(row: dict) -> bytes:
    return encode(pixels(row["mask"], row["height"], row["width"], channels=1) * 255, "png")


def _extension(key: str) -> str:
    name = key.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[-1] if "." in name else ""


def _name_converted(row: dict, encoder: str, shard: str, options: ShardWriteOptions) -> None:
    """``--output-layout`` other than the input's: the image's field in the input and in the output
    (``layout_convert``), and where the manifest says it went."""
    row["sample_key"] = row["key"]
    if options.layout == "webdataset":
        row["source_field"] = tar_shard.key_and_extension(row["member"])[1]
        row["image_field"] = tar_shard.key_and_extension(row["output_member"])[1]
    else:  # a Parquet column, or a packed file's extension
        row["source_field"] = row["member"] if options.layout == "parquet" else _extension(row["member"])
        named = EXTENSION_ENCODERS.get(row["source_field"].lower()) == encoder
        row["image_field"] = row["source_field"] if named else FORMAT_EXTENSIONS[encoder]
    if options.layout == "files":  # img2dataset's keys: the shard's number, then the sample's
        width = max(4, len(str(options.shard_size - 1)))
        row["sample_key"] = f"{shard_stem(shard)}{row['index']:0{width}d}"
    if options.output_layout == "webdataset":
        row["output_member"] = f"{row['sample_key']}.{row['image_field']}"
    elif options.output_layout == "parquet":
        row["output_member"] = row["image_field"]
    else:
        row["output_member"] = ""
        row["output_key"] = layout_convert.file_key(shard, row["key"], row["image_field"])
        if options.write_masks:
            row["mask_output_key"] = layout_convert.file_key(shard, row["key"], layout_convert.MASK_FIELD)


def _encode_all(
    samples: list[dict], options: ShardWriteOptions, source_encoders: dict[int, str], shard: str
) -> dict:
    """Each ok sample's output bytes (``row["out"]``), or the row turned into a write error."""
    for row in samples:
        row.update(out=None, exact=False, write_s=0.0, output_member="", output_key="", mask_output_key="")
        if row["status"] != STATUS_OK:
            continue
        start = time.perf_counter()
        try:
            if options.layout == "webdataset":
                row["output_member"], encoder = output_member(row["member"], options.output_format)
            elif options.layout == "files":
                same = EXTENSION_ENCODERS.get(_extension(row["member"]).lower(), "png")
                encoder = same if options.output_format == "same" else options.output_format
            else:
                row["output_member"] = row["member"]
                encoder = (
                    source_encoders[row["index"]]
                    if options.output_format == "same"
                    else options.output_format
                )
            if options.converting:
                _name_converted(row, encoder, shard, options)
            row["out"], row["exact"] = _encode_sample(row, encoder, options.postprocess)
            row["encoder"] = encoder
        except storage.UnsafeKeyError as e:
            row.update(status=STATUS_ERROR, error_type="unsafe_key", error_message=str(e))
        except Exception as e:
            row.update(
                status=STATUS_ERROR, error_type="write_failed", error_message=f"{type(e).__name__}: {e}"
            )
        row["write_s"] = time.perf_counter() - start
    return {row["index"]: row for row in samples if row["status"] == STATUS_OK}


def _build_tar(path: str, source: bytes, done: dict[int, dict], options: ShardWriteOptions) -> None:
    contents = tar_shard.read_tar(source)  # the same items the read stage numbered
    writer = tar_shard.TarShardWriter(path)
    try:
        for index, item in enumerate(contents.items):
            if isinstance(item, tar_shard.Member):
                writer.add(item.info, item.data)
                continue
            row = done.get(index)
            if row is None:
                continue  # an error sample: none of its members
            mask_name = f"{item.key}.{tar_shard.MASK_EXTENSION}"
            for member in item.members:
                if member.name == row["member"]:
                    writer.add(
                        tar_shard.renamed(member.info, row["output_member"], len(row["out"])), row["out"]
                    )
                    if options.write_masks and tar_shard.mask_member(item) is None:
                        writer.add(tar_shard.renamed(member.info, mask_name, 0), _mask_png(row))
                elif options.write_masks and member is tar_shard.mask_member(item):
                    writer.add(member.info, _mask_png(row))  # the mask used (never a second one)
                else:
                    writer.add(member.info, member.data)
    finally:
        writer.close()


def _build_parquet(path: str, table: pa.Table, done: dict[int, dict], samples: list[dict], options) -> None:
    image_col = samples[0]["member"] if samples else None
    keep, images, masks = [], [], []
    original = table.column(image_col).to_pylist() if image_col else []
    for index in range(len(table)):
        row = done.get(index)
        if row is not None:
            keep.append(index)
            images.append(row["out"])
            masks.append(_mask_png(row) if options.write_masks else None)
        elif image_col and original[index] is None:
            keep.append(index)  # a failed download stays as it was
            images.append(None)
            masks.append(None)
    out = table.take(pa.array(keep, pa.int64()))
    if image_col:
        position = out.schema.get_field_index(image_col)
        field = out.schema.field(image_col)
        out = out.set_column(position, field, pa.array(images, field.type))
    binary = (image_col,) if image_col else ()
    if options.write_masks and image_col:
        if options.mask_column in out.schema.names:
            position = out.schema.get_field_index(options.mask_column)
            field = out.schema.field(options.mask_column)
            out = out.set_column(position, field, pa.array(masks, field.type))
        else:
            out = out.append_column(options.mask_column, pa.array(masks, pa.binary()))
        binary += (options.mask_column,)
    parquet_shard.write_parquet(path, out, binary)


def _stats(samples: list[dict], started: float) -> bytes:
    ok = sum(1 for r in samples if r["status"] == STATUS_OK)
    errors: dict[str, int] = {}
    for r in samples:
        if r["status"] != STATUS_OK:
            errors[r["error_type"]] = errors.get(r["error_type"], 0) + 1
    end = time.time()
    return json.dumps(
        {
            "count": sum(1 for r in samples if r["key"]),
            "successes": ok,
            "failed_to_complete": sum(errors.values()),
            "status_dict": {"success": ok, **errors},
            "duration": round(end - started, 3),
            "start_time": datetime.fromtimestamp(started, timezone.utc).isoformat(),
            "end_time": datetime.fromtimestamp(end, timezone.utc).isoformat(),
        },
        indent=2,
        sort_keys=True,
    ).encode()


def _upload_shard(fs, path: str, build) -> str:
    """``build(local path)`` a shard in a local spill file, upload it whole; its full URI."""
    with tempfile.TemporaryDirectory(prefix="glcic-shard-") as spill:
        local = os.path.join(spill, "shard")
        build(local)
        storage.with_retries(lambda: storage.atomic_put_file(fs, local, path))
    return storage.full_uri(fs, path)


def _write_stats(fs, root: str, shard_key: str, samples: list[dict], started: float) -> None:
    stats, path = _stats(samples, started), storage.join_key(root, stats_key(shard_key))
    storage.with_retries(lambda: storage.atomic_write_bytes(fs, path, stats))


def _committed(done: dict[int, dict], key: str, uri: str) -> None:
    for row in done.values():
        if row["status"] == STATUS_OK:
            row["output_key"], row["output_uri"] = key, uri


def _write_mirrored(fs, root, shard, source, table, done, samples, options, started) -> None:
    """The output shard in the input's layout, under the input's name."""
    if options.layout == "webdataset":
        build = lambda local: _build_tar(local, source, done, options)  # noqa: E731
    else:
        build = lambda local: _build_parquet(local, table, done, samples, options)  # noqa: E731
    uri = _upload_shard(fs, storage.join_key(root, shard), build)
    _write_stats(fs, root, shard, samples, started)
    _committed(done, shard, uri)


def _write_converted(fs, root, shard, source, table, done, samples, options, started) -> None:
    """``--output-layout`` other than the input's (``pipeline/layout_convert.py``)."""
    if options.layout == "webdataset":
        fields = layout_convert.tar_fields(source)
    elif options.layout == "parquet":
        fields = layout_convert.parquet_fields(table, options.key_column, options.mask_column)
    else:
        fields = {index: layout_convert.packed_fields(row) for index, row in done.items()}
    completed = [
        (
            row,
            layout_convert.completed_fields(
                fields[index], row, _mask_png(row) if options.write_masks else None
            ),
        )
        for index, row in sorted(done.items())
    ]
    for row in done.values():
        row.pop("out", None)  # the encoded bytes now live in ``completed`` only
    if options.output_layout == "files":
        layout_convert.write_files(fs, root, shard, completed)
        _write_stats(fs, root, shard, samples, started)  # last: the folder's completion marker
        for row in done.values():
            if row["status"] == STATUS_OK:
                row["output_uri"] = storage.full_uri(fs, storage.join_key(root, row["output_key"]))
        return
    key = output_shard_key(shard, options.layout, options.output_layout)
    keyed = [(row["sample_key"], row_fields) for row, row_fields in completed]
    if options.output_layout == "webdataset":
        build = lambda local: layout_convert.build_tar(local, keyed)  # noqa: E731
    else:
        build = lambda local: layout_convert.build_parquet(local, keyed, options.mask_column)  # noqa: E731
    uri = _upload_shard(fs, storage.join_key(root, key), build)
    _write_stats(fs, root, key, samples, started)
    _committed(done, key, uri)


def _manifest_rows(shard: str, shard_uri: str, samples: list[dict], options) -> pa.Table:
    n = len(samples)

    def col(name, default=""):
        return [r.get(name, default) for r in samples]

    ok = [r["status"] == STATUS_OK for r in samples]
    rows = {
        "input_key": col("key"),
        "input_uri": [r.get("uri") or shard_uri for r in samples],
        "shard": [shard] * n,
        "member": col("member") if options.layout != "files" else [""] * n,  # a packed file has none
        "output_member": [r["output_member"] if k else "" for r, k in zip(samples, ok, strict=True)],
        "mask_key": col("mask_key"),
        "mask_generator": [options.mask_generator if not r["mask_key"] else "" for r in samples],
        "mask_seed": [options.mask_seed] * n,
        "output_key": [r["output_key"] if k else "" for r, k in zip(samples, ok, strict=True)],
        "output_uri": [r["output_uri"] if k else "" for r, k in zip(samples, ok, strict=True)],
        "mask_output_key": [r["mask_output_key"] if k else "" for r, k in zip(samples, ok, strict=True)],
        "width": col("width", 0),
        "height": col("height", 0),
        "hole_fraction": col("hole_fraction", float("nan")),
        "known_pixels_exact": col("exact", False),
        "status": col("status"),
        "error_type": col("error_type"),
        "error_message": col("error_message"),
        "checkpoint_id": col("checkpoint_id"),
        "read_s": col("read_s", 0.0),
        "decode_s": col("decode_s", 0.0),
        "inference_s": col("inference_s", 0.0),
        "write_s": col("write_s", 0.0),
        "node_id": col("node_id"),
        "inference_worker": col("inference_worker"),
        "gpu_id": col("gpu_id"),
    }
    return manifest_lib.rows_to_table(rows)


def write_shard(batch: dict[str, np.ndarray], *, options: ShardWriteOptions) -> dict[str, list]:
    """WriteShard stage: completed shards -> their output shards and ``{"shard", "manifest_table"}``."""
    fs, root = storage.filesystem(options.output, options.endpoint_url)
    tally = RowTally(options.run_id)
    out: dict[str, list] = {"shard": [], "manifest_table": []}
    for shard, shard_uri, source, packed in zip(
        batch["shard"], batch["shard_uri"], batch["source"], batch["samples"], strict=True
    ):
        started = time.time()
        shard, shard_uri, source = str(shard), str(shard_uri), bytes(source)
        samples = unpack(packed).to_pylist()
        readable = (bool(source) or options.layout == "files") and not any(r["error_type"] in ("not_a_tar", "not_parquet", "shard_layout")
                                            for r in samples if not r["key"])  # fmt: skip
        if readable:
            source_encoders = {}
            table = parquet_shard.read_parquet(source) if options.layout == "parquet" else None  # read once
            if table is not None and options.output_format == "same" and samples:
                column = table.column(samples[0]["member"]).to_pylist()
                source_encoders = {i: sniffed_encoder(v) for i, v in enumerate(column)}
            done = _encode_all(samples, options, source_encoders, shard)
            start = time.perf_counter()
            try:
                write = _write_converted if options.converting else _write_mirrored
                write(fs, root, shard, source, table, done, samples, options, started)
            except Exception as e:
                for row in done.values():
                    row.update(status=STATUS_ERROR, error_type="write_failed",
                               error_message=f"the shard could not be written: {type(e).__name__}: {e}")  # fmt: skip
            share = (time.perf_counter() - start) / max(1, len(done))
            for row in done.values():
                row["write_s"] += share
        for row in samples:
            for name in ("output_member", "output_key", "output_uri", "mask_output_key"):
                row.setdefault(name, "")
            row.setdefault("exact", False)
            row.setdefault("write_s", 0.0)
            row.pop("completed", None)
            row.pop("out", None)
            tally.row(row_stages(row), 0, row["status"], row["error_type"], float(row["write_s"]))
        tally.push()
        out["shard"].append(shard)
        out["manifest_table"].append(pack(_manifest_rows(shard, shard_uri, samples, options)))
    return out


def row_stages(row: dict) -> dict:
    """One row's stage times as ``RowTally.row`` reads them (a batch of one)."""
    return {name: [float(row.get(name, 0.0))] for name in ("read_s", "decode_s", "inference_s", "write_s")}
