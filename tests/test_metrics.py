"""Live figures of a run: Ray metrics scraped by a real Prometheus, `glcic status` during a run,
readable job metadata, and the preflight probe of the head's Python.

One module-scoped Ray head (`ray start --head --metrics-export-port`, its workers reporting every
second) and one Prometheus of our own (Debian's `prometheus`; `make test` installs it) scraping it.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time

import pytest
from PIL import Image

from tests.helpers import REPO, missing_tool

GLCIC = [sys.executable, "-m", "jobs.cli"]
N_GOOD = 24  # photographs to complete; one more input is not an image (an error row)


@pytest.fixture(scope="module")
def prometheus_binary():
    from embedded.prometheus import INSTALL_HINT, prometheus_binary

    binary = prometheus_binary()
    if binary is None:
        missing_tool(INSTALL_HINT, "GLCIC_REQUIRE_PROMETHEUS")
    return binary


@pytest.fixture(scope="module")
def head(s3_server, prometheus_binary):
    from embedded.prometheus import LocalPrometheus
    from embedded.servers import LocalRayHead

    env = {**s3_server.env(), "RAY_metrics_report_interval_ms": "1000"}  # default 10 s
    with LocalRayHead(num_cpus=2, env=env) as ray_head:
        with LocalPrometheus([f"127.0.0.1:{ray_head.metrics_port}"], scrape_interval_s=1) as prometheus:
            ray_head.prometheus = prometheus
            yield ray_head


@pytest.fixture(scope="module")
def inputs(s3_server, photo_paths):
    import torch

    from model.completion import CompletionNetwork
    from pipeline.checkpoint import ModelConfig, save_checkpoint

    fs = s3_server.filesystem()
    root = "s3://test/metrics"
    for i in range(N_GOOD):
        buffer = io.BytesIO()
        photo = photo_paths[i % len(photo_paths)]
        Image.open(photo).convert("RGB").resize((128, 80)).save(buffer, format="JPEG")
        fs.pipe_file(f"{root}/photos/{i:03d}-{photo.name}", buffer.getvalue())
    fs.pipe_file(f"{root}/photos/zz-broken.jpg", b"not an image at all")
    torch.manual_seed(0)
    config = ModelConfig(width=0.125, mean_pixel=(0.5, 0.5, 0.5), image_size=64, local_size=32)
    save_checkpoint(
        f"{root}/model", config, CompletionNetwork(width=0.125), endpoint_url=s3_server.endpoint_url
    )
    return root


def glcic_here(*args: str):
    from typer.testing import CliRunner

    from jobs.cli import app

    return CliRunner().invoke(app, list(args), env={"RAY_ADDRESS": None})


def status_table(output: str) -> dict[str, str]:
    rows = {}
    for line in output.splitlines()[2:]:
        name, _, value = line.strip().partition("  ")
        rows.setdefault(name.strip(), value.strip())
    return rows


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads((REPO / "dashboards" / "glcic.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    return {name for expr in exprs for name in re.findall(r"ray_glcic_\w+", expr)}


def test_status_shows_live_counts_and_prometheus_scrapes_them(head, inputs, s3_server):
    from ray.job_submission import JobSubmissionClient

    from jobs.cli import ray_auth_headers
    from pipeline.manifest import read_manifest

    out = "s3://test/metrics/completed"
    started = time.monotonic()
    submitted = subprocess.run(
        [*GLCIC, "submit-inpaint", "--images", f"{inputs}/photos", "--output", out,
         "--checkpoint", f"{inputs}/model", "--num-actors", "1", "--num-cpus-per-actor", "0.5",
         "--num-cpus-per-task", "0.25", "--batch-size", "2", "--task-batch-size", "4",
         "--log-every-s", "0.5", "--manifest-rows-per-part", "4", "--job-id", "metrics-run",
         "--address", head.address],
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, cwd=REPO,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    run_id = re.search(r"run id:\s+(\S+)", submitted.stdout).group(1)  # chosen at submit
    assert re.search(rf"manifest: +{re.escape(out)}/_manifest/run_id={run_id}\n", submitted.stdout)
    submit_s = time.monotonic() - started

    # While it runs, `glcic status` shows counts from the progress file the driver rewrites. (Parts
    # of 4 rows: the write tasks, fused with encode/write, then finish a few images at a time
    # rather than all 25 in one burst at the end, which a poll could miss.)
    live = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        result = glcic_here("status", "metrics-run", "--address", head.address)
        assert result.exit_code == 0, result.stdout + result.stderr
        rows = status_table(result.stdout)
        if rows["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        # "of 25 images" once the listing is done, "of 24+ listed so far" while it still runs (on a
        # loaded machine Ray Data can finish the listing task after most images: CI saw a whole run
        # of the second kind). Either is a live view if some but not all images are done.
        match = re.search(r"running: (\d+) of (\d+)(\+?)", rows.get("progress", ""))
        if (
            match
            and 0 < int(match.group(1))
            and (match.group(3) or int(match.group(1)) < int(match.group(2)))
        ):
            live.append(rows)
        time.sleep(0.3)
    logs = glcic_here("logs", "metrics-run", "--address", head.address).stdout
    assert rows["status"] == "SUCCEEDED", logs[-3000:]
    run_s = time.monotonic() - started - submit_s
    print(f"submit {submit_s:.1f}s, run {run_s:.1f}s, {len(live)} live views")
    assert live, f"no status during the run showed partial counts (run took {run_s:.0f}s)"
    seen = live[-1]
    assert seen["run id"] == run_id and seen["manifest"] == f"{out}/_manifest/run_id={run_id}"
    assert re.fullmatch(r"\d+\.\d\d \(ok \+ error; skipped apart\)", seen["images/s"]), seen
    assert "images/s completed (skipped apart); ETA" in seen["progress"]
    for view in live:  # an ETA once the listing is done, none before
        listing_done = "listed so far" not in view["progress"]
        assert bool(re.fullmatch(r"\d+:\d\d:\d\d", view["ETA"])) == listing_done, view

    # Finished: the final counts, also in the status table.
    final = status_table(glcic_here("status", "metrics-run", "--address", head.address).stdout)
    assert final["images"] == f"{N_GOOD + 1} of {N_GOOD + 1}", final
    assert (final["ok"], final["error"], final["skipped"]) == (str(N_GOOD), "1", "0")
    assert final["progress at"].endswith("(finished)")
    # Progress lines come from the driver's timer: several during a run of a few seconds.
    assert len(re.findall(r"inpaint \S+ running: ", logs)) >= 2, logs[-3000:]

    # The metadata a person reads in the dashboard's Jobs list.
    table = read_manifest(f"{out}/_manifest", endpoint_url=s3_server.endpoint_url)
    info = JobSubmissionClient(head.address, headers=ray_auth_headers()).get_job_info("metrics-run")
    assert info.metadata["job_name"] == f"inpaint {inputs}/photos -> {out}"
    assert info.metadata["run_id"] == run_id == table.column("run_id")[0].as_py()
    assert info.metadata["manifest"] == f"{out}/_manifest/run_id={run_id}"
    checkpoint_ids = {c for c in table.column("checkpoint_id").to_pylist() if c}
    assert checkpoint_ids == {info.metadata["checkpoint_id"]}
    probes = [j for j in JobSubmissionClient(head.address, headers=ray_auth_headers()).list_jobs()
              if (j.submission_id or "").startswith("glcic-probe-")]  # fmt: skip
    assert probes and all(p.metadata["job_name"].startswith("glcic preflight") for p in probes)
    listing = glcic_here("list", "--address", head.address).stdout
    assert "metrics-run" in listing and "glcic-probe" not in listing

    # Prometheus scraped the run's figures from the head's metrics port, with the right counts.
    prometheus = head.prometheus
    selector = f'run_id="{run_id}"'
    expected = {
        f'sum(ray_glcic_inpaint_images_total{{{selector},status="ok"}})': N_GOOD,
        f'sum(ray_glcic_inpaint_images_total{{{selector},status="error"}})': 1,
        f"sum(ray_glcic_inpaint_errors_total{{{selector}}})": 1,
        f'sum(ray_glcic_inpaint_stage_seconds_count{{{selector},stage="inference"}})': N_GOOD,
        f'sum(ray_glcic_inpaint_stage_seconds_count{{{selector},stage="write"}})': N_GOOD,
        # Gauges of the job's processes leave the agent with them: what was scraped while it ran.
        f"max(max_over_time(ray_glcic_inpaint_images_listed{{{selector}}}[10m]))": N_GOOD + 1,
        f"max(max_over_time(ray_glcic_inpaint_images_expected{{{selector}}}[10m]))": N_GOOD + 1,
    }
    got: dict[str, float | None] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = {expr: prometheus.value(expr) for expr in expected}
        if got == expected:
            break
        time.sleep(1)
    assert got == expected
    errors = prometheus.query(f"ray_glcic_inpaint_errors_total{{{selector}}}")
    statuses = table.column("status").to_pylist()
    error_types = {
        t for s, t in zip(statuses, table.column("error_type").to_pylist(), strict=True) if s == "error"
    }
    assert {e["metric"]["error_type"] for e in errors} == error_types
    assert prometheus.value(f"max(max_over_time(ray_glcic_inpaint_images_per_second{{{selector}}}[10m]))") > 0
    # Every inpainting series the Grafana dashboard charts exists under that name.
    scraped = set(prometheus.metric_names())  # every name with samples in the TSDB
    charted = {name for name in dashboard_metric_names() if name.startswith("ray_glcic_inpaint")}
    assert charted and not charted - scraped, charted - scraped


def test_preflight_refuses_a_head_whose_python_cannot_import_the_project(head, tmp_path):
    from jobs.cli import job_client, runtime_env_for
    from jobs.errors import CliError
    from jobs.monitor import probe_environment

    # The head's `python` for this job: an interpreter without the project's packages.
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").write_text('#!/bin/sh\nexec /usr/bin/python3 -I "$@"\n')
    (shim / "python").chmod(0o755)
    client = job_client(head.address)
    runtime_env = runtime_env_for(None, None)
    runtime_env["env_vars"] = {"PATH": f"{shim}:{os.environ['PATH']}"}
    started = time.monotonic()
    with pytest.raises(CliError) as failed:
        probe_environment(client, "inpaint", runtime_env, head.address)
    message = str(failed.value)
    assert "cannot run inpaint" in message and "No module named" in message, message
    assert "/usr/bin/python3" in message and "\n" not in message
    assert time.monotonic() - started < 60
    ok = probe_environment(client, "inpaint", runtime_env_for(None, None), head.address)
    assert ok.startswith("glcic-probe-ok: python ") and sys.executable.rsplit("/", 1)[0] in ok


def test_train_reporter_writes_progress(tmp_path):
    from pipeline.metrics import TrainReporter, progress_line, read_json

    reporter = TrainReporter("r1", str(tmp_path / "run"), t_train=1000, endpoint_url=None, every_s=0)
    reporter.report({"step": 100, "phase": 1, "start_step": 0, "steps_per_s": 2.0,
                     "images_per_s_per_worker": 8.0, "loss_mse": 0.25}, world=2)  # fmt: skip
    snap = read_json(str(tmp_path / "run" / "_progress.json"), None)
    assert (snap["step"], snap["phase"], snap["eta_s"], snap["losses"]) == (100, 1, 450.0, {"loss_mse": 0.25})
    assert (
        progress_line(snap)
        == "train r1: step 100 of 1000 (phase 1); 2.00 steps/s; loss_mse 0.25; ETA 0:07:30"
    )
