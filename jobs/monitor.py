"""What the CLI adds around a submission so a person can follow a run: readable job metadata, the
run id chosen here, an environment probe before submitting, and live progress for ``glcic status``.

- ``with_run_id``, ``job_metadata``: the inpainting run id is chosen at submit (and passed to the job as
  ``--run-id``), so the job's metadata can name its manifest and progress file before the job
  starts; ``job_name`` is what the Ray dashboard shows in the Jobs list's Name column.
- ``probe_environment``: a short Ray Job (``python -c`` importing the job's modules, with the same
  runtime_env) that fails at submit, as one line, when the head's Python cannot import the project
  (a head started outside the project's environment), instead of the job failing seconds later.
- ``status_rows``: the job's metadata and its ``_progress.json`` (``pipeline.metrics``) as rows
  of the ``glcic status`` table.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
import uuid
from typing import Any

PROBE_PREFIX = "glcic-probe"
PROBE_TIMEOUT_S = 180.0  # the probe also sets up the runtime_env the job then reuses from cache
# Imported by the probe: what the job's driver and its tasks import (torch included).
PROBE_MODULES = {
    "inpaint": ("jobs.inpaint", "pipeline.inference", "pipeline.writer", "pipeline.metrics"),
    "evaluate": ("jobs.evaluate", "pipeline.inference", "pipeline.evaluation"),
    "train": ("jobs.train", "pipeline.metrics"),
}


def with_run_id(spec_name: str, config: Any) -> Any:
    """The config with its run id chosen here, so the metadata can name the run's files."""
    if spec_name == "inpaint" and not config.run_id:
        from pipeline.batch_run import new_run_id

        config = dataclasses.replace(config, run_id=new_run_id())
    return config


def job_metadata(spec_name: str, config: Any, checkpoint=None) -> dict[str, str]:
    """The job's metadata: ``job_name`` (the dashboard's Name column), run id, manifest, checkpoint
    (``checkpoint``: the ``LocatedCheckpoint`` the CLI checked, or None without a preflight)."""
    from pipeline.metrics import PROGRESS_FILE

    metadata = {"glcic_job": spec_name}
    if spec_name == "inpaint":
        from pipeline.manifest import run_prefix

        prefix = run_prefix(config.manifest_uri, config.run_id)
        metadata.update(
            job_name=f"inpaint {config.images} -> {config.output}",
            run_id=config.run_id,
            manifest=prefix,
            progress=f"{prefix}/{PROGRESS_FILE}",
            checkpoint=config.checkpoint,
        )
        if checkpoint is not None:
            metadata["checkpoint_id"] = checkpoint.checkpoint_id
    elif spec_name == "train":
        run_uri = config.run_uri()
        metadata.update(
            job_name=f"train {config.images} -> {config.output}",
            run_id=config.run_name,
            run=run_uri,
            progress=f"{run_uri}/{PROGRESS_FILE}",
            checkpoint=config.output,
        )
    else:
        metadata["job_name"] = spec_name
    from pipeline.storage import redact

    return {key: redact(value) for key, value in metadata.items()}  # the dashboard shows it to all


def describe(metadata: dict[str, str]) -> list[str]:
    """Lines the CLI prints after submitting."""
    names = {"run_id": "run id", "manifest": "manifest", "run": "run", "checkpoint_id": "checkpoint"}
    width = max(len(label) for label in names.values()) + 2  # the longest label keeps a space too
    return [f"  {label + ':':<{width}}{metadata[key]}" for key, label in names.items() if metadata.get(key)]


def probe_command(modules: tuple[str, ...]) -> str:
    code = (
        "import importlib, sys\n"
        "try:\n"
        f"    for name in {list(modules)!r}:\n"
        "        importlib.import_module(name)\n"
        "except BaseException as e:\n"
        "    print(f'glcic-probe-error: {type(e).__name__}: {e} (python {sys.executable})', flush=True)\n"
        "    sys.exit(3)\n"
        "import ray\n"
        "print(f'glcic-probe-ok: python {sys.executable}, ray {ray.__version__}', flush=True)\n"
    )
    return shlex.join(["python", "-c", code])


