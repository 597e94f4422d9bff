"""The ``glcic`` command line: submit the jobs of ``jobs/`` as Ray Jobs and follow them.

``glcic submit-train``, ``glcic submit-inpaint`` and ``glcic submit-evaluate`` take one flag per
field of the job's config dataclass (``TrainConfig``, ``InpaintConfig``, ``EvaluateConfig``: the
same dataclass the job parses), check from
here what can be checked (storage protocols, input prefixes, the checkpoint), and submit
``python -m jobs.X <flags>`` through ``JobSubmissionClient`` with this project as the
runtime_env ``working_dir``. ``--local`` instead runs the job's ``run(config)`` on a Ray started
in this process. ``status``, ``logs``, ``stop`` and ``list`` wrap the rest of the Jobs API.

Every failure a user can cause (a bad URI, an unreachable cluster, a missing checkpoint, no
credentials, a failed job) ends as one ``error: ...`` line and a non-zero exit, not a traceback;
``GLCIC_DEBUG=1`` shows the traceback as well.

Credentials never travel with a job: s3fs reads the usual AWS variables and profiles wherever
it runs, so the cluster's nodes (or a local head's environment) supply their own. Only the S3
endpoint, which is not a secret, is passed on in the runtime_env.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import importlib
import inspect
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

# typer's public base of its (vendored) click's usage errors: format_message() and exit_code.
from typer.exceptions import TyperException

from jobs import config as job_config
from jobs import monitor
from jobs.errors import EXIT_FAILED, EXIT_USAGE, CliError, one_line

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Never shipped to the cluster: environments, data, outputs, caches (gitignore-style patterns).
WORKING_DIR_EXCLUDES = [
    "/.venv/", "/data/", "/embedded/", "/demo_out/", "/bench_out/", "/.git/", "/.whl/", "/.gl/", "/shared/",
    "__pycache__/", "*.egg-info/", ".pytest_cache/", ".ruff_cache/", "*.pyc",
]  # fmt: skip

TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")

# What Ray's Jobs client says at INFO/WARNING while packaging and following a job.
RAY_CLIENT_LOGGERS = (
    "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
    "ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir",
)  # fmt: skip


def _debug() -> bool:
    return os.environ.get("GLCIC_DEBUG", "") not in ("", "0")


class OneLineErrors(TyperGroup):
    """Report usage errors and unexpected exceptions as one ``error: ...`` line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(
                args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra
            )
        except TyperException as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # `glcic` alone: the help, not an error
                e.show()
                return sys.exit(0) if standalone_mode else 0
            typer.echo(f"error: {one_line(e.format_message())} (see --help)", err=True)
            code = e.exit_code
        except CliError as e:
            typer.echo(f"error: {one_line(e)}", err=True)
            code = e.exit_code
        except (typer.Abort, KeyboardInterrupt):
            typer.echo("error: interrupted", err=True)
            code = 130
        except Exception as e:
            if _debug():
                raise
            typer.echo(
                f"error: {type(e).__name__}: {one_line(e)} (GLCIC_DEBUG=1 shows the traceback)", err=True
            )
            code = EXIT_FAILED
        if standalone_mode:
            sys.exit(code or 0)
        return code


