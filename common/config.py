"""Builds argparse flags and env overrides from a frozen config dataclass; holds no defaults."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, TypeVar

ENV_PREFIX = "EDGELORA_"
T = TypeVar("T")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def _base_type(annotation: Any) -> type:
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing))  # our own dataclass annotations
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Adds one flag per field of `cls`; the help text is the field's `metadata["help"]`.

    A flag left unset falls back to EDGELORA_<FIELD> in the environment, then to the field default.
    """
    group = parser.add_argument_group(cls.__name__)
    for field in dataclasses.fields(cls):
        if field.name in skip or not field.init:
            continue
        kind = _base_type(field.type)
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = (f"{field.metadata.get('help', '')} "
                     f"(default: {default!r}; env {_env_name(field.name)})")
        converter = _parse_bool if kind is bool else kind
        group.add_argument(_flag(field.name), dest=field.name, type=converter, default=None,
                           help=help_text, metavar=kind.__name__.upper())


def config_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Flag value, else environment variable, else the field default; `overrides` win over all."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        value = getattr(args, field.name, None)
        if value is None and _env_name(field.name) in os.environ:
            kind = _base_type(field.type)
            converter = _parse_bool if kind is bool else kind
            raw = os.environ[_env_name(field.name)]
            try:
                value = converter(raw)
            except ValueError as exc:
                raise ValueError(f"{_env_name(field.name)}={raw!r}: {exc}") from exc
        if value is not None:
            values[field.name] = value
    values.update(overrides)
    return cls(**values)
