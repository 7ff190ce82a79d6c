"""Where a stage of a training run lives, and the one owner of what is in it.

`<storage_path>/<run_name>-<stage>/` (`StageDir`) holds
- `checkpoint_<step:08d>/`: Ray Train's checkpoint directories (what is inside one, and when
  it counts as complete, is `jobs.checkpoint`'s format); the stage's final one also holds
  `example_input.pt` (the first batch's first two clips, tensors only, for the registered
  example) and `rank_digests.json` (every rank's parameter digest), written with the others
  before its marker (`final_files`), so the marker's hashes cover them;
- `stage_data.json` (`StageData`): the data the stage started on, written once when it starts;
- `stage_done.json` (`StageDone`): written last, when the stage is registered;
- `corrupt_checkpoints.jsonl`: checkpoints found unreadable (`jobs.checkpoint.record_corrupt`);
- `fault_injected`: the test-only marker of `fault_at_step` (the fault is injected once).

Both the driver and the workers choose checkpoints here: the worker the one to resume from
(`resume_checkpoint`), the driver the one to register (`final_checkpoint`). The layout and
the JSON are those of every earlier version, so that a run started before resumes after.

`storage_path` may be an object-store URL (`s3://bucket/runs`, any fsspec URL): the stage
directory is then a `storage.ObjectPath`, a key prefix with the same names under it. Every
file is one atomic PUT (the marker of a checkpoint last), listing a prefix finds the
checkpoints, and nothing needs a filesystem shared by the nodes. Ray Train persists its
checkpoints there itself (through pyarrow.fs); `ray_checkpoint` maps the path Ray reports (on
its filesystem, without the URL scheme) back to the checkpoint here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from jobs.checkpoint import (
    CORRUPT_LOG,
    NoReadableCheckpoint,
    ReadableCheckpoint,
    load_checkpoint_file,
    load_first_readable,
)
from jobs.tensor_files import CheckpointError, tensor_bytes
from jobs.train_config import TrainConfig
from storage import Location, as_location, atomic_write_bytes, remove_tree
from typedconfig import ConfigError

CHECKPOINT_PREFIX = "checkpoint_"
DONE_FILE = "stage_done.json"
DATA_FILE = "stage_data.json"
EXAMPLE_INPUT_FILE = "example_input.pt"  # in the final checkpoint directory
RANK_DIGESTS_FILE = "rank_digests.json"  # in the final checkpoint directory
FAULT_MARKER = "fault_injected"


def checkpoint_name(step: int) -> str:
    """`checkpoint_00000042`: zero-padded, so names sort in step order."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_step(path: str | Location) -> int:
    """The step in a `checkpoint_<step>` directory's name; -1 for any other name."""
    name = as_location(path).name
    suffix = name.removeprefix(CHECKPOINT_PREFIX)
    digits = name.startswith(CHECKPOINT_PREFIX) and suffix.isascii() and suffix.isdigit()
    return int(suffix) if digits else -1


def example_input_file(checkpoint: str | Location) -> Location:
    return as_location(checkpoint) / EXAMPLE_INPUT_FILE


def rank_digests_file(checkpoint: str | Location) -> Location:
    return as_location(checkpoint) / RANK_DIGESTS_FILE


def final_files(
    example_input: dict[str, torch.Tensor], rank_digests: list[str]
) -> dict[str, bytes]:
    """What only a stage's final checkpoint holds, beside `jobs.checkpoint`'s files: {name:
    content}, for `save_checkpoint(extra_files=...)` to write before its marker."""
    return {
        EXAMPLE_INPUT_FILE: tensor_bytes({k: v.cpu() for k, v in example_input.items()}),
        RANK_DIGESTS_FILE: json.dumps({"rank_param_digests": rank_digests}).encode(),
    }


def read_example_input(checkpoint: str | Location) -> dict[str, torch.Tensor]:
    """The final checkpoint's example input, verified against its marker, tensors only."""
    return load_checkpoint_file(checkpoint, EXAMPLE_INPUT_FILE)


def check_final_files(state: dict[str, Any], path: Location) -> None:
    """A checkpoint of a stage's last step without its final files is incomplete.

    Written by code that added them after the marker, killed in between: every rerun would
    resume from it, find nothing left to train and fail registering it. Skipped instead (the
    stage trains its last steps again from the checkpoint before).
    """
    schedule = state.get("config", {}).get("schedule", {})
    final = isinstance(schedule, dict) and state.get("step") == schedule.get("steps")
    if final and not example_input_file(path).is_file():
        raise CheckpointError(
            f"checkpoint {path} is the stage's last but has no {EXAMPLE_INPUT_FILE}: killed "
            "before it was written"
        )


@dataclasses.dataclass(frozen=True)
class StageData:
    """The data a stage started on: resuming it, or reusing it finished, needs the same."""

    data: str  # what --data named
    data_hash: str  # its content hash, combined with the names of skipped shards
    skipped_shards: tuple[str, ...] = ()  # "shard: reason" of the corrupt shards left out

    def to_json(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "data_hash": self.data_hash,
            "skipped_shards": [*self.skipped_shards],
        }

    @classmethod
    def from_json(cls, record: dict[str, Any], source: Location) -> StageData:
        try:
            return cls(record["data"], record["data_hash"], tuple(record.get("skipped_shards", ())))
        except (KeyError, TypeError) as e:
            raise ConfigError(
                f"{source} is not a stage data record ({type(e).__name__}: {e}); delete it "
                "only if this stage's checkpoints were trained on the data you give now"
            ) from e