app = typer.Typer(
    cls=OneLineErrors,
    help="Globally and Locally Consistent Image Completion on Ray: submit and follow training and inpainting jobs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


# ---------------------------------------------------------------------------------------------
# The jobs the CLI submits.


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """One submittable job: its module (``python -m``), its config dataclass and what to check."""

    name: str
    module: str
    config_class: type
    summary: str
    example: str
    inputs: tuple[str, ...] = ()  # prefixes that must exist and hold objects
    checkpoints: tuple[str, ...] = ()  # checkpoint URIs that must hold a complete checkpoint
    # Every URI field: relative local paths among them are made absolute before submitting.
    uris: tuple[str, ...] = ()


TRAIN = JobSpec(
    name="train",
    module="jobs.train",
    config_class=job_config.TrainConfig,
    summary="Train the completion network and its discriminators (the paper's three phases) with Ray Train.",
    example=(
        "glcic submit-train --address http://127.0.0.1:8265 --images s3://photos/train "
        "--output s3://models/glcic --storage-path s3://models/ray --wait"
    ),
    inputs=("images",),
    uris=("images", "output", "storage_path", "val_images"),
)

INPAINT = JobSpec(
    name="inpaint",
    module="jobs.inpaint",
    config_class=job_config.InpaintConfig,
    summary="Complete every masked image under a prefix with Ray Data actors and write a Parquet manifest.",
    example=(
        "glcic submit-inpaint --address http://127.0.0.1:8265 --images s3://photos/in "
        "--masks s3://photos/masks --output s3://photos/out --checkpoint s3://models/glcic --wait"
    ),
    inputs=("images", "masks"),
    checkpoints=("checkpoint",),
    uris=("images", "masks", "output", "checkpoint", "manifest"),
)

EVALUATE = JobSpec(
    name="evaluate",
    module="jobs.evaluate",
    config_class=job_config.EvaluateConfig,
    summary=(
        "Score the generator (raw and post-processed) against OpenCV's Telea and Navier-Stokes fills and "
        "PatchMatch on the same seeded holes: per-image PSNR, SSIM and hole L1 as Parquet rows, a summary and a grid PNG."
    ),
    example=(
        "glcic submit-evaluate --address http://127.0.0.1:8265 --images s3://photos/val "
        "--output s3://photos/eval --checkpoint s3://models/glcic --wait"
    ),
    inputs=("images", "masks"),
    checkpoints=("checkpoint",),
    uris=("images", "masks", "output", "checkpoint"),
)


# ---------------------------------------------------------------------------------------------
# Flags: one per config field (jobs/config.py's engine), plus the options every submit command has.


# Options every submit command has; a config field of the same name takes precedence.
def _common_options() -> list[inspect.Parameter]:
    def opt(name: str, annotation: Any, default: Any) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)

    return [
        opt("address", Annotated[str | None, typer.Option(
            envvar="RAY_ADDRESS", help="Ray dashboard address of the cluster, e.g. http://127.0.0.1:8265 "
            "(through `ray dashboard ray_cluster.yaml` for the AWS cluster).", rich_help_panel="Ray")], None),
        opt("local", Annotated[bool, typer.Option(
            "--local", help="Run the job here, on a Ray started in this process, instead of submitting it.",
            rich_help_panel="Ray")], False),
        opt("wait", Annotated[bool, typer.Option(
            "--wait", help="Follow the job's logs until it ends; exit non-zero unless it succeeded.",
            rich_help_panel="Ray")], False),
        opt("job_id", Annotated[str | None, typer.Option(
            help="Submission id to give the job (default: one Ray makes up).", rich_help_panel="Ray")], None),
        opt("entrypoint_num_cpus", Annotated[float, typer.Option(
            help="CPUs reserved for the job's driver process on the cluster.", rich_help_panel="Ray")], 0.0),
        opt("working_dir", Annotated[str | None, typer.Option(
            help="Project directory shipped as the job's runtime_env working_dir (default: this "
            "checkout; 'none' ships nothing when the cluster has glcic installed).",
            rich_help_panel="Ray")], None),
        opt("endpoint_url", Annotated[str | None, typer.Option(
            envvar="GLCIC_S3_ENDPOINT_URL", help="S3-compatible endpoint for s3:// URIs (SeaweedFS, "
            "MinIO, ...); passed on to the job. Credentials come from the usual AWS variables and "
            "profiles and are never passed on.", rich_help_panel="Storage")], None),
        opt("preflight", Annotated[bool, typer.Option(
            help="Check URIs, input prefixes and the checkpoint from here before submitting.",
            rich_help_panel="Storage")], True),
    ]  # fmt: skip


def _submit_command(spec: JobSpec) -> Callable[..., None]:
    cls = spec.config_class
    fields = job_config.config_parameters(cls)
    field_names = {p.name for p in fields}
    common = [p for p in _common_options() if p.name not in field_names]

    def command(**values: Any) -> None:
        from pipeline.storage import endpoint_url_from_env

        options = {p.name: values.pop(p.name) for p in common}
        endpoint_url = values.get("endpoint_url") or options.get("endpoint_url") or endpoint_url_from_env()
        try:
            config = cls(**values)
        except (TypeError, ValueError) as e:
            raise CliError(f"invalid {cls.__name__}: {one_line(e)}", EXIT_USAGE) from e
        submit_or_run(
            spec,
            config,
            endpoint_url=endpoint_url,
            **{k: v for k, v in options.items() if k != "endpoint_url"},
        )

    command.__doc__ = f"{spec.summary}\n\nExample:\n\n  {spec.example}"
    return job_config.with_signature(command, fields + common)


