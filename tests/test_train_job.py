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

    # The exported generator is what the inpainting job loads; its mean pixel is the data's. It is
    # the one of the best validation hole PSNR (--export best), of the two validations at 7 and 14.
    generator, model_config, _ = load_generator(config.output)
    validations = model_config.extra["validations"]
    assert [v["step"] for v in validations] == [7, 14]
    best_step = max(validations, key=lambda v: v["val_hole_psnr"])["step"]
    assert model_config.width == 0.125 and model_config.step == best_step
    assert model_config.extra["exported"] == {"which": "best", "step": best_step}
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
        max_failures=2, export="last", **TINY,
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


def test_a_segment_starts_from_a_carried_generator(ray_local, s3_photos, s3_prefix):
    """--init-generator + --start-step: a new segment of a longer schedule starts from an earlier
    segment's fp16 export (its weights and mean pixel) in the right phase, with a fresh discriminator."""
    import torch

    from model.completion import CompletionNetwork
    from pipeline.checkpoint import ModelConfig, save_checkpoint

    torch.manual_seed(1)
    carried = CompletionNetwork(width=0.125)
    carried_uri = f"{s3_prefix}/segment-1"
    save_checkpoint(
        carried_uri, ModelConfig(width=0.125, mean_pixel=(0.31, 0.52, 0.73), image_size=32, local_size=16, step=4),
        carried, generator_dtype=torch.float16,
    )  # fmt: skip
    # lr_g 0: the generator must come out exactly as it went in (up to fp16), in phase 3 from step 4.
    config = TrainConfig(
        images=s3_photos, output=f"{s3_prefix}/segment-2", storage_path=f"{s3_prefix}/runs", run_name="seg2",
        cpus_per_worker=1.0, data_cpus=0.5, tc=2, td=2, t_train=6, val_every=100, checkpoint_every=100,
        min_epoch_steps=1, init_generator=carried_uri, start_step=4, **{**TINY, "lr_g": 0.0},
    )  # fmt: skip
    assert run(config) == config.output

    generator, model_config, _ = load_generator(config.output)
    assert model_config.step == 6 and model_config.phase == 3
    assert model_config.mean_pixel == pytest.approx((0.31, 0.52, 0.73))  # the carried one, not the data's
    for name, value in carried.state_dict().items():
        if value.is_floating_point() and "running" not in name:
            torch.testing.assert_close(generator.state_dict()[name], value.half().float(), msg=name)
    # Only steps 4 and 5 ran, both in phase 3: the fresh discriminator was trained there.
    last = load_checkpoint(f"{s3_prefix}/runs/seg2/checkpoint-000000006")
    assert last.config.phase == 3 and last.discriminator_state is not None

    wrong = TrainConfig(**{**config.__dict__, "width": 0.25, "run_name": "seg-wrong"})
    with pytest.raises(ValueError, match="has width 0.125, this run --width 0.25"):
        run(wrong)


def test_a_time_budget_runs_all_three_phases_and_exports_the_best_validation(
    ray_local, photo_paths, tmp_path
):
    """--time-budget-s with --schedule-fractions: the phases' lengths are planned from the measured
    step rates, the run ends inside the budget, and --output is the best validated generator."""
    import shutil
    import time

    import torch

    images = tmp_path / "photos"
    images.mkdir()
    for p in photo_paths[:24]:
        shutil.copy(p, images / p.name)
    config = TrainConfig(
        images=str(images), output=str(tmp_path / "model"), run_name="budget", num_workers=1,
        cpus_per_worker=1, data_cpus=0.5, time_budget_s=40, schedule_fractions="0.6,0.2,0.2",
        **{**TINY, "val_fraction": 0.2},
    )  # fmt: skip
    started = time.time()
    run(config)
    took = time.time() - started
    assert took < config.time_budget_s + 15  # the budget ends at the export; Ray Train's teardown follows

    exported = load_checkpoint(config.output).config
    schedule = exported.extra["schedule"]
    tc, td, t_train = schedule["tc"], schedule["td"], schedule["t_train"]
    assert 13 < tc and 0 < td and tc + td < t_train < 500_000  # all three planned, none the defaults
    assert exported.extra["train_config"]["t_train"] == t_train  # the checkpoint says what ran
    whys = [p["why"] for p in exported.extra["schedule_plans"]]
    assert whys[0] == "phase 1 timed over 10 steps" and "phase 2 begins" in whys and "phase 3 begins" in whys

    # Validated at the phase ends and a few times inside phase 1, not every few steps.
    validations = exported.extra["validations"]
    steps = [v["step"] for v in validations]
    assert {tc, tc + td, t_train} <= set(steps) and len(steps) <= 10
    assert sum(1 for v in validations if v["phase"] == 1) >= 3
    best = max(validations, key=lambda v: v["val_hole_psnr"])
    assert exported.step == best["step"] == exported.extra["exported"]["step"]
    # ... and the exported weights are that validation's (the run's best/ checkpoint).
    kept = load_checkpoint(f"{config.run_uri()}/best")
    assert kept.config.step == best["step"]
    exported_state = load_checkpoint(config.output).generator.state_dict()
    for name, value in kept.generator.state_dict().items():
        assert torch.equal(exported_state[name], value), name
