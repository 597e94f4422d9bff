import dataclasses
from typing import Literal

import numpy as np
import pytest

from jobs.config import (
    DEFAULT_MAX_PIXELS,
    BatchInferenceConfig,
    EvaluateConfig,
    InpaintConfig,
    TrainConfig,
    flag,
    parse_config,
    to_argv,
)


@dataclasses.dataclass
class Example:
    images: str = flag("input URI")
    batch_size: int = flag("images per batch", 8)
    precision: Literal["fp32", "bf16"] = flag("precision", "fp32")
    endpoint_url: str | None = flag("endpoint", None)
    postprocess: bool = flag("post-process", False)
    channels_last: bool = flag("channels_last", True)
    scale: float = flag("scale", 1.0)


def test_flags_round_trip_through_argv():
    cfg = Example(
        images="s3://b/p", batch_size=3, precision="bf16", postprocess=True, channels_last=False, scale=0.5
    )
    argv = to_argv(cfg)
    assert "--no-channels-last" in argv and "--postprocess" in argv
    assert parse_config(Example, argv) == cfg


def test_defaults_and_required_flags():
    assert parse_config(Example, ["--images", "x"]) == Example(images="x")
    with pytest.raises(SystemExit):
        parse_config(Example, [])
    with pytest.raises(SystemExit):
        parse_config(Example, ["--images", "x", "--precision", "fp8"])


def test_the_jobs_configs_round_trip_and_check_themselves():
    train = TrainConfig(images="s3://b/photos", output="s3://b/model", tc=10, td=5, t_train=20, use_gpu=True)
    assert parse_config(TrainConfig, to_argv(train)) == train
    inpaint = InpaintConfig(images="in", output="out", checkpoint="ckpt", postprocess=False, num_actors=2)
    assert parse_config(InpaintConfig, to_argv(inpaint)) == inpaint
    with pytest.raises(ValueError, match="tc"):
        TrainConfig(images="a", output="b", tc=30, td=0, t_train=20)
    with pytest.raises(ValueError, match="--batch-size must be at least 1"):
        InpaintConfig(images="in", output="out", checkpoint="ckpt", batch_size=-1)
    auto = InpaintConfig(images="in", output="out")  # the shipped weights; batch sized for the device
    assert auto.checkpoint == "default" and (auto.inference_batch_size(1), auto.inference_batch_size(0)) == (
        64,
        16,
    )
    with pytest.raises(ValueError, match="run-id"):
        InpaintConfig(images="in", output="out", checkpoint="ckpt", run_id="../x")
    # A bad value on the job's own command line is one clear exit, not a traceback.
    with pytest.raises(SystemExit, match="must be at least 1"):
        parse_config(
            InpaintConfig, ["--images", "i", "--output", "o", "--checkpoint", "c", "--task-batch-size", "0"]
        )


def test_the_default_pixel_limit_is_the_decoders():
    from pipeline.decode import DEFAULT_MAX_PIXELS as DECODER_DEFAULT

    assert DEFAULT_MAX_PIXELS == DECODER_DEFAULT


def test_evaluate_config_shares_the_inference_flags_and_checks_its_protocol():
    shared = {f.name for f in dataclasses.fields(BatchInferenceConfig)}
    assert shared <= {f.name for f in dataclasses.fields(InpaintConfig)}
    assert shared <= {f.name for f in dataclasses.fields(EvaluateConfig)}
    evaluate = EvaluateConfig(images="in", output="out", checkpoint="ckpt", crop=0, mask_seed=3, num_actors=2)
    assert parse_config(EvaluateConfig, to_argv(evaluate)) == evaluate
    assert (evaluate.crop, evaluate.local_size, evaluate.hole_range, evaluate.grid_rows) == (
        0,
        128,
        (64, 128),
        8,
    )
    with pytest.raises(ValueError, match="--batch-size must be at least 1"):  # a shared check
        EvaluateConfig(images="in", output="out", checkpoint="ckpt", batch_size=-1)
    with pytest.raises(ValueError, match="must fit in --crop"):
        EvaluateConfig(images="in", output="out", checkpoint="ckpt", crop=64)
    with pytest.raises(ValueError, match="hole_min <= hole_max"):
        EvaluateConfig(images="in", output="out", checkpoint="ckpt", hole_min=100, hole_max=90)


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ("data", "data", True),
        ("data/", "./data", True),
        ("data", "data/completed", True),
        ("data/completed", "data", True),
        ("data", "data_completed", False),
        ("s3://bucket/photos/", "s3a://bucket/photos", True),
        ("s3://bucket/photos", "s3://bucket/photos/out", True),
        ("s3://bucket/photos", "s3://bucket/photos-out", False),
        ("s3://bucket/photos", "gs://bucket/photos", False),
        ("file:///tmp/x", "/tmp/x/", True),
    ],
)
def test_overlapping_locations_are_compared_segment_by_segment(a, b, expected):
    from pipeline.storage import overlaps

    assert overlaps(a, b) is expected and overlaps(b, a) is expected


