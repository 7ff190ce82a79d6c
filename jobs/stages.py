"""The stage protocol of a training run: resume or skip only on the same data and model
config, chain each stage from the previous one's final checkpoint, register what finishes."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from jobs.checkpoint import (
    CheckpointError,
    NoReadableCheckpoint,
    check_compatible,
    load_latest_valid,
)
from jobs.ray_fit import run_stage
from jobs.registry import load_state, register_stage
from jobs.stage_dir import DATA_FILE, DONE_FILE, latest_checkpoint, stage_dir
from jobs.tracking import StageRuns, finish_run, log_dataset, set_tag
from jobs.train_config import TrainConfig
from jobs.train_data import DataInfo, data_tags
from jobs.train_loop import EXAMPLE_INPUT_FILE
from storage import atomic_write_bytes
from typedconfig import ConfigError

log = logging.getLogger("jobs.train")


def check_same_data(cfgs: list[TrainConfig], run_name: str, data: DataInfo) -> None:
    """Refuse to resume, or to skip as finished, a stage of `run_name` that started on other
    data: its checkpoints and registered model say which data they learnt from."""
    for cfg in cfgs:
        path = stage_dir(cfg, run_name) / DATA_FILE
        if not path.exists():
            continue
        recorded = json.loads(path.read_text())
        if recorded["data_hash"] != data.content_hash:
            latest = latest_checkpoint(path.parent)
            skipped = (
                f" with {len(data.skipped)} corrupt shards skipped: {data.skipped}"
                if data.skipped
                else ""
            )
            raise ConfigError(
                f"run {run_name!r} stage {cfg.stage} started on data {recorded['data']} "
                f"(content hash {recorded['data_hash'][:12]}, {path}), not on --data "
                f"{data.uri} ({data.content_hash[:12]}{skipped}): give that data to resume it, "
                "or a new --run-name to train on this data"
                + (f" (checkpoint.init_from={latest} starts from its weights)" if latest else "")
            )


def check_finished_stages(cfgs: list[TrainConfig], run_name: str) -> None:
    """A finished stage is reused as it is: refuse it under another model config, as a resume
    is refused, before any MLflow run is touched. Other changes (schedule, optim, ...) leave
    it finished (setup_runs warns about each changed param)."""
    for cfg in cfgs:
        done_file = stage_dir(cfg, run_name) / DONE_FILE
        if not done_file.exists():
            continue
        final = json.loads(done_file.read_text())["checkpoint"]
        try:
            state, used, _ = load_latest_valid(final)
        except NoReadableCheckpoint:
            continue  # nothing to compare; chaining from it names the fix
        check_compatible(
            state,
            cfg.model.as_args(),
            f"{used} (stage {cfg.stage} of run {run_name!r}, finished: {done_file})",
        )


def preflight_checkpoints(cfg: TrainConfig, run_dir: Path, tracking_uri: str) -> None:
    """Refuse a resume or init checkpoint from another model config before workers start."""
    model_args = cfg.model.as_args()
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        try:
            state, used, _ = load_latest_valid(latest)
        except NoReadableCheckpoint as e:  # e.g. killed while writing the first checkpoint
            start = cfg.checkpoint.init_from or "scratch"
            log.warning("stage %s: %s; it starts afresh from %s", cfg.stage, e, start)
        else:
            check_compatible(state, model_args, str(used))
            return
    if cfg.checkpoint.init_from:
        from mlflow.exceptions import MlflowException

        try:
            state = load_state(cfg.checkpoint.init_from, tracking_uri)
        except (OSError, CheckpointError, MlflowException) as e:  # the registry's: no such model
            raise CheckpointError(
                f"checkpoint.init_from={cfg.checkpoint.init_from!r}: {e}; give a readable "
                "checkpoint directory or a models:/ URI"
            ) from e
        check_compatible(state, model_args, cfg.checkpoint.init_from)


def readable_final(previous: str, stage: str, run_name: str) -> tuple[str, list[str]]:
    """The previous stage's final checkpoint, or the newest readable one beside it if that is
    corrupt (recorded); returns (path, [corrupt paths skipped])."""
    try:
        _, used, skipped = load_latest_valid(previous)
    except NoReadableCheckpoint as e:
        done_file = Path(previous).parent / DONE_FILE
        raise CheckpointError(
            f"stage {stage} of run {run_name!r} left nothing to start the next stage from: {e}. "
            f"Rerun {stage} (delete {done_file}) or pass checkpoint.init_from=<checkpoint dir "
            "or models:/ URI>"
        ) from e
    if skipped:
        log.warning("stage %s: final checkpoint %s is corrupt; using %s", stage, previous, used)
    return str(used), skipped


def train_stages(
    cfgs: list[TrainConfig],
    run_name: str,
    data: DataInfo,
    uri: str,
    runs: StageRuns,
    ended: set[str],
) -> dict[str, Any]:
    """Each stage in turn, from the previous one's final checkpoint; finished ones skipped."""
    for c in cfgs:
        child = runs.child_run_ids[c.stage]
        log_dataset(uri, child, data.uri, data.content_hash, data.num_samples, data_tags(data))
    outputs: dict[str, Any] = {}
    previous: str | None = None
    previous_stage = ""
    for cfg in cfgs:
        run_dir = stage_dir(cfg, run_name)
        done_file = run_dir / DONE_FILE
        child = runs.child_run_ids[cfg.stage]
        if done_file.exists():
            outputs[cfg.stage] = json.loads(done_file.read_text())
            previous, previous_stage = outputs[cfg.stage]["checkpoint"], cfg.stage
            ended.add(child)
            log.info("stage %s already finished (%s); skipping", cfg.stage, done_file)
            continue
        if previous and not cfg.checkpoint.init_from:
            init_from, skipped = readable_final(previous, previous_stage, run_name)
            if skipped:
                set_tag(uri, child, "init_from_corrupt_skipped", ",".join(skipped))
            cfg = dataclasses.replace(
                cfg, checkpoint=dataclasses.replace(cfg.checkpoint, init_from=init_from)
            )
        preflight_checkpoints(cfg, run_dir, uri)
        if not (run_dir / DATA_FILE).exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            record = {
                "data": data.uri,
                "data_hash": data.content_hash,
                "skipped_shards": data.skipped,
            }
            atomic_write_bytes(str(run_dir / DATA_FILE), json.dumps(record).encode())
        log.info(
            "stage %s: %d steps on %d workers -> %s",
            cfg.stage,
            cfg.schedule.steps,
            cfg.scaling.num_workers,
            run_dir,
        )
        final, metrics = run_stage(cfg, run_name, data, uri, child)
        version = register(cfg, final, run_name, data, uri, child) if cfg.mlflow.register else None
        finish_run(uri, child)
        ended.add(child)
        outputs[cfg.stage] = {
            "checkpoint": str(final),
            "version": version,
            "metrics": metrics,
            "run_id": child,
        }
        done_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(str(done_file), json.dumps(outputs[cfg.stage], default=str).encode())
        previous, previous_stage = str(final), cfg.stage
    return outputs


def register(cfg: TrainConfig, final: Path, run_name: str, data: DataInfo, uri: str, run_id: str):
    state, _, _ = load_latest_valid(final)
    example_input = torch.load(final / EXAMPLE_INPUT_FILE, map_location="cpu", weights_only=True)
    return register_stage(
        cfg, state, example_input, run_name=run_name, data_hash=data.content_hash, uri=uri,
        run_id=run_id,
    )  # fmt: skip
