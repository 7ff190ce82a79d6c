"""The one error every config problem raises, and the two checks every section uses."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message says which and what is allowed."""


def choice(value: Any, allowed: Iterable[Any], key: str) -> None:
    """Raise a ConfigError unless `value` is one of `allowed`."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {allowed}")


def positive(value: float, key: str, *, allow_zero: bool = False) -> None:
    """Raise a ConfigError unless `value` > 0 (or >= 0 with `allow_zero`)."""
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")