# ---------------------------------------------------------------------------------------------
# Checks from the client, before anything is submitted.


def check_protocol(flag: str, uri: str) -> None:
    from pipeline.storage import protocol_of, protocol_problem

    problem = protocol_problem(uri)
    if problem == "unknown":
        raise CliError(f"{flag} {uri!r}: unknown storage protocol {protocol_of(uri)!r}", EXIT_USAGE)
    if problem:
        raise CliError(
            f"{flag} {uri!r}: {protocol_of(uri)}:// needs a package that is not installed ({problem})"
        )


def _storage_error(flag: str, uri: str, e: Exception) -> CliError:
    text = one_line(e)
    name = type(e).__name__
    if "NoCredentials" in name or "Unable to locate credentials" in text:
        return CliError(
            f"{flag} {uri!r}: no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE; "
            "--no-preflight skips this check when only the cluster has credentials)"
        )
    if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return CliError(f"{flag} {uri!r}: access denied ({text})")
    return CliError(f"{flag} {uri!r}: storage unreachable ({name}: {text})")


def check_input(flag: str, uri: str, endpoint_url: str | None) -> None:
    """An input is a prefix holding objects, or a single object (a list file)."""
    from pipeline.storage import holds_objects

    try:
        found = holds_objects(uri, endpoint_url)
    except Exception as e:
        raise _storage_error(flag, uri, e) from e
    if not found:
        raise CliError(f"{flag} {uri!r}: no such prefix, or it holds no objects", EXIT_USAGE)


def preflight_checkpoint(flag: str, uri: str, endpoint_url: str | None):
    """The checkpoint located once (``pipeline.checkpoint.locate``): its id goes into the job's
    metadata, so nothing after this reads its config.json again to say which weights run."""
    from pipeline.checkpoint import CheckpointError, locate

    try:
        return locate(uri, endpoint_url, fail_fast=True)
    except CheckpointError as e:
        raise CliError(f"{flag} {uri!r}: no checkpoint there: {one_line(e)}", EXIT_USAGE) from e
    except Exception as e:
        raise _storage_error(flag, uri, e) from e


def absolute_local_paths(spec: JobSpec, config: Any) -> Any:
    """The config with relative local paths made absolute: a job runs in its own working_dir.

    The shipped checkpoint's name (``default``) stays as it is: each job resolves it in its own
    copy of the package."""
    from pipeline.checkpoint import DEFAULT_CHECKPOINT

    changes = {}
    for name in spec.uris:
        value = getattr(config, name, None)
        if name in spec.checkpoints and value == DEFAULT_CHECKPOINT:
            continue
        if isinstance(value, str) and value and "://" not in value and not os.path.isabs(value):
            changes[name] = os.path.abspath(value)
    return dataclasses.replace(config, **changes) if changes else config


def check_before_submit(spec: JobSpec, config: Any, endpoint_url: str | None, *, reach_storage: bool):
    """Refuse what the job would only refuse minutes later: bad protocols, empty inputs, no checkpoint.
    Returns the located checkpoint (None without one, or without ``reach_storage``)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, str) and "://" in value:
            check_protocol(f"--{f.name.replace('_', '-')}", value)
    if not reach_storage:
        return None
    for name in spec.inputs:
        if getattr(config, name, None):
            check_input(f"--{name.replace('_', '-')}", getattr(config, name), endpoint_url)
    located = None
    for name in spec.checkpoints:
        if getattr(config, name, None):
            located = preflight_checkpoint(f"--{name.replace('_', '-')}", getattr(config, name), endpoint_url)
    return located


# ---------------------------------------------------------------------------------------------
# The Jobs API.


def ray_auth_headers() -> dict[str, str]:
    """The bearer token of a token-authenticated cluster, found where Ray itself looks for it.

    A Ray head enables token authentication when a token exists (``ray get-auth-token
    --generate`` writes ~/.ray/auth_token); its dashboard then refuses requests without it.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        try:
            token = path.read_text().strip()
        except OSError:
            return {}
    return {"Authorization": f"Bearer {token}"} if token else {}


