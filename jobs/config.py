"""Typed, frozen configuration shared by every job.

Every job's settings are a frozen dataclass. A config is built from (in order of precedence):
dataclass defaults < a YAML file < `key=value` overrides from the command line (dotted keys
reach nested sections: `model.width=32`). Values are validated before any work starts; an
error names the bad key and the allowed keys or values. The resolved config is saved with
every run and every checkpoint (`to_dict`), and logged to MLflow flattened (`flatten`).

    cfg = load_config(TrainConfig, "configs/train/pretrain.yaml", ["optim.lr=3e-4"])
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message says which and what is allowed."""


def choice(value: Any, allowed: typing.Iterable[Any], key: str) -> None:
    """Raise a ConfigError unless `value` is one of `allowed`."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {allowed}")


def positive(value: float, key: str, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


# ---------------------------------------------------------------------------------------------
# Conversion of plain YAML values into the annotated field types.


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{key}: cannot convert {value!r}")
    if origin is Literal:
        options = get_args(tp)
        # YAML reads `true`/`false` as booleans; a string choice such as use_gpu: auto|true|false
        # means the words.
        if isinstance(value, bool) and str(value).lower() in options:
            value = str(value).lower()
        choice(value, options, key)
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if origin in (tuple, list):
        if isinstance(value, (str, int, float)):
            value = [value] if not isinstance(value, str) else _split_list(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key} must have {len(args)} items, got {list(value)!r}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        return [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def _split_list(text: str) -> list[str]:
    text = text.strip().strip("[]")
    return [part.strip() for part in text.split(",") if part.strip()]


def _build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; allowed keys under "
            f"{prefix.rstrip('.') or cls.__name__}: {names}"
        )
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in values.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def from_dict(cls: type[T], values: dict[str, Any] | None) -> T:
    """Build and validate a config from a (possibly nested) plain dict."""
    return _build(cls, dict(values or {}))


def _parse_override(text: str) -> tuple[list[str], Any]:
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


def _merge(base: dict[str, Any], path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[path[-1]] = value


def _deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def read_yaml(path: str | Path) -> dict[str, Any]:
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
    overrides: typing.Sequence[str] = (),
    base: dict[str, Any] | None = None,
) -> T:
    """Defaults < `base` dict < YAML file at `path` < `key=value` overrides; validated."""
    values: dict[str, Any] = {}
    if base:
        _deep_update(values, to_plain(base))
    if path is not None:
        _deep_update(values, read_yaml(path))
    for text in overrides:
        keys, value = _parse_override(text)
        _merge(values, keys, value)
    return from_dict(cls, values)


def to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of the whole config (saved with runs/checkpoints)."""
    return to_plain(cfg)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`{"optim.lr": 1e-3, ...}`: one entry per leaf, for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in (to_dict(cfg) if not isinstance(cfg, dict) else cfg).items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(cfg: T, **changes: Any) -> T:
    """A validated copy with some top-level fields changed."""
    new = dataclasses.replace(cfg, **changes)
    validate = getattr(new, "validate", None)
    if callable(validate):
        validate()
    return new


def config_help(cls: type, prefix: str = "") -> str:
    """One line per key with its default, for every job's `--help` epilog."""
    lines = []
    for f in dataclasses.fields(cls):
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        if dataclasses.is_dataclass(default):
            lines.append(config_help(type(default), f"{prefix}{f.name}."))
        else:
            lines.append(f"  {prefix}{f.name} = {default!r}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Sections shared by several jobs. Job-specific sections live beside their job
# (pipeline/config.py for ingest and the loader, jobs/train_config.py, jobs/evaluate.py).


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Constructor arguments of `model.MAST` (stored in every checkpoint; see model/mast.py)."""

    width: int = 64  # ResNet-18 base width: 64 gives the paper's 5,291,648 parameters
    feat_dim: int = 64  # key/query dimension
    train_radius: int = 6  # short-term window radius in training (13x13)
    test_radius: int = 12  # short-term window radius at test time (25x25)
    scale: float | None = None  # affinity scale; None = 1/sqrt(feat_dim) (defect 3); 1.0 = ref code
    channel_dropout: Literal["reference", "paper", "none"] = "reference"
    long_term_gap: int = 15  # references more than this many frames back use ROI localisation
    coarse_radius: int = 12  # coarse ROI search window radius (25x25)
    max_dilation: int = 4  # coarse window dilation = min(max_dilation, gap // 15 + 1)
    loss_weight: float = 20.0  # smooth-L1 on (output x 20, target x 20), as the reference code
    chunk_size: int = 0  # query positions per memory-read chunk; 0 = automatic

    def validate(self) -> None:
        for key in ("width", "feat_dim", "train_radius", "test_radius", "coarse_radius"):
            positive(getattr(self, key), f"model.{key}")
        positive(self.long_term_gap, "model.long_term_gap", allow_zero=True)
        positive(self.max_dilation, "model.max_dilation")
        positive(self.chunk_size, "model.chunk_size", allow_zero=True)
        if self.scale is not None:
            positive(self.scale, "model.scale")
