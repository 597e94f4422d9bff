"""The glcic CLI against a real local Ray head (`ray start --head`, stopped after) and a real S3 server.

Submitting runs as a user runs it: the console script in a subprocess, its exit code and stderr
checked. The quick commands (status, logs, list, stop) and most error lines run the same typer
app in this process, which spares a torch import per call. One head serves the whole module.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
GLCIC = [sys.executable, "-m", "jobs.cli"]
# A secret only the CLI's environment holds: it must reach neither the job nor its logs.
CLIENT_SECRET = "client-only-secret-6f1d2c"


def glcic(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "AWS_SECRET_ACCESS_KEY": CLIENT_SECRET, **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [*GLCIC, *args], env=full_env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def glcic_here(*args: str) -> subprocess.CompletedProcess:
    """The same app in this process, with the same client-only secret."""
    from typer.testing import CliRunner

    from jobs.cli import app

    result = CliRunner().invoke(
        app, list(args), env={"AWS_SECRET_ACCESS_KEY": CLIENT_SECRET, "RAY_ADDRESS": None}
    )
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


@pytest.fixture(scope="module")
def head(s3_server):
    """A Ray head with dashboard on free 127.0.0.1 ports; jobs inherit the S3 credentials from it."""
    from embedded.servers import LocalRayHead

    with LocalRayHead(num_cpus=2, env=s3_server.env()) as ray_head:
        yield ray_head


@pytest.fixture(scope="module")
def inputs(s3_server, photo_paths):
    """Two small photographs and an untrained tiny checkpoint, as a user's bucket would hold them."""
    import torch

    from model.completion import CompletionNetwork
    from pipeline.checkpoint import ModelConfig, save_checkpoint

    fs = s3_server.filesystem()
    root = "s3://test/cli"
    for path in photo_paths[:2]:
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").resize((64, 40)).save(buffer, format="JPEG")
        fs.pipe_file(f"{root}/photos/{path.name}", buffer.getvalue())
    torch.manual_seed(0)
    config = ModelConfig(width=0.125, mean_pixel=(0.5, 0.5, 0.5), image_size=64, local_size=32)
    save_checkpoint(
        f"{root}/model", config, CompletionNetwork(width=0.125), endpoint_url=s3_server.endpoint_url
    )
    return root


def inpaint_flags(root: str, out: str) -> list[str]:
    return ["--images", f"{root}/photos", "--output", out, "--checkpoint", f"{root}/model",
            "--num-actors", "1", "--num-cpus-per-actor", "0.5", "--num-cpus-per-task", "0.25",
            "--batch-size", "2", "--log-every-s", "1"]  # fmt: skip


def test_every_flag_has_help_and_every_command_an_example():
    from typer.main import get_command

    from jobs.cli import app
    from jobs.config import EvaluateConfig, InpaintConfig, TrainConfig

    group = get_command(app)
    assert {"submit-train", "submit-inpaint", "submit-evaluate", "status", "logs", "stop", "list"} <= set(
        group.commands
    )
    for name, command in group.commands.items():
        assert "Example" in (command.help or "") + (command.epilog or ""), name
        for param in command.params:
            if param.name != "help":
                assert getattr(param, "help", None) or param.param_type_name == "argument", (name, param.name)
    for name, cls in (
        ("submit-train", TrainConfig),
        ("submit-inpaint", InpaintConfig),
        ("submit-evaluate", EvaluateConfig),
    ):
        flags = {opt for p in group.commands[name].params for opt in p.opts}
        for f in dataclasses.fields(cls):
            assert f"--{f.name.replace('_', '-')}" in flags, (name, f.name)


