"""The inpainting job on Ray's own autoscaler: GPU workers start from zero for its GPU actors.

``embedded.fake_cluster.FakeAutoscalingCluster`` runs a CPU head whose autoscaler (provider
``fake_multinode``) starts GPU worker nodes, 0 to 2, as real raylets on this machine with a logical
``GPU: 1`` each. The job asks for one GPU per actor and computes on the CPU (``--device cpu``), so
the test needs no GPU, yet every decision is the one a cloud cluster makes: the GPU demand comes
from the job's config (nothing with a GPU is up when it is submitted), the autoscaler starts GPU
nodes for it, the actors run there and the nodes go away once idle.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from embedded.fake_cluster import FakeAutoscalingCluster, gpu_worker_type
from jobs.config import InpaintConfig
from pipeline.batch_run import actor_pool
from pipeline.manifest import read_manifest
from tests.helpers import write_objects
from tests.test_inpaint import crop, encode

REPO = Path(__file__).resolve().parent.parent
IDLE_TIMEOUT_MINUTES = 0.1  # 6 s: the workers go soon after the job


@pytest.fixture
def fake_cluster():
    # 1 CPU per worker: each fake node is a real raylet (and actor) on this small machine.
    cluster = FakeAutoscalingCluster(
        head_cpus=2,
        worker_types={"ray.worker.gpu": gpu_worker_type(num_cpus=1, num_gpus=1, max_workers=2)},
        idle_timeout_minutes=IDLE_TIMEOUT_MINUTES,
    )
    with cluster:
        yield cluster


class NodeWatcher:
    """Polls the cluster's GPU workers in the background: every one that was ever alive."""

    def __init__(self, cluster: FakeAutoscalingCluster):
        self.cluster = cluster
        self.seen: dict[str, float] = {}  # node id -> when first seen alive
        self.most_alive = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                alive = self.cluster.worker_nodes("GPU")
            except (OSError, ValueError, KeyError):  # the dashboard busy or restarting: ask again
                alive = None
            if alive is not None:
                self.most_alive = max(self.most_alive, len(alive))
                for node in alive:
                    self.seen.setdefault(node["node_id"], time.monotonic())
            self._stop.wait(0.5)

    def __enter__(self) -> NodeWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_gpu_job_scales_gpu_workers_up_from_zero_runs_there_and_they_scale_down(
    fake_cluster, tmp_path, photos, tiny_checkpoint
):
    n = 12
    images = str(tmp_path / "in")
    write_objects(
        images,
        {
            f"p/{i:02d}.png": encode(Image.fromarray(crop(photos[i % 10], 64, 64, at=i)), "PNG")
            for i in range(n)
        },
    )
    output = str(tmp_path / "out")
    assert fake_cluster.worker_nodes("GPU") == [], "GPU workers must start at zero"
    head_id = next(node["node_id"] for node in fake_cluster.nodes() if node["is_head_node"])

    argv = ["--images", images, "--output", output, "--checkpoint", tiny_checkpoint, "--run-id", "autoscale",
            "--num-gpus-per-actor", "1", "--device", "cpu", "--max-actors", "2", "--no-postprocess",
            "--batch-size", "2", "--task-batch-size", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), **fake_cluster.driver_env()}
    started = time.monotonic()
    with NodeWatcher(fake_cluster) as watcher:
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.inpaint", *argv],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    job_s = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "inference actors: 1 to 2 (starting with 1), 1.0 GPU" in proc.stdout, proc.stdout[-3000:]

    # Scaled up from zero: the job saw no GPU when it was submitted, asked for them anyway.
    assert 1 <= watcher.most_alive <= 2 and watcher.seen, "no GPU worker node was started"
    rows = read_manifest(f"{output}/_manifest", "autoscale").to_pylist()
    assert sorted(r["input_key"] for r in rows) == [f"p/{i:02d}.png" for i in range(n)]
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"][:3]
    for r in rows:  # the inference ran on a GPU worker that the autoscaler started, holding a GPU
        assert r["node_id"] != head_id and r["node_id"] in watcher.seen, (r["node_id"], watcher.seen)
        assert r["gpu_id"] == "0", r
    print(
        f"job {job_s:.1f}s; GPU workers used {sorted({r['node_id'][-5:] for r in rows})}, most alive {watcher.most_alive}"
    )

    # ... and back down to zero once idle (idle_timeout_minutes, plus the autoscaler's rounds).
    down_started = time.monotonic()
    left = fake_cluster.wait_for_workers(0, timeout=60)
    assert left == [], f"GPU workers still alive {time.monotonic() - down_started:.0f}s after the job: {left}"
    assert {n["node_id"] for n in fake_cluster.worker_nodes("GPU", alive=False)} >= set(watcher.seen)


