"""A Prometheus of our own on 127.0.0.1, scraping a Ray head's metrics port: for tests and a laptop.

``LocalPrometheus(["127.0.0.1:PORT"])`` writes a one-job scrape config into a fresh temporary
directory, starts the ``prometheus`` binary (Debian's ``prometheus`` package:
``apt-get install prometheus``; ``make test`` installs it when missing) on a free port, waits until
it is ready and answers PromQL queries (``query``). ``stop()`` ends exactly the process it started
(its own session), never another Prometheus on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

from embedded.servers import stop_process_group

INSTALL_HINT = (
    "the 'prometheus' binary is missing: install Debian's package "
    "(apt-get install -y prometheus; `make test` does it as root) or put it on PATH"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_binary() -> str | None:
    """The ``prometheus`` executable: ``$GLCIC_PROMETHEUS``, else on PATH, else Debian's path."""
    candidates = [os.environ.get("GLCIC_PROMETHEUS"), shutil.which("prometheus"), "/usr/bin/prometheus"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


class LocalPrometheus:
    def __init__(self, targets: list[str], scrape_interval_s: float = 1.0, startup_timeout: float = 60):
        self.targets = list(targets)
        self.scrape_interval_s = scrape_interval_s
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = tempfile.mkdtemp(prefix="glcic-prom-")
        self.log_path = os.path.join(self.data_dir, "prometheus.log")
        self._proc: subprocess.Popen | None = None

    def _write_config(self) -> str:
        interval = f"{max(1, int(self.scrape_interval_s * 1000))}ms"
        config = {  # JSON is YAML
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": self.targets}]}],
        }
        path = os.path.join(self.data_dir, "prometheus.yml")
        with open(path, "w") as f:
            json.dump(config, f)
        return path

    def start(self) -> LocalPrometheus:
        binary = prometheus_binary()
        if binary is None:
            raise FileNotFoundError(INSTALL_HINT)
        args = [
            binary, f"--config.file={self._write_config()}", f"--web.listen-address=127.0.0.1:{self.port}",
            f"--storage.tsdb.path={os.path.join(self.data_dir, 'tsdb')}", "--storage.tsdb.retention.time=1h",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"prometheus exited with {self._proc.returncode}; see {self.log_path}")
                try:
                    urllib.request.urlopen(f"{self.url}/-/ready", timeout=2)
                    return self
                except (urllib.error.URLError, OSError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"prometheus not ready in {self.startup_timeout}s; see {self.log_path}"
                        ) from None
                    time.sleep(0.3)
        except BaseException:
            self.stop()
            raise

    def _api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant-query results: ``[{"metric": {labels}, "value": [time, "text"]}, ...]``."""
        return self._api("query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        """The single value of ``expr`` (e.g. a ``sum(...)``), or None when it has no sample."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def metric_names(self) -> list[str]:
        return self._api("label/__name__/values")

    def targets_up(self) -> bool:
        active = self._api("targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def stop(self) -> None:
        if self._proc is not None:
            stop_process_group(self._proc)
            self._proc = None
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
