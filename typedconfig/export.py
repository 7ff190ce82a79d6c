"""A config out again: as plain dicts (saved with runs and checkpoints), flattened (MLflow
params), as YAML, and as the `--help` listing of every key."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Any

import yaml


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts and tuples -> lists, recursively."""
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


def config_help(cls: type, width: int = 100) -> str:
    """Every visible key with its default and description (from the comments beside its
    field, typedconfig.describe), for a job's `--help` epilog."""
    from typedconfig.describe import key_docs

    lines = []
    for doc in key_docs(cls):
        lines.append(f"  {doc.key} = {doc.default!r}")
        text = doc.description or "(no description)"
        lines += textwrap.wrap(text, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)
