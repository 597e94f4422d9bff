"""Typed job configuration: dataclasses <-> command-line flags, printed at start, saved beside outputs.

Each job module declares one dataclass (``InpaintConfig``, ``TrainConfig``); every field carries
its help text in ``field(metadata={"help": ...})``. The same dataclass drives the job's own
``python -m jobs.X --flag value`` entry point (what a Ray Job runs) and the ``glcic`` CLI, which
turns a config back into those flags with ``to_argv``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

C = TypeVar("C")


def _base_type(tp: Any) -> Any:
    """``int | None`` -> ``int``; ``Literal["a", "b"]`` stays as is."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip().split("\n")[0])
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", ""), "dest": f.name}
        if not required:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kwargs["default"] = default
            kwargs["help"] += f" (default: {default})"
        else:
            kwargs["required"] = True
        if typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        elif tp is bool:
            kwargs["type"] = _parse_bool
            kwargs["metavar"] = "BOOL"
        elif typing.get_origin(tp) in (tuple, list):
            elem = typing.get_args(tp)[0]
            kwargs["type"] = elem
            kwargs["nargs"] = "+"
        else:
            kwargs["type"] = tp
        parser.add_argument(_flag(f.name), **kwargs)
    return parser


def parse_config(cls: type[C], argv: list[str] | None = None) -> C:
    ns = build_parser(cls).parse_args(argv)
    values = vars(ns)
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if typing.get_origin(_base_type(hints[name])) is tuple and isinstance(value, list):
            values[name] = tuple(value)
    return cls(**values)


def to_argv(config: Any) -> list[str]:
    """Flags that ``parse_config`` turns back into an equal config (defaults left out)."""
    argv: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )  # fmt: skip
        if has_default and value == default:
            continue
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            argv += [_flag(f.name), *[str(v) for v in value]]
        else:
            argv += [_flag(f.name), str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_json(config: Any) -> str:
    return json.dumps(
        {"type": type(config).__name__, **to_dict(config)}, indent=2, sort_keys=True, default=str
    )


def print_config(config: Any, log=print) -> None:
    log(f"{type(config).__name__}:")
    for key, value in to_dict(config).items():
        log(f"  {key} = {value!r}")


def save_config(config: Any, uri: str, endpoint_url: str | None = None) -> None:
    """Write the config as JSON at ``uri`` (any fsspec URI), whole or not at all."""
    from pipeline.storage import atomic_write_bytes, filesystem

    fs, path = filesystem(uri, endpoint_url)
    atomic_write_bytes(fs, path, to_json(config).encode())
