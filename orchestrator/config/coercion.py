"""Input values -> the schema's field types: what YAML and ``key=value`` overrides give becomes typed.

Why a converter of its own: a CLI override is always text, and YAML 1.1 reads ``4e-3`` as a string, so
``train.lr=4e-3`` must become a float and ``run.use_gpu=auto`` a literal; what cannot be converted
losslessly (``train.epochs=2.5``) is a problem line that names the type and an example, and an unknown
name suggests the nearest valid one. The field types are the dataclass annotations of
:mod:`orchestrator.config.schema`, so a new field needs no edit here.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Mapping
from typing import Any

import yaml

from orchestrator.config.schema import MODEL_ALIASES, SECTIONS, setting_names

__all__ = ["typed_values"]

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(section_cls: type) -> dict[str, Any]:
    if section_cls not in _HINTS:
        _HINTS[section_cls] = typing.get_type_hints(section_cls)
    return _HINTS[section_cls]


def _describe(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if len(args) > 1:  # a union such as ``bool | Literal["auto"]``
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {args[0].__name__}" if args else "a list"
    if args and origin is not list:
        inner = _describe(args[0])
        return f"{inner} or null" if type(None) in typing.get_args(tp) else inner
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Convert ``value`` to the annotated type; raise TypeError when it cannot be done losslessly."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner)
    if origin is typing.Literal:
        if value in args:
            return value
        raise TypeError
    if len(args) > 1 and origin is not list:  # a union: the first member that takes the value
        for member in args:
            try:
                return _coerce(value, member)
            except (TypeError, ValueError):
                continue
        raise TypeError
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [_coerce(v, args[0]) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise TypeError
    if tp is int:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            number = float(value)
            if number.is_integer():
                return int(number)
        raise TypeError
    if tp is float:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value)  # accepts "4e-3", which YAML 1.1 reads as a string
        raise TypeError
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError
    raise TypeError


def _unknown_problem(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    known = [*setting_names(), *MODEL_ALIASES]
    close = [n for n in known if n.endswith("." + leaf)][:1]  # right field, wrong section
    if not close:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid sections: {list(SECTIONS)}"
    return f"{name}: unknown setting{hint}"


def _example(cls: type, leaf: str) -> Any:
    default = cls()
    return getattr(default, leaf)


def typed_values(flat: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``{"section.field": value}`` of alias-free input -> the values converted to their fields' types.

    Returns:
        The converted values, and one problem line per name that is no setting (with the nearest valid
        one) or value that does not convert (with the type and an example); those are left out of the
        values.
    """
    values: dict[str, Any] = {}
    problems: list[str] = []
    for name, value in flat.items():
        section, _, leaf = str(name).partition(".")
        cls = SECTIONS.get(section)
        if cls is None or leaf not in _hints(cls):
            problems.append(_unknown_problem(str(name)))
            continue
        tp = _hints(cls)[leaf]
        try:
            values[str(name)] = _coerce(value, tp)
        except (TypeError, ValueError):
            problems.append(f"{name}={value!r}: must be {_describe(tp)}; fix the type, e.g. "
                            f"{name}={_example(cls, leaf)!r}")
    return values, problems
