"""What a rerun skips: the resume index, built from earlier runs' manifests, and the listing stage
that drops the inputs in it.

An earlier ``ok`` row counts as done only when it would still be right today:

- its run had the same settings (``RESUME_SETTINGS``, read from that run's ``_config.json``): a
  rerun with another output format, mask source, mask seed or post-processing redoes its inputs
  instead of skipping them silently;
- its output still exists (``verify_outputs``: one listing of ``--output``, a request per 1,000
  outputs, not one per input): deleted outputs are redone;
- it was made with this checkpoint, or ``redo_other_checkpoint`` is off: then inputs completed
  with other weights are kept, and the run says how many.

``resume_index`` runs as one Ray task: the driver gets only the report (counts and the runs whose
settings differ, with what differs) and an ObjectRef of the sorted 16-byte digests, which the
listing task (``list_todo``) fetches once and looks each page up in (``drop_completed``).
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.manifest import RUN_CONFIG_FILE, STATUS_OK, part_paths, read_part, run_dirs, run_id_of
from pipeline.naming import contains, key_digests
from pipeline.shard_layout import completion_marker, pack_identity, packs_files, shard_of_identity

log = logging.getLogger(__name__)

# The settings that decide what an input's output is: an ok row of a run whose values differ is
# not this run's result. (Precision, batch sizes, the device and the actor pool do not count.)
RESUME_SETTINGS = (
    "images", "output", "output_format", "masks", "mask_generator", "mask_seed", "local_size", "hole_min",
    "hole_max", "postprocess", "max_side", "write_masks", "input_format", "image_column", "key_column",
    "mask_column", "image_ext", "output_layout", "shard_size",
)  # fmt: skip
# What a _config.json written before a setting existed meant by leaving it out.
_SETTING_DEFAULTS = {"input_format": "files", "key_column": "key", "mask_column": "mask"}
_URI_SETTINGS = ("images", "output", "masks")
_EMPTY = np.empty(0, dtype="S16")


def resume_settings(config: dict) -> dict:
    """``RESUME_SETTINGS`` of a config (``jobs.config.to_dict`` or a ``_config.json``), URIs
    compared as places (``storage.location``), credentials never part of them."""
    values = {}
    for name in RESUME_SETTINGS:
        value = config.get(name, _SETTING_DEFAULTS.get(name))
        if name in _URI_SETTINGS and isinstance(value, str):
            if name == "images":  # a list file or its folder: the same keys
                value = storage.keys_root(value)
            protocol, parts = storage.location(storage.redact(value))
            value = "/".join((protocol + ":", *parts))
        values[name] = value
    if values["output_layout"] is None:  # before --output-layout, every output mirrored its input
        values["output_layout"] = values["input_format"]
    if not packs_files(values["input_format"], values["output_layout"]):
        values["shard_size"] = None  # it shapes the outputs of packed files only
    return values


@dataclass(frozen=True)
class ResumeRule:
    settings: dict  # resume_settings of this run
    checkpoint_id: str | None = None  # this run's weights
    redo_other_checkpoint: bool = False
    verify_output: str | None = None  # the output prefix to list, or None: trust the rows
    exclude: tuple[str, ...] = ()  # URIs under the output that are not outputs (the manifest)
    # Sharded runs: (input layout, output layout), which name the object that says a shard is done.
    layouts: tuple[str, str] | None = None


@dataclass
class ResumeReport:
    """Why each earlier ok row is or is not skipped (distinct inputs, not rows)."""

    skipped: int = 0  # done earlier and skipped now
    skipped_other_checkpoint: int = 0  # of those, done with another checkpoint
    redo_other_checkpoint: int = 0  # done with another checkpoint, redone (--redo-other-checkpoint)
    redo_other_settings: int = 0  # done only by runs with other settings
    redo_output_missing: int = 0  # done, but the output is gone
    redo_unfinished: int = 0  # sharded runs: shards that could not be read or written
    runs_other_settings: dict[str, list[str]] = field(default_factory=dict)  # run id -> what differs
    unit: str = "inputs"  # what the counts count: inputs (images), or shards of a sharded run
    skipped_rows: int | None = None  # sharded runs: the samples in the skipped shards

    def lines(self, checkpoint_id: str | None) -> list[str]:
        """What the job says about its resume before it starts."""
        samples = f" ({self.skipped_rows} samples)" if self.skipped_rows is not None else ""
        lines = [f"resuming: {self.skipped} {self.unit}{samples} completed by earlier runs are skipped"]
        if self.skipped_other_checkpoint:
            lines.append(
                f"  {self.skipped_other_checkpoint} of them were completed with another checkpoint than "
                f"{checkpoint_id}; --redo-other-checkpoint redoes them"
            )
        if self.redo_other_checkpoint:
            lines.append(f"  {self.redo_other_checkpoint} completed with another checkpoint are redone")
        if self.redo_output_missing:
            lines.append(f"  {self.redo_output_missing} completed whose outputs are gone are redone")
        if self.redo_unfinished:
            lines.append(f"  {self.redo_unfinished} that could not be read or written are redone")
        if self.redo_other_settings:
            differing = sorted({name for names in self.runs_other_settings.values() for name in names})
            lines.append(
                f"  {self.redo_other_settings} completed only by runs with other settings "
                f"({', '.join(differing)}: runs {', '.join(sorted(self.runs_other_settings))}) are redone"
            )
        return lines


def _run_config(fs, run_dir: str) -> dict | None:
    try:
        data = storage.with_retries(
            lambda: storage.read_bytes(fs, storage.join_key(run_dir, RUN_CONFIG_FILE))
        )
        return json.loads(data)
    except (FileNotFoundError, ValueError):
        return None


def _runs_with_same_settings(fs, root: str, rule: ResumeRule, report: ResumeReport) -> set[str]:
    """The ids of the runs under ``root`` whose ``_config.json`` has this run's ``RESUME_SETTINGS``;
    the others go into ``report.runs_other_settings`` with what differs."""
    same: set[str] = set()
    for run_dir in run_dirs(fs, root):
        run_config = _run_config(fs, run_dir)
        theirs = resume_settings(run_config) if run_config is not None else None
        differs = ["(no _config.json)"] if theirs is None else [
            name for name in RESUME_SETTINGS if theirs[name] != rule.settings.get(name)
        ]  # fmt: skip
        if differs:
            report.runs_other_settings[run_id_of(run_dir)] = differs
        else:
            same.add(run_id_of(run_dir))
    return same


def existing_output_digests(output: str, endpoint_url: str | None, exclude: tuple[str, ...]) -> np.ndarray:
    """Sorted digests of every object's key under ``output`` (one listing, a page at a time)."""
    fs, root = storage.filesystem(output, endpoint_url, cached=False)
    excluded = tuple(storage.filesystem(u, endpoint_url)[1] for u in exclude)
    chunks = [_EMPTY]
    try:
        for page in storage.iter_object_pages(fs, root, excluded):
            chunks.append(key_digests([storage.relative_key(root, p) for p in page]))
    except FileNotFoundError:
        pass
    return np.unique(np.concatenate(chunks))


