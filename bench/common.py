"""What every benchmark script shares: the machine's description, a local Ray, test inputs, a random
checkpoint, medians, peak-RSS sampling of a process tree, tables and the JSON of the figures.

Benchmarks are scripts, not tests: each prints a table and writes ``bench_out/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "data" / "photos"
OUT_DIR = REPO / "bench_out"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# A benchmark's Ray keeps its memory monitor and dashboard out of the measurement.
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def machine_info(device: str = "cpu") -> dict:
    import torch

    info = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * PAGE_SIZE / 2**30, 1),
        "cpu_bf16": "avx512_bf16" in cpu_flags() or "amx_bf16" in cpu_flags(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(v, 2) for v in load_average()],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def start_ray(num_cpus: int | None = None, num_gpus: int = 0, **kwargs):
    """A fresh local Ray of our own: ``address="local"`` never joins a head someone else started."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        num_gpus=num_gpus,
        include_dashboard=False,
        log_to_driver=False,
        **kwargs,
    )
    return ray


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how noisy the repeats were."""
    m = median(values)
    return float((max(values) - min(values)) / m) if m else 0.0


def photo_crops(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` distinct ``size`` x ``size`` RGB crops of the shipped photographs (scaled up first
    where a photo is smaller than ``size``), so decoders and encoders see real image statistics."""
    import cv2

    photos = []
    for path in sorted(PHOTOS.glob("*.jpg")):
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        h, w = bgr.shape[:2]
        scale = max(1.0, (size + 16) / min(h, w))
        if scale > 1:
            bgr = cv2.resize(bgr, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_CUBIC)
        photos.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        y = int(rng.integers(0, photo.shape[0] - size + 1))
        x = int(rng.integers(0, photo.shape[1] - size + 1))
        crop = photo[y : y + size, x : x + size]
        crops.append(np.ascontiguousarray(crop[:, ::-1] if rng.integers(2) else crop))
    return crops


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def random_checkpoint(uri: str, width: float, seed: int = 0) -> str:
    """A randomly initialised generator saved as a real checkpoint: speed does not depend on the
    weights' values, and the jobs load it exactly as they load a trained one."""
    import torch

    from model.completion import CompletionNetwork
    from pipeline.checkpoint import ModelConfig, save_checkpoint

    torch.manual_seed(seed)
    generator = CompletionNetwork(width).eval()
    return save_checkpoint(uri, ModelConfig(width=width, mean_pixel=(0.45, 0.43, 0.40)), generator)