def job_client(address: str | None, *, submitting: bool = False):
    from ray.job_submission import JobSubmissionClient

    if not _debug():  # Ray's client logs every file it packages; the user wants the job's own output
        for name in RAY_CLIENT_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise CliError(
            "no Ray cluster: pass --address http://HEAD:8265 or set RAY_ADDRESS"
            + (" (or use --local)" if submitting else ""),
            EXIT_USAGE,
        )
    if "://" not in address and address != "auto":
        # A bare host:port means the dashboard here; Ray would take it for the GCS and hang a minute.
        address = f"http://{address}"
    try:
        return JobSubmissionClient(address, headers=ray_auth_headers())
    except Exception as e:  # ConnectionError, ValueError for a malformed address, ...
        raise CliError(f"cannot reach the Ray cluster at {address}: {one_line(e)}") from e


def _jobs_api(call: Callable[[], Any], job_id: str, address: str) -> Any:
    try:
        return call()
    except RuntimeError as e:
        if "does not exist" in str(e) or "404" in str(e):
            raise CliError(f"no job {job_id!r} on {address}") from e
        raise CliError(f"Ray Jobs API at {address}: {one_line(e)}") from e
    except OSError as e:  # requests' ConnectionError is an OSError
        raise CliError(f"cannot reach the Ray cluster at {address}: {one_line(e)}") from e


def dashboard_job_url(address: str, job_id: str) -> str:
    return f"{address.rstrip('/')}/#/jobs/{job_id}"


def runtime_env_for(working_dir: str | None, endpoint_url: str | None) -> dict[str, Any]:
    """The project as working_dir and the S3 endpoint; never credentials."""
    runtime_env: dict[str, Any] = {}
    if working_dir is None and (PROJECT_ROOT / "pyproject.toml").exists():
        working_dir = str(PROJECT_ROOT)
    if working_dir and working_dir.lower() != "none":
        runtime_env["working_dir"] = working_dir
        runtime_env["excludes"] = list(WORKING_DIR_EXCLUDES)
    if endpoint_url:
        runtime_env["env_vars"] = {"GLCIC_S3_ENDPOINT_URL": endpoint_url}
    return runtime_env


def entrypoint_for(spec: JobSpec, config: Any) -> str:
    return shlex.join(["python", "-m", spec.module, *job_config.to_argv(config)])


def submit_or_run(
    spec: JobSpec,
    config: Any,
    *,
    address: str | None,
    local: bool,
    wait: bool,
    job_id: str | None,
    entrypoint_num_cpus: float,
    working_dir: str | None,
    endpoint_url: str | None,
    preflight: bool,
) -> None:
    config = monitor.with_run_id(spec.name, absolute_local_paths(spec, config))
    job_config.print_config(config, log=typer.echo)
    checkpoint = check_before_submit(spec, config, endpoint_url, reach_storage=preflight)
    metadata = monitor.job_metadata(spec.name, config, checkpoint)
    if local:
        run_local(spec, config, endpoint_url)
        return
    client = job_client(address, submitting=True)
    address = client.get_address()
    runtime_env = runtime_env_for(working_dir, endpoint_url)
    if preflight:  # a head whose Python cannot import the project fails here, as one line
        monitor.probe_environment(client, spec.name, runtime_env, address)
    submission_id = _jobs_api(
        lambda: client.submit_job(
            entrypoint=entrypoint_for(spec, config),
            submission_id=job_id,
            runtime_env=runtime_env,
            metadata=metadata,
            entrypoint_num_cpus=entrypoint_num_cpus,
        ),
        job_id or "",
        address,
    )
    typer.echo(f"submitted {spec.name} job {submission_id} to {address}")
    typer.echo(f"  dashboard: {dashboard_job_url(address, submission_id)}")
    for line in monitor.describe(metadata):
        typer.echo(line)
    if not wait:
        typer.echo(f"  follow:    glcic logs {submission_id} --follow --address {address}")
        return
    status = follow(client, address, submission_id)
    if status != "SUCCEEDED":
        raise CliError(f"job {submission_id} {status}")


