"""ray_cluster.yaml: valid for Ray's own cluster launcher, and shaped as the README promises."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

CLUSTER_FILE = Path(__file__).resolve().parent.parent / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_FILE.read_text())


def test_ray_launcher_accepts_it(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)  # Ray's JSON schema and its cross-field checks; raises when invalid
    assert prepared["provider"]["type"] == "aws"


def test_cpu_head_and_an_autoscaling_gpu_pool(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")), "the head is a CPU node"
    gpu_pools = {
        name: t for name, t in types.items() if re.match(r"(g[4-6]|p[3-5])", t["node_config"]["InstanceType"])
    }
    assert gpu_pools, "no GPU worker type"
    for pool in gpu_pools.values():
        assert pool["min_workers"] == 0 < pool["max_workers"] <= cluster["max_workers"]
    assert cluster["idle_timeout_minutes"] > 0


def test_nodes_install_this_project_and_start_ray_from_it(cluster):
    import ray

    mounts = cluster["file_mounts"]
    project = next(remote for remote, local in mounts.items() if local == ".")
    setup = " ; ".join(cluster["setup_commands"])
    assert f"pip install -q -e {project}" in setup
    pyproject = (CLUSTER_FILE.parent / "pyproject.toml").read_text()
    assert f"ray[data,train,default]=={ray.__version__}" in pyproject, (
        "the cluster's Ray must be the client's"
    )
    for excluded in (".venv", ".git", "data", "demo_out"):
        assert excluded in cluster["rsync_exclude"]
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--head" in head_start and "--autoscaling-config" in head_start
    # The Jobs API and dashboard are reached through `ray dashboard`'s SSH tunnel only.
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in CLUSTER_FILE.read_text()
    assert all(
        "--address=$RAY_HEAD_IP" in c for c in cluster["worker_start_ray_commands"] if "ray start" in c
    )


def test_comments_say_how_to_start_submit_and_open_the_dashboard():
    text = CLUSTER_FILE.read_text()
    for command in ("ray up ray_cluster.yaml", "ray dashboard ray_cluster.yaml", "glcic submit-train",
                    "glcic submit-inpaint", "ray down ray_cluster.yaml"):  # fmt: skip
        assert command in text