@pytest.mark.parametrize(
    "args, exit_code, words",
    [
        (["submit-inpaint", "--images", "notaproto://x", "--output", "o", "--checkpoint", "c"], 2, ["notaproto"]),
        (["submit-inpaint", "--images", "s3://test/x", "--checkpoint", "c"], 2, ["--output"]),
        (["submit-train", "--images", "s3://test/x", "--output", "s3://m", "--tc", "10", "--t-train", "5"], 2,
         ["t_train"]),
        (["submit-train", "--images", "s3://test/x", "--output", "s3://m", "--no-such-flag"], 2, ["--no-such-flag"]),
        (["submit-train", "--images", "s3://test/x", "--output", "s3://m", "--width", "wide"], 2, ["--width"]),
        (["status", "raysubmit_x", "--address", "http://127.0.0.1:1"], 1, ["cannot reach", "127.0.0.1:1"]),
        (["list"], 2, ["--address", "RAY_ADDRESS"]),
        (["submit-evaluate", "--images", "i", "--output", "o", "--checkpoint", "c", "--hole-max", "200"], 2,
         ["hole_max <= local_size"]),
        (["submit-evaluate", "--images", "notaproto://x", "--output", "o", "--checkpoint", "c"], 2, ["notaproto"]),
        (["export", "--output", "o.onnx", "--checkpoint", "/nonexistent/ckpt"], 2,
         ["--checkpoint", "no checkpoint there"]),
        (["export", "--output", "s3://b/o.onnx"], 2, ["local path"]),
    ],
    ids=["bad-protocol", "missing-flag", "bad-schedule", "unknown-flag", "bad-number", "unreachable-cluster",
         "no-address", "evaluate-bad-holes", "evaluate-bad-protocol", "export-no-checkpoint", "export-to-s3"],
)  # fmt: skip
def test_bad_arguments_give_one_clear_line(args, exit_code, words):
    result = glcic_here(*args)
    line = one_error_line(result)
    assert result.returncode == exit_code, result.stderr
    for word in words:
        assert word in line


def test_the_console_script_reports_one_line_too():
    result = glcic("submit-inpaint", "--images", "notaproto://x", "--output", "o", "--checkpoint", "c")
    assert result.returncode == 2
    assert "unknown storage protocol 'notaproto'" in one_error_line(result)
    result = glcic("list", "--address", "127.0.0.1:1")  # a bare host:port is the dashboard
    assert result.returncode == 1
    assert "cannot reach the Ray cluster at http://127.0.0.1:1" in one_error_line(result)


def test_unreachable_cluster_on_submit_is_one_line(inputs):
    result = glcic_here(
        "submit-inpaint", *inpaint_flags(inputs, "s3://test/cli/o0"), "--address", "http://127.0.0.1:1"
    )
    assert result.returncode == 1
    assert "cannot reach the Ray cluster at http://127.0.0.1:1" in one_error_line(result)


def test_missing_inputs_and_checkpoint_are_refused_before_submitting(head, inputs):
    missing_ckpt = glcic_here(
        "submit-inpaint",
        *inpaint_flags(inputs, "s3://test/cli/o1"),
        "--checkpoint",
        "s3://test/cli/no-model",
        "--address",
        head.address,
    )
    assert missing_ckpt.returncode == 2
    assert "no checkpoint" in one_error_line(missing_ckpt)
    empty_images = glcic_here(
        "submit-inpaint",
        *inpaint_flags(inputs, "s3://test/cli/o2"),
        "--images",
        "s3://test/cli/nothing-here",
        "--address",
        head.address,
    )
    assert empty_images.returncode == 2
    assert "nothing-here" in one_error_line(empty_images)
    assert "submitted" not in missing_ckpt.stdout + empty_images.stdout