def resume_index(
    manifest: str, endpoint_url: str | None, rule: ResumeRule, threads: int = 16
) -> tuple[ResumeReport, np.ndarray]:
    """The report and the sorted digests of the input keys this run skips.

    Reads four columns of the parts of runs with the same settings and two of the others,
    ``threads`` parts at a time (object storage answers each GET in tens of milliseconds); memory
    is 16 bytes per completed input. A part that cannot be read (not one of ours: ours are
    written atomically) is logged and ignored, so its inputs are simply done again.
    """
    from concurrent.futures import ThreadPoolExecutor

    fs, root = storage.filesystem(manifest, endpoint_url)
    report = ResumeReport()
    same = _runs_with_same_settings(fs, root, rule, report)

    def ok_rows(path: str) -> tuple[bool, np.ndarray, np.ndarray, list]:
        in_same = run_id_of(posixpath.dirname(path)) in same
        columns = ["input_key", "status", *(["output_key", "checkpoint_id"] if in_same else [])]
        try:
            table = read_part(fs, path, columns)
        except (FileNotFoundError, OSError, pa.ArrowException) as e:
            log.warning("ignoring unreadable manifest part %s: %s", path, e)
            return in_same, _EMPTY, _EMPTY, []
        ok = table.filter(pc.equal(table.column("status"), STATUS_OK))
        keys = key_digests(ok.column("input_key").to_pylist())
        if not in_same:
            return in_same, keys, _EMPTY, []
        outputs = key_digests(str(k or "") for k in ok.column("output_key").to_pylist())
        return in_same, keys, outputs, ok.column("checkpoint_id").to_pylist()

    with ThreadPoolExecutor(max(1, threads)) as pool:
        parts = list(pool.map(ok_rows, part_paths(fs, root)))
    existing = (
        existing_output_digests(rule.verify_output, endpoint_url, rule.exclude)
        if rule.verify_output is not None
        else None
    )
    kept, ours, other_checkpoint, redone_checkpoint, missing, other_settings = ([_EMPTY] for _ in range(6))
    for in_same, keys, outputs, checkpoint_ids in parts:
        if not in_same:
            other_settings.append(keys)
            continue
        present = contains(existing, outputs) if existing is not None else np.ones(len(keys), bool)
        missing.append(keys[~present])
        foreign = np.array([c != rule.checkpoint_id for c in checkpoint_ids], dtype=bool)
        if rule.checkpoint_id is None:
            foreign[:] = False
        ours.append(keys[present & ~foreign])
        if rule.redo_other_checkpoint:
            redone_checkpoint.append(keys[present & foreign])
            kept.append(keys[present & ~foreign])
        else:
            other_checkpoint.append(keys[present & foreign])
            kept.append(keys[present])
    done = np.unique(np.concatenate(kept))
    done_with_ours = np.unique(np.concatenate(ours))

    def not_done(chunks: list[np.ndarray]) -> int:
        return len(np.setdiff1d(np.unique(np.concatenate(chunks)), done, assume_unique=True))

    report.skipped = len(done)
    # Inputs whose only ok rows (with these settings) are another checkpoint's.
    report.skipped_other_checkpoint = len(
        np.setdiff1d(np.unique(np.concatenate(other_checkpoint)), done_with_ours, assume_unique=True)
    )
    report.redo_other_checkpoint = not_done(redone_checkpoint)
    report.redo_output_missing = not_done(missing)
    report.redo_other_settings = not_done(other_settings)
    return report, done


