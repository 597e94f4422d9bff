"""A Ray cluster that autoscales on this machine: Ray's own autoscaler with fake nodes.

``FakeAutoscalingCluster`` starts ``ray start --head --autoscaling-config=...`` with Ray's
``fake_multinode`` node provider (``RAY_FAKE_CLUSTER=1``). The autoscaler then "launches" a worker
node by starting a real raylet on this machine with the node type's resources, ``GPU: 1`` among
them if asked, and terminates it after ``idle_timeout_minutes`` idle: the same upscaling and
downscaling decisions as on a cloud, in seconds, with no cloud and no GPU. Tests use it to check
that a job's resource requests make the cluster grow, and that the work lands on the new nodes.

It is not ``ray.cluster_utils.AutoscalingCluster``: that runs ``ray stop --force`` on start and
shutdown (which ends every Ray on the machine) and reads an ``example.yaml`` the wheel does not
ship. This one writes its own config, and like ``LocalRayHead`` it listens on free ports of
127.0.0.1 and ``stop()`` ends exactly the processes it started: the head's daemons, the monitor
(the autoscaler) and the worker raylets the monitor forked all stay in the session ``ray start``
began in.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import urllib.request
import uuid
from pathlib import Path

import yaml

from embedded.servers import LocalRayHead

HEAD_NODE_TYPE = "ray.head.default"  # the fake provider's fixed name for the head's type
GPU_WORKER_TYPE = "ray.worker.gpu"


def gpu_worker_type(
    num_cpus: float = 1, num_gpus: int = 1, min_workers: int = 0, max_workers: int = 2,
    object_store_mib: int = 128,
) -> dict:  # fmt: skip
    """A worker node type for the config: ``GPU`` as a logical resource, nothing physical behind it."""
    return {
        "resources": {"CPU": num_cpus, "GPU": num_gpus, "object_store_memory": object_store_mib * 1024**2},
        "node_config": {},
        "min_workers": min_workers,
        "max_workers": max_workers,
    }


class FakeAutoscalingCluster(LocalRayHead):
    """A CPU head on free 127.0.0.1 ports whose autoscaler starts and stops fake worker nodes.

    ``worker_types`` are autoscaler node types (default: ``ray.worker.gpu``, 1 CPU and 1 GPU, 0 to
    2 nodes). Drivers connect with ``RAY_ADDRESS=<gcs_address>``; ``address`` is the dashboard
    (Jobs API and state API), as for ``LocalRayHead``.
    """

    def __init__(
        self,
        head_cpus: int = 2,
        worker_types: dict[str, dict] | None = None,
        idle_timeout_minutes: float = 0.1,
        upscaling_speed: float = 1.0,
        update_interval_s: int = 1,
        env: dict[str, str] | None = None,
    ):
        super().__init__(num_cpus=head_cpus, num_gpus=0)
        # Token authentication with a token of its own: the GCS listens on every interface, and
        # whether a head enables tokens otherwise depends on whether ~/.ray/auth_token exists
        # (a local ray.init() writes one), which a driver connecting later does not follow.
        self.token_path = os.path.join(self.temp_dir, "auth_token")
        with open(os.open(self.token_path, os.O_CREAT | os.O_WRONLY, 0o600), "w") as f:
            f.write(secrets.token_hex(32))
        self.extra_env = {
            "RAY_FAKE_CLUSTER": "1",  # the fake_multinode provider refuses to run without it
            "AUTOSCALER_UPDATE_INTERVAL_S": str(update_interval_s),
            **self.auth_env(),
            **(env or {}),
        }
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.worker_types = worker_types or {GPU_WORKER_TYPE: gpu_worker_type()}
        self.idle_timeout_minutes = idle_timeout_minutes
        self.upscaling_speed = upscaling_speed
        self.config_path = os.path.join(self.temp_dir, "autoscaling.yaml")

    def auth_env(self) -> dict[str, str]:
        """What a process needs to talk to this cluster's GCS and dashboard."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path}

    def driver_env(self) -> dict[str, str]:
        """Variables under which ``ray.init()`` (a job's driver) connects to this cluster."""
        return {"RAY_ADDRESS": self.gcs_address, **self.auth_env()}

    def autoscaling_config(self) -> dict:
        """The cluster config the head's autoscaler reads (the launcher's format, provider fake)."""
        types = {HEAD_NODE_TYPE: {"resources": {"CPU": self.num_cpus}, "node_config": {}, "max_workers": 0}}
        types.update(self.worker_types)
        return {
            "cluster_name": f"glcic-fake-{uuid.uuid4().hex[:8]}",
            "max_workers": sum(t.get("max_workers", 0) for t in self.worker_types.values()),
            "upscaling_speed": self.upscaling_speed,
            "idle_timeout_minutes": self.idle_timeout_minutes,
            "provider": {
                "type": "fake_multinode",
                # Without it the provider's nodes join a GCS on the default port 6379: someone else's.
                "gcs_address": self.gcs_address,
                # Every fake node has this machine's IP: the autoscaler must tell them apart by id.
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "available_node_types": types,
            "head_node_type": HEAD_NODE_TYPE,
            "auth": {},
            "docker": {},
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }

    def start_args(self) -> list[str]:
        # No GPU on the head: the GPUs are the fake worker nodes the autoscaler adds.
        args = [a for a in super().start_args() if not a.startswith("--num-gpus=")]
        return [*args, "--num-gpus=0", f"--autoscaling-config={self.config_path}"]

    def start_env(self) -> dict[str, str]:
        env = super().start_env()
        env.pop("RAY_ADDRESS", None)
        return env

    def start(self, timeout: float = 120) -> FakeAutoscalingCluster:
        with open(self.config_path, "w") as f:
            yaml.safe_dump(self.autoscaling_config(), f)
        super().start(timeout)
        return self

    def nodes(self) -> list[dict]:
        """Every node the GCS knows (alive and dead), from the dashboard's state API."""
        token = Path(self.token_path).read_text().strip()
        request = urllib.request.Request(
            f"{self.address}/api/v0/nodes?detail=1&limit=1000", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)["data"]["result"]["result"]

    def worker_nodes(self, resource: str = "GPU", alive: bool = True) -> list[dict]:
        """The worker nodes (not the head) that have ``resource``, alive ones only by default."""
        return [
            n for n in self.nodes()
            if not n["is_head_node"] and n["resources_total"].get(resource, 0) > 0
            and (not alive or n["state"] == "ALIVE")
        ]  # fmt: skip

    def wait_for_workers(self, count: int, timeout: float, resource: str = "GPU") -> list[dict]:
        """Wait until exactly ``count`` such workers are alive (0: scaled down); return them."""
        deadline = time.monotonic() + timeout
        while True:
            workers = self.worker_nodes(resource)
            if len(workers) == count or time.monotonic() > deadline:
                return workers
            time.sleep(0.5)

    def __enter__(self) -> FakeAutoscalingCluster:
        return self.start()
