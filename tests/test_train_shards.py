"""Training on images inside shards: WebDataset tars written by the ``webdataset`` library and
Parquet files in img2dataset's column layout written by pyarrow, on a real local Ray and the real
S3 server. Each shard is read whole, its unusable samples are skipped, and the validation split
is made sample by sample.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.config import TrainConfig
from jobs.train import run, shard_inputs
from pipeline import storage, train_data
from pipeline.checkpoint import load_generator
from pipeline.train_shards import ShardInput, parse_sample_uri, sample_uri
from tests.test_train_job import TINY

PER_SHARD = 12


def _jpeg(photo: np.ndarray, i: int) -> bytes:
    """A 64 x 56 JPEG cut from ``photo`` at an offset of its own, so every sample differs."""
    y, x = 40 + 7 * i, 60 + 11 * i  # photos are at least 256 x 384
    sink = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(photo[y : y + 56, x : x + 64])).save(sink, "JPEG", quality=90)
    return sink.getvalue()


def _good_keys(shard: int) -> list[str]:
    return [f"{shard:05d}{i:04d}" for i in range(PER_SHARD)]


@pytest.fixture(scope="module")
def s3_tars(s3_server, photos, tmp_path_factory):
    """Two tars by webdataset.TarWriter on S3: 12 good samples each (jpg + json), a text file named
    .jpg and a zero-byte image; img2dataset's metadata parquet and stats beside them."""
    import webdataset as wds

    fs = s3_server.filesystem()
    local = tmp_path_factory.mktemp("tars")
    for shard in range(2):
        path = local / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for i, key in enumerate(_good_keys(shard)):
                writer.write(
                    {
                        "__key__": key,
                        "jpg": _jpeg(photos[i % len(photos)], shard * PER_SHARD + i),
                        "json": b'{"caption": "x"}',
                    }
                )
            writer.write({"__key__": f"{shard:05d}text", "jpg": b"not a jpeg\n" * 30, "json": b"{}"})
            writer.write({"__key__": f"{shard:05d}empty", "jpg": b"", "json": b"{}"})
        fs.put_file(str(path), f"test/train-tars/{path.name}")
        fs.pipe_file(f"test/train-tars/{shard:05d}.parquet", b"img2dataset's metadata, not images")
        fs.pipe_file(f"test/train-tars/{shard:05d}_stats.json", json.dumps({"count": PER_SHARD + 2}).encode())
    return "s3://test/train-tars"


@pytest.fixture(scope="module")
def parquet_folder(photos, tmp_path_factory):
    """Two Parquet files in img2dataset's column layout: 12 good rows each, a failed download
    (null jpg) and a corrupt image."""
    root = tmp_path_factory.mktemp("parquet")
    for shard in range(2):
        keys = [*_good_keys(shard), f"{shard:05d}null", f"{shard:05d}bad"]
        jpgs = [_jpeg(photos[i % len(photos)], shard * PER_SHARD + i + 1) for i in range(PER_SHARD)] + [
            None,
            b"\xff\xd8\xff garbage",
        ]
        table = pa.table(
            {
                "key": keys,
                "jpg": pa.array(jpgs, pa.binary()),
                "url": [f"http://example.invalid/{k}.jpg" for k in keys],
                "caption": [f"caption {k}" for k in keys],
                "status": ["success"] * PER_SHARD + ["failed_to_download", "success"],
            }
        )
        pq.write_table(table, root / f"{shard:05d}.parquet")
    return str(root)


