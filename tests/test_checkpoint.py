import json
import os
import shutil

import pytest
import torch
from torch import nn

from model.completion import CompletionNetwork
from model.discriminator import ContextDiscriminator
from pipeline import storage
from pipeline.checkpoint import (
    CheckpointError,
    ModelConfig,
    load_checkpoint,
    load_generator,
    save_checkpoint,
)

WIDTH = 0.125
CONFIG = ModelConfig(
    width=WIDTH, mean_pixel=(0.45, 0.42, 0.38), image_size=32, local_size=16, phase=3, step=17
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Wrapped(nn.Module):
    """Stands in for DistributedDataParallel: the model under ``.module``, keys prefixed 'module.'."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def trained_models():
    """A generator, discriminator and optimizers with real (non-initial) state after two steps."""
    torch.manual_seed(0)
    generator = CompletionNetwork(WIDTH)
    discriminator = ContextDiscriminator(32, 16, WIDTH)
    g_opt = torch.optim.Adam(generator.parameters(), lr=1e-3)
    d_opt = torch.optim.Adadelta(discriminator.parameters())
    for _ in range(2):
        x = torch.rand(2, 4, 32, 32)
        g_opt.zero_grad()
        generator(x).mean().backward()
        g_opt.step()
        d_opt.zero_grad()
        discriminator(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 16, 16)).mean().backward()
        d_opt.step()
    return generator, discriminator, {"generator": g_opt, "discriminator": d_opt}


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_round_trip_restores_weights_config_discriminator_and_optimizers(tmp_path):
    generator, discriminator, optimizers = trained_models()
    uri = str(tmp_path / "ckpt")
    save_checkpoint(uri, CONFIG, Wrapped(generator), Wrapped(discriminator), optimizers)

    loaded = load_checkpoint(uri)
    assert loaded.config == CONFIG
    assert not loaded.generator.training
    assert_same_state(loaded.generator.state_dict(), generator.state_dict())
    x = torch.rand(1, 4, 32, 32)
    assert torch.equal(loaded.generator(x), generator.eval()(x))

    fresh_d = loaded.restore_discriminator(ContextDiscriminator(32, 16, WIDTH))
    assert_same_state(fresh_d.state_dict(), discriminator.state_dict())

    # A resumed run continues exactly where the saved one stopped: same optimizer state.
    for name, params in [
        ("generator", loaded.generator.parameters()),
        ("discriminator", fresh_d.parameters()),
    ]:
        fresh = type(optimizers[name])(params)
        loaded.restore_optimizer(name, fresh)
        saved, restored = optimizers[name].state_dict(), fresh.state_dict()
        assert restored["param_groups"] == saved["param_groups"]
        for pid, fields in saved["state"].items():
            for field_name, value in fields.items():
                assert torch.equal(restored["state"][pid][field_name], value), (name, pid, field_name)

    with pytest.raises(CheckpointError, match="no optimizer 'critic'.*discriminator.*generator"):
        loaded.restore_optimizer("critic", torch.optim.Adam(fresh_d.parameters()))
    with pytest.raises(CheckpointError, match="optimizer 'generator' was saved from Adam, not Adadelta"):
        loaded.restore_optimizer("generator", torch.optim.Adadelta(loaded.generator.parameters()))
    with pytest.raises(CheckpointError, match="optimizer 'generator' does not match"):
        loaded.restore_optimizer("generator", torch.optim.Adam(list(loaded.generator.parameters())[:3]))

    # Files a user would otherwise have to trust: no pickles anywhere, config.json is plain JSON.
    names = sorted(os.listdir(uri))
    assert names == [
        "config.json",
        "discriminator.safetensors",
        "generator.safetensors",
        "optimizer.safetensors",
    ]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["model"]["width"] == WIDTH


def test_checkpoint_id_is_stable_and_follows_the_weights(tmp_path):
    generator, _, _ = trained_models()
    save_checkpoint(str(tmp_path / "a"), CONFIG, generator)
    save_checkpoint(str(tmp_path / "b"), CONFIG, generator)
    _, config, id_a = load_generator(str(tmp_path / "a"))
    _, _, id_b = load_generator(str(tmp_path / "b"))
    assert config == CONFIG and id_a == id_b and len(id_a) == 16
    with torch.no_grad():
        generator.net[0].weight[0, 0, 0, 0] += 1
    save_checkpoint(str(tmp_path / "a"), CONFIG, generator)
    assert load_generator(str(tmp_path / "a"))[2] != id_a
    assert load_checkpoint(str(tmp_path / "a")).discriminator_state is None


def test_round_trip_through_s3(s3_prefix, s3_server):
    generator, discriminator, optimizers = trained_models()
    uri = f"{s3_prefix}/run/step-17"
    save_checkpoint(uri, CONFIG, generator, discriminator, optimizers, endpoint_url=s3_server.endpoint_url)
    fs, root = storage.filesystem(uri, s3_server.endpoint_url)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(root, refresh=True)) == [
        "config.json",
        "discriminator.safetensors",
        "generator.safetensors",
        "optimizer.safetensors",
    ]
    loaded = load_checkpoint(uri, endpoint_url=s3_server.endpoint_url)
    assert loaded.config == CONFIG
    assert_same_state(loaded.generator.state_dict(), generator.state_dict())
    assert_same_state(loaded.discriminator_state, discriminator.state_dict())
    # The endpoint can also come from the environment (how Ray workers get it).
    assert load_generator(uri)[2] == loaded.checkpoint_id


def test_real_ddp_module_saves_bare_weights_through_a_file_uri(tmp_path):
    # What a Ray Train worker holds: the generator inside DistributedDataParallel.
    import torch.distributed as dist

    from embedded.servers import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        generator = CompletionNetwork(WIDTH)
        ddp = nn.parallel.DistributedDataParallel(generator)
        uri = f"file://{tmp_path}/ddp"
        save_checkpoint(uri, CONFIG, ddp, optimizers={"generator": torch.optim.Adam(ddp.parameters())})
    finally:
        dist.destroy_process_group()
    net, _, _ = load_generator(uri)
    assert_same_state(net.state_dict(), generator.state_dict())
    loaded = load_checkpoint(uri)
    loaded.restore_optimizer("generator", torch.optim.Adam(loaded.generator.parameters()))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    generator, discriminator, optimizers = trained_models()
    uri = str(tmp_path_factory.mktemp("pristine") / "ckpt")
    save_checkpoint(uri, CONFIG, generator, discriminator, optimizers)
    return uri


@pytest.fixture
def saved(pristine, tmp_path):
    """A fresh copy of a complete checkpoint for a test to damage."""
    return shutil.copytree(pristine, tmp_path / "ckpt").as_posix()


def edit_config(uri: str, **model_fields):
    path = os.path.join(uri, "config.json")
    document = json.load(open(path))
    document["model"].update(model_fields)
    json.dump(document, open(path, "w"))


def test_missing_config_means_incomplete_checkpoint(saved):
    os.remove(os.path.join(saved, "config.json"))
    with pytest.raises(CheckpointError, match=r"ckpt: no config.json.*incomplete"):
        load_checkpoint(saved)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_generator(saved + "-does-not-exist")


def test_a_file_inside_the_checkpoint_is_not_the_checkpoint(saved):
    with pytest.raises(
        CheckpointError, match="is a file inside a checkpoint: pass the checkpoint's directory"
    ):
        load_generator(os.path.join(saved, "generator.safetensors"))
    open(os.path.join(saved, "notes.txt"), "w").write("hello")
    with pytest.raises(CheckpointError, match="notes.txt: cannot read config.json"):
        load_generator(os.path.join(saved, "notes.txt"))


@pytest.mark.parametrize(
    "name", ["generator.safetensors", "discriminator.safetensors", "optimizer.safetensors"]
)
def test_missing_weights_file(saved, name):
    os.remove(os.path.join(saved, name))
    with pytest.raises(CheckpointError, match=f"ckpt: {name} is missing"):
        load_checkpoint(saved)


def test_truncated_weights(saved):
    path = os.path.join(saved, "generator.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=r"generator.safetensors is truncated.*\d+ bytes, config.json says \d+"
    ):
        load_generator(saved)


def test_truncated_weights_without_recorded_sizes(saved):
    # A checkpoint written by another tool may not record sizes: safetensors itself must then fail clearly.
    path = os.path.join(saved, "config.json")
    document = json.load(open(path))
    document["files"] = {}
    json.dump(document, open(path, "w"))
    weights = os.path.join(saved, "generator.safetensors")
    open(weights, "wb").write(open(weights, "rb").read()[:-100])
    with pytest.raises(CheckpointError, match="generator.safetensors is not a readable safetensors file"):
        load_generator(saved)


def test_corrupt_weights_same_size(saved):
    path = os.path.join(saved, "generator.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="generator.safetensors is corrupt"):
        load_generator(saved)


def test_wrong_width_names_the_mismatched_shapes(saved):
    edit_config(saved, width=0.25)
    with pytest.raises(
        CheckpointError, match=r"does not match the CompletionNetwork.*shape mismatch.*net\.0\.weight"
    ):
        load_generator(saved)


def test_wrong_architecture(saved):
    edit_config(saved, architecture="pix2pix")
    with pytest.raises(CheckpointError, match="architecture is 'pix2pix', expected 'glcic-completion'"):
        load_generator(saved)


def test_future_format_version_is_refused(saved):
    edit_config(saved, format_version=2)
    with pytest.raises(CheckpointError, match="unsupported format_version 2"):
        load_generator(saved)


def test_discriminator_of_another_size_is_refused(saved):
    loaded = load_checkpoint(saved)
    with pytest.raises(CheckpointError, match="does not match the ContextDiscriminator.*shape mismatch"):
        loaded.restore_discriminator(ContextDiscriminator(128, 64, WIDTH))


def test_unknown_future_fields_are_kept_and_missing_optional_fields_default(saved):
    path = os.path.join(saved, "config.json")
    document = json.load(open(path))
    model = document["model"]
    for name in ("phase", "step", "extra", "local_size"):
        del model[name]
    model["attention"] = "none"
    json.dump(document, open(path, "w"))
    config = load_generator(saved)[1]
    assert (config.phase, config.step, config.local_size) == (1, 0, 128)
    assert config.extra == {"attention": "none"}


def test_unserialisable_config_is_refused_before_anything_is_overwritten(saved):
    before = {name: open(os.path.join(saved, name), "rb").read() for name in os.listdir(saved)}
    bad = ModelConfig(width=WIDTH, mean_pixel=CONFIG.mean_pixel, extra={"started": object()})
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        save_checkpoint(saved, bad, CompletionNetwork(WIDTH))
    assert {name: open(os.path.join(saved, name), "rb").read() for name in os.listdir(saved)} == before
    assert load_checkpoint(saved).config == CONFIG


def test_garbage_config(saved):
    open(os.path.join(saved, "config.json"), "w").write("{not json")
    with pytest.raises(CheckpointError, match="config.json is not a checkpoint config"):
        load_generator(saved)
