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
from rlhfspec.rl.typed import UNIONS, coerce


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A Config from a YAML file (sections named as Config's fields) and `--section.key value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RlhfspecError(f"config file {p} does not exist.")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise RlhfspecError(f"{p} is not valid YAML: {_yaml_problem(e)}.") from None
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
        if values is not None and not isinstance(values, dict):
            raise RlhfspecError(f"{source}: section {section} must be a mapping of settings (key: value), not {values!r}.")
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
        value = _parse(value, hints[parts[1]], dotted)
    setattr(section, parts[1], coerce(value, hints[parts[1]], dotted, source))


def _parse(text: str, hint: Any, dotted: str) -> Any:
    """A command-line value as YAML reads it; for a text setting the text itself (YAML would read
    `010` as 8 and `0x10` as 16), or None for null where the setting may be null."""
    if hint is str or (typing.get_origin(hint) in UNIONS and set(typing.get_args(hint)) == {str, type(None)}):
        return None if hint is not str and text.strip().lower() in ("null", "none", "~") else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RlhfspecError(f"command line: --{dotted} {text!r} cannot be read as a value ({_yaml_problem(e)}).") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's complaint in one line, with the line and column it points at."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


_UNIONS = (typing.Union, getattr(__import__("types"), "UnionType", None))