# A shard whose rows hold one of these was not done: the shard could not be read or written.
SHARD_RETRY_ERRORS = ("not_found", "read_failed", "write_failed")


def shard_resume_index(
    manifest: str, endpoint_url: str | None, rule: ResumeRule, threads: int = 16
) -> tuple[ResumeReport, tuple[np.ndarray, np.ndarray]]:
    """The resume index of a sharded run: the sorted digests of the input shards it skips, with
    each one's row count (what the listing reports as skipped).

    A shard is done when a run with the same settings has its rows (all of a shard's rows are in
    one part, written after its output shard: ``pipeline/shard_writer.py``), none of them says the
    shard could not be read or written (``SHARD_RETRY_ERRORS``), and its output shard exists
    (one listing of ``--output``). With ``redo_other_checkpoint``, shards with an ok row from
    another checkpoint are redone.
    """
    from concurrent.futures import ThreadPoolExecutor

    fs, root = storage.filesystem(manifest, endpoint_url)
    report = ResumeReport(unit="shards")
    same = _runs_with_same_settings(fs, root, rule, report)

    # Files packed into shards: a pack is its name and its images (shard_layout.pack_identity).
    packing = rule.layouts is not None and packs_files(*rule.layouts)

    def shards_of(path: str) -> tuple[bool, list, list, list, list]:
        in_same = run_id_of(posixpath.dirname(path)) in same
        columns = ["shard", *(["status", "error_type", "checkpoint_id"] if in_same else [])]
        try:
            table = read_part(fs, path, [*columns, *(["input_key"] if packing else [])])
        except (FileNotFoundError, OSError, pa.ArrowException, KeyError) as e:
            log.warning("ignoring manifest part %s (no shard rows): %s", path, e)
            return in_same, [], [], [], []
        shards = table.column("shard").to_pylist()
        if packing:
            members: dict[str, list] = {}
            for shard, key in zip(shards, table.column("input_key").to_pylist(), strict=True):
                members.setdefault(shard, []).append(key or "")
            identities = {shard: pack_identity(shard, keys) for shard, keys in members.items() if shard}
            shards = [identities.get(shard, shard) for shard in shards]
        if not in_same:
            return in_same, sorted({s for s in shards if s}), [], [], []
        counts: dict[str, list] = {}  # shard -> [rows, retry, foreign checkpoint]
        for shard, status, error, checkpoint in zip(
            shards, *(table.column(c).to_pylist() for c in columns[1:]), strict=True
        ):
            if not shard:
                continue
            entry = counts.setdefault(shard, [0, False, False])
            entry[0] += 1
            entry[1] |= error in SHARD_RETRY_ERRORS
            entry[2] |= (
                status == STATUS_OK and rule.checkpoint_id is not None and checkpoint != rule.checkpoint_id
            )
        names = sorted(counts)
        return (
            in_same,
            names,
            [counts[n][0] for n in names],
            [counts[n][1] for n in names],
            [counts[n][2] for n in names],
        )

    with ThreadPoolExecutor(max(1, threads)) as pool:
        parts = list(pool.map(shards_of, part_paths(fs, root)))
    existing = (
        existing_output_digests(rule.verify_output, endpoint_url, rule.exclude)
        if rule.verify_output is not None
        else None
    )
    done: dict[bytes, int] = {}
    other_settings, missing, retry, redone_checkpoint, other_checkpoint = set(), set(), set(), set(), set()
    for in_same, names, rows, retried, foreign in parts:
        digests = key_digests(names)
        if not in_same:
            other_settings.update(digests.tolist())
            continue
        if existing is not None:
            layouts = rule.layouts or ("", "")
            markers = (completion_marker(shard_of_identity(n), *layouts) for n in names)
            present = contains(existing, key_digests(markers))
        else:
            present = np.ones(len(names), bool)
        for digest, count, was_retry, is_foreign, here in zip(
            digests.tolist(), rows, retried, foreign, present.tolist(), strict=True
        ):
            if was_retry:
                retry.add(digest)
            elif not here:
                missing.add(digest)
            elif is_foreign and rule.redo_other_checkpoint:
                redone_checkpoint.add(digest)
            else:
                if is_foreign:
                    other_checkpoint.add(digest)
                done[digest] = max(done.get(digest, 0), count)
    index = np.array(sorted(done), dtype="S16")
    counts = np.array([done[d] for d in index.tolist()], dtype=np.int64)
    report.skipped = len(index)
    report.skipped_rows = int(counts.sum())
    report.skipped_other_checkpoint = len(other_checkpoint)
    report.redo_unfinished = len(retry - done.keys())
    report.redo_other_checkpoint = len(redone_checkpoint - done.keys())
    report.redo_output_missing = len(missing - done.keys())
    report.redo_other_settings = len(other_settings - done.keys())
    return report, (index, counts)


