"""Checkpoints: safetensors weights plus a JSON config, on any fsspec URI. Nothing is ever unpickled.

Layout of a checkpoint directory / prefix::

    generator.safetensors       the completion network
    discriminator.safetensors   optional: the context discriminator (training only)
    optimizer.safetensors       optional: optimizer state tensors, keys "<name>/<param>/<field>"
    config.json                 ModelConfig, sizes and sha256 of the files above, and the
                                optimizers' non-tensor state (param_groups, scalar fields)

``config.json`` is written last, so its presence marks a complete checkpoint; a save over an
older checkpoint removes the old ``config.json`` first so a crash half-way never pairs new weights
with an old config.

Weights are saved unwrapped: the ``module.`` prefix of DistributedDataParallel and the
``_orig_mod.`` prefix of ``torch.compile`` are stripped, so a checkpoint saved from a Ray Train
worker loads into a bare ``CompletionNetwork``. Pass either the wrapped or the bare module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import storage

if TYPE_CHECKING:  # torch is imported where tensors are made: the CLI checks checkpoints without it
    import torch
    from torch import nn

    from model.completion import CompletionNetwork

ARCHITECTURE = "glcic-completion"
FORMAT_VERSION = 1

# The checkpoint URI that names the weights shipped in the package (model/weights/default/).
DEFAULT_CHECKPOINT = "default"

CONFIG_FILE = "config.json"
GENERATOR_FILE = "generator.safetensors"
DISCRIMINATOR_FILE = "discriminator.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


def is_complete(fs, root: str) -> bool:
    """Whether the checkpoint at ``root`` is complete: its config.json, written last, exists."""
    return storage.exists(fs, storage.join_key(root, CONFIG_FILE))


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the URI and what is wrong."""


