"""What one training worker is made of: the typed config the driver hands every rank
(`LoopConfig`, a plain dict on the way through Ray), the rank's state (`Worker`), its
optimiser and schedule, and its device."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

from jobs.rank_zero import RankZeroTracker
from jobs.stage_dir import StageDir
from jobs.train_config import TrainConfig
from storage import as_location
from typedconfig import ConfigError, from_dict, to_dict


class InjectedFault(RuntimeError):
    """Raised once at `fault_at_step` to test recovery (FailureConfig + checkpoints)."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """What the driver gives every worker of a stage. Ray Train takes a plain dict as
    `train_loop_config`: `to_dict()` in the driver, `from_dict()` in `train_loop_per_worker`."""

    train: TrainConfig
    source: Any  # what the loader reads (`jobs.train_data`), handed to it unchanged
    run_dir: str  # the stage directory, absolute (Ray workers change directory) or a URL
    tracking_uri: str = ""
    mlflow_run_id: str = ""  # "": nothing is logged (the benchmarks)
    local_mode: bool = False  # num_workers=0: in the driver; Ray persists no checkpoint

    @property
    def stage_dir(self) -> StageDir:
        return StageDir(as_location(self.run_dir))

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: `source` is the loader's value, passed on as it is.
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**fields, "train": to_dict(self.train)}

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> LoopConfig:
        try:  # a key too many or missing is a TypeError naming it
            return cls(**{**config, "train": from_dict(TrainConfig, config["train"])})
        except (KeyError, TypeError) as e:
            raise ConfigError(
                f"train_loop_config with keys {sorted(config)}: {type(e).__name__}: {e}; build "
                "it with LoopConfig(...).to_dict()"
            ) from e


@dataclasses.dataclass
class Worker:
    """One rank's training state, built once by `train_loop_per_worker`."""

    cfg: TrainConfig
    model: torch.nn.Module  # wrapped in DDP after `restore` when world_size > 1
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rank: int
    world_size: int
    device: torch.device
    tracker: RankZeroTracker
    stage_dir: StageDir
    local_mode: bool
    tracking_uri: str
    loader: Iterable[dict[str, Any]] | None = None  # made once `restore` knows the start step
    rank_digests: list[str] = dataclasses.field(default_factory=list)  # at the final step


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module):
    opt_cls = torch.optim.AdamW if cfg.optim.name == "adamw" else torch.optim.Adam
    optimizer = opt_cls(
        model.parameters(),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        weight_decay=cfg.optim.weight_decay,
    )
    milestones = cfg.schedule.milestone_steps()
    warmup = cfg.schedule.warmup_steps

    def factor(step: int) -> float:  # lr multiplier after `step` optimiser steps
        decay = cfg.schedule.gamma ** sum(step >= m for m in milestones)
        return decay * (min(1.0, 0.01 + 0.99 * step / warmup) if warmup else 1.0)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def select_device(local_mode: bool) -> torch.device:
    """This worker's GPU (nccl, bf16 autocast) or the CPU (gloo, fp32)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    import ray.train

    if local_mode:  # in the driver (optionally under torchrun): the local rank's GPU
        device = torch.device("cuda", ray.train.get_context().get_local_rank())
    else:
        # Ray sets CUDA_VISIBLE_DEVICES per worker; get_device maps the assigned GPU id to
        # the index this process sees (not necessarily the local rank).
        from ray.train.torch import get_device

        device = get_device()
    torch.cuda.set_device(device)
    return device
