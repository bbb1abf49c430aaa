"""Settings as their declared types take them: what a YAML file, the command line or Python gives a
config field, converted where the intent is plain and refused in one sentence where it is not."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any

from rlhfspec.errors import RlhfspecError

UNIONS = (typing.Union, types.UnionType)


def coerce(value: Any, hint: Any, dotted: str, source: str) -> Any:
    """`value` as setting `dotted` of type `hint` takes it (an int for a float, text for a number
    where YAML read one, "on"/"off" for a bool, one item for a list), or one sentence."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise RlhfspecError(f"{source}: {dotted} cannot be null.")
    if origin in UNIONS:
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, dotted, source)
            except RlhfspecError:
                continue
        raise RlhfspecError(f"{source}: {dotted} = {value!r} is not a valid {hint}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce(v, args[0], dotted, source) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise RlhfspecError(f"{source}: {dotted} needs {len(args)} values, got {value!r}.")
        return tuple(coerce(v, a, dotted, source) for v, a in zip(value, args))
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
    if hint is str and isinstance(value, (str, int, float, os.PathLike)) and not isinstance(value, bool):
        return str(value)
    raise RlhfspecError(f"{source}: {dotted} = {value!r} is not a valid {getattr(hint, '__name__', hint)}.")


def coerce_fields(section, name: str, source: str) -> None:
    """Every field of dataclass `section` (config section `name`) coerced to its declared type, in place."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        setattr(section, f.name, coerce(getattr(section, f.name), hints[f.name], f"{name}.{f.name}", source))
