"""Live figures of the jobs while they run: Ray metrics for Prometheus/Grafana, and a progress file.

Two audiences, two channels:

- **Ray metrics** (``ray.util.metrics``), recorded where the rows and steps are made: the
  inpainting job's write tasks count every image as it is written (``RowTally``), its driver sets
  the run-wide gauges (images/s, listed, ETA); the training loop's rank 0 reports steps, phase,
  losses and validation figures (``TrainReporter``). Each node's Ray agent exposes them to
  Prometheus on the head's ``--metrics-export-port`` with a ``ray_`` prefix
  (``ray_glcic_inpaint_images_total{status="ok"}``); ``dashboards/glcic.json`` charts them.
- **A progress file** (``_progress.json``, next to the run's manifest or in the training run's
  folder), rewritten by the driver on a timer: what ``glcic status JOB`` prints (counts,
  images/s, ETA) without needing Prometheus. Names starting with ``_`` are ignored by the
  manifest readers.

The inpainting driver never sees rows (write tasks write the manifest and return counts), so live
counts come from a small actor, the run's ``ProgressBoard``: the listing task tells it how many keys it listed, and
write tasks push their per-image counts to it about once a second. The driver's ``InpaintProgress``
reads it on its timer, logs a progress line, saves the progress file and sets the gauges. The
counts in ``_SUCCESS.json`` come from the manifest parts' own counts (a retried write task may count
some images twice on the board; never in the manifest).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np

log = logging.getLogger("glcic.progress")

PROGRESS_FILE = "_progress.json"
STATUSES = ("ok", "error", "skipped")  # pipeline.manifest.STATUSES, without importing pyarrow here
STAGES = ("read_s", "decode_s", "inference_s", "write_s")
# Seconds per image and stage: from a cached small PNG (ms) to a large image on a slow store (s).
STAGE_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
RECENT_WINDOW_S = 60.0  # images/s for the ETA: over this last stretch, not since the start
BOARD_PUSH_S = 1.0  # a write task tells the board its counts at most this often

# Metric names as recorded; Prometheus sees them with Ray's ``ray_`` prefix (and counters with
# ``_total``, histograms as ``_bucket``/``_sum``/``_count``).
INPAINT_IMAGES = "glcic_inpaint_images"  # Counter {run_id, status}: images finished, per status
INPAINT_ERRORS = "glcic_inpaint_errors"  # Counter {run_id, error_type}: error rows by cause
INPAINT_STAGE_SECONDS = "glcic_inpaint_stage_seconds"  # Histogram {run_id, stage}: per image
INPAINT_IMAGES_PER_S = "glcic_inpaint_images_per_second"  # Gauge {run_id}: ok + error, recent
INPAINT_LISTED = "glcic_inpaint_images_listed"  # Gauge {run_id}: keys listed so far
INPAINT_TOTAL = "glcic_inpaint_images_expected"  # Gauge {run_id}: listed (capped by --limit) once known
INPAINT_ETA = "glcic_inpaint_eta_seconds"  # Gauge {run_id}
TRAIN_STEPS = "glcic_train_steps"  # Counter {run}: optimizer steps done (rank 0)
TRAIN_STEP = "glcic_train_step"  # Gauge {run}: the current step
TRAIN_STEPS_PER_S = "glcic_train_steps_per_second"  # Gauge {run}
TRAIN_IMAGES_PER_S = "glcic_train_images_per_second"  # Gauge {run}: all workers
TRAIN_PHASE = "glcic_train_phase"  # Gauge {run}: 1 completion MSE, 2 discriminator, 3 joint
TRAIN_LOSS = "glcic_train_loss"  # Gauge {run, loss}: loss_mse, loss_d, loss_adv
TRAIN_VALIDATION = "glcic_train_validation"  # Gauge {run, metric}: val_hole_l1/_psnr, val_psnr, val_ssim
TRAIN_ETA = "glcic_train_eta_seconds"  # Gauge {run}

RAY_METRIC_NAMES = (
    INPAINT_IMAGES, INPAINT_ERRORS, INPAINT_STAGE_SECONDS, INPAINT_IMAGES_PER_S, INPAINT_LISTED,
    INPAINT_TOTAL, INPAINT_ETA, TRAIN_STEPS, TRAIN_STEP, TRAIN_STEPS_PER_S, TRAIN_IMAGES_PER_S,
    TRAIN_PHASE, TRAIN_LOSS, TRAIN_VALIDATION, TRAIN_ETA,
)  # fmt: skip

_METRICS: dict[str, Any] = {}
_METRICS_LOCK = threading.Lock()


def metric(name: str):
    """This process's Ray metric object for ``name`` (created on first use, once Ray is up)."""
    with _METRICS_LOCK:
        if name not in _METRICS:
            from ray.util import metrics as ray_metrics

            run = ("run_id",) if name.startswith("glcic_inpaint") else ("run",)
            if name == INPAINT_IMAGES:
                m = ray_metrics.Counter(name, "images finished, by status", run + ("status",))
            elif name == INPAINT_ERRORS:
                m = ray_metrics.Counter(name, "error rows, by error type", run + ("error_type",))
            elif name == INPAINT_STAGE_SECONDS:
                m = ray_metrics.Histogram(
                    name, "seconds per image in each stage", STAGE_BOUNDARIES, run + ("stage",)
                )
            elif name == TRAIN_STEPS:
                m = ray_metrics.Counter(name, "training steps done", run)
            elif name == TRAIN_LOSS:
                m = ray_metrics.Gauge(name, "latest training losses", run + ("loss",))
            elif name == TRAIN_VALIDATION:
                m = ray_metrics.Gauge(name, "latest validation figures", run + ("metric",))
            elif name in RAY_METRIC_NAMES:
                m = ray_metrics.Gauge(name, name.replace("_", " "), run)
            else:
                raise KeyError(name)
            _METRICS[name] = m
        return _METRICS[name]


