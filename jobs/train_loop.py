"""The per-worker training loop that Ray Train runs on every rank.

`train_loop_per_worker(config)` turns the plain dict Ray hands it into a typed `LoopConfig`,
builds this rank's `Worker`, restores the latest checkpoint (`StageDir.resume_checkpoint`:
after a worker failure or a rerun with the same run name) or the stage's starting weights
(`checkpoint.init_from`), then runs exactly `schedule.steps` optimiser steps over the loader's
infinite stream. Every rank calls `ray.train.report` at the same steps (it is a barrier); only
rank 0 writes the checkpoint directory and only rank 0 talks to MLflow (`RankZeroTracker`).

Device policy: CUDA (nccl, bf16 autocast) when the worker has a GPU, otherwise CPU (gloo,
fp32). A non-finite loss on any rank stops every rank at the same step (no checkpoint of the
bad state); the driver turns the reported reason into a clear error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from jobs import mlflow_keys as keys
from jobs.checkpoint import (
    NoReadableCheckpoint,
    check_compatible,
    restore_training_state,
    save_checkpoint,
    unwrap,
)
from jobs.rank_zero import RankZeroTracker
from jobs.stage_dir import checkpoint_name, final_files
from jobs.tensor_files import kill_hook
from jobs.worker import InjectedFault, LoopConfig, Worker, build_optimizer, select_device
from pipeline.progress import progress as progress_bar
from typedconfig import to_dict

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Window:
    """Running sums between two metric logs (timings in seconds)."""

    steps: int = 0
    clips: int = 0
    loss: float = 0.0
    grad_norm: float = 0.0
    data_wait: float = 0.0
    total: float = 0.0
    long_term_refs: int = 0

    def metrics(self, lr: float) -> dict[str, float]:
        n = max(self.steps, 1)
        return {
            "loss": self.loss / n,
            "lr": lr,
            "grad_norm": self.grad_norm / n,
            "clips_per_s": self.clips / max(self.total, 1e-9),  # per worker
            "data_wait_fraction": self.data_wait / max(self.total, 1e-9),
            "long_term_refs": float(self.long_term_refs),
        }


def train_steps(worker: Worker, start_step: int) -> dict[str, Any]:
    """Run optimiser steps start_step..steps-1; report + checkpoint on schedule. Returns the end state."""
    import ray.train
    import ray.util

    if worker.loader is None:
        raise RuntimeError("train_steps: worker.loader is not made yet (make it after restore)")
    cfg, model, tracker = worker.cfg, worker.model, worker.tracker
    optimizer, scheduler = worker.optimizer, worker.scheduler
    rank, world_size, device = worker.rank, worker.world_size, worker.device
    batches = iter(worker.loader)
    window, example_input, final_metrics = Window(), None, {}
    use_autocast = device.type == "cuda"
    stage = cfg.loader.stage
    node = ray.util.get_node_ip_address()
    # Rank 0 shows progress; every log line says stage, step, node and rank.
    # A bar on a terminal (local mode); plain periodic lines from a Ray worker.
    progress = progress_bar(
        total=cfg.schedule.steps,
        desc=f"{stage} (node {node})",
        unit="step",
        enabled=rank == 0,
        initial=start_step,
    )
    model.train()
    for step in range(start_step, cfg.schedule.steps):
        if step == cfg.fault_at_step and rank == 0:
            marker = worker.stage_dir.fault_marker
            if not marker.exists():
                marker.write_text(str(step))
                raise InjectedFault(f"injected fault at step {step} (fault_at_step)")
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        frames = batch["frames"].to(device, non_blocking=True)
        gaps = batch["gaps"]
        if example_input is None:
            example_input = {"frames": batch["frames"][:2].clone(), "gaps": gaps[:2].clone()}
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_autocast):
            out = model(frames, gaps)
        # One small all-reduce per step: the mean loss for logging, and every rank learns
        # about a non-finite loss on any rank at the same step (no rank is left waiting).
        stats = torch.tensor([out.loss.detach().float().item(), float(out.long_term_refs)])
        if world_size > 1:
            stats = stats.to(device)
            dist.all_reduce(stats)
            stats = stats.cpu()
        mean_loss = stats[0].item() / world_size
        if not math.isfinite(mean_loss):
            final_metrics = {"step": step, "error": f"non-finite loss ({mean_loss}) at step {step}"}
            ray.train.report(final_metrics)
            return {"stopped": final_metrics["error"], "step": step}
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
        optimizer.step()
        scheduler.step()
        t2 = time.perf_counter()
        window.steps += 1
        window.clips += frames.shape[0]
        window.loss += mean_loss
        window.grad_norm += grad_norm
        window.data_wait += t1 - t0
        window.total += t2 - t0
        window.long_term_refs += int(stats[1].item())
        done = step + 1
        progress.update(1)
        if done % cfg.mlflow.image_every_steps == 0 or done == cfg.schedule.steps:
            tracker.log_picture(
                out.target[0], out.reconstruction[0].detach(), done, int(out.dropped[0])
            )
        if done % cfg.mlflow.log_every_steps == 0 or done == cfg.schedule.steps:
            final_metrics = window.metrics(scheduler.get_last_lr()[0])
            tracker.log_metrics(final_metrics, done)
            if rank == 0:
                log.info(
                    "stage %s step %d/%d node %s rank %d: loss %.4f, %.2f clips/s per worker, "
                    "data wait %.1f%%",
                    stage,
                    done,
                    cfg.schedule.steps,
                    node,
                    rank,
                    final_metrics["loss"],
                    final_metrics["clips_per_s"],
                    100 * final_metrics["data_wait_fraction"],
                )
            window = Window()
        if done % cfg.checkpoint.every_steps == 0 or done == cfg.schedule.steps:
            final = done == cfg.schedule.steps
            metrics = {**final_metrics, "step": done}
            if final:  # DDP must leave identical weights on every rank: check, record
                digests = rank_param_digests(model, world_size)
                metrics["ranks_in_sync"] = float(len(set(digests)) == 1)
                worker.rank_digests = digests
                tracker.log_metrics({"ranks_in_sync": metrics["ranks_in_sync"]}, done)
            report_checkpoint(worker, done, metrics, example_input if final else None)
    progress.close()
    return {"stopped": "", "step": cfg.schedule.steps, "metrics": final_metrics}


def rank_param_digests(model: torch.nn.Module, world_size: int) -> list[str]:
    """sha256 of every rank's parameters, gathered on all ranks (rank order).

    Buffers are left out on purpose: BatchNorm running statistics are updated locally by each
    rank's last forward (DDP re-broadcasts rank 0's at the next forward; checkpoints hold rank 0's).
    """
    h = hashlib.sha256()
    for name, tensor in unwrap(model).named_parameters():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    if world_size == 1:
        return [h.hexdigest()]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, h.hexdigest())
    return gathered


def report_checkpoint(worker: Worker, step: int, metrics: dict, example_input) -> None:
    """All ranks report (a barrier); rank 0 alone writes the checkpoint directory."""
    import ray.train
    from ray.train import Checkpoint

    cfg = worker.cfg
    name = checkpoint_name(step)
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if worker.rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    kill = kill_hook(step)  # the kill -9 tests' write points; nothing otherwise
    extra = None if example_input is None else final_files(example_input, worker.rank_digests)
    # In local mode (num_workers=0) Ray does not persist checkpoints: write them in place (on
    # an object store: each file a local temp file and one PUT, the marker last).
    if worker.local_mode:
        directory = worker.stage_dir.checkpoint_path(step)
    else:
        directory = Path(tempfile.mkdtemp(prefix="mast-ckpt-"))
    # Local mode keeps no more of a checkpoint than its path; an object-store one is not a
    # local directory to hand Ray.
    local_dir = isinstance(directory, Path)
    try:
        save_checkpoint(
            directory,
            model=worker.model,
            optimizer=worker.optimizer,
            scheduler=worker.scheduler,
            step=step,
            config=to_dict(cfg),
            data_position={"start_step": step, "seed": cfg.seed},
            metrics=metrics,
            extra_files=extra,
            kill=kill,
        )
        # Ray mode: report copies the directory to storage before it returns (sync upload);
        # the temporary directory goes whatever happens (a kill -9 aside).
        checkpoint = Checkpoint.from_directory(str(directory)) if local_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        kill("reported")
    finally:
        if not worker.local_mode:
            shutil.rmtree(directory, ignore_errors=True)
    if worker.local_mode:
        worker.stage_dir.prune(cfg.checkpoint.keep)
        kill("pruned")


def restore(worker: Worker) -> int:
    """Latest checkpoint (resume) > checkpoint.init_from (stage start) > fresh; return start step."""
    import ray.train

    cfg, model, tracker, rank = worker.cfg, worker.model, worker.tracker, worker.rank
    restored = ray.train.get_checkpoint()  # Ray's record: after a worker failure, or a rerun
    where = worker.stage_dir
    try:
        resume = where.resume_checkpoint(where.ray_checkpoint(restored.path) if restored else None)
    except NoReadableCheckpoint as e:  # e.g. killed while writing the first one
        log.warning("rank %d: %s; the stage starts afresh", rank, e)
        tracker.set_tag(keys.CORRUPT_CHECKPOINTS_SKIPPED, ",".join(e.skipped))
        resume = None
    if resume is not None:
        check_compatible(resume.state, model.model_args, str(resume.path))
        step = restore_training_state(resume.state, model, worker.optimizer, worker.scheduler)
        # Other ranks draw their own channel-dropout stream; the loader reseeds by start_step.
        if rank != 0:
            torch.manual_seed(cfg.seed * 1000003 + rank * 7919 + step)
        tracker.set_tag(keys.RESUMED_FROM, str(resume.path))
        tracker.log_metrics({"resumed_from_step": step}, step)
        if resume.skipped:
            tracker.set_tag(keys.CORRUPT_CHECKPOINTS_SKIPPED, ",".join(resume.skipped))
        log.info("rank %d resumed from %s at step %d", rank, resume.path, step)
        return step
    torch.manual_seed(cfg.seed * 1000003 + rank * 7919)
    if cfg.checkpoint.init_from:
        from jobs.registry import load_state

        state = load_state(cfg.checkpoint.init_from, worker.tracking_uri or None)
        check_compatible(state, model.model_args, cfg.checkpoint.init_from)
        model.load_state_dict(state["model"])
        tracker.set_tag(keys.INIT_FROM, cfg.checkpoint.init_from)
        log.info("rank %d starts from weights %s", rank, cfg.checkpoint.init_from)
    return 0


def quiet_ray_train_reports() -> None:
    """Ray Train 2.60 logs every report ("Reporting training result N: TrainingReport(...)",
    about 60 lines a demo) at INFO on a logger named by its file path, outside `ray.train`,
    so RunConfig's LoggingConfig level does not reach it. Raised to WARNING here."""
    try:
        from ray.train.v2._internal.execution import context as ray_train_context
    except ImportError:  # another Ray version: its own logging applies
        return
    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point; `config` is a `LoopConfig.to_dict()`."""
    import ray.train

    from model import MAST
    from pipeline.loader import make_train_loader

    quiet_ray_train_reports()
    loop = LoopConfig.from_dict(config)
    cfg = loop.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    threads = cfg.scaling.threads_per_worker or max(1, int(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    device = select_device(loop.local_mode)
    torch.manual_seed(cfg.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = MAST(cfg.model).to(device)
    optimizer, scheduler = build_optimizer(cfg, model)
    loop.stage_dir.path.mkdir(parents=True, exist_ok=True)
    tracker = RankZeroTracker(
        rank == 0, loop.tracking_uri, loop.mlflow_run_id, cfg.mlflow.system_metrics
    )
    worker = Worker(
        cfg=cfg, model=model, optimizer=optimizer, scheduler=scheduler, rank=rank,
        world_size=world_size, device=device, tracker=tracker, stage_dir=loop.stage_dir,
        local_mode=loop.local_mode, tracking_uri=loop.tracking_uri,
    )  # fmt: skip
    with tracker:
        start_step = restore(worker)
        if world_size > 1:
            ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
            worker.model = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
        if start_step >= cfg.schedule.steps:  # a finished run rerun: nothing left to do
            ray.train.report({"step": start_step})
            return {"stopped": "", "step": start_step}
        worker.loader = make_train_loader(
            loop.source,
            cfg.loader,
            rank=rank,
            world_size=world_size,
            seed=cfg.seed,
            start_step=start_step,
            long_term_gap=cfg.model.long_term_gap,
        )
        result = train_steps(worker, start_step)
        if result["stopped"]:
            tracker.set_tag(keys.STOPPED, result["stopped"])
        return result
