"""The training job end to end on a real local Ray (2 CPUs) and a real S3 server on 127.0.0.1.

Tiny networks (width 0.125), 32 px crops and a few steps per phase keep each run well under a
minute on two CPUs; the schedules still cross every phase boundary.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from jobs.config import TrainConfig
from jobs.train import run
from pipeline import storage
from pipeline.checkpoint import load_checkpoint, load_generator
from pipeline.faults import KILL_IN_UPLOAD_ENV, KILL_MARKER_ENV

TINY = dict(
    width=0.125, image_size=32, local_size=16, hole_min=6, hole_max=12, batch_size=4,
    optimizer="adam", lr_g=1e-3, lr_d=1e-3, val_fraction=0.1, log_every=5,
)  # fmt: skip


@pytest.fixture(scope="module")
def s3_photos(s3_server, photo_paths):
    """The shipped photos uploaded to s3://test/train-photos/."""
    fs = s3_server.filesystem()
    for p in photo_paths:
        fs.put_file(str(p), f"test/train-photos/{p.name}")
    return "s3://test/train-photos"


def _checkpoint_steps(uri: str) -> list[int]:
    """Steps of the checkpoint directories under ``uri`` that still hold files.

    Listed by files, not directories: SeaweedFS keeps an emptied prefix as a directory entry.
    """
    fs, root = storage.filesystem(uri)
    fs.invalidate_cache()
    dirs = {p[len(root) + 1 :].split("/", 1)[0] for p in fs.find(root)}
    return sorted(int(d.rsplit("-", 1)[1]) for d in dirs if d.startswith("checkpoint-"))


def test_three_phases_two_sharded_workers_on_s3(ray_local, s3_photos, s3_prefix):
    config = TrainConfig(
        images=s3_photos, output=f"{s3_prefix}/model", storage_path=f"{s3_prefix}/runs", run_name="r",
        num_workers=2, cpus_per_worker=0.5, data_cpus=0.5, tc=6, td=4, t_train=14,
        val_every=7, checkpoint_every=7, keep_checkpoints=2, log_shard_keys=True, min_epoch_steps=1, **TINY,
    )  # fmt: skip
    assert run(config) == config.output

    run_uri = f"{s3_prefix}/runs/r"
    fs, _ = storage.filesystem(run_uri)
    # Checkpoints at 6 (end of phase 1), 7, 10 (end of phase 2) and 14; the last two are kept.
    assert _checkpoint_steps(run_uri) == [10, 14]
    last = load_checkpoint(f"{run_uri}/checkpoint-000000014")
    assert last.config.step == 14 and last.config.phase == 3
    assert last.discriminator_state is not None and set(last.optimizer_json) == {"generator", "discriminator"}
    phase2 = load_checkpoint(f"{run_uri}/checkpoint-000000010")
    assert phase2.config.phase == 2
    for name in ("train_config.json",):
        assert json.loads(fs.cat_file(f"{run_uri[5:]}/{name}"))["tc"] == 6

    # The exported generator is what the inpainting job loads; its mean pixel is the data's.
    generator, model_config, _ = load_generator(config.output)
    assert model_config.width == 0.125 and model_config.step == 14
    assert all(0.2 < v < 0.6 for v in model_config.mean_pixel)
    assert all(np.isfinite(p.detach().numpy()).all() for p in generator.parameters())
    assert json.loads(fs.cat_file(config.output[5:] + ".train_config.json"))["run_name"] == "r"

    # Validation wrote metrics into the checkpoint and a PNG grid beside the checkpoints.
    pngs = sorted(fs.ls(f"{run_uri[5:]}/progress", detail=False))
    assert [p.rsplit("/", 1)[1] for p in pngs] == ["step-000000007.png", "step-000000014.png"]
    assert fs.cat_file(pngs[-1])[:8] == b"\x89PNG\r\n\x1a\n"
    best = load_checkpoint(f"{run_uri}/best")
    assert math.isfinite(best.config.extra["val"]["val_hole_l1"])

    # Two workers really shard the data: disjoint keys, together covering the training split.
    rank0 = json.loads(fs.cat_file(f"{run_uri[5:]}/shards/rank-0.json"))
    rank1 = json.loads(fs.cat_file(f"{run_uri[5:]}/shards/rank-1.json"))
    assert rank0 and rank1 and set(rank0).isdisjoint(rank1)
    assert len(rank0) + len(rank1) >= 8  # 9 or 10 training images, whole batches of 2 per worker


def test_killed_worker_resumes_from_the_last_complete_checkpoint(
    ray_local, s3_photos, s3_prefix, tmp_path, monkeypatch
):
    config = TrainConfig(
        images=s3_photos, output=f"{s3_prefix}/model", storage_path=f"{s3_prefix}/runs", run_name="r",
        num_workers=1, cpus_per_worker=1, tc=6, td=2, t_train=8, val_every=100, checkpoint_every=5,
        max_failures=2, **TINY,
    )  # fmt: skip
    run(config)  # checkpoints 5, 6 and 8: phases 1 and 2
    run_uri = f"{s3_prefix}/runs/r"
    assert load_checkpoint(config.output).config.step == 8

    # Running again with the same run name and a longer schedule continues from step 8. Mid-phase 3
    # the worker dies while uploading checkpoint 10: after its weights, before its config.json.
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_IN_UPLOAD_ENV, "10")
    monkeypatch.setenv(KILL_MARKER_ENV, str(marker))
    run(TrainConfig(**{**config.__dict__, "t_train": 12}))
    assert marker.exists(), "the fault was not injected"
    assert load_checkpoint(config.output).config.step == 12

    # Ray restarted the worker from checkpoint 8, the latest complete one, never the half-written
    # 10 (nor from scratch); it then wrote 10 again, whole.
    for step in (10, 12):
        written = load_checkpoint(f"{run_uri}/checkpoint-{step:09d}")
        assert written.config.step == step and written.config.phase == 3
        assert written.config.extra["attempt_start_step"] == 8