def drop_completed(
    page: dict[str, np.ndarray], index: np.ndarray | tuple[np.ndarray, np.ndarray] | None
) -> tuple[dict[str, np.ndarray], int]:
    """Resuming: ``page`` without the keys in the resume index (completed by an earlier run), and
    how many it dropped. Done in the listing so that a finished input costs one digest lookup and
    never reaches a read task, an actor, a writer or the driver. A sharded run's index is
    ``(digests, rows)``: what it dropped counts each shard's rows. Packs of files are looked up by
    their ``identity`` (``shard_layout.pack_identity``), not by their name alone."""
    if index is None or len(page["key"]) == 0:
        return page, 0
    digests, rows = index if isinstance(index, tuple) else (index, None)
    names = page["identity"] if "identity" in page else page["key"]
    found = contains(digests, key_digests([str(k) for k in names]))
    if rows is not None and found.any():
        positions = np.searchsorted(digests, key_digests([str(k) for k in names[found]]))
        dropped = int(rows[positions].sum())
    else:
        dropped = int(found.sum())
    keep = ~found
    return ({name: values[keep] for name, values in page.items()} if found.any() else page), dropped


def list_todo(
    batch: dict[str, np.ndarray], *, run_id: str = "", index_ref: list | tuple = (), **kwargs
) -> Iterator[dict]:
    """The listing stage: ``pipeline.listing.list_images`` without the keys in the resume
    index (``index_ref``: ``[ObjectRef]`` of ``resume_index``'s digests, or empty), telling the
    run's progress board how many keys it listed and how many it dropped: the run's ``skipped``."""
    import ray

    from pipeline.listing import list_images
    from pipeline.metrics import INPAINT_LISTED, board, metric, safely

    index = ray.get(index_ref[0]) if index_ref else None
    progress_board = board(run_id)
    # Shards are not images: their rows are counted as the read tasks read them (ProgressBoard).
    sharded = kwargs.get("layout", "files") != "files" or kwargs.get("pack") is not None
    listed = skipped = shards = 0
    for page in list_images(batch, **kwargs):
        listed += 0 if sharded else len(page["key"])
        page, dropped = drop_completed(page, index)
        skipped += dropped
        shards += len(page["key"])
        if progress_board is not None:
            progress_board.listing.remote(listed, skipped, False)
        metric_set = safely("record the listing", metric, INPAINT_LISTED)
        if metric_set is not None and not sharded:
            metric_set.set(listed, tags={"run_id": run_id or "-"})
        if len(page["key"]):
            yield page
    if progress_board is not None:
        # Waited for: the driver reads the skipped count from the board once the rows stop coming.
        done = progress_board.listing.remote(listed, skipped, True, shards if sharded else None)
        safely("report the listing", ray.get, done, timeout=60)
