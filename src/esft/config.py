"""Typed configs: one dataclass per concern, YAML files as saved arguments, ``key=value`` overrides.

``build_config(TrainConfig, "train.yaml", ["lr=3e-5", "steps=20"])`` reads the YAML, applies the
overrides (values parsed as YAML scalars), rejects unknown keys by name and checks types, and
the dataclass's ``__post_init__`` validates values.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


def _check_type(cls, name: str, value, hint):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(hint)):
            return value
        errors = []
        for a in args:  # the first alternative the value fits
            try:
                return _check_type(cls, name, value, a)
            except ConfigError as e:
                errors.append(e)
        if len(args) > 1:
            kinds = " or ".join(_kind(a) for a in args)
            raise ConfigError(f"{cls.__name__}.{name} must be {kinds}, got {type(value).__name__} {value!r}")
        raise errors[0]
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{cls.__name__}.{name} must be a list, e.g. [a, b], got {value!r}")
        (inner,) = typing.get_args(hint)
        return [_check_type(cls, f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # 3 -> 3.0 loses nothing; the other way round (3.5 -> 3) is refused below
    # Strict: no str -> bool/number and no bool -> int (a quoted "false" is a string, and true is not 1)
    wrong = not isinstance(value, hint) or (hint in (int, float) and isinstance(value, bool))
    if hint in (int, float, str, bool, list, dict) and wrong:
        raise ConfigError(f"{cls.__name__}.{name} must be {_kind(hint)}, got {type(value).__name__} {value!r}")
    return value


def _kind(hint) -> str:
    hint = typing.get_origin(hint) or hint
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(hint, getattr(hint, "__name__", str(hint)))


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that 3e-5 (no dot) is a number, as in YAML 1.2 and JSON."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(text: str):
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def from_dict(cls, data: dict, source: str = "config"):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _check_type(cls, k, v, hints[k]) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None


def parse_overrides(overrides: list[str]) -> dict:
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        out[key.strip()] = load_yaml(raw) if raw != "" else None
    return out


def build_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    data: dict = {}
    if path is not None:
        try:
            data = load_yaml(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value")
    data.update(parse_overrides(overrides or []))
    return from_dict(cls, data, source=str(path or "overrides"))


def to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def field_help(cls) -> str:
    """One line per field: name, default, and the comment from the dataclass's ``help`` metadata."""
    lines = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        lines.append(f"  {f.name:<24} default {default!r:<14} {f.metadata.get('help', '')}")
    return "\n".join(lines)
