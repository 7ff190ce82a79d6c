"""Training checkpoints: what a run needs to continue exactly where it stopped, in files that
load without running any code.

A checkpoint is a directory (what Ray Train persists) holding
- `checkpoint.pt`: `torch.save` of
      {"model_args": dict, "model": unwrapped state_dict, "optimizer": ..., "scheduler": ...,
       "step": int, "rng": {...}, "data": {"start_step": int, "seed": int}, "config": dict,
       "metrics": dict}
  with nothing but tensors, numbers, strings and containers in it (numpy's RNG state too: its
  MT19937 key is a uint32 tensor), so that it loads with `torch.load(weights_only=True)`;
  `MAST.from_state(state)` rebuilds the model (the format `jobs.registry.load_model` reads);
- the files its writer adds (a stage's final checkpoint: `jobs.stage_dir.final_files`);
- `complete.json`, written last: {"format": 2, "step", "time", "metrics", "files": {name:
  {"sha256", "size"}}}. Every file is written atomically before it, so a kill -9 at any point
  of a save leaves a directory that is complete, or one without its marker.

The directory may be an object-store URL (`storage.as_location`): its files are uploaded one
PUT each, the marker last, and read back as bytes; nothing else differs.

Reading verifies every file against the marker. A directory without its marker, a file whose
size or sha256 differs, or one that does not load is corrupt: recorded (a warning, and once a
line in `corrupt_checkpoints.jsonl` beside it) and skipped, and the next candidate is tried
(`load_first_readable`; `jobs.stage_dir` lists the candidates: the next older checkpoint of the
same stage). A file holding more than tensors is never unpickled (`jobs.tensor_files`): the
error names it and the command that converts a trusted one written before this format
(`python -m jobs.checkpoint convert PATH`, `jobs.checkpoint_convert`). An I/O error while
reading is not corruption: retried, then `CheckpointReadError`, never skipped. Markers without
"files" (written before the hashes) are read unverified.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from jobs.tensor_files import (
    CheckpointError,
    CheckpointReadError,
    file_record,
    kill_hook,
    load_tensors,
    read_bytes,
    tensor_bytes,
    write_file,
)
from model import MASTConfig
from storage import Location, append_text, as_location

log = logging.getLogger(__name__)

STATE_FILE = "checkpoint.pt"
MARKER_FILE = "complete.json"
CORRUPT_LOG = "corrupt_checkpoints.jsonl"
MARKER_FORMAT = 2  # 1 (no "format" key): a marker without the files' hashes


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


def numpy_rng_tensors(state: tuple) -> dict[str, Any]:
    """`np.random.get_state()` (a tuple holding an ndarray) as tensors and numbers."""
    name, key, pos, has_gauss, cached_gaussian = state
    return {
        "bit_generator": str(name),
        "key": torch.from_numpy(np.array(key, dtype=np.uint32)),  # (624,) MT19937 words
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": numpy_rng_tensors(np.random.get_state()),
        "python": random.getstate(),  # (version, tuple of ints, None): plain values
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        numpy = (
            numpy["bit_generator"], numpy["key"].numpy(), numpy["pos"], numpy["has_gauss"],
            numpy["cached_gaussian"],
        )  # fmt: skip
    np.random.set_state(numpy)
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    directory: str | Location,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    step: int,
    config: dict[str, Any],
    data_position: dict[str, Any],
    metrics: dict[str, float] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    kill: Callable[[str], None] | None = None,
) -> Location:
    """Write a complete checkpoint into `directory`: `checkpoint.pt` and `extra_files` ({name:
    content}) atomically, then the marker with their hashes; return the directory."""
    directory = as_location(directory)
    kill = kill or kill_hook(step)
    directory.mkdir(parents=True, exist_ok=True)
    # A marker left by an earlier save into this directory must not vouch for the new files.
    (directory / MARKER_FILE).unlink(missing_ok=True)
    bare = unwrap(model)
    # Python numbers only: a numpy float (a float subclass) would pickle as a numpy object.
    metrics = {
        k: v if type(v) in (int, float, str) else float(v) for k, v in (metrics or {}).items()
    }
    state = {
        "model_args": dict(getattr(bare, "model_args", {})),
        "model": {k: v.detach().cpu() for k, v in bare.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "rng": rng_state(),
        "data": dict(data_position),
        "config": config,
        "metrics": metrics,
    }
    files = {STATE_FILE: tensor_bytes(state), **(extra_files or {})}
    for name, data in files.items():
        write_file(directory / name, data, kill)
    marker = {
        "format": MARKER_FORMAT, "step": int(step), "time": time.time(), "metrics": metrics,
        "files": {name: file_record(data) for name, data in files.items()},
    }  # fmt: skip
    write_file(directory / MARKER_FILE, json.dumps(marker).encode(), kill)
    return directory


def read_marker(directory: Location) -> dict[str, Any]:
    file = directory / MARKER_FILE
    try:
        marker = json.loads(read_bytes(file))
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {directory} has no {MARKER_FILE}: it was not finished (crash while "
            "writing)"
        ) from None
    except ValueError as e:  # not JSON (or not UTF-8): a marker of old code torn by a kill
        raise CheckpointError(f"checkpoint {file} is corrupt ({e})") from e
    files = marker.get("files", {}) if isinstance(marker, dict) else None
    if not isinstance(files, dict) or not all(isinstance(f, dict) for f in files.values()):
        raise CheckpointError(f"checkpoint {file} is corrupt (not a {MARKER_FILE} marker)")
    return marker


def read_checkpoint_file(directory: Location, name: str, marker: dict[str, Any]) -> bytes:
    """The bytes of `name` in a checkpoint directory, checked against the marker's record."""
    listed = marker.get("files")
    if listed is not None and name not in listed:
        raise CheckpointError(f"checkpoint {directory} has no {name} ({MARKER_FILE} lists none)")
    try:
        data = read_bytes(directory / name)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {directory} is corrupt: it has no {name}") from None
    if listed is not None:
        want, got = listed[name], file_record(data)
        if (want.get("size"), want.get("sha256")) != (got["size"], got["sha256"]):
            raise CheckpointError(
                f"checkpoint {directory / name} is corrupt: {got['size']} bytes with sha256 "
                f"{got['sha256'][:16]}..., {MARKER_FILE} recorded {want.get('size')} bytes "
                f"with sha256 {str(want.get('sha256'))[:16]}..."
            )
    return data