def safely(what: str, fn, *args, **kwargs):
    """Figures must never fail a job: log and carry on."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        log.warning("could not %s: %s: %s", what, type(e).__name__, e)
        return None


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(uri: str, document: dict, endpoint_url: str | None) -> None:
    from pipeline import storage

    fs, path = storage.filesystem(uri, endpoint_url)
    data = json.dumps(document, indent=2, sort_keys=True, default=str).encode()
    storage.atomic_write_bytes(fs, path, data)


def read_json(uri: str, endpoint_url: str | None) -> dict:
    from pipeline import storage

    fs, path = storage.filesystem(uri, endpoint_url)
    fs.invalidate_cache()
    return json.loads(storage.read_bytes(fs, path))


# ---------------------------------------------------------------------------------------------
# The inpainting job.


def board_name(run_id: str) -> str:
    return f"glcic-progress-{run_id}"


class ProgressBoard:
    """One per run (a named actor, no CPU): live counts that tasks push and the driver reads."""

    def __init__(self):
        self.listed = 0
        self.skipped = 0  # listed keys the resume index dropped (completed by an earlier run)
        self.listing_done = False
        self.counts: collections.Counter = collections.Counter()
        self.error_types: collections.Counter = collections.Counter()
        # Sharded runs list shards, not images: their rows are known once each shard is read.
        self.shards: int | None = None  # shards to read, once the listing is done
        self.shards_read = 0
        self.found = 0  # rows of the shards read so far

    def listing(self, listed: int, skipped: int, done: bool, shards: int | None = None) -> None:
        # cumulative per listing task: a retry starts over
        self.listed, self.skipped = max(self.listed, listed), max(self.skipped, skipped)
        self.listing_done = self.listing_done or done
        if shards is not None and done:
            self.shards = shards

    def found_rows(self, rows: int) -> None:
        """A read task read one shard holding ``rows`` manifest rows."""
        self.found += rows
        self.shards_read += 1

    def add(self, counts: dict[str, int], error_types: dict[str, int]) -> None:
        self.counts.update(counts)
        self.error_types.update(error_types)

    def snapshot(self) -> dict:
        return {
            "listed": self.listed + self.found,
            "skipped": self.skipped,
            # Every input known: with shards, once each listed shard has been read.
            "listing_done": self.listing_done and (self.shards is None or self.shards_read >= self.shards),
            "counts": dict(self.counts),
            "error_types": dict(self.error_types),
        }


_BOARDS: dict[str, Any] = {}


def board(run_id: str):
    """The run's board from a task (cached per process); None when there is none."""
    if not run_id:
        return None
    if run_id not in _BOARDS:
        import ray

        try:
            _BOARDS[run_id] = ray.get_actor(board_name(run_id))
        except ValueError:
            _BOARDS[run_id] = None
    return _BOARDS[run_id]


