"""Typed configuration values: convert what YAML or ``--set`` gives into each field's declared type.

YAML reads ``3e-4`` as a string and ``8.5`` as a float, and ``--set model.depth=two`` gives a string:
every value is converted to its field's type (``int``, ``float``, ``bool``, ``str``, tuples of those,
``X | None``) or rejected with one line that names the key, the value and the expected type.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing

from .errors import UserError

__all__ = ["ConfigError", "coerce", "coerce_fields"]

_TRUE, _FALSE, _NONE = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("none", "null", "~", "")


class ConfigError(UserError):
    """A configuration value of the wrong type or an unknown key."""


def _describe(annotation) -> str:
    args = typing.get_args(annotation)
    if _is_optional(annotation):
        inner = [a for a in args if a is not type(None)]
        return f"{' or '.join(_describe(a) for a in inner)} or null"
    if typing.get_origin(annotation) is tuple:
        return f"a list of {_describe(args[0])}" if args else "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def _is_optional(annotation) -> bool:
    origin = typing.get_origin(annotation)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def coerce(value, annotation, key: str):
    """``value`` converted to ``annotation``; raises :class:`ConfigError` naming ``key``."""
    def fail(reason: str = ""):
        raise ConfigError(f"{key}: {value!r} is not {_describe(annotation)}{reason}")

    if _is_optional(annotation):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return coerce(value, inner[0], key) if len(inner) == 1 else value
    origin = typing.get_origin(annotation)
    if origin is tuple:
        args = typing.get_args(annotation)
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            fail()
        if args and args[-1] is not Ellipsis and len(args) != len(items):
            fail(f" (expected {len(args)} values)")
        return tuple(coerce(v, args[0] if args else typing.Any, f"{key}[{i}]") for i, v in enumerate(items))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        fail()
    if annotation is int:
        if isinstance(value, bool):
            fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            if value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: {value!r} must be an integer")
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                fail()
            if not number.is_integer():
                raise ConfigError(f"{key}: {value!r} must be an integer")
            return int(number)
        fail()
    if annotation is float:
        if isinstance(value, bool):
            fail()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                fail()
            if math.isnan(number):
                fail(" (NaN)")
            return number
        fail()
    if annotation is str:
        if isinstance(value, str):
            return value
        fail()
    return value  # other types (nested records) are checked by their own constructors


def coerce_fields(cls, values: dict, section: str, extra: dict | None = None) -> dict:
    """Convert every entry of ``values`` to the type of ``cls``'s field of that name.

    ``extra`` declares keys that are not fields (e.g. a model's ``name``). Unknown keys raise.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping of options, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    declared = {f.name: hints[f.name] for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else dict(hints)
    declared.update(extra or {})
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise ConfigError(f"{section}: unknown option(s) {unknown}; known: {sorted(declared)}")
    return {k: coerce(v, declared[k], f"{section}.{k}") for k, v in values.items()}
