"""Ray for training stages: join or start the cluster, check that a stage's workers fit it,
and run one stage as a Ray Train TorchTrainer fit."""

from __future__ import annotations

import logging
from typing import Any

import torch

from jobs.stage_dir import StageDir
from jobs.train_config import TrainConfig
from jobs.train_data import DataInfo
from jobs.train_loop import train_loop_per_worker
from jobs.worker import LoopConfig
from pipeline.distributor import placeable, ray_may_grow
from pipeline.ray_local import init_ray
from storage import Location
from typedconfig import ConfigError, to_dict

log = logging.getLogger("jobs.train")


class TrainingError(RuntimeError):
    """A stage could not finish; the message names the cause (the last checkpoint stays)."""


def start_ray(cfgs: list[TrainConfig]) -> None:
    """Join the cluster named by RAY_ADDRESS (or one started on this machine with `ray
    start`), or start a local instance, when a stage to run needs Ray (local mode, 0
    workers, does not); then `check_fits` every such stage."""
    if not any(c.scaling.num_workers > 0 for c in cfgs):
        return
    import ray

    init_ray()  # a local instance of its own, or the cluster RAY_ADDRESS / `ray start` names
    may_grow = ray_may_grow()
    for cfg in cfgs:
        if cfg.scaling.num_workers > 0:
            check_fits(cfg, ray.nodes(), may_grow)


def check_fits(cfg: TrainConfig, nodes: list[dict[str, Any]], may_grow: bool) -> None:
    """Ray waits forever for workers that no node can place, and says so only in its logs
    (the stage configs ask for 8 workers of 4 CPUs, one 8-GPU node). Refused when the
    cluster cannot grow (the local instance this job started), else a warning. A worker
    takes `cpus_per_worker` CPUs, and a GPU when use_gpu is true (or auto, on a cluster
    with GPUs), all on one node."""
    alive = [n["Resources"] for n in nodes if n.get("Alive")]
    total_gpus = sum(r.get("GPU", 0) for r in alive)
    sc = cfg.scaling
    gpu = sc.use_gpu == "true" or (sc.use_gpu == "auto" and total_gpus > 0)
    if placeable(alive, sc.cpus_per_worker, gpu) >= sc.num_workers:
        return
    total_cpus = sum(r.get("CPU", 0) for r in alive)
    message = (
        f"stage {cfg.stage}: scaling.num_workers={sc.num_workers} workers of "
        f"scaling.cpus_per_worker={sc.cpus_per_worker:g} CPUs{' and 1 GPU' if gpu else ''} "
        f"do not fit the Ray cluster ({len(alive)} node(s), {total_cpus:g} CPUs, "
        f"{total_gpus:g} GPUs)"
    )
    if may_grow:
        log.warning("%s: the stage waits until nodes join the cluster", message)
        return
    if gpu and not total_gpus:
        raise ConfigError(f"{message}; pass scaling.use_gpu=auto (or false) on a CPU machine")
    cpus = min(sc.cpus_per_worker, 1.0)
    fit = min(placeable(alive, cpus, gpu), sc.num_workers)
    if not fit:
        raise ConfigError(f"{message}; start Ray with CPUs for at least one worker")
    raise ConfigError(
        f"{message}; on this machine pass scaling.num_workers={fit} "
        f"scaling.cpus_per_worker={cpus:g}, or use configs/train/demo.yaml (sized for one machine)"
    )


def run_stage(
    cfg: TrainConfig, run_name: str, data: DataInfo, tracking_uri: str, run_id: str
) -> tuple[Location, dict[str, Any]]:
    """One Ray Train fit; returns (final checkpoint dir, final metrics)."""
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    where = StageDir.of(cfg, run_name)
    local_mode = cfg.scaling.num_workers == 0
    if cfg.scaling.use_gpu == "auto":
        gpus = torch.cuda.device_count() if local_mode else ray.cluster_resources().get("GPU", 0)
        use_gpu = gpus > 0
    else:
        use_gpu = cfg.scaling.use_gpu == "true"
    loop_config = {
        "train": to_dict(cfg),
        "source": data.shard_set,
        "run_dir": str(where.path),
        "tracking_uri": tracking_uri,
        "mlflow_run_id": run_id,
        "local_mode": local_mode,
    }
    # Converted here as every worker converts it: a dict they would refuse fails before any
    # worker starts. Ray Train takes a dict (it is what crosses to the workers).
    loop = LoopConfig.from_dict(loop_config)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop.to_dict(),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        # An object-store storage_path is Ray's to write too: pyarrow.fs resolves s3:// / gs://
        # itself, with the standard credentials and endpoint variables (AWS_ENDPOINT_URL, ...).
        run_config=RunConfig(
            name=where.path.name,
            storage_path=str(where.path.parent),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            # Ray Train's INFO lines (every report, every checkpoint, resource requests) were
            # ~60 lines per demo; ours say step, loss and checkpoint. Its session logs keep all.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrainingError(
            f"stage {cfg.stage} failed after {cfg.scaling.max_failures} retries: {e}\n"
            f"checkpoints stay in {where.path}; rerun the same command (same --run-name) to resume"
        ) from e
    if result.error is not None:
        raise TrainingError(f"stage {cfg.stage} failed: {result.error}") from result.error
    metrics = result.metrics or {}
    if metrics.get("error"):
        raise TrainingError(
            f"stage {cfg.stage} stopped: {metrics['error']}; the last good checkpoint stays in "
            f"{where.path} (lower optim.lr or set optim.grad_clip, then rerun the same command)"
        )
    # Local mode: Ray persists nothing; the newest checkpoint written in place is the final one.
    reported = None
    if not local_mode and result.checkpoint is not None:
        reported = where.ray_checkpoint(result.checkpoint.path)
    final = where.final_checkpoint(reported)
    if final is None:
        raise TrainingError(f"stage {cfg.stage} ended without a checkpoint in {where.path}")
    return final, metrics
