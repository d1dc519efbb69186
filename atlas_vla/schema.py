"""Typed dataclass configs <-> plain dicts: the one converter every config goes through.

YAML files, command-line overrides, a saved policy's `config.json` and a sweep's parameters all
arrive as plain nested dicts. `from_dict` turns them into the dataclass that describes them,
checking every key (an unknown one fails with the closest valid name) and converting every value
to its field's annotated type the way YAML users expect (`"1e-4"` is a float, `"true"` a bool).
A dataclass that renamed a key lists it in `RENAMED_KEYS = {"old": "new"}`: the old spelling keeps
working (files and flags users already have) with a `RenamedWarning` naming the new one. This module imports nothing heavy, so reading a config never loads torch or datasets.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
import warnings
from typing import Any, Literal, Mapping, Sequence


class RenamedWarning(FutureWarning):
    """A config key or command-line flag was used under its old name (it still works)."""


def warn_renamed(old: str, new: str) -> None:
    """Tell the user that `old` is now called `new`."""
    warnings.warn(f"{old} is deprecated: use {new}", RenamedWarning, stacklevel=3)


def print_renames_as_one_line() -> None:
    """For command-line entry points: show a `RenamedWarning` as one line (`RenamedWarning: ...`) instead
    of Python's file:line + source-line format; every other warning keeps the standard format."""
    standard = warnings.formatwarning

    def formatwarning(message: Any, category: type, *args: Any, **kwargs: Any) -> str:
        if issubclass(category, RenamedWarning):
            return f"{category.__name__}: {message}\n"
        return standard(message, category, *args, **kwargs)

    warnings.formatwarning = formatwarning


def suggest(name: str, candidates: Sequence[str]) -> str:
    """` (did you mean 'x'?)` for the closest of `candidates`, or an empty string."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def from_dict(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Build dataclass `cls` from a (nested) mapping, checking every key and value type.

    `where` names the mapping in error messages (`config.training`, `model`, a file path).
    """
    if not isinstance(values, Mapping):
        raise ValueError(f"{where} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    renamed = getattr(cls, "RENAMED_KEYS", {})
    kwargs = {}
    for key, value in values.items():
        if key in renamed:
            if renamed[key] in values:
                raise ValueError(f"{where} sets both {key} and {renamed[key]} (its new name): keep only {renamed[key]}")
            warn_renamed(f"{where}.{key}", f"{where}.{renamed[key]}")
            key = renamed[key]
        if key not in known:
            raise ValueError(f"unknown key {where}.{key}{suggest(key, known)}; valid keys: {known}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a dataclass config (for YAML/JSON and the tracker)."""
    return dataclasses.asdict(config)


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (lists become strings, so every tracker can show them)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of dataclass `cls` and of its nested dataclasses, dotted (`training.seed`)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        nested = next((a for a in (annotation, *typing.get_args(annotation)) if dataclasses.is_dataclass(a)), None)
        keys.append(prefix + f.name)
        if nested is not None:
            keys.extend(dotted_keys(nested, f"{prefix}{f.name}."))
    return keys


def renamed_dotted_keys(cls: type, prefix: str = "") -> dict[str, str]:
    """Every old dotted key of `cls` and its nested dataclasses -> its new dotted key."""
    renamed = {f"{prefix}{old}": f"{prefix}{new}" for old, new in getattr(cls, "RENAMED_KEYS", {}).items()}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        nested = next((a for a in (annotation, *typing.get_args(annotation)) if dataclasses.is_dataclass(a)), None)
        if nested is not None:
            renamed.update(renamed_dotted_keys(nested, f"{prefix}{f.name}."))
    return renamed


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field annotation, converting strings/ints the way YAML users expect."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        return from_dict(annotation, value, where)
    if origin in (list, Sequence) or annotation is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off", "y", "n"):
            return value.lower() in ("true", "1", "yes", "on", "y")
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{where} must be an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ValueError(f"{where} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value