def run_local(spec: JobSpec, config: Any, endpoint_url: str | None) -> None:
    """The same job, on a Ray started in this process (a laptop: no cluster, no dashboard needed)."""
    import ray

    if endpoint_url:
        os.environ["GLCIC_S3_ENDPOINT_URL"] = endpoint_url  # Ray's workers inherit it
    module = importlib.import_module(spec.module)  # the job's code (torch, Ray Data): only now
    # address="local": a fresh Ray even when RAY_ADDRESS names a cluster or a head runs here.
    context = ray.init(address="local", include_dashboard=False, log_to_driver=True)
    typer.echo(f"running {spec.name} on a local Ray ({context.address_info['address']})")
    try:
        result = module.run(config)
    except Exception as e:
        if _debug():
            raise
        raise CliError(f"{spec.name} job failed: {type(e).__name__}: {one_line(e)}") from e
    finally:
        ray.shutdown()
    typer.echo(f"{spec.name} job finished: {result}")


def follow(client, address: str, job_id: str) -> str:
    """Print the job's logs as they come until it ends; return its final status."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    try:
        _jobs_api(lambda: asyncio.run(tail()), job_id, address)
        # The log stream closes when the driver exits; the status follows a moment later.
        while (
            status := str(_jobs_api(lambda: client.get_job_status(job_id), job_id, address).value)
        ) not in (TERMINAL_STATUSES):
            time.sleep(0.5)
    except KeyboardInterrupt:
        typer.echo(
            f"\nstopped following; the job keeps running (glcic stop {job_id} --address {address})", err=True
        )
        raise typer.Exit(130) from None
    typer.echo(f"job {job_id} {status}")
    return status


app.command("submit-train")(_submit_command(TRAIN))
app.command("submit-inpaint")(_submit_command(INPAINT))
app.command("submit-evaluate")(_submit_command(EVALUATE))


# ---------------------------------------------------------------------------------------------
# status, logs, stop, list.

AddressOption = Annotated[
    str | None,
    typer.Option(
        envvar="RAY_ADDRESS", help="Ray dashboard address of the cluster, e.g. http://127.0.0.1:8265."
    ),
]
JobArgument = Annotated[
    str, typer.Argument(help="The job's submission id (raysubmit_...).", show_default=False)
]


def _time(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _duration(start_ms: int | None, end_ms: int | None) -> str:
    if not start_ms:
        return "-"
    seconds = int(((end_ms or time.time() * 1000) - start_ms) / 1000)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table with rich (which typer brings), as wide as its cells: nothing is cut or wrapped,
    so a URI or an entrypoint stays whole and greppable in a log or a pipe."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(*headers, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=False)]
    Console(width=sum(widths) + 3 * len(widths) + 2, soft_wrap=False).print(table)


@app.command(epilog="Example: glcic status raysubmit_XYZ --address http://127.0.0.1:8265")
def status(job_id: JobArgument, address: AddressOption = None) -> None:
    """Show a job's status, times, entrypoint, Ray's message about it, and its live progress."""
    from pipeline.storage import endpoint_url_from_env

    client = job_client(address)
    info = _jobs_api(lambda: client.get_job_info(job_id), job_id, client.get_address())
    rows = [
        ("submission id", info.submission_id or "-"),
        ("status", str(info.status.value)),
        ("job", (info.metadata or {}).get("glcic_job", "-")),
        ("started", _time(info.start_time)),
        ("ended", _time(info.end_time)),
        ("duration", _duration(info.start_time, info.end_time)),
        ("entrypoint", info.entrypoint),
        # A failed job's message carries its last logs; the tail names the error, `logs` has the rest.
        ("message", _tail(one_line(info.message or "-"), 300)),
        ("dashboard", dashboard_job_url(client.get_address(), job_id)),
        *monitor.status_rows(info, endpoint_url_from_env()),  # name, run, manifest, live progress
    ]
    print_table(("field", "value"), rows)


@app.command(epilog="Example: glcic logs raysubmit_XYZ --follow --address http://127.0.0.1:8265")
def logs(
    job_id: JobArgument,
    address: AddressOption = None,
    follow_logs: Annotated[
        bool,
        typer.Option(
            "--follow", "-f", help="Keep printing until the job ends; exit non-zero unless it succeeded."
        ),
    ] = False,
) -> None:
    """Print a job's logs (its driver's stdout and stderr)."""
    client = job_client(address)
    address = client.get_address()
    if follow_logs:
        final = follow(client, address, job_id)
        if final != "SUCCEEDED":
            raise CliError(f"job {job_id} {final}")
        return
    typer.echo(_jobs_api(lambda: client.get_job_logs(job_id), job_id, address), nl=False)


@app.command(epilog="Example: glcic stop raysubmit_XYZ --address http://127.0.0.1:8265")
def stop(
    job_id: JobArgument,
    address: AddressOption = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the job has stopped.")] = False,
) -> None:
    """Stop a running job (Ray sends SIGTERM to its driver, then SIGKILL)."""
    client = job_client(address)
    address = client.get_address()
    stopping = _jobs_api(lambda: client.stop_job(job_id), job_id, address)
    if not stopping:
        final = _jobs_api(lambda: client.get_job_status(job_id), job_id, address)
        typer.echo(f"job {job_id} had already ended: {final.value}")
        return
    typer.echo(f"stopping job {job_id}")
    while wait:
        current = str(_jobs_api(lambda: client.get_job_status(job_id), job_id, address).value)
        if current in TERMINAL_STATUSES:
            typer.echo(f"job {job_id} {current}")
            break
        time.sleep(0.5)


@app.command(
    "manifest",
    epilog="Example: glcic manifest s3://BUCKET/completed/_manifest --todo todo.txt --endpoint-url http://127.0.0.1:8333",
)
def manifest_report(
    manifest: Annotated[
        str, typer.Argument(help="the manifest prefix (default of a job: <output>/_manifest)")
    ],
    todo: Annotated[
        str | None,
        typer.Option(
            help="write the URI of every input still to do (error rows only), one a line, to this file"
        ),
    ] = None,
    errors: Annotated[int, typer.Option(help="error types to show, most frequent first")] = 20,
    endpoint_url: Annotated[
        str | None,
        typer.Option(help="S3-compatible endpoint (default: GLCIC_S3_ENDPOINT_URL / AWS_ENDPOINT_URL)"),
    ] = None,
) -> None:
    """The state of every input across the runs of a manifest: the runs, how many inputs are done and
    still to do, and why the rest failed. Rerunning the job's command redoes exactly what is to do."""
    from collections import Counter

    from pipeline import manifest as manifest_lib
    from pipeline.storage import endpoint_url_from_env

    endpoint_url = endpoint_url or endpoint_url_from_env()
    check_protocol("MANIFEST", manifest)
    try:
        runs = manifest_lib.run_summaries(manifest, endpoint_url)
        states = manifest_lib.input_states(manifest, endpoint_url)
    except Exception as e:
        raise _storage_error("MANIFEST", manifest, e) from e
    if not runs:
        raise CliError(f"MANIFEST {manifest!r}: no run_id=... folders there", EXIT_USAGE)

    rows = []
    for run_id, summary in runs:
        if summary is None:
            rows.append((run_id, "no (killed or running)", "-", "-", "-", "-"))
            continue
        counts = summary.get("counts", {})
        rows.append((
            run_id, "yes", str(counts.get("ok", 0)), str(counts.get("error", 0)), str(counts.get("skipped", 0)),
            f"{summary.get('wall_s', 0):.0f}",
        ))  # fmt: skip
    print_table(("RUN", "FINISHED", "OK", "ERROR", "SKIPPED", "WALL S"), rows)

    status = states.column("status").to_pylist()
    done, to_do = status.count("ok"), status.count("error")
    typer.echo(
        f"\ninputs with rows: {len(status)}; done (one ok row): {done}; still to do (errors only): {to_do}"
    )
    if to_do:
        failed = [(t, m) for s, t, m in zip(status, states.column("error_type").to_pylist(),
                                            states.column("error_message").to_pylist(), strict=True) if s == "error"]  # fmt: skip
        by_type = Counter(t or "-" for t, _ in failed)
        example = {}
        for t, m in failed:
            example.setdefault(t or "-", m or "")
        table = [(t, str(n), _tail(one_line(example[t]), 80)) for t, n in by_type.most_common(errors)]
        typer.echo("")
        print_table(("ERROR TYPE", "INPUTS", "EXAMPLE"), table)
    if todo is not None:
        uris = [
            u for s, u in zip(status, states.column("input_uri").to_pylist(), strict=True) if s == "error"
        ]
        Path(todo).write_text("".join(f"{u}\n" for u in uris))
        typer.echo(f"\nwrote {len(uris)} input URIs to {todo}")


