import dataclasses
from typing import Literal

import pytest

from jobs.config import parse_config, to_argv


@dataclasses.dataclass
class Example:
    images: str = dataclasses.field(metadata={"help": "input URI"})
    batch_size: int = dataclasses.field(default=8, metadata={"help": "images per batch"})
    precision: Literal["fp32", "bf16"] = "fp32"
    endpoint_url: str | None = None
    postprocess: bool = False
    hole_range: tuple[int, int] = (96, 128)


def test_flags_round_trip_through_argv():
    cfg = Example(images="s3://b/p", batch_size=3, precision="bf16", postprocess=True, hole_range=(8, 16))
    assert parse_config(Example, to_argv(cfg)) == cfg


def test_defaults_and_required_flags():
    assert parse_config(Example, ["--images", "x"]) == Example(images="x")
    with pytest.raises(SystemExit):
        parse_config(Example, [])
    with pytest.raises(SystemExit):
        parse_config(Example, ["--images", "x", "--precision", "fp8"])
