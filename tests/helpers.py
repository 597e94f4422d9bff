"""Small helpers shared by the test modules."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def missing_tool(hint: str, required_by: str) -> None:
    """A tool a test needs is not here: fail where ``make test`` sets ``required_by`` (no silent
    skip in CI), else skip saying how to get it."""
    import pytest

    if os.environ.get(required_by):
        pytest.fail(hint)
    pytest.skip(hint)


def write_objects(root: str, files: dict[str, bytes], endpoint_url: str | None = None) -> None:
    """Put ``files`` (relative key -> bytes) under ``root``, any fsspec URI."""
    from pipeline import storage

    fs, base = storage.filesystem(root, endpoint_url)
    for key, data in files.items():
        storage.atomic_write_bytes(fs, storage.join_key(base, key), data)


def job_env(extra: dict | None = None) -> dict:
    """The environment of a job started as its own process: this repository importable, without
    a RAY_ADDRESS the test session may have set."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra or {})}
    env.pop("RAY_ADDRESS", None)
    return env


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL everything the job started, the way a lost machine stops it: all at once.

    Ray's workers put themselves in process groups of their own, so a killpg of the driver's group
    leaves them running until they notice the raylet is gone, and one can still write a manifest
    part after the test has counted them. They all stay in the session the test gave the driver.
    """
    deadline = time.time() + 30
    while True:
        alive = []
        for entry in os.listdir("/proc"):
            try:
                # /proc/PID/stat after the command's ")": state ppid pgrp session ...
                state, _, _, session = Path("/proc", entry, "stat").read_text().rsplit(")", 1)[1].split()[:4]
            except (OSError, ValueError):
                continue  # not a process, or gone already
            if int(session) == proc.pid and state != "Z":  # a zombie has stopped already
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry), signal.SIGKILL)
                alive.append(entry)
        if not alive or time.time() > deadline:
            break
        time.sleep(0.05)
    proc.wait()


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    """A tar of ``(name, data)`` members in this order, written with Python's tarfile: members a
    WebDataset writer would never produce (split keys, duplicates) included."""
    import io
    import tarfile

    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return sink.getvalue()


def kill_at_first_part(argv: list[str], manifest: Path, timeout_s: float = 180) -> Path:
    """Run ``python -m jobs.inpaint argv`` and kill it (``kill_session``) once its first manifest
    part is written; returns the run's folder, which must not hold a _SUCCESS.json yet."""
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.inpaint", *argv], env=job_env(), cwd=REPO, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + timeout_s
        while time.time() < deadline and not list(manifest.glob("run_id=*/part-*.parquet")):
            time.sleep(0.1)
    finally:
        kill_session(proc)
    (run_dir,) = manifest.glob("run_id=*")
    assert not (run_dir / "_SUCCESS.json").exists(), "the job finished before it could be killed"
    return run_dir
