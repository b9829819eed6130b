"""Typed configs from plain data: dataclasses with type hints, every problem reported at once.

``from_dict(cls, data)`` builds dataclass ``cls`` from a mapping (a YAML section), checking every key against the
field types (``int``, ``float``, ``str``, ``bool``, ``Literal``, unions, lists, tuples, dicts, nested dataclasses)
and then each object's own ``check()``; unknown keys (with a "did you mean"), wrong types and impossible values
are collected into one :class:`~distill.errors.ConfigError`. Nothing here knows about recipes (that schema is
:mod:`distill.config`); evaluation protocols use it too.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Mapping, Sequence

import yaml

from distill.errors import ConfigError

def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists: what ``yaml.safe_dump`` writes."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


INVALID = object()  # a value that failed its type check


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, errors: list[str]) -> Any:
    """Check ``value`` against type ``tp``; return the converted value, or ``INVALID`` after recording an error."""
    origin = typing.get_origin(tp)
    bad = f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        if isinstance(value, bool):
            # YAML reads an unquoted no / off / yes / on as a boolean (mixed_precision=no arrives as False): take
            # the one choice that is spelled that way
            spelled = [a for a in typing.get_args(tp) if isinstance(a, str) and yaml.safe_load(a) is value]
            if len(spelled) == 1:
                return spelled[0]
        hint = ""
        if isinstance(value, bool):
            hint = " (YAML reads an unquoted yes / no / on / off as a boolean; quote the value)"
        errors.append(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in typing.get_args(tp))}{hint}")
        return INVALID
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            trial: list[str] = []
            out = _convert(value, a, where, trial)
            if not trial:
                return out
        errors.append(bad)
        return INVALID
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            errors.append(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
            return INVALID
        return build(tp, value, where, errors)
    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            errors.append(bad)
            return INVALID
        (a,) = typing.get_args(tp) or (Any,)
        items = [_convert(v, a, f"{where}[{i}]", errors) for i, v in enumerate(value)]
        return INVALID if any(v is INVALID for v in items) else items
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
            errors.append(bad)
            return INVALID
        if args and args[-1] is Ellipsis:
            args = (args[0],) * len(value)
        items = [_convert(v, a, f"{where}[{i}]", errors) for i, (v, a) in enumerate(zip(value, args))]
        return INVALID if any(v is INVALID for v in items) else tuple(items)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            errors.append(bad)
            return INVALID
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        errors.append(bad)
        return INVALID
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        errors.append(bad)
        return INVALID
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads 3e-4 (no dot) as a string; accept what Python reads as a number.
            try:
                return float(value)
            except ValueError:
                pass
        errors.append(bad)
        return INVALID
    if tp is str:
        if isinstance(value, str):
            return value
        errors.append(bad)
        return INVALID
    return value


def unknown_key_message(key: str, where: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{where}{'.' if where else ''}{key}: unknown key{hint}; valid keys: {', '.join(choices)}"


def build(cls: type, data: Mapping[str, Any], where: str, errors: list[str]) -> Any:
    """Build ``cls`` from ``data``, appending every problem to ``errors``.

    Returns ``INVALID`` when a value has the wrong type (nothing can be built); otherwise the object, whose
    ``check()`` value problems are recorded too, so that one pass reports every problem.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            errors.append(unknown_key_message(str(key), where, list(fields)))
            continue
        kwargs[key] = _convert(value, hints[key], f"{where}.{key}" if where else key, errors)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    errors.extend(f"{where}.{n}: required key is missing" for n in missing)
    if missing or any(v is INVALID for v in kwargs.values()):
        return INVALID
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if callable(check):
        errors.extend(f"{where}.{msg}" if where else msg for msg in check())
    return obj


def from_dict(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; raise one :class:`ConfigError` listing every problem."""
    errors: list[str] = []
    obj = build(cls, data, where, errors)
    if errors:
        raise ConfigError(errors)
    return obj