def load_checkpoint_file(checkpoint: str | Location, name: str) -> Any:
    """One torch file of a complete checkpoint directory, verified, loaded tensors-only."""
    directory = as_location(checkpoint)
    data = read_checkpoint_file(directory, name, read_marker(directory))
    return load_tensors(data, directory / name, directory)


def load_checkpoint(path: str | Location) -> dict[str, Any]:
    """Read a checkpoint directory (or a bare .pt file); CheckpointError if incomplete/corrupt.

    Every file the marker lists is verified and every torch file among them loads tensors-only
    (a stage's final example too): a checkpoint is readable only as a whole.
    """
    path = as_location(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        marker = read_marker(path)
        state = None
        for name in marker.get("files", [STATE_FILE]):
            data = read_checkpoint_file(path, name, marker)
            if name == STATE_FILE:
                state = load_tensors(data, path / name, path)
            elif name.endswith(".pt"):  # tensors-only too, or the checkpoint is unreadable
                load_tensors(data, path / name, path)
        file = path / STATE_FILE
    else:
        file = path
        try:
            state = load_tensors(read_bytes(path), path)
        except FileNotFoundError as e:  # removed since the check above
            raise CheckpointError(f"checkpoint {path} does not exist") from e
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


def record_corrupt(path: Location, error: Exception) -> None:
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
        append_text(log_file, json.dumps(entry) + "\n")
    except OSError as e:  # the record is best effort; the warning above is already out
        log.warning("could not record corrupt checkpoint in %s: %s", log_file, e)


class ReadableCheckpoint(NamedTuple):
    """A checkpoint that loaded: its state, its directory, and the corrupt ones skipped first."""

    state: dict[str, Any]
    path: Location
    skipped: list[str]


def load_first_readable(
    candidates: list[Location], check: Callable[[dict[str, Any], Location], None] | None = None
) -> ReadableCheckpoint:
    """The first of `candidates` that loads (and passes `check`, which raises CheckpointError
    for one that loads but is incomplete), each corrupt one before it recorded and skipped.

    Which checkpoints to try, in which order, is the stage directory's choice
    (`jobs.stage_dir.StageDir`). Raises NoReadableCheckpoint if none loads: the caller decides
    between starting afresh and an error that names the fix. A CheckpointReadError (I/O, not
    the file) is raised as it is: falling back from a good checkpoint would lose steps.
    """
    skipped: list[str] = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
            if check is not None:
                check(state, path)
            return ReadableCheckpoint(state, path, skipped)
        except CheckpointReadError:
            raise
        except CheckpointError as e:
            record_corrupt(path, e)
            skipped.append(str(path))
    where = candidates[0].parent if candidates else Path(".")
    raise NoReadableCheckpoint(
        f"no readable checkpoint in {where}: {[as_location(p).name for p in skipped]} are all "
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


if __name__ == "__main__":  # python -m jobs.checkpoint convert PATH [PATH ...]
    from jobs.checkpoint_convert import cli

    sys.exit(cli())