class RowTally:
    """Counts the rows a write task finishes, image by image: Ray metrics and the run's board."""

    def __init__(self, run_id: str):
        self.run_id = run_id or "-"
        self.board = board(run_id)
        self.counts: collections.Counter = collections.Counter()
        self.error_types: collections.Counter = collections.Counter()
        self.last_push = time.monotonic()
        self.ok = True
        try:
            self.images = metric(INPAINT_IMAGES)
            self.errors = metric(INPAINT_ERRORS)
            self.stages = metric(INPAINT_STAGE_SECONDS)
        except Exception as e:  # noqa: BLE001
            log.warning("no Ray metrics in this process: %s", e)
            self.ok = False

    def row(self, batch: dict[str, np.ndarray], i: int, status: str, error_type: str, write_s: float = 0.0):
        tags = {"run_id": self.run_id}
        if self.ok:
            self.images.inc(1, tags={**tags, "status": status})
            if error_type:
                self.errors.inc(1, tags={**tags, "error_type": error_type})
            for stage in STAGES:
                seconds = write_s if stage == "write_s" else float(batch[stage][i])
                if seconds > 0:
                    self.stages.observe(seconds, tags={**tags, "stage": stage[:-2]})
        self.counts[status] += 1
        if error_type:
            self.error_types[error_type] += 1
        if time.monotonic() - self.last_push >= BOARD_PUSH_S:
            self.push()

    def push(self) -> None:
        if self.board is not None and self.counts:
            self.board.add.remote(dict(self.counts), dict(self.error_types))
        self.counts.clear()
        self.error_types.clear()
        self.last_push = time.monotonic()