def test_no_credentials_is_one_line(s3_server, inputs, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        HOME=str(tmp_path),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    result = subprocess.run(
        [
            *GLCIC,
            "submit-inpaint",
            *inpaint_flags(inputs, "s3://test/cli/o3"),
            "--address",
            "http://127.0.0.1:1",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "no AWS credentials" in one_error_line(result)


def test_submit_wait_status_logs_list(head, inputs, s3_server):
    from ray.job_submission import JobSubmissionClient

    from jobs.cli import ray_auth_headers
    from pipeline.manifest import read_manifest

    out = "s3://test/cli/completed"
    result = glcic(
        "submit-inpaint",
        *inpaint_flags(inputs, out),
        "--job-id",
        "cli-inpaint",
        "--address",
        head.address,
        "--wait",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "submitted inpaint job cli-inpaint" in result.stdout
    assert f"{head.address}/#/jobs/cli-inpaint" in result.stdout
    assert "InpaintConfig:" in result.stdout  # the typed config, printed before submitting
    assert "job cli-inpaint SUCCEEDED" in result.stdout

    fs = s3_server.filesystem()
    table = read_manifest(f"{out}/_manifest", endpoint_url=s3_server.endpoint_url)
    assert sorted(table.column("status").to_pylist()) == ["ok", "ok"]
    for key in table.column("output_key").to_pylist():
        assert fs.exists(f"{out}/{key}")
    run_id = table.column("run_id")[0].as_py()
    saved = json.loads(fs.cat_file(f"{out}/_manifest/run_id={run_id}/_config.json"))
    assert saved["checkpoint"] == f"{inputs}/model"  # the config, saved beside the outputs

    status = glcic_here("status", "cli-inpaint", "--address", head.address)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout and "inpaint" in status.stdout
    logs = glcic_here("logs", "cli-inpaint", "--address", head.address)
    assert logs.returncode == 0 and "InpaintConfig" in logs.stdout and "2 images" in logs.stdout
    listing = glcic_here("list", "--address", head.address)
    assert listing.returncode == 0
    assert any(
        line.startswith("cli-inpaint ") and "SUCCEEDED" in line for line in listing.stdout.splitlines()
    )

    # The client's secret stays with the client: not in the job's runtime_env, entrypoint or logs.
    info = JobSubmissionClient(head.address, headers=ray_auth_headers()).get_job_info("cli-inpaint")
    shipped = json.dumps(info.runtime_env) + info.entrypoint
    assert "GLCIC_S3_ENDPOINT_URL" in shipped
    assert CLIENT_SECRET not in shipped + logs.stdout and "AWS_SECRET_ACCESS_KEY" not in shipped


def test_a_failing_job_exits_non_zero(head, inputs):
    # --no-preflight lets the missing checkpoint through to the job, which must fail.
    result = glcic(
        "submit-inpaint",
        *inpaint_flags(inputs, "s3://test/cli/o4"),
        "--checkpoint",
        "s3://test/cli/no-model",
        "--no-preflight",
        "--job-id",
        "cli-fails",
        "--address",
        head.address,
        "--wait",
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: job cli-fails FAILED"
    assert "not a checkpoint, or an incomplete one" in result.stdout  # the job's own error, in its logs
    follow = glcic_here("logs", "cli-fails", "--follow", "--address", head.address)
    assert follow.returncode == 1 and "error: job cli-fails FAILED" in follow.stderr
    status = glcic_here("status", "cli-fails", "--address", head.address)
    assert "FAILED" in status.stdout and "an incomplete one" in status.stdout  # the message's tail
    assert max(len(line) for line in status.stdout.splitlines()) < 500, "a readable table"


def test_stop_a_running_job(head, inputs):
    submitted = glcic_here(
        "submit-train",
        "--images",
        f"{inputs}/photos",
        "--output",
        "s3://test/cli/long-model",
        "--width",
        "0.125",
        "--image-size",
        "32",
        "--local-size",
        "16",
        "--hole-min",
        "4",
        "--hole-max",
        "8",
        "--batch-size",
        "2",
        "--tc",
        "100000",
        "--td",
        "1",
        "--t-train",
        "200000",
        "--job-id",
        "cli-long",
        "--address",
        head.address,
    )
    assert submitted.returncode == 0, submitted.stderr
    assert "glcic logs cli-long --follow" in submitted.stdout
    stopped = glcic_here("stop", "cli-long", "--wait", "--address", head.address)
    assert stopped.returncode == 0, stopped.stderr
    assert "job cli-long STOPPED" in stopped.stdout
    assert "STOPPED" in glcic_here("status", "cli-long", "--address", head.address).stdout
    again = glcic_here("stop", "cli-long", "--address", head.address)
    assert again.returncode == 0 and "already ended: STOPPED" in again.stdout
    missing = glcic_here("status", "no-such-job", "--address", head.address)
    assert missing.returncode == 1 and "no job 'no-such-job'" in one_error_line(missing)


def test_local_runs_the_job_on_an_embedded_ray(s3_server, inputs):
    from pipeline.manifest import read_manifest

    out = "s3://test/cli/local"
    result = glcic("submit-inpaint", *inpaint_flags(inputs, out), "--local", timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "running inpaint on a local Ray" in result.stdout
    table = read_manifest(f"{out}/_manifest", endpoint_url=s3_server.endpoint_url)
    assert table.column("status").to_pylist() == ["ok", "ok"]


def test_local_inpaints_webdataset_shards_named_by_a_brace_pattern(s3_server, inputs, photo_paths):
    """The brace pattern passes the CLI's checks and reaches the job as given; the shard it names
    that does not exist is a not_found row."""
    import webdataset as wds

    from pipeline.manifest import read_manifest

    sink = io.BytesIO()
    with wds.TarWriter(sink) as writer:
        for i, path in enumerate(photo_paths[:2]):
            image = io.BytesIO()
            Image.open(path).convert("RGB").resize((48, 40)).save(image, format="JPEG")
            writer.write({"__key__": f"0000{i}", "jpg": image.getvalue(), "txt": b"caption"})
    s3_server.filesystem().pipe_file(f"{inputs}/wds/00000.tar", sink.getvalue())
    out = "s3://test/cli/wds-out"
    flags = inpaint_flags(inputs, out)
    flags[1] = f"{inputs}/wds/{{00000..00001}}.tar"
    result = glcic("submit-inpaint", *flags, "--local", timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_manifest(f"{out}/_manifest", endpoint_url=s3_server.endpoint_url).to_pylist()
    assert sorted((r["shard"], r["input_key"] or "", r["error_type"] or "") for r in rows) == [
        ("00000.tar", "00000", ""), ("00000.tar", "00001", ""), ("00001.tar", "", "not_found")]  # fmt: skip


def test_relative_local_paths_are_made_absolute_before_submitting(tmp_path, monkeypatch):
    # A job runs in its own unpacked working_dir, where the user's relative paths mean nothing.
    from jobs.cli import INPAINT, TRAIN, absolute_local_paths
    from jobs.config import InpaintConfig, TrainConfig

    monkeypatch.chdir(tmp_path)
    config = absolute_local_paths(
        INPAINT, InpaintConfig(images="photos", output="out", checkpoint="s3://b/m")
    )
    assert (config.images, config.output, config.checkpoint) == (
        str(tmp_path / "photos"), str(tmp_path / "out"), "s3://b/m",
    )  # fmt: skip
    config = absolute_local_paths(TRAIN, TrainConfig(images="/data/in", output="model"))
    assert (config.images, config.output, config.storage_path) == (
        "/data/in", str(tmp_path / "model"), str(tmp_path / "model-runs"),
    )  # fmt: skip


def test_manifest_report_over_s3(s3_server, tmp_path):
    """`glcic manifest` reads a manifest on the S3 server (no cluster): runs, done and to-do inputs,
    the error types, and the to-do URIs a user can act on."""
    from pipeline import manifest as m
    from tests.test_manifest import rows

    manifest = "s3://test/cli/report/_manifest"
    endpoint = s3_server.endpoint_url
    first = m.rows_to_table(rows(["a.jpg", "b.jpg", "c.jpg"], ["ok", "error", "error"]))
    m.write_part(manifest, "20260101T000000Z-aaaa", first, endpoint)
    m.write_summary(manifest, "20260101T000000Z-aaaa", {"counts": {"ok": 1, "error": 2, "skipped": 0}, "wall_s": 3.0}, endpoint)  # fmt: skip
    m.write_part(manifest, "20260102T000000Z-bbbb", m.rows_to_table(rows(["b.jpg"], ["ok"])), endpoint)

    todo = tmp_path / "todo.txt"
    result = glcic("manifest", manifest, "--todo", str(todo), "--endpoint-url", endpoint)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[:6] == ["20260101T000000Z-aaaa", "yes", "1", "2", "0", "3"] for line in lines), (
        lines
    )
    assert any(
        line.startswith("20260102T000000Z-bbbb") and "no (killed or running)" in line for line in lines
    )
    assert "inputs with rows: 3; done (one ok row): 2; still to do (errors only): 1" in result.stdout
    assert any(line.split()[:2] == ["not_an_image", "1"] for line in lines), lines
    assert todo.read_text() == "s3://bucket/in/c.jpg\n"
    assert CLIENT_SECRET not in result.stdout + result.stderr

    missing = glcic("manifest", "s3://test/cli/nothing-here", "--endpoint-url", endpoint)
    assert missing.returncode == 2 and "no run_id=... folders there" in one_error_line(missing)


@pytest.mark.parametrize("output", [".", "./completed"])
def test_output_over_the_inputs_is_refused_before_anything_is_written(tmp_path, photo_paths, output):
    """A new user's ``--output D`` with ``--images D`` once replaced every original with its
    completion: now one line, exit 2, and the folder is byte for byte as it was."""
    images = tmp_path / "photos"
    images.mkdir()
    for path in photo_paths[:3]:
        (images / path.name).write_bytes(path.read_bytes())
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    result = glcic(
        "submit-inpaint", "--local", "--images", str(images), "--output", str(images / output),
        "--checkpoint", "default",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "overlap" in one_error_line(result)
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before


def test_credentials_in_urls_are_never_printed_stored_or_put_in_metadata(tmp_path):
    """An endpoint or URI carrying ``user:password@`` appears everywhere as ``***@``: the printed
    config, its JSON (``_config.json``), the job's metadata, and the one error line."""
    from jobs.config import InpaintConfig, to_json
    from jobs.monitor import job_metadata
    from pipeline.storage import redact

    secret = "pw-8c1e77"
    assert (
        redact(f"http://key:{secret}@127.0.0.1:1/x and s3://b/k") == "http://***@127.0.0.1:1/x and s3://b/k"
    )
    config = InpaintConfig(
        images=f"http://user:{secret}@127.0.0.1:1/photos", output=str(tmp_path / "out"),
        endpoint_url=f"http://AKIA:{secret}@127.0.0.1:1",
    )  # fmt: skip
    assert secret not in to_json(config)
    assert secret not in json.dumps(job_metadata("inpaint", config))
    result = glcic_here(
        "submit-inpaint", "--local", "--images", f"http://user:{secret}@127.0.0.1:1/photos",
        "--output", str(tmp_path / "out"), "--endpoint-url", f"http://AKIA:{secret}@127.0.0.1:1",
    )  # fmt: skip
    assert result.returncode != 0 and one_error_line(result)
    assert secret not in result.stdout + result.stderr
    assert "***@127.0.0.1:1" in result.stdout  # the printed config still names the place


def test_status_reads_only_the_jobs_own_progress_file_through_the_callers_endpoint(tmp_path):
    """A job's metadata is whatever its submitter wrote: ``glcic status`` reads a progress URI only
    when it is the job's own ``<run folder>/_progress.json``, and never through an endpoint that the
    job's runtime_env names (the caller's credentials would be sent there)."""
    from types import SimpleNamespace

    from jobs.monitor import status_rows

    elsewhere = tmp_path / "someone-elses" / "_progress.json"
    elsewhere.parent.mkdir()
    elsewhere.write_text(json.dumps({"job": "inpaint", "secret": "x"}))
    own = tmp_path / "out" / "_manifest" / "run_id=r1"
    job = SimpleNamespace(
        metadata={"manifest": str(own), "progress": str(elsewhere)},
        runtime_env={"env_vars": {"GLCIC_S3_ENDPOINT_URL": "http://attacker.invalid"}},
    )
    rows = dict(status_rows(job, endpoint_url=None))
    assert rows["progress"].startswith("not read:")
    job.metadata["progress"] = f"{own}/_progress.json"
    assert dict(status_rows(job, endpoint_url=None))["progress"].startswith("none yet")
