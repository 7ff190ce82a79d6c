"""Plain values (from YAML or a `key=value` override) -> the annotated type of a config field.

`convert(value, tp, key)` dispatches on the kind of `tp`: a union tries each member, a Literal
checks the allowed words, a dataclass builds a nested section, a tuple/list converts each
item, and the scalars (bool, int, float, str) accept their YAML spellings. Every failure is a
ConfigError that names the key (`model.width`, `loader.pair_gaps[1]`). A section whose keys
moved elsewhere says where in a `MOVED_KEYS` ClassVar ({old field: new dotted key}), and an old
key is refused with the new one named.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from typedconfig.errors import ConfigError, choice

T = TypeVar("T")


def convert(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp`; ConfigError naming `key` if it cannot be."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _union(value, get_args(tp), key)
    if origin is Literal:
        return _literal(value, get_args(tp), key)
    if dataclasses.is_dataclass(tp):
        return _section(value, tp, key)
    if origin in (tuple, list):
        return _sequence(value, origin, get_args(tp), key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    scalar = _SCALARS.get(tp)
    return scalar(value, key) if scalar else value


def build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """A validated `cls` from a dict of its fields (nested sections as dicts)."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    moved = getattr(cls, "MOVED_KEYS", {})  # ClassVar {old field: its new dotted key}
    for key in unknown:
        if key in moved:
            raise ConfigError(f"config key {prefix}{key} has moved: set {moved[key]} instead")
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; allowed keys under "
            f"{prefix.rstrip('.') or cls.__name__}: {names}"
        )
    obj = cls(**{k: convert(v, hints[k], prefix + k) for k, v in values.items()})
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def _union(value: Any, options: tuple[Any, ...], key: str) -> Any:
    if value is None and type(None) in options:
        return None
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return convert(value, option, key)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[-1] if errors else f"{key}: cannot convert {value!r}")


def _literal(value: Any, options: tuple[Any, ...], key: str) -> Any:
    # YAML reads `true`/`false` as booleans; a string choice such as use_gpu: auto|true|false
    # means the words.
    if isinstance(value, bool) and str(value).lower() in options:
        value = str(value).lower()
    choice(value, options, key)
    return value


def _section(value: Any, tp: type, key: str) -> Any:
    if isinstance(value, tp):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
    return build(tp, value, prefix=f"{key}.")


def _sequence(value: Any, origin: type, args: tuple[Any, ...], key: str) -> tuple | list:
    # A scalar is a one-item list; a string from the command line may be "[1, 2]" or "1,2".
    if isinstance(value, str):
        value = split_list(value)
    elif isinstance(value, (int, float)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key} must be a list, got {value!r}")
    items = [f"{key}[{i}]" for i in range(len(value))]
    if origin is list or not args or (len(args) == 2 and args[1] is Ellipsis):
        inner = args[0] if args else Any  # list[X], tuple[X, ...]
        converted = [convert(v, inner, k) for v, k in zip(value, items)]
        return converted if origin is list else tuple(converted)
    if len(args) != len(value):  # tuple[X, Y]: fixed length, one type per item
        raise ConfigError(f"{key} must have {len(args)} items, got {list(value)!r}")
    return tuple(convert(v, a, k) for v, a, k in zip(value, args, items))


def split_list(text: str) -> list[str]:
    """ "[a, b]" or "a,b" -> ["a", "b"]."""
    text = text.strip().strip("[]")
    return [part.strip() for part in text.split(",") if part.strip()]


def _to_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ConfigError(f"{key} must be true or false, got {value!r}")


def _to_int(value: Any, key: str) -> int:
    # 1e3 and "8" are integers; 2.5, True and lists are not.
    number = None
    if not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not number.is_integer():
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return int(number)


def _to_float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number, got {value!r}") from None


def _to_str(value: Any, key: str) -> str:
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return str(value)


_SCALARS: dict[type, Callable[[Any, str], Any]] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
}
