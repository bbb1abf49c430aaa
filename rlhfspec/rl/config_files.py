"""Reading a run configuration: a YAML file (sections named as Config's fields) and
`--section.key value` overrides, each value checked against its field's type."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from rlhfspec.errors import RlhfspecError
from rlhfspec.rl.config import Config


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A Config from a YAML file (sections named as Config's fields) and `--section.key value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RlhfspecError(f"config file {p} does not exist.")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise RlhfspecError(f"{p} must hold a mapping of sections (model, data, reward, generation, algorithm, train, run).")
    config = from_dict(raw, source=str(path or "defaults"))
    apply_overrides(config, overrides or [])
    return config


def from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    config = Config()
    for section, values in raw.items():
        if not hasattr(config, section):
            raise RlhfspecError(f"{source}: unknown section {section!r}; sections are {', '.join(f.name for f in dataclasses.fields(Config))}.")
        for key, value in (values or {}).items():
            _set(config, f"{section}.{key}", value, source, parse=False)
    return config


def apply_overrides(config: Config, overrides: list[str]) -> None:
    """Apply ['--section.key', 'value', ...] (or 'section.key=value') in order."""
    items = list(overrides)
    while items:
        token = items.pop(0)
        if "=" in token:
            key, value = token.split("=", 1)
        else:
            if not items:
                raise RlhfspecError(f"override {token} has no value; write --section.key value.")
            key, value = token, items.pop(0)
        _set(config, key.lstrip("-"), value, "command line", parse=True)


def _set(config: Config, dotted: str, value: Any, source: str, parse: bool) -> None:
    parts = dotted.split(".")
    if len(parts) != 2 or not hasattr(config, parts[0]):
        raise RlhfspecError(f"{source}: {dotted!r} is not section.key (sections: {', '.join(f.name for f in dataclasses.fields(Config))}).")
    section = getattr(config, parts[0])
    hints = typing.get_type_hints(type(section))
    if parts[1] not in hints:
        raise RlhfspecError(f"{source}: {parts[0]} has no setting {parts[1]!r}; it has {', '.join(hints)}.")
    if parse and isinstance(value, str):
        value = yaml.safe_load(value)
    setattr(section, parts[1], _coerce(value, hints[parts[1]], dotted, source))


def _coerce(value: Any, hint: Any, dotted: str, source: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise RlhfspecError(f"{source}: {dotted} cannot be null.")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, dotted, source)
            except RlhfspecError:
                continue
        raise RlhfspecError(f"{source}: {dotted} = {value!r} is not a valid {hint}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, args[0], dotted, source) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise RlhfspecError(f"{source}: {dotted} needs {len(args)} values, got {value!r}.")
        return tuple(_coerce(v, a, dotted, source) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("on", "off", "true", "false"):
            return value.lower() in ("on", "true")
        raise RlhfspecError(f"{source}: {dotted} must be true/false (or on/off), not {value!r}.")
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "1e-5" (no dot) as a string
        except ValueError:
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise RlhfspecError(f"{source}: {dotted} = {value!r} is not a valid {getattr(hint, '__name__', hint)}.")