class InpaintProgress:
    """The driver's live view of a run, logged, saved to ``_progress.json`` and set as gauges on a
    timer (every ``every_s``), whether or not a write task has finished since."""

    def __init__(
        self,
        run_id: str,
        run_prefix: str,
        *,
        every_s: float = 10.0,
        limit: int | None = None,
        endpoint_url: str | None = None,
    ):
        self.run_id, self.run_prefix, self.every_s = run_id, run_prefix, max(0.2, every_s)
        self.limit, self.endpoint_url = limit, endpoint_url
        self.uri = f"{run_prefix.rstrip('/')}/{PROGRESS_FILE}"
        self.started = time.time()
        self.rows: collections.Counter = collections.Counter()  # the manifest parts' counts, at the end
        self.row_errors: collections.Counter = collections.Counter()
        self.samples: collections.deque = collections.deque()  # (time, ok + error)
        self.board = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> InpaintProgress:
        import ray

        board_cls = ray.remote(num_cpus=0, max_restarts=0)(ProgressBoard)
        board = safely(
            "start the progress board", lambda: board_cls.options(name=board_name(self.run_id)).remote()
        )
        if board is not None and safely(
            "reach the progress board", ray.get, board.snapshot.remote(), timeout=60
        ):
            self.board = board
        self.tick()
        self._thread = threading.Thread(target=self._run, name="glcic-progress", daemon=True)
        self._thread.start()
        return self

    def set_rows(self, counts: dict[str, int], error_types: dict[str, int]) -> None:
        """The counts of the rows the manifest holds (the parts' totals), for the final snapshot."""
        with self._lock:
            self.rows = collections.Counter(counts)
            self.row_errors = collections.Counter(error_types)

    def failed(self) -> None:
        """Save the ``failed`` state of a run that raised, never raising itself (the run's own
        error is what the caller must see)."""
        safely("save the failed state", self.finish, "failed")

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            safely("report progress", self.tick)

    def snapshot(self, state: str = "running") -> dict:
        import ray

        board = None
        if self.board is not None:
            board = safely("read the progress board", ray.get, self.board.snapshot.remote(), timeout=10)
        with self._lock:
            counts, error_types = dict(self.rows), dict(self.row_errors)
        listed, listing_done, skipped = None, False, None
        if board is not None:
            listed, listing_done, skipped = board["listed"], board["listing_done"], board["skipped"]
            # The board counts images as they are written; the rows only once a whole task is done.
            if state == "running" and sum(board["counts"].values()) > sum(counts.values()):
                counts, error_types = board["counts"], board["error_types"]
        counts = {s: int(counts.get(s, 0)) for s in STATUSES}
        # Completed inputs never become rows: the listing drops them and counts them on the board.
        counts["skipped"] = int(skipped or 0)
        done = sum(counts.values())
        processed = counts["ok"] + counts["error"]  # skipped images cost nothing: reported apart
        total = None
        if state == "finished":
            total = done
        elif listed is not None and self.limit is not None and listed >= self.limit:
            total = self.limit
        elif listed is not None and listing_done:
            total = min(listed, self.limit) if self.limit is not None else listed
        now = time.time()
        elapsed = now - self.started
        self.samples.append((now, processed))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RECENT_WINDOW_S:
            self.samples.popleft()
        t0, p0 = self.samples[0]
        recent = (processed - p0) / (now - t0) if now - t0 >= 1.0 else None
        overall = processed / elapsed if elapsed > 0 else None
        rate = recent if recent else overall
        eta = None
        if total is not None and rate:
            eta = max(0, total - done) / rate
        elif total is not None and done >= total:
            eta = 0.0
        return {
            "job": "inpaint",
            "run_id": self.run_id,
            "state": state,
            "started_at": datetime.fromtimestamp(self.started, timezone.utc).isoformat(timespec="seconds"),
            "updated_at": _now_iso(),
            "elapsed_s": round(elapsed, 1),
            "counts": counts,
            "error_types": dict(error_types),
            "done": done,
            "listed": listed,
            "listing_done": listing_done,
            "total": total,
            "images_per_s": round(overall, 3) if overall is not None else None,
            "recent_images_per_s": round(recent, 3) if recent is not None else None,
            "eta_s": round(eta, 1) if eta is not None else None,
            "manifest": self.run_prefix,
        }

    def tick(self, state: str = "running") -> dict:
        snap = self.snapshot(state)
        log.warning("%s", progress_line(snap))
        safely("save the progress file", write_json, self.uri, snap, self.endpoint_url)
        safely("set the progress gauges", self._gauges, snap)
        return snap

    def _gauges(self, snap: dict) -> None:
        tags = {"run_id": self.run_id}
        rate = snap["recent_images_per_s"] or snap["images_per_s"] or 0.0
        metric(INPAINT_IMAGES_PER_S).set(rate, tags=tags)
        if snap["listed"] is not None:
            metric(INPAINT_LISTED).set(snap["listed"], tags=tags)
        if snap["total"] is not None:
            metric(INPAINT_TOTAL).set(snap["total"], tags=tags)
        if snap["eta_s"] is not None:
            metric(INPAINT_ETA).set(snap["eta_s"], tags=tags)

    def finish(self, state: str = "finished") -> dict | None:
        if self._stop.is_set():
            return None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        snap = self.tick(state)
        if self.board is not None:
            import ray

            safely("stop the progress board", ray.kill, self.board)
        return snap