def pool_of(cluster: dict, reachable: dict | None = None, **config):
    return actor_pool(InpaintConfig(images="i", output="o", checkpoint="c", **config), cluster, reachable)


def test_gpu_demand_comes_from_the_config_not_from_what_is_up():
    cpu_cluster = {"CPU": 8}
    # Asked for: GPU actors even though no GPU is up; the pool starts at 1 and grows to --max-actors.
    pool = pool_of(cpu_cluster, num_gpus_per_actor=1, max_actors=8)
    assert (pool.num_gpus, pool.min_size, pool.initial_size, pool.max_size) == (1, 1, 1, 8)
    # --device cuda says "a GPU job": one GPU per actor by default; no cap but the cluster's own.
    pool = pool_of(cpu_cluster, device="cuda")
    assert (pool.num_gpus, pool.max_size) == (1, None)
    # Fake GPUs requested, CPU compute: the request does not depend on the device.
    assert pool_of(cpu_cluster, num_gpus_per_actor=1, device="cpu").num_gpus == 1
    assert pool_of({"CPU": 8, "GPU": 4}, device="cpu").num_gpus == 0
    # auto: the GPUs up now, or those the autoscaler reports it can add.
    assert pool_of(cpu_cluster).num_gpus == 0
    pool = pool_of(cpu_cluster, reachable={"CPU": 72, "GPU": 8})
    assert (pool.num_gpus, pool.initial_size, pool.max_size) == (1, 1, 8)
    pool = pool_of({"CPU": 24, "GPU": 3}, reachable={"CPU": 72, "GPU": 8}, num_gpus_per_actor=0.5)
    assert (pool.min_size, pool.initial_size, pool.max_size) == (1, 6, 16)  # starts with what fits now


def test_cpu_job_and_fixed_pools_keep_their_sizes():
    # As before on a CPU cluster: one actor per 4 CPUs, all started at once, none with a GPU.
    pool = pool_of({"CPU": 2})
    assert (pool.num_gpus, pool.min_size, pool.initial_size, pool.max_size) == (0, 1, 1, 1)
    pool = pool_of({"CPU": 16})
    assert (pool.num_gpus, pool.min_size, pool.initial_size, pool.max_size) == (0, 1, 4, 4)
    # --num-actors: a fixed pool, whatever the cluster.
    pool = pool_of({"CPU": 2, "GPU": 2}, num_actors=2, num_cpus_per_actor=0.5)
    assert (pool.num_gpus, pool.num_cpus, pool.min_size, pool.initial_size, pool.max_size) == (
        1,
        0.5,
        2,
        2,
        2,
    )
    pool = pool_of({"CPU": 64}, min_actors=2, max_actors=3)
    assert (pool.min_size, pool.initial_size, pool.max_size) == (2, 3, 3)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"device": "cuda", "num_gpus_per_actor": 0}, "--device cuda needs --num-gpus-per-actor > 0"),
        ({"min_actors": 0}, "--min-actors must be at least 1"),
        ({"min_actors": 4, "max_actors": 2}, "--max-actors must be at least --min-actors"),
        ({"num_gpus_per_actor": -1}, "--num-gpus-per-actor must be >= 0"),
    ],
)
def test_inconsistent_actor_settings_are_refused(config, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        InpaintConfig(images="i", output="o", checkpoint="c", **config)