@app.command(
    "export",
    epilog="Example: glcic export --checkpoint s3://models/glcic --output glcic.onnx --half",
)
def export(
    output: Annotated[str, typer.Option(help="the ONNX file to write (a local path)")],
    checkpoint: Annotated[
        str,
        typer.Option(help="the checkpoint to export: a directory or URI, or default (the shipped weights)"),
    ] = "default",
    half: Annotated[
        bool,
        typer.Option(
            "--half", help="fp16 weights and network (half the file); inputs and outputs stay uint8"
        ),
    ] = False,
    endpoint_url: Annotated[
        str | None,
        typer.Option(help="S3-compatible endpoint (default: GLCIC_S3_ENDPOINT_URL / AWS_ENDPOINT_URL)"),
    ] = None,
) -> None:
    """Write the whole completion as one ONNX graph (model/onnx_export.py): uint8 image N x H x W x 3
    and mask N x H x W (nonzero = hole) in, uint8 completed image out; any batch and size (H, W >= 4).
    Runs here, not as a Ray job."""
    from pipeline.storage import endpoint_url_from_env, redact

    endpoint_url = endpoint_url or endpoint_url_from_env()
    check_protocol("--checkpoint", checkpoint)
    if "://" in output and not output.startswith("file://"):
        raise CliError(f"--output {output!r}: write the ONNX file to a local path", EXIT_USAGE)
    try:
        from model.onnx_export import export_onnx
    except ImportError as e:  # pragma: no cover - the extra is part of make's environment
        raise CliError(f"glcic export needs the export extra: pip install 'glcic[export]' ({e})") from e
    located = preflight_checkpoint("--checkpoint", checkpoint, endpoint_url)
    from pipeline.checkpoint import load_generator

    try:
        network, model_config, checkpoint_id = load_generator(located.resolved, endpoint_url=endpoint_url)
    except Exception as e:
        raise _storage_error("--checkpoint", checkpoint, e) from e
    path = Path(output.removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "checkpoint_id": checkpoint_id,
        "checkpoint": redact(located.uri),
        "width": str(model_config.width),
        "mean_pixel": ",".join(f"{v:.6f}" for v in model_config.mean_pixel),
        "precision": "fp16" if half else "fp32",
    }
    export_onnx(network, model_config.mean_pixel, str(path), half=half, metadata=metadata)
    typer.echo(
        f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {metadata['precision']}, checkpoint {checkpoint_id})"
    )


@app.command("list", epilog="Example: glcic list --address http://127.0.0.1:8265")
def list_jobs(address: AddressOption = None) -> None:
    """List the jobs submitted to the cluster, oldest first."""
    client = job_client(address)
    jobs = _jobs_api(client.list_jobs, "", client.get_address())
    jobs = sorted((j for j in jobs if not monitor.is_probe(j)), key=lambda j: j.start_time or 0)
    rows = [
        (
            j.submission_id or j.job_id or "-", str(j.status.value), (j.metadata or {}).get("glcic_job", "-"),
            (j.metadata or {}).get("job_name", "-"), _time(j.start_time), _duration(j.start_time, j.end_time),
            j.entrypoint,
        )
        for j in jobs
    ]  # fmt: skip
    if not rows:
        typer.echo(f"no jobs on {client.get_address()}")
        return
    print_table(("SUBMISSION ID", "STATUS", "JOB", "NAME", "STARTED", "DURATION", "ENTRYPOINT"), rows)


if __name__ == "__main__":
    app()