def test_a_job_never_writes_where_it_reads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for images, output, extra in [
        ("photos", "photos", {}),
        ("photos", "photos/completed", {}),
        ("photos/", str(tmp_path / "photos"), {}),  # two spellings of one folder
        ("s3://b/photos", "s3a://b/photos/", {}),
        ("photos/list.txt", "photos", {}),  # a list file's keys lie beside it
        ("photos", "out", {"masks": "out/masks"}),
        ("photos", "out", {"manifest": "photos/_manifest"}),
    ]:
        with pytest.raises(ValueError, match="overlap"):
            InpaintConfig(images=images, output=output, checkpoint="c", **extra)
    with pytest.raises(ValueError, match="overlap"):
        EvaluateConfig(images="photos", output="photos/eval", checkpoint="c")
    (tmp_path / "photos").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "photos")
    with pytest.raises(ValueError, match="overlap"):
        InpaintConfig(images="photos", output="link", checkpoint="c")
    InpaintConfig(images="photos", output="photos_completed", checkpoint="c")
    InpaintConfig(images="s3://b/photos", output="s3://b/photos-completed", checkpoint="c")


def test_one_mask_route_for_every_job():
    """The same generator kinds and the same hole check for training, evaluation and inpainting;
    submit-inpaint's hole flags reach the masks it generates."""
    import typing

    from jobs.config import MaskKind, TrainConfig
    from model.masks import MASK_KINDS, generate_mask
    from pipeline.inpaint_data import ReadOptions, _generate_mask

    assert typing.get_args(MaskKind) == MASK_KINDS
    for make in (
        lambda **k: TrainConfig(images="i", output="o", tc=1, td=0, t_train=2, **k),
        lambda **k: InpaintConfig(images="i", output="o", **k),
        lambda **k: EvaluateConfig(images="i", output="o", **k),
    ):
        with pytest.raises(ValueError, match=r"hole_min <= hole_max <= local_size, got 50\.\.40 in 64"):
            make(local_size=64, hole_min=50, hole_max=40)
    with pytest.raises(ValueError, match="--hole-min and --hole-max together"):
        InpaintConfig(images="i", output="o", hole_min=8)
    config = InpaintConfig(images="i", output="o", local_size=20, hole_min=10, hole_max=10)
    options = ReadOptions(output="o", mask_seed=5, hole_range=config.hole_range, local_size=config.local_size)
    mask = _generate_mask("a.jpg", 200, 300, options)
    ys, xs = np.nonzero(mask)
    assert (np.ptp(ys) + 1, np.ptp(xs) + 1, int(mask.sum())) == (10, 10, 100)
    assert np.array_equal(mask, generate_mask("rectangle", 200, 300, seed=5, key="a.jpg", local_size=20,
                                              hole_range=(10, 10)))  # fmt: skip
    # Unset: the paper's sizes, as before the flags existed (golden values in test_masks.py).
    default = _generate_mask("a.jpg", 200, 300, ReadOptions(output="o", mask_seed=5))
    assert np.array_equal(default, generate_mask("rectangle", 200, 300, seed=5, key="a.jpg"))
