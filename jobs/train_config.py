"""Typed configuration of `jobs.train`: one frozen dataclass per section, validated up front.

A stage config (configs/train/pretrain.yaml, ...) is one `TrainConfig`. A multi-stage file
(configs/train/demo.yaml) holds shared values at the top level plus a `stages:` mapping of
per-stage overrides; `load_stage_configs` turns either kind into one `TrainConfig` per stage.
The stage itself is `loader.stage` (one source of truth: the loader builds pairs for
"pretrain", short-term memories for "main", and adds long-term references for "dynamic").

    cfgs = load_stage_configs("configs/train/demo.yaml", ["pretrain", "main"], ["optim.lr=3e-4"])
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Literal

import storage
from jobs import mlflow_keys as keys
from model import MASTConfig
from pipeline.config import STAGES, LoaderConfig
from typedconfig import (
    ConfigError,
    choice,
    deep_update,
    from_dict,
    parse_override,
    positive,
    read_yaml,
    set_path,
)
from typedconfig.describe import HIDDEN


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser. MAST_NOTES "Training recipe": Adam, lr 1e-3 pretrain, 2e-5 fine-tuning."""

    name: Literal["adam", "adamw"] = "adam"  # adamw: decoupled weight decay
    lr: float = 1e-3  # peak learning rate (after warm-up, before the milestones)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's moment decay rates
    weight_decay: float = 0.0  # L2 (adam) or decoupled (adamw) decay; 0 = none
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping

    def validate(self) -> None:
        positive(self.lr, "optim.lr")
        positive(self.weight_decay, "optim.weight_decay", allow_zero=True)
        positive(self.grad_clip, "optim.grad_clip", allow_zero=True)
        for i, b in enumerate(self.betas):
            if not 0.0 <= b < 1.0:
                raise ConfigError(f"optim.betas[{i}]={b!r} must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Step decay counted in optimiser iterations (the reference code counted samples: defect 5)."""

    steps: int = 1000  # optimiser steps of this stage; identical on every rank
    # Paper: 1M iterations, lr halved at 0.4M / 0.6M / 0.8M -> fractions of `steps`.
    milestones: tuple[float, ...] = (0.4, 0.6, 0.8)
    gamma: float = 0.5  # lr multiplier at each milestone
    warmup_steps: int = 0  # linear warm-up from lr/100 (0 = none, as the paper)

    def validate(self) -> None:
        positive(self.steps, "schedule.steps")
        positive(self.gamma, "schedule.gamma")
        positive(self.warmup_steps, "schedule.warmup_steps", allow_zero=True)
        for i, m in enumerate(self.milestones):
            if not 0.0 < m < 1.0:
                raise ConfigError(f"schedule.milestones[{i}]={m!r} must be a fraction in (0, 1)")

    def milestone_steps(self) -> list[int]:
        return sorted({max(1, int(round(m * self.steps))) for m in self.milestones})


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """When checkpoints are written and kept, and what a stage starts from."""

    every_steps: int = 500  # a checkpoint every N steps, and always at the end of the stage
    keep: int = 3  # Ray CheckpointConfig(num_to_keep)
    # Weights to start from: a checkpoint dir/file or a models:/ or runs:/ URI. Stage chaining
    # fills it with the previous stage's final checkpoint when left empty.
    init_from: str = ""

    def validate(self) -> None:
        positive(self.every_steps, "checkpoint.every_steps")
        positive(self.keep, "checkpoint.keep")


@dataclasses.dataclass(frozen=True)
class ScalingSection:
    """Ray Train workers (DDP ranks) and their resources."""

    num_workers: int = 2  # 0 = run the loop in the driver process (unit tests, debugging)
    use_gpu: Literal["auto", "true", "false"] = "auto"  # auto: GPUs if the cluster has any
    cpus_per_worker: float = 1.0  # Ray CPUs reserved per worker (its DataLoader workers too)
    max_failures: int = 2  # Ray FailureConfig: worker failures recovered from the last checkpoint
    threads_per_worker: int = 0  # torch intra-op threads per worker; 0 = cpus_per_worker

    def validate(self) -> None:
        positive(self.num_workers, "scaling.num_workers", allow_zero=True)
        positive(self.cpus_per_worker, "scaling.cpus_per_worker")
        if self.max_failures < -1:
            raise ConfigError(f"scaling.max_failures={self.max_failures} must be >= -1")
        positive(self.threads_per_worker, "scaling.threads_per_worker", allow_zero=True)


@dataclasses.dataclass(frozen=True)
class MlflowSection:
    """Tracking: the runs of a training, its pictures and the registered model."""

    tracking_uri: str = ""  # "" -> $MLFLOW_TRACKING_URI, else sqlite under runs/mlflow
    experiment: str = "mast-train"  # MLflow experiment of the training runs
    registered_model: str = keys.MODEL_NAME  # each stage registers a version of this model
    log_every_steps: int = 10  # scalar metrics
    image_every_steps: int = 100  # target / reconstruction / error map picture
    system_metrics: bool = True  # CPU, memory and GPU use logged with each stage run
    register: bool = True  # log + register the model at the end of each stage

    def validate(self) -> None:
        positive(self.log_every_steps, "mlflow.log_every_steps")
        positive(self.image_every_steps, "mlflow.image_every_steps")
        if not self.experiment:
            raise ConfigError("mlflow.experiment must not be empty")
        if not self.registered_model:
            raise ConfigError("mlflow.registered_model must not be empty")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training stage (`loader.stage`): data, model, loader, optimiser and tracking."""

    data: str = ""  # manifest.json path/URL or shard URL(s); required
    run_name: str = ""  # Ray run + MLflow parent run name; the same name resumes
    storage_path: str = "runs/ray"  # run directories: a path (made absolute) or s3://, gs://...
    seed: int = 0  # model initialisation and sample draws; the same seed repeats a run
    # Testing knob, hidden from --help: raise inside rank 0 at this step, once (a marker file
    # in the run directory makes the retried attempt pass). -1 = off.
    fault_at_step: int = dataclasses.field(default=-1, metadata={HIDDEN: True})
    model: MASTConfig = dataclasses.field(default_factory=MASTConfig)
    loader: LoaderConfig = dataclasses.field(default_factory=LoaderConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    scaling: ScalingSection = dataclasses.field(default_factory=ScalingSection)
    mlflow: MlflowSection = dataclasses.field(default_factory=MlflowSection)

    @property
    def stage(self) -> str:
        return self.loader.stage

    def validate(self) -> None:
        choice(self.loader.stage, STAGES, "loader.stage")
        if self.fault_at_step >= self.schedule.steps:
            raise ConfigError(
                f"fault_at_step={self.fault_at_step} must be < schedule.steps={self.schedule.steps}"
            )
        if self.run_name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.run_name):
            raise ConfigError(
                f"run_name={self.run_name!r} may only hold letters, digits, '.', '_' and '-' "
                "(it names a directory and an MLflow run)"
            )


def _stage_values(raw: dict[str, Any], stage: str, path: Path) -> dict[str, Any]:
    """The plain dict of one stage: shared top-level values < the file's `stages.<stage>`."""
    raw = dict(raw)
    per_stage = raw.pop("stages", None)
    values = deep_update({}, raw)
    if per_stage is not None:
        if not isinstance(per_stage, dict):
            raise ConfigError(f"{path}: `stages` must map stage names to overrides")
        unknown = sorted(set(per_stage) - set(STAGES))
        if unknown:
            raise ConfigError(f"{path}: unknown stage {unknown[0]!r}; allowed: {list(STAGES)}")
        deep_update(values, dict(per_stage.get(stage) or {}))
    set_path(values, ["loader", "stage"], stage)
    return values


def load_stage_configs(
    path: str | Path | None, stages: list[str] | None, overrides: list[str] = ()
) -> list[TrainConfig]:
    """One validated `TrainConfig` per requested stage.

    `path` may be a single-stage file (used for every stage, with `loader.stage` set per stage)
    or a multi-stage file with a `stages:` mapping. With `stages` given and no `path`, each
    stage reads configs/train/<stage>.yaml. Overrides (`key=value`) apply to every stage.
    """
    if stages:
        for s in stages:
            choice(s, STAGES, "--stages")
        # Each stage starts from the previous one's weights: only the paper's order makes sense.
        order = [STAGES.index(s) for s in stages]
        if order != sorted(set(order)):
            raise ConfigError(
                f"--stages {','.join(stages)}: stages run in the order {' -> '.join(STAGES)}, "
                "each at most once (a subset is fine, e.g. main,dynamic)"
            )
    cfgs = []
    if path is not None:
        raw = read_yaml(path)
        if not stages:
            stage = (raw.get("loader") or {}).get("stage", "pretrain")
            stages = [stage]
        for s in stages:
            values = _stage_values(raw, s, Path(path))
            cfgs.append(_finish(values, overrides))
    else:
        if not stages:
            raise ConfigError("give --config FILE or --stages (reads configs/train/<stage>.yaml)")
        root = Path(__file__).resolve().parent.parent / "configs" / "train"
        for s in stages:
            values = _stage_values(read_yaml(root / f"{s}.yaml"), s, root / f"{s}.yaml")
            cfgs.append(_finish(values, overrides))
    return cfgs


def _finish(values: dict[str, Any], overrides: list[str]) -> TrainConfig:
    for text in overrides:
        keys, value = parse_override(text)
        if keys == ["loader", "stage"] or keys == ["stage"]:
            raise ConfigError("set the stage with --stages, not loader.stage=...")
        set_path(values, keys, value)
    cfg = from_dict(TrainConfig, values)
    # An object-store URL is taken as it is, unchecked here (no network while reading a
    # config; an object and a prefix of the same name may coexist there): jobs.stage_dir.
    if not storage.is_local(cfg.storage_path):
        return cfg
    path = os.path.abspath(os.path.expanduser(storage.strip_file(cfg.storage_path)))
    problem = storage.not_a_directory(path)
    if problem:
        raise ConfigError(f"storage_path={path} {problem}; give a directory path")
    return dataclasses.replace(cfg, storage_path=path)
