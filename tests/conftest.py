"""Shared fixtures: real parts only (a local Ray, a real S3 server on 127.0.0.1, real photos)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "data" / "photos"

# Ray on a 2-CPU machine: keep its own memory monitor and dashboard out of the tests' way.
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def s3_server():
    """A SeaweedFS S3 server on free ports of 127.0.0.1 with a ``test`` bucket; stopped after."""
    from embedded.servers import LocalS3Server

    server = LocalS3Server(buckets=("test",)).start()
    old = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())  # Ray workers started after this inherit the endpoint
    try:
        yield server
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_prefix(s3_server, request):
    """A fresh ``s3://test/<test name>`` prefix per test."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")
    return f"s3://test/{name}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the session: 2 CPUs, no GPUs, as on the CI machine.

    It starts after the S3 server so its workers inherit the endpoint variables. Tests that need
    another shape of cluster (logical GPUs, a `ray start --head`) run it in a subprocess.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # address="local" always starts a fresh instance: a bare ray.init() would attach to any
    # cluster a `ray start --head` left on this machine (it reads /tmp/ray/ray_current_cluster).
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def photo_paths() -> list[Path]:
    paths = sorted(PHOTOS.glob("*.jpg"))
    assert len(paths) >= 10, "the shipped photographs are missing from data/photos"
    return paths


@pytest.fixture(scope="session")
def photos(photo_paths) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(p).convert("RGB")) for p in photo_paths]


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on the shared 2-CPU CI machine OpenMP
    threads spin-waiting for a busy core made the model tests up to 10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A randomly initialised tiny generator (width 0.125), saved the way training saves one."""
    import torch

    from model.completion import CompletionNetwork
    from pipeline.checkpoint import ModelConfig, save_checkpoint

    torch.manual_seed(0)
    uri = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    save_checkpoint(
        uri, ModelConfig(width=0.125, mean_pixel=(0.45, 0.42, 0.4)), CompletionNetwork(0.125).eval()
    )
    return uri
