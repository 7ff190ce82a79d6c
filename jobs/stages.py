"""The stage protocol of a training run: resume or skip only on the same data and model
config, chain each stage from the previous one's final checkpoint, register what finishes."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from jobs import mlflow_keys as keys
from jobs.checkpoint import CheckpointError, NoReadableCheckpoint, check_compatible
from jobs.ray_fit import run_stage
from jobs.registry import load_state, register_stage
from jobs.stage_dir import (
    StageData,
    StageDir,
    StageDone,
    checkpoint_step,
    load_latest_valid,
    read_example_input,
)
from jobs.tensor_files import kill_hook
from jobs.tracking import StageRuns, finish_run, log_dataset, set_tag
from jobs.train_config import TrainConfig
from jobs.train_data import DataInfo, data_tags
from storage import Location, as_location
from typedconfig import ConfigError

log = logging.getLogger("jobs.train")


def check_same_data(cfgs: list[TrainConfig], run_name: str, data: DataInfo) -> None:
    """Refuse to resume, or to skip as finished, a stage of `run_name` that started on other
    data: its checkpoints and registered model say which data they learnt from."""
    for cfg in cfgs:
        where = StageDir.of(cfg, run_name)
        recorded = where.read_data()
        if recorded is None:
            continue
        if recorded.data_hash != data.content_hash:
            latest = where.newest_checkpoint()
            skipped = (
                f" with {len(data.skipped)} corrupt shards skipped: {data.skipped}"
                if data.skipped
                else ""
            )
            raise ConfigError(
                f"run {run_name!r} stage {cfg.stage} started on data {recorded.data} "
                f"(content hash {recorded.data_hash[:12]}, {where.data_file}), not on --data "
                f"{data.uri} ({data.content_hash[:12]}{skipped}): give that data to resume it, "
                "or a new --run-name to train on this data"
                + (f" (checkpoint.init_from={latest} starts from its weights)" if latest else "")
            )


def check_finished_stages(cfgs: list[TrainConfig], run_name: str) -> None:
    """A finished stage is reused as it is: refuse it under another model config, as a resume
    is refused, before any MLflow run is touched. Other changes (schedule, optim, ...) leave
    it finished (setup_runs warns about each changed param)."""
    for cfg in cfgs:
        where = StageDir.of(cfg, run_name)
        done = where.read_done()
        if done is None:
            continue
        try:
            final = load_latest_valid(done.checkpoint)
        except NoReadableCheckpoint:
            continue  # nothing to compare; chaining from it names the fix
        check_compatible(
            final.state,
            cfg.model.as_args(),
            f"{final.path} (stage {cfg.stage} of run {run_name!r}, finished: {where.done_file})",
        )


def preflight_checkpoints(cfg: TrainConfig, where: StageDir, tracking_uri: str) -> None:
    """Refuse a resume or init checkpoint from another model config before workers start."""
    model_args = cfg.model.as_args()
    try:
        # What the workers will resume from, as far as the driver can tell: Ray's record of
        # the run, the other candidate, is never newer than the disk.
        resume = where.resume_checkpoint(None)
    except NoReadableCheckpoint as e:  # e.g. killed while writing the first checkpoint
        start = cfg.checkpoint.init_from or "scratch"
        log.warning("stage %s: %s; it starts afresh from %s", cfg.stage, e, start)
    else:
        if resume is not None:
            check_compatible(resume.state, model_args, str(resume.path))
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
    where = StageDir(as_location(previous).parent)
    try:
        final = where.load_readable(previous)
    except NoReadableCheckpoint as e:
        raise CheckpointError(
            f"stage {stage} of run {run_name!r} left nothing to start the next stage from: {e}. "
            f"Rerun {stage} (delete {where.done_file}) or pass checkpoint.init_from=<checkpoint "
            "dir or models:/ URI>"
        ) from e
    if final.skipped:
        log.warning(
            "stage %s: final checkpoint %s is corrupt; using %s", stage, previous, final.path
        )
    return str(final.path), final.skipped


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
        where = StageDir.of(cfg, run_name)
        child = runs.child_run_ids[cfg.stage]
        done = where.read_done()
        if done is not None:
            outputs[cfg.stage] = done.as_dict()
            previous, previous_stage = done.checkpoint, cfg.stage
            ended.add(child)
            log.info("stage %s already finished (%s); skipping", cfg.stage, where.done_file)
            continue
        if previous and not cfg.checkpoint.init_from:
            init_from, skipped = readable_final(previous, previous_stage, run_name)
            if skipped:
                set_tag(uri, child, keys.INIT_FROM_CORRUPT_SKIPPED, ",".join(skipped))
            cfg = dataclasses.replace(
                cfg, checkpoint=dataclasses.replace(cfg.checkpoint, init_from=init_from)
            )
        preflight_checkpoints(cfg, where, uri)
        where.write_data_once(StageData(data.uri, data.content_hash, tuple(data.skipped)))
        log.info(
            "stage %s: %d steps on %d workers -> %s",
            cfg.stage,
            cfg.schedule.steps,
            cfg.scaling.num_workers,
            where.path,
        )
        final, metrics = run_stage(cfg, run_name, data, uri, child)
        kill = kill_hook(checkpoint_step(final))  # the kill -9 tests' points; nothing otherwise
        kill("trained")
        version = register(cfg, final, run_name, data, uri, child) if cfg.mlflow.register else None
        kill("registered")
        finish_run(uri, child)
        ended.add(child)
        done = StageDone(str(final), version, metrics, child)
        where.write_done(done)
        kill("done")
        outputs[cfg.stage] = done.as_dict()
        previous, previous_stage = done.checkpoint, cfg.stage
    return outputs


def register(
    cfg: TrainConfig, final: Location, run_name: str, data: DataInfo, uri: str, run_id: str
):
    state, _, _ = load_latest_valid(final)
    example_input = read_example_input(final)
    return register_stage(
        cfg, state, example_input, run_name=run_name, data_hash=data.content_hash, uri=uri,
        run_id=run_id,
    )  # fmt: skip
