"""Test-only fault injection: the one place where a job process kills itself on purpose.

The fault tests (tests/test_fault.py, tests/test_train_job.py) prove that a worker dying mid-run
loses nothing. They set these variables in the driver's environment; nothing happens unless they
are set, and each fault fires once per marker file (created atomically before dying), so the
restarted worker runs on.

- ``GLCIC_TEST_CRASH_AFTER_BATCHES=N`` + ``GLCIC_TEST_CRASH_MARKER=<path>``: an inference actor
  dies at its (N+1)th batch (forwarded to the actors' runtime env, read there).
- ``GLCIC_TEST_KILL_AT_STEP=N`` or ``GLCIC_TEST_KILL_IN_UPLOAD_AT_STEP=N`` +
  ``GLCIC_TEST_KILL_MARKER=<path>``: the rank-0 training worker dies after update N, or after the
  weights of checkpoint N and before its ``config.json`` (forwarded to the workers' runtime env).
"""

from __future__ import annotations

import os

PREFIX = "GLCIC_TEST_"
CRASH_AFTER_BATCHES_ENV = "GLCIC_TEST_CRASH_AFTER_BATCHES"
CRASH_MARKER_ENV = "GLCIC_TEST_CRASH_MARKER"
KILL_AT_STEP_ENV = "GLCIC_TEST_KILL_AT_STEP"
KILL_IN_UPLOAD_ENV = "GLCIC_TEST_KILL_IN_UPLOAD_AT_STEP"
KILL_MARKER_ENV = "GLCIC_TEST_KILL_MARKER"


def test_env() -> dict[str, str]:
    """The fault variables set in this process, to forward to workers."""
    return {k: v for k, v in os.environ.items() if k.startswith(PREFIX)}


def die_once(marker: str, note: str) -> None:
    """Exit like a preempted process (no cleanup, no exception), unless ``marker`` exists already."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"{note}\n".encode())
    os.close(fd)
    os._exit(1)


def forwarded(ray_remote_args: dict | None = None) -> dict:
    """``ray_remote_args`` with the fault variables set here forwarded in the runtime env (nothing
    added when none is set, as in every real run)."""
    env = test_env()
    return {**(ray_remote_args or {}), **({"runtime_env": {"env_vars": env}} if env else {})}


def maybe_crash_inference_actor(batches: int, note: str) -> None:
    """An inference actor dies at its (N+1)th batch if ``GLCIC_TEST_CRASH_AFTER_BATCHES=N`` and the
    marker is not there yet (only actors: the evaluation's grid task runs the same predictor)."""
    after = int(os.environ.get(CRASH_AFTER_BATCHES_ENV, "0") or 0)
    marker = os.environ.get(CRASH_MARKER_ENV)
    if after > 0 and marker and batches >= after:
        die_once(marker, note)


def maybe_kill_training_worker(env_name: str, step: int, rank: int) -> None:
    """Rank 0 dies if ``env_name`` names ``step`` and the marker is not there yet."""
    at, marker = os.environ.get(env_name), os.environ.get(KILL_MARKER_ENV)
    if rank == 0 and at is not None and int(at) == step and marker:
        die_once(marker, f"{env_name}={step}")
