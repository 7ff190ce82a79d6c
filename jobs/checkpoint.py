"""Training checkpoints: what a run needs to continue exactly where it stopped.

A checkpoint is a directory (what Ray Train persists) holding `checkpoint.pt` and, written
last, `complete.json`. `checkpoint.pt` is `torch.save` of
    {"model_args": dict, "model": unwrapped state_dict, "optimizer": ..., "scheduler": ...,
     "step": int, "rng": {...}, "data": {"start_step": int, "seed": int}, "config": dict}
so `MAST.from_state(state)` rebuilds the model (the format `jobs.tracking.load_model` reads).

A directory without its completion marker, or whose file does not unpickle, is corrupt: it is
recorded (a warning, and once a line in `corrupt_checkpoints.jsonl` beside it) and skipped,
and the next candidate is tried (`load_first_readable`; `jobs.stage_dir` lists the
candidates: the next older checkpoint of the same stage).
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from model import MASTConfig
from storage import atomic_write

log = logging.getLogger(__name__)

STATE_FILE = "checkpoint.pt"
MARKER_FILE = "complete.json"
CORRUPT_LOG = "corrupt_checkpoints.jsonl"


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or does not fit the current config; the message says why."""


class NoReadableCheckpoint(CheckpointError):
    """Every checkpoint of a run directory is corrupt (each one recorded); `skipped` lists them."""

    def __init__(self, message: str, skipped: list[str]):
        super().__init__(message)
        self.skipped = skipped


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP / torch.compile wrappers (its state_dict keys have no prefix)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    step: int,
    config: dict[str, Any],
    data_position: dict[str, Any],
    metrics: dict[str, float] | None = None,
) -> Path:
    """Write a complete checkpoint into `directory` (atomic file, marker last); return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bare = unwrap(model)
    state = {
        "model_args": dict(getattr(bare, "model_args", {})),
        "model": {k: v.detach().cpu() for k, v in bare.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "rng": rng_state(),
        "data": dict(data_position),
        "config": config,
        "metrics": dict(metrics or {}),
    }
    atomic_write(str(directory / STATE_FILE), lambda f: torch.save(state, f))
    marker = {"step": int(step), "time": time.time(), "metrics": dict(metrics or {})}
    (directory / MARKER_FILE).write_text(json.dumps(marker))
    return directory


def state_path(path: str | Path) -> Path:
    """`checkpoint.pt` inside a checkpoint directory, or the file itself."""
    path = Path(path)
    return path / STATE_FILE if path.is_dir() else path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint directory (or a bare .pt file); CheckpointError if incomplete/corrupt."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir() and not (path / MARKER_FILE).exists():
        raise CheckpointError(
            f"checkpoint {path} has no {MARKER_FILE}: it was not finished (crash while writing)"
        )
    file = state_path(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CheckpointError(f"checkpoint {file} is corrupt ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "model" not in state or "model_args" not in state:
        raise CheckpointError(
            f"checkpoint {file} lacks 'model'/'model_args': not a MAST checkpoint"
        )
    return state


def check_compatible(state: dict[str, Any], model_args: dict[str, Any], source: str) -> None:
    """Raise CheckpointError naming every model argument that differs from the current config."""
    # A checkpoint written before a setting existed was trained with that setting's default.
    defaults = MASTConfig().as_args()
    saved = {**defaults, **state.get("model_args", {})}
    model_args = {**defaults, **model_args}
    keys = sorted(set(saved) | set(model_args))
    diffs = [
        f"model.{k}: checkpoint {saved.get(k)!r} != config {model_args.get(k)!r}"
        for k in keys
        if saved.get(k) != model_args.get(k)
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {source} was trained with a different model config ("
            + "; ".join(diffs)
            + "). Use the same model.* values, or start a new run (another run_name) "
            "instead of resuming."
        )


def record_corrupt(path: Path, error: Exception) -> None:
    """Warn; add a line to CORRUPT_LOG unless this checkpoint is already there (the driver's
    preflight and the worker's restore both meet it, and so does every rerun)."""
    log.warning("skipping corrupt checkpoint %s: %s", path, error)
    log_file = path.parent / CORRUPT_LOG
    entry = {"checkpoint": str(path), "error": str(error), "time": time.time()}
    try:
        if log_file.exists():
            for line in log_file.read_text().splitlines():
                try:
                    if json.loads(line).get("checkpoint") == str(path):
                        return
                except (json.JSONDecodeError, AttributeError):
                    continue  # a torn line from a killed writer
        with open(log_file, "a") as f:
            f.write(json.dumps(entry) + "\n")
    except OSError as e:  # the record is best effort; the warning above is already out
        log.warning("could not record corrupt checkpoint in %s: %s", log_file, e)


class ReadableCheckpoint(NamedTuple):
    """A checkpoint that loaded: its state, its directory, and the corrupt ones skipped first."""

    state: dict[str, Any]
    path: Path
    skipped: list[str]


def load_first_readable(candidates: list[Path]) -> ReadableCheckpoint:
    """The first of `candidates` that loads, each corrupt one before it recorded and skipped.

    Which checkpoints to try, in which order, is the stage directory's choice
    (`jobs.stage_dir.StageDir`). Raises NoReadableCheckpoint if none loads: the caller decides
    between starting afresh and an error that names the fix.
    """
    skipped: list[str] = []
    for path in candidates:
        try:
            return ReadableCheckpoint(load_checkpoint(path), path, skipped)
        except CheckpointError as e:
            record_corrupt(path, e)
            skipped.append(str(path))
    where = candidates[0].parent if candidates else Path(".")
    raise NoReadableCheckpoint(
        f"no readable checkpoint in {where}: {[Path(p).name for p in skipped]} are all "
        f"corrupt (recorded in {where / CORRUPT_LOG})",
        skipped,
    )


def restore_training_state(
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    *,
    restore_rng: bool = True,
) -> int:
    """Load weights (+ optimiser, scheduler, RNG when given); return the step to continue from."""
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and state.get("rng"):
        set_rng_state(state["rng"])
    return int(state.get("step", 0))