def progress_line(snap: dict) -> str:
    """One line for logs and ``glcic status``, from an inpainting or a training progress document."""
    if snap.get("job") == "train":
        parts = [f"step {snap['step']} of {snap['t_train']} (phase {snap['phase']})"]
        if snap.get("steps_per_s") is not None:
            parts.append(f"{snap['steps_per_s']:.2f} steps/s")
        losses = ", ".join(f"{k} {v:.4g}" for k, v in sorted(snap.get("losses", {}).items()))
        if losses:
            parts.append(losses)
        parts.append(f"ETA {format_duration(snap.get('eta_s'))}")
        return f"train {snap['run']}: " + "; ".join(parts)
    counts = snap["counts"]
    of = f" of {snap['total']}" if snap.get("total") is not None else ""
    if snap.get("total") is None and snap.get("listed") is not None:
        of = f" of {snap['listed']}+ listed so far"
    rate = snap.get("recent_images_per_s") or snap.get("images_per_s")
    errors = ", ".join(f"{k} {v}" for k, v in sorted(snap.get("error_types", {}).items()))
    return (
        f"inpaint {snap['run_id']} {snap['state']}: {snap['done']}{of} images "
        f"(ok {counts['ok']}, error {counts['error']}, skipped {counts['skipped']})"
        + (f" [{errors}]" if errors else "")
        + f"; {rate or 0:.2f} images/s completed (skipped apart); ETA {format_duration(snap.get('eta_s'))}"
    )


# ---------------------------------------------------------------------------------------------
# The training job.


class TrainReporter:
    """Rank 0's figures at each of its report points: Ray metrics and ``<run>/_progress.json``."""

    def __init__(self, run: str, run_uri: str, t_train: int, endpoint_url: str | None, every_s: float = 10.0):
        self.run, self.t_train, self.endpoint_url, self.every_s = run, t_train, endpoint_url, every_s
        self.uri = f"{run_uri.rstrip('/')}/{PROGRESS_FILE}"
        self.last_step: int | None = None
        self.last_write = 0.0
        self.started = time.time()

    def report(self, figures: dict[str, float], world: int = 1, final: bool = False) -> None:
        figures = dict(figures)
        if "images_per_s_per_worker" in figures:
            figures["images_per_s"] = figures["images_per_s_per_worker"] * world
        safely("report training figures", self._report, figures, final)

    def _report(self, figures: dict[str, float], final: bool) -> None:
        tags = {"run": self.run}
        step = int(figures["step"])
        previous = self.last_step if self.last_step is not None else int(figures.get("start_step", 0))
        if step > previous:
            metric(TRAIN_STEPS).inc(step - previous, tags=tags)
        self.last_step = step
        metric(TRAIN_STEP).set(step, tags=tags)
        metric(TRAIN_PHASE).set(figures["phase"], tags=tags)
        steps_per_s = figures.get("steps_per_s")
        if steps_per_s is not None:
            metric(TRAIN_STEPS_PER_S).set(steps_per_s, tags=tags)
        if figures.get("images_per_s") is not None:
            metric(TRAIN_IMAGES_PER_S).set(figures["images_per_s"], tags=tags)
        losses = {k: float(v) for k, v in figures.items() if k.startswith("loss_")}
        for name, value in losses.items():
            metric(TRAIN_LOSS).set(value, tags={**tags, "loss": name})
        validation = {k: float(v) for k, v in figures.items() if k.startswith(("val_", "best_val_"))}
        for name, value in validation.items():
            metric(TRAIN_VALIDATION).set(value, tags={**tags, "metric": name})
        eta = (self.t_train - step) / steps_per_s if steps_per_s else None
        if eta is not None:
            metric(TRAIN_ETA).set(eta, tags=tags)
        if final or time.monotonic() - self.last_write >= self.every_s:
            self.last_write = time.monotonic()
            document = {
                "job": "train",
                "run": self.run,
                "state": "finished" if final else "running",
                "updated_at": _now_iso(),
                "step": step,
                "t_train": self.t_train,
                "phase": int(figures["phase"]),
                "steps_per_s": round(steps_per_s, 4) if steps_per_s is not None else None,
                "losses": losses,
                "validation": validation,
                "eta_s": round(eta, 1) if eta is not None else None,
            }
            write_json(self.uri, document, self.endpoint_url)
