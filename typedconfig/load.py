"""Building a config: dataclass defaults < a base dict < a YAML file < `key=value` overrides.

Dotted keys reach nested sections (`model.width=32`); values are read as YAML
(`optim.betas=[0.9,0.99]`), converted to the field types and validated before any work
starts (typedconfig.convert).

    cfg = load_config(TrainConfig, "configs/train/pretrain.yaml", ["optim.lr=3e-4"])
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from typedconfig.convert import build
from typedconfig.errors import ConfigError
from typedconfig.export import to_plain

T = TypeVar("T")


def from_dict(cls: type[T], values: dict[str, Any] | None) -> T:
    """Build and validate a config from a (possibly nested) plain dict."""
    return build(cls, dict(values or {}))


def parse_override(text: str) -> tuple[list[str], Any]:
    """ "optim.lr=1e-4" -> (["optim", "lr"], 0.0001); the value is read as YAML."""
    if "=" not in text:
        hint = ""
        if os.path.exists(text):  # the shell expanded an unquoted glob into more paths
            hint = "; it is a path: quote globs so that the shell does not expand them"
        raise ConfigError(f"override {text!r} must look like key=value (e.g. optim.lr=1e-4){hint}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def set_path(base: dict[str, Any], path: list[str], value: Any) -> None:
    """base[path[0]][path[1]]... = value, creating the mappings on the way."""
    node = base
    for part in path[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[path[-1]] = value


def deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge `update` into `base` recursively (mappings merge, anything else replaces)."""
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file; ConfigError naming the file if there is none."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (configs live under configs/)")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    base: dict[str, Any] | None = None,
) -> T:
    """Defaults < `base` dict < YAML file at `path` < `key=value` overrides; validated."""
    values: dict[str, Any] = {}
    if base:
        deep_update(values, to_plain(base))
    if path is not None:
        deep_update(values, read_yaml(path))
    for text in overrides:
        keys, value = parse_override(text)
        set_path(values, keys, value)
    return from_dict(cls, values)


def replace(cfg: T, **changes: Any) -> T:
    """A validated copy with some top-level fields changed."""
    new = dataclasses.replace(cfg, **changes)
    validate = getattr(new, "validate", None)
    if callable(validate):
        validate()
    return new