def completion_flops(width: float, size: int) -> int:
    """FLOPs (2 per multiply-add) of one ``size`` x ``size`` forward pass, counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from model.completion import CompletionNetwork

    net = CompletionNetwork(width).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 4, size, size))
    return int(counter.get_total_flops())


class PeakRSS:
    """Samples the resident memory of this process and of every process it started (Ray's raylet,
    GCS and workers are children of a driver that ran ``ray.init(address="local")``).

    Reads /proc directly (no psutil dependency). Besides the sampled RSS, each process's own
    high-water mark (``VmHWM``, kept by the kernel) is recorded, so a peak between two samples is
    not missed for processes that are still alive at the next sample.
    """

    def __init__(self, interval_s: float = 0.5, root_pid: int | None = None):
        self.interval_s = interval_s
        self.root_pid = root_pid or os.getpid()
        self.driver_peak = 0
        self.workers_peak_sum = 0
        self.worker_peak = 0
        self.system_peak_sum = 0
        self.tree_peak_sum = 0
        self.hwm: dict[int, tuple[str, int]] = {}
        # Ray names a worker process after the task it runs (``ray::MapBatches(list_todo...)``):
        # the largest RSS seen under each name is the memory of that stage's processes.
        self.title_peak: dict[str, int] = {}
        self.samples = 0
        self.started = time.monotonic()
        self.timeline: list[tuple[float, int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="peak-rss", daemon=True)

    @staticmethod
    def _status(pid: int) -> dict[str, int] | None:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return None
        fields = {}
        for line in text.splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                fields[name] = int(value.split()[0]) * 1024
        return fields

    @staticmethod
    def _cmdline(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""

    def _descendants(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        found, todo = [], [self.root_pid]
        while todo:
            for child in children.get(todo.pop(), []):
                found.append(child)
                todo.append(child)
        return found

    @staticmethod
    def kind(cmdline: str) -> str:
        """``worker`` (Ray task and actor processes), ``ray`` (raylet, GCS, agents) or ``other``."""
        if cmdline.startswith("ray::") or "default_worker.py" in cmdline:
            return "worker"
        if "ray" in cmdline:
            return "ray"
        return "other"

    def sample(self) -> None:
        own = self._status(self.root_pid) or {}
        driver = own.get("VmRSS", 0)
        workers = system = 0
        for pid in self._descendants():
            status = self._status(pid)
            if not status:
                continue
            cmd = self._cmdline(pid)
            kind = self.kind(cmd)
            rss = status.get("VmRSS", 0)
            if kind == "worker":
                workers += rss
                self.worker_peak = max(self.worker_peak, rss)
                title = cmd.split(" ")[0]
                self.title_peak[title] = max(self.title_peak.get(title, 0), rss)
            elif kind == "ray":
                system += rss
            previous = self.hwm.get(pid, ("", 0))[1]
            self.hwm[pid] = (cmd.split(" ")[0][:60], max(previous, status.get("VmHWM", 0)))
        self.driver_peak = max(self.driver_peak, driver)
        self.workers_peak_sum = max(self.workers_peak_sum, workers)
        self.system_peak_sum = max(self.system_peak_sum, system)
        self.tree_peak_sum = max(self.tree_peak_sum, driver + workers + system)
        self.samples += 1
        self.timeline.append((round(time.monotonic() - self.started, 1), driver, workers, system))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def figures(self) -> dict:
        mib = 2**20
        worker_hwm = max((v for name, v in self.hwm.values() if name.startswith("ray::")), default=0)
        return {
            "driver_peak_rss_mib": round(self.driver_peak / mib, 1),
            "worker_peak_rss_mib": round(max(self.worker_peak, worker_hwm) / mib, 1),
            "workers_peak_rss_sum_mib": round(self.workers_peak_sum / mib, 1),
            "ray_system_peak_rss_sum_mib": round(self.system_peak_sum / mib, 1),
            "all_processes_peak_rss_sum_mib": round(self.tree_peak_sum / mib, 1),
            "rss_samples": self.samples,
        }

    def task_peak_mib(self, *names: str) -> float:
        """The largest RSS sampled in a worker while its title named one of ``names`` (0: never seen)."""
        peaks = [v for title, v in self.title_peak.items() if any(n in title for n in names)]
        return round(max(peaks, default=0) / 2**20, 1)

    def timeline_mib(self, points: int = 60) -> list[dict]:
        """About ``points`` evenly spaced samples: whether memory grows with the work done."""
        step = max(1, len(self.timeline) // points)
        mib = 2**20
        return [
            {
                "t_s": t,
                "driver_mib": round(d / mib, 1),
                "workers_mib": round(w / mib, 1),
                "ray_mib": round(r / mib, 1),
            }
            for t, d, w, r in self.timeline[::step]
        ]


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (pastes straight into BENCHMARKS.md); printed and returned."""
    cells = [[str(h) for h in header]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [f"### {title}", ""]
    for j, row in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if j == 0:
            lines.append("| " + " | ".join("-" * w for w in widths) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write_json(name: str, figures: dict, out_dir: Path | None = None) -> Path:
    out = Path(out_dir or OUT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    print(f"wrote {path}", flush=True)
    return path


def write_figures(
    name: str, info: dict, args, argv: list[str] | None, figures: dict, skip: tuple[str, ...] = ()
) -> dict:
    """Wrap a script's ``figures`` with what every benchmark JSON records, and write it.

    The machine, the settings (``args`` less ``out_dir`` and ``skip``), the command that reproduces
    the run and the load average at its end: each script's tables are only comparable with these.
    """
    figures = {
        "benchmark": name,
        "machine": info,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out_dir", *skip)},
        **figures,
        "command": f"python bench/{name}.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "load_average_at_end": [round(v, 2) for v in load_average()],
    }
    write_json(name, figures, Path(args.out_dir))
    return figures


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM (a timeout, a kill) unwinds like Ctrl-C, so ``finally`` blocks stop the S3 server
    and Ray this script started and remove its temporary files."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def base_parser(description: str) -> argparse.ArgumentParser:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: tiny sizes, one repeat")
    parser.add_argument("--out-dir", default=str(OUT_DIR), help="where the JSON of the figures goes")
    return parser