@dataclasses.dataclass(frozen=True)
class StageDone:
    """A finished, registered stage: a rerun reuses it and the next stage starts from it."""

    checkpoint: str  # the final checkpoint directory
    version: int | None  # the registered model version (None: mlflow.register=false)
    metrics: dict[str, Any]  # Ray's final report
    run_id: str  # the stage's MLflow run

    def as_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: that deep-copies Ray's metrics, whatever values they hold.
        return {
            "checkpoint": self.checkpoint,
            "version": self.version,
            "metrics": self.metrics,
            "run_id": self.run_id,
        }

    @classmethod
    def from_json(cls, record: dict[str, Any], source: Location) -> StageDone:
        try:
            return cls(
                str(record["checkpoint"]),
                record.get("version"),
                dict(record.get("metrics") or {}),
                str(record.get("run_id", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(
                f"{source} is not a stage done record ({type(e).__name__}: {e}); delete it to "
                "train the stage again"
            ) from e


@dataclasses.dataclass(frozen=True)
class StageDir:
    """One stage's directory of one run (module docstring)."""

    path: Location  # a local Path, or an ObjectPath under an object-store storage_path

    @classmethod
    def of(cls, cfg: TrainConfig, run_name: str) -> StageDir:
        return cls(as_location(cfg.storage_path) / f"{run_name}-{cfg.stage}")

    @property
    def is_local(self) -> bool:
        return isinstance(self.path, Path)

    @property
    def data_file(self) -> Location:
        return self.path / DATA_FILE

    @property
    def done_file(self) -> Location:
        return self.path / DONE_FILE

    @property
    def corrupt_log(self) -> Location:
        return self.path / CORRUPT_LOG

    @property
    def fault_marker(self) -> Location:
        return self.path / FAULT_MARKER

    # Checkpoint directories.

    def checkpoints(self) -> list[Location]:
        """Every `checkpoint_<step>` directory, oldest first (a file or another name is not one)."""
        if not self.path.is_dir():
            return []
        found = [p for p in self.path.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()]
        return sorted((p for p in found if checkpoint_step(p) >= 0), key=checkpoint_step)

    def newest_checkpoint(self) -> Location | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def checkpoint_path(self, step: int) -> Location:
        return self.path / checkpoint_name(step)

    def ray_checkpoint(self, ray_path: str) -> Location:
        """This stage's checkpoint at `ray_path`, a path Ray Train reports: on its storage
        filesystem, so for an object store without the URL scheme (`bucket/runs/...`)."""
        if self.is_local:
            return Path(ray_path)
        return self.path / PurePosixPath(ray_path).name

    def prune(self, keep: int) -> None:
        """Delete all but the newest `keep` checkpoints (Ray does this itself when it persists)."""
        for old in self.checkpoints()[:-keep] if keep > 0 else []:
            remove_tree(old)

    def load_readable(self, start: str | Location) -> ReadableCheckpoint:
        """`start`, or if it is corrupt the newest older checkpoint here that reads (each corrupt
        one recorded); NoReadableCheckpoint if none does."""
        start = as_location(start)
        older = [p for p in self.checkpoints() if checkpoint_step(p) < checkpoint_step(start)]
        return load_first_readable([start, *reversed(older)], check_final_files)

    def resume_checkpoint(self, restored: str | Location | None) -> ReadableCheckpoint | None:
        """The checkpoint a (re)started stage continues from: the newer of `restored` (Ray's
        record of the run) and the newest here, falling back through older readable ones.

        Ray's record can lag the disk: a job killed after a checkpoint landed, before Ray's
        snapshot recorded it (or with the snapshot lost). None: nothing to resume from;
        NoReadableCheckpoint: every candidate is corrupt (recorded).
        """
        candidates = [as_location(p) for p in (restored, self.newest_checkpoint()) if p]
        if not candidates:
            return None
        start = max(candidates, key=checkpoint_step)  # a tie keeps Ray's
        return self.load_readable(start)

    def final_checkpoint(self, reported: str | Location | None) -> Location | None:
        """The checkpoint to register when a fit ends: `reported` (Ray's result; None in local
        mode, where the newest here is the final one), unless a newer one is here that reads.

        Newer on disk than Ray's record: a job killed after the stage's last checkpoint landed,
        before Ray recorded it. The rerun's workers resumed from it at the last step and
        reported nothing, so Ray's is the older one. It is taken if it reads, else the newest
        readable one below it (Ray's, beside it here).
        """
        newest = self.newest_checkpoint()
        if reported is None:
            return newest
        reported = as_location(reported)
        if newest is None or checkpoint_step(newest) <= checkpoint_step(reported):
            return reported
        try:
            return self.load_readable(newest).path
        except NoReadableCheckpoint:
            return reported

    # Records.

    def write_data_once(self, record: StageData) -> None:
        """Record the data the stage starts on; a record already there (a resume) stays."""
        if self.data_file.exists():
            return
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(str(self.data_file), json.dumps(record.to_json()).encode())

    def read_data(self) -> StageData | None:
        record = read_record(self.data_file)
        return None if record is None else StageData.from_json(record, self.data_file)

    def write_done(self, record: StageDone) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        text = json.dumps(record.as_dict(), default=str)  # Ray's metrics may hold any value
        atomic_write_bytes(str(self.done_file), text.encode())

    def is_done(self) -> bool:
        return self.done_file.exists()

    def read_done(self) -> StageDone | None:
        record = read_record(self.done_file)
        return None if record is None else StageDone.from_json(record, self.done_file)


def read_record(path: Location) -> Any:
    """The JSON in `path`, None if there is no such file."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:  # written atomically: not torn, edited by hand
        raise ConfigError(f"{path} is not valid JSON ({e}); fix or delete it") from e


def load_latest_valid(latest: str | Location) -> ReadableCheckpoint:
    """`latest`, or the newest readable checkpoint below it in its stage directory."""
    return StageDir(as_location(latest).parent).load_readable(latest)