def probe_environment(
    client, spec_name: str, runtime_env: dict, address: str, timeout_s: float = PROBE_TIMEOUT_S
) -> str:
    """Run the probe job; return its ok line, or raise ``CliError`` with the head's import error."""
    from jobs.errors import CliError, one_line

    modules = PROBE_MODULES.get(spec_name, ())
    job_id = f"{PROBE_PREFIX}-{uuid.uuid4().hex[:12]}"
    try:
        client.submit_job(
            entrypoint=probe_command(modules),
            submission_id=job_id,
            runtime_env=runtime_env,
            metadata={"job_name": f"glcic preflight: can the cluster's Python import {spec_name}?"},
            entrypoint_num_cpus=0,
        )
    except Exception as e:  # noqa: BLE001
        raise CliError(f"cannot submit to the Ray cluster at {address}: {one_line(e)}") from e
    deadline = time.monotonic() + timeout_s
    status = "PENDING"
    try:
        while time.monotonic() < deadline:
            status = str(client.get_job_status(job_id).value)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(0.3)
        else:
            print(
                f"warning: the environment probe did not finish in {timeout_s:.0f}s; submitting anyway",
                file=sys.stderr,
            )
            return ""
        logs = client.get_job_logs(job_id) or ""
        lines = [line.strip() for line in logs.splitlines() if line.strip()]
        if status == "SUCCEEDED":
            return next((line for line in lines if line.startswith("glcic-probe-ok")), "")
        error = next((line for line in lines if line.startswith("glcic-probe-error: ")), None)
        if error is not None:
            reason = error.removeprefix("glcic-probe-error: ")
        else:  # the runtime_env or the entrypoint itself failed
            info = client.get_job_info(job_id)
            reason = one_line(info.message or (lines[-1] if lines else status))[-300:]
        raise CliError(
            f"the cluster's Python cannot run {spec_name}: {reason}. A Ray Job runs `python` from the PATH "
            "the Ray head was started with, not the `ray` command's own environment: start the head (and "
            "workers) with the project's environment active (source .venv/bin/activate; or pip install -e . "
            "into that python), or pass --no-preflight to submit anyway"
        )
    finally:
        if status not in ("SUCCEEDED", "FAILED", "STOPPED"):
            try:
                client.stop_job(job_id)
            except Exception:  # noqa: BLE001
                pass


def is_probe(job) -> bool:
    """A probe job (kept: Ray's job table keeps a deleted job's entry without its name anyway)."""
    return (job.submission_id or "").startswith(PROBE_PREFIX)


def status_rows(info, endpoint_url: str | None) -> list[tuple[str, str]]:
    """Rows for ``glcic status``: what the metadata says, and the live progress document."""
    from pipeline.metrics import PROGRESS_FILE, format_duration, progress_line, read_json

    metadata = info.metadata or {}
    rows = []
    for key, label in (("job_name", "name"), ("run_id", "run id"), ("manifest", "manifest"), ("run", "run")):
        if metadata.get(key):
            rows.append((label, metadata[key]))
    if metadata.get("checkpoint"):
        checkpoint = metadata["checkpoint"]
        if metadata.get("checkpoint_id"):
            checkpoint += f" (id {metadata['checkpoint_id']})"
        rows.append(("checkpoint", checkpoint))
    uri = metadata.get("progress")
    if not uri:
        return rows
    # Whoever submitted the job wrote its metadata; the caller reads with their own credentials.
    # So only the job's own progress file is read (the one the CLI names at submit), and only
    # through the caller's endpoint, never one the job's runtime_env names.
    run_folder = metadata.get("manifest") or metadata.get("run")
    if not run_folder or uri != f"{run_folder}/{PROGRESS_FILE}":
        rows.append(("progress", f"not read: {uri!r} is not the job's own {PROGRESS_FILE}"))
        return rows
    try:
        snap = read_json(uri, endpoint_url)
    except FileNotFoundError:
        rows.append(("progress", "none yet (the job has not reported; see glcic logs)"))
        return rows
    except Exception as e:  # noqa: BLE001
        rows.append(("progress", f"unavailable: {type(e).__name__}: {' '.join(str(e).split())[:200]}"))
        return rows
    rows.append(("progress", progress_line(snap)))
    if snap.get("job") == "inpaint":
        counts = snap["counts"]
        rows.append(("images", f"{snap['done']}" + (f" of {snap['total']}" if snap.get("total") else "")))
        rows += [(f"  {status}", str(counts.get(status, 0))) for status in ("ok", "error", "skipped")]
        for error_type, n in sorted(snap.get("error_types", {}).items()):
            rows.append((f"  error {error_type}", str(n)))
        rate = snap.get("recent_images_per_s") or snap.get("images_per_s")
        rows.append(("images/s", f"{rate or 0:.2f} (ok + error; skipped apart)"))
    rows.append(("ETA", format_duration(snap.get("eta_s"))))
    rows.append(("progress at", f"{snap.get('updated_at', '-')} ({snap.get('state', '-')})"))
    return rows