def test_the_survey_splits_by_sample_and_takes_the_mean_sample_from_few_shards(ray_local, s3_tars):
    shards = ShardInput("webdataset")
    survey = train_data.survey(s3_tars, fraction=0.25, seed=3, val_limit=50, sample_size=5, shards=shards)
    # 24 good samples and the 2 texts named .jpg, which only decoding finds out (it skips them); not
    # the zero-byte images, nor the metadata parquet beside the tars.
    assert survey.train_count + survey.val_count == 2 * PER_SHARD + 2
    assert 0 < survey.val_count < 2 * PER_SHARD
    for key, uri in zip(survey.val_keys, survey.val_uris, strict=True):
        shard_uri, sample = parse_sample_uri(uri)
        assert key == f"{shard_uri.rsplit('/', 1)[1]}/{sample}" and survey.split.is_validation(uri)
    # The split is the sample's own hash: the two shards each give some to validation or not,
    # independently of the shard order.
    all_uris = [
        sample_uri(f"{s3_tars}/{s:05d}.tar", k) for s in range(2) for k in [*_good_keys(s), f"{s:05d}text"]
    ]
    assert sorted(survey.val_uris) == sorted(u for u in all_uris if survey.split.is_validation(u))
    # The mean pixel's 5 samples come from one shard (the lowest shard hash first), read once.
    assert len(survey.sample_uris) == 5
    assert len({parse_sample_uri(u)[0] for u in survey.sample_uris}) == 1
    assert not any(survey.split.is_validation(u) for u in survey.sample_uris)


def test_trains_on_webdataset_tars_on_s3_named_by_a_brace_pattern(ray_local, s3_tars, s3_prefix):
    # {00000..00002}: the third shard does not exist, which costs a warning, not the run.
    config = TrainConfig(
        images=f"{s3_tars}/{{00000..00002}}.tar", output=f"{s3_prefix}/model", storage_path=f"{s3_prefix}/runs",
        run_name="tars", tc=4, td=2, t_train=8, val_every=4, checkpoint_every=4, log_shard_keys=True,
        min_epoch_steps=1, resident_max_gib=0, shuffle_buffer=8, **{**TINY, "val_fraction": 0.25},
    )  # fmt: skip
    assert run(config) == config.output
    shards, _ = shard_inputs(config, None)
    survey = train_data.survey(
        config.images,
        fraction=config.val_fraction,
        seed=config.seed,
        val_limit=50,
        sample_size=2048,
        shards=shards,
    )
    train_keys = {f"{s:05d}.tar/{k}" for s in range(2) for k in _good_keys(s)} - set(survey.val_keys)
    _, model_config, _ = load_generator(config.output)
    assert [v["step"] for v in model_config.extra["validations"]] == [4, 8]
    # The mean pixel is of every decodable training sample (the sample asked for is larger).
    assert model_config.extra["mean_pixel_from"]["images"] == len(train_keys)

    fs, _ = storage.filesystem(config.output)
    logged = json.loads(fs.cat_file(f"{s3_prefix[5:]}/runs/tars/shards/rank-0.json"))
    # Streamed, epoch 0 is every training sample once, but for what whole batches leave over.
    assert set(logged) <= train_keys and len(logged) == len(set(logged))
    assert len(logged) >= len(train_keys) - (TINY["batch_size"] - 1)
    assert {k.split("/")[0] for k in logged} == {"00000.tar", "00001.tar"}


def test_trains_on_img2dataset_parquet_held_resident(ray_local, parquet_folder, s3_prefix):
    config = TrainConfig(
        images=parquet_folder, output=f"{s3_prefix}/model", storage_path=f"{s3_prefix}/runs", run_name="pq",
        tc=4, td=2, t_train=6, val_every=3, checkpoint_every=3, log_shard_keys=True, min_epoch_steps=1, **TINY,
    )  # fmt: skip
    assert run(config) == config.output
    shards, _ = shard_inputs(config, None)
    assert shards == ShardInput("parquet")
    survey = train_data.survey(
        parquet_folder,
        fraction=config.val_fraction,
        seed=config.seed,
        val_limit=50,
        sample_size=2048,
        shards=shards,
    )
    fs, _ = storage.filesystem(config.output)
    held = json.loads(fs.cat_file(f"{s3_prefix[5:]}/runs/pq/shards/rank-0.json"))
    # Resident: the worker holds exactly the training samples, the null and corrupt rows skipped.
    good = {f"{s:05d}.parquet/{k}" for s in range(2) for k in _good_keys(s)}
    assert sorted(held) == sorted(good - set(survey.val_keys))
    _, model_config, _ = load_generator(config.output)
    assert all(0.1 < v < 0.9 for v in model_config.mean_pixel)