@dataclass
class ModelConfig:
    width: float
    mean_pixel: tuple[float, float, float]  # RGB in [0, 1], from the training set
    image_size: int = 256  # training crop, the global discriminator's input
    local_size: int = 128  # the local discriminator's patch
    architecture: str = ARCHITECTURE
    format_version: int = FORMAT_VERSION
    phase: int | str = 1  # the paper's schedule: 1 completion (MSE), 2 discriminator, 3 joint
    step: int = 0
    extra: dict = field(default_factory=dict)  # free-form, JSON-serialisable (e.g. the TrainConfig)

    def __post_init__(self):
        self.width = float(self.width)
        self.mean_pixel = tuple(float(v) for v in self.mean_pixel)
        if len(self.mean_pixel) != 3 or not all(0.0 <= v <= 1.0 for v in self.mean_pixel):
            raise ValueError(f"mean_pixel must be 3 floats in [0, 1], got {self.mean_pixel}")
        if not self.width > 0:
            raise ValueError(f"width must be positive, got {self.width}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Build from JSON; fields this version does not know are kept in ``extra``, not lost."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        unknown = {k: v for k, v in data.items() if k not in known}
        if unknown:
            kwargs["extra"] = {**unknown, **dict(kwargs.get("extra") or {})}
        return cls(**kwargs)


def unwrapped_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous copies of the bare module's state (no DDP / torch.compile prefixes)."""
    from model.gan import unwrap

    return {key: t.detach().to("cpu").contiguous() for key, t in unwrap(module).state_dict().items()}


def _optimizer_payload(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state into tensors (for safetensors) and the rest (for JSON)."""
    import torch

    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, fields in state_dict["state"].items():
        for field_name, value in fields.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{param_id}/{field_name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(param_id), {})[field_name] = value
    payload = {
        "class": type(optimizer).__name__,
        "param_groups": state_dict["param_groups"],
        "scalars": scalars,
    }
    try:
        json.dumps(payload)
    except TypeError as e:
        raise CheckpointError(f"optimizer {name!r} has state that is neither a tensor nor JSON: {e}") from e
    return tensors, payload


def save_checkpoint(
    uri: str,
    config: ModelConfig,
    generator: nn.Module,
    discriminator: nn.Module | None = None,
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    endpoint_url: str | None = None,
    generator_dtype: torch.dtype | None = None,
) -> str:
    """Write a checkpoint to the directory / prefix ``uri``; return ``uri``.

    ``generator_dtype`` (e.g. ``torch.float16``) stores the generator's floating-point weights in
    that type: half the bytes for shipped weights. Loading casts them back to the model's float32.
    """
    import torch
    from safetensors.torch import save as save_safetensors

    try:  # before any file is written: a bad config must not cost the old checkpoint
        json.dumps(config.to_dict())
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{uri}: the ModelConfig is not JSON-serialisable (check extra): {e}") from e
    fs, root = storage.filesystem(uri, endpoint_url)
    config_path = storage.join_key(root, CONFIG_FILE)
    try:
        storage.with_retries(lambda: fs.rm_file(config_path))
    except FileNotFoundError:
        pass

    generator_state = unwrapped_state_dict(generator)
    if generator_dtype is not None:
        generator_state = {
            k: t.to(generator_dtype) if t.is_floating_point() else t for k, t in generator_state.items()
        }
    blobs: dict[str, bytes] = {GENERATOR_FILE: save_safetensors(generator_state)}
    if discriminator is not None:
        blobs[DISCRIMINATOR_FILE] = save_safetensors(unwrapped_state_dict(discriminator))
    optimizer_json: dict[str, dict] = {}
    if optimizers:
        optimizer_tensors: dict[str, torch.Tensor] = {}
        for name, optimizer in optimizers.items():
            if "/" in name:
                raise ValueError(f"optimizer name {name!r} must not contain '/'")
            tensors, optimizer_json[name] = _optimizer_payload(name, optimizer)
            optimizer_tensors.update(tensors)
        blobs[OPTIMIZER_FILE] = save_safetensors(optimizer_tensors)

    for name, data in blobs.items():
        path = storage.join_key(root, name)
        storage.with_retries(lambda path=path, data=data: storage.atomic_write_bytes(fs, path, data))
    document = {
        "model": config.to_dict(),
        "files": {
            name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in blobs.items()
        },
        "optimizers": optimizer_json,
        "torch_version": torch.__version__,
    }
    config_bytes = json.dumps(document, indent=2, sort_keys=True).encode()
    storage.with_retries(lambda: storage.atomic_write_bytes(fs, config_path, config_bytes))
    return uri


@dataclass
class LoadedCheckpoint:
    uri: str
    config: ModelConfig
    generator: CompletionNetwork  # eval mode, on the requested device
    discriminator_state: dict[str, torch.Tensor] | None
    checkpoint_id: str  # first 16 hex digits of the generator file's sha256
    optimizer_tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    optimizer_json: dict[str, dict] = field(default_factory=dict, repr=False)

    def restore_discriminator(self, discriminator: nn.Module) -> nn.Module:
        """Load the saved discriminator weights (strict) into ``discriminator`` (bare or wrapped)."""
        if self.discriminator_state is None:
            raise CheckpointError(f"{self.uri}: has no {DISCRIMINATOR_FILE}")
        from model.gan import unwrap

        _load_strict(unwrap(discriminator), self.discriminator_state, self.uri, DISCRIMINATOR_FILE)
        return discriminator

    def restore_optimizer(self, name: str, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Load the state saved under ``name`` into ``optimizer`` (built over the same parameters)."""
        if name not in self.optimizer_json:
            raise CheckpointError(
                f"{self.uri}: no optimizer {name!r} (saved: {sorted(self.optimizer_json) or 'none'})"
            )
        saved = self.optimizer_json[name]
        # torch would load Adam's state into an Adadelta without complaint and fail at its next step.
        saved_class = saved.get("class")
        if saved_class is not None and saved_class != type(optimizer).__name__:
            raise CheckpointError(
                f"{self.uri}: optimizer {name!r} was saved from {saved_class}, not {type(optimizer).__name__}"
            )
        state: dict[int, dict[str, Any]] = {}
        prefix = f"{name}/"
        for key, tensor in self.optimizer_tensors.items():
            if key.startswith(prefix):
                param_id, field_name = key[len(prefix) :].split("/", 1)
                state.setdefault(int(param_id), {})[field_name] = tensor
        for param_id, fields in saved["scalars"].items():
            state.setdefault(int(param_id), {}).update(fields)
        # JSON turned tuples (Adam's betas) into lists; give each hyperparameter back its type.
        groups = []
        for saved_group, current in zip(saved["param_groups"], optimizer.param_groups, strict=False):
            group = dict(saved_group)
            for key, value in group.items():
                if key != "params" and isinstance(current.get(key), tuple) and isinstance(value, list):
                    group[key] = tuple(value)
            groups.append(group)
        try:
            optimizer.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{self.uri}: optimizer {name!r} does not match the one given: {e}") from e
        return optimizer


def _fetch(fs, root: str, name: str, uri: str, retries: dict | None = None) -> bytes:
    """The bytes of ``name``; FileNotFoundError passes through, any other failure names the URI."""
    path = storage.join_key(root, name)

    def read() -> bytes:
        try:
            return storage.read_bytes(fs, path)
        except NotADirectoryError as e:  # the URI is a file: no retry will help
            raise CheckpointError(f"{uri}: cannot read {name}: {e}") from e

    try:
        return storage.with_retries(read, **(retries or storage.DATA_RETRIES))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CheckpointError(f"{uri}: cannot read {name}: {e}") from e


def _read(fs, root: str, name: str, uri: str, files: dict) -> bytes:
    """Read ``name`` and check it against the size and hash recorded in config.json."""
    try:
        data = _fetch(fs, root, name, uri)
    except FileNotFoundError:
        raise CheckpointError(f"{uri}: {name} is missing (config.json lists it)") from None
    expected = files.get(name)
    if expected is not None:
        if len(data) != expected["bytes"]:
            raise CheckpointError(
                f"{uri}: {name} is truncated or was replaced: {len(data)} bytes, config.json says {expected['bytes']}"
            )
        if hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise CheckpointError(f"{uri}: {name} is corrupt: its sha256 does not match config.json")
    return data


def _tensors(data: bytes, name: str, uri: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{uri}: {name} is not a readable safetensors file (truncated?): {e}") from e


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], uri: str, name: str) -> None:
    """``load_state_dict(strict=True)`` with an error that says which keys and shapes differ."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if shapes:
        problems.append(f"shape mismatch {shapes[:3]}{' ...' if len(shapes) > 3 else ''}")
    if problems:
        raise CheckpointError(
            f"{uri}: {name} does not match the {type(module).__name__} its config describes "
            f"(wrong width or architecture?): " + "; ".join(problems)
        )
    module.load_state_dict(state, strict=True)


def _read_config(fs, root: str, uri: str, retries: dict | None = None) -> dict:
    name = root.rstrip("/").rsplit("/", 1)[-1]
    if name in (CONFIG_FILE, GENERATOR_FILE, DISCRIMINATOR_FILE, OPTIMIZER_FILE):
        raise CheckpointError(
            f"{uri} is a file inside a checkpoint: pass the checkpoint's directory / prefix"
        )
    try:
        raw = _fetch(fs, root, CONFIG_FILE, uri, retries)
    except FileNotFoundError:
        raise CheckpointError(
            f"{uri}: no {CONFIG_FILE}: not a checkpoint, or an incomplete one ({CONFIG_FILE} is written last)"
        ) from None
    try:
        document = json.loads(raw)
        model = document["model"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{uri}: {CONFIG_FILE} is not a checkpoint config: {e!r}") from e
    architecture = model.get("architecture")
    if architecture != ARCHITECTURE:
        raise CheckpointError(f"{uri}: architecture is {architecture!r}, expected {ARCHITECTURE!r}")
    version = model.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{uri}: unsupported format_version {version!r} (this code reads 1..{FORMAT_VERSION}; upgrade glcic)"
        )
    return document


def resolve(uri: str) -> str:
    """``"default"`` -> the weights shipped with glcic (``model/weights/default``); other URIs as given."""
    if uri == DEFAULT_CHECKPOINT:
        import model

        return str(Path(model.__file__).resolve().parent / "weights" / DEFAULT_CHECKPOINT)
    return uri


@dataclass(frozen=True)
class LocatedCheckpoint:
    """A checkpoint found and checked once, before any work: where it is and which weights."""

    uri: str  # as given ('default' stays 'default': each job resolves it in its own package)
    resolved: str  # where its files are
    checkpoint_id: str  # the first 16 hex digits of the generator file's sha256 (as loading computes)


def locate(uri: str, endpoint_url: str | None = None, *, fail_fast: bool = False) -> LocatedCheckpoint:
    """Resolve ``uri`` and read its ``config.json`` (written last: a complete checkpoint), without
    torch and without the weights: the one check the CLI, the job's driver and the monitor share.
    Raises ``CheckpointError`` naming what is wrong; storage errors pass through as they are."""
    resolved = resolve(uri)
    fs, root = storage.filesystem(resolved, endpoint_url, fail_fast=fail_fast)
    fs.invalidate_cache()
    document = _read_config(fs, root, resolved, storage.PREFLIGHT_RETRIES if fail_fast else None)
    try:
        checkpoint_id = document["files"][GENERATOR_FILE]["sha256"][:16]
    except (KeyError, TypeError):
        raise CheckpointError(f"{resolved}: {CONFIG_FILE} lists no {GENERATOR_FILE}") from None
    return LocatedCheckpoint(uri=uri, resolved=resolved, checkpoint_id=checkpoint_id)


def load_checkpoint(
    uri: str,
    endpoint_url: str | None = None,
    device: str | torch.device = "cpu",
    *,
    training_state: bool = True,
) -> LoadedCheckpoint:
    """Read a checkpoint; ``training_state=False`` skips the discriminator and optimizers."""
    uri = resolve(uri)
    fs, root = storage.filesystem(uri, endpoint_url)
    document = _read_config(fs, root, uri)
    try:
        config = ModelConfig.from_dict(document["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{uri}: {CONFIG_FILE} has a bad model config: {e}") from e
    files = document.get("files", {})

    generator_bytes = _read(fs, root, GENERATOR_FILE, uri, files)
    from model.completion import CompletionNetwork

    generator = CompletionNetwork(width=config.width)
    _load_strict(generator, _tensors(generator_bytes, GENERATOR_FILE, uri), uri, GENERATOR_FILE)
    generator.to(device).eval()

    discriminator_state = None
    optimizer_tensors: dict[str, torch.Tensor] = {}
    optimizer_json: dict[str, dict] = {}
    if training_state:
        if DISCRIMINATOR_FILE in files:
            data = _read(fs, root, DISCRIMINATOR_FILE, uri, files)
            discriminator_state = _tensors(data, DISCRIMINATOR_FILE, uri)
        if OPTIMIZER_FILE in files:
            optimizer_tensors = _tensors(_read(fs, root, OPTIMIZER_FILE, uri, files), OPTIMIZER_FILE, uri)
            optimizer_json = document.get("optimizers", {})
    return LoadedCheckpoint(
        uri=uri,
        config=config,
        generator=generator,
        discriminator_state=discriminator_state,
        checkpoint_id=hashlib.sha256(generator_bytes).hexdigest()[:16],
        optimizer_tensors=optimizer_tensors,
        optimizer_json=optimizer_json,
    )


def load_generator(
    uri: str, device: str | torch.device = "cpu", endpoint_url: str | None = None
) -> tuple[CompletionNetwork, ModelConfig, str]:
    """The completion network (eval mode, on ``device``), its config and its checkpoint id."""
    loaded = load_checkpoint(uri, endpoint_url=endpoint_url, device=device, training_state=False)
    return loaded.generator, loaded.config, loaded.checkpoint_id
