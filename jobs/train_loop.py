"""The per-worker training loop that Ray Train runs on every rank.

`train_loop_per_worker(config)` turns the plain dict Ray hands it into a typed `TrainConfig`,
restores the latest checkpoint (Ray's, after a worker failure or a rerun with the same run
name) or the stage's starting weights (`checkpoint.init_from`), then runs exactly
`schedule.steps` optimiser steps over the loader's infinite stream. Every rank calls
`ray.train.report` at the same steps (it is a barrier); only rank 0 writes the checkpoint
directory and only rank 0 talks to MLflow (`RankZeroTracker`).

Device policy: CUDA (nccl, bf16 autocast) when the worker has a GPU, otherwise CPU (gloo,
fp32). A non-finite loss on any rank stops every rank at the same step (no checkpoint of the
bad state); the driver turns the reported reason into a clear error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from jobs.checkpoint import (
    NoReadableCheckpoint,
    check_compatible,
    checkpoint_step,
    load_latest_valid,
    restore_training_state,
    save_checkpoint,
    unwrap,
)
from jobs.rank_zero import RankZeroTracker
from jobs.train_config import TrainConfig
from typedconfig import from_dict, to_dict

log = logging.getLogger(__name__)

EXAMPLE_INPUT_FILE = "example_input.pt"
RANK_DIGESTS_FILE = "rank_digests.json"
FAULT_MARKER = "fault_injected"


class InjectedFault(RuntimeError):
    """Raised once at `fault_at_step` to test recovery (FailureConfig + checkpoints)."""


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


def train_steps(ctx: dict[str, Any], start_step: int) -> dict[str, Any]:
    """Run optimiser steps start_step..steps-1; report + checkpoint on schedule. Returns the end state."""
    import ray.train
    import ray.util

    cfg: TrainConfig = ctx["cfg"]
    model, optimizer, scheduler = ctx["model"], ctx["optimizer"], ctx["scheduler"]
    rank, device, tracker = ctx["rank"], ctx["device"], ctx["tracker"]
    batches = iter(ctx["loader"])
    window, example_input, final_metrics = Window(), None, {}
    use_autocast = device.type == "cuda"
    stage = cfg.loader.stage
    node = ray.util.get_node_ip_address()
    # Rank 0 shows progress; every log line says stage, step, node and rank.
    progress = tqdm(
        total=cfg.schedule.steps,
        initial=start_step,
        desc=f"{stage} (node {node})",
        unit="step",
        disable=rank != 0,
        mininterval=5.0,
    )
    model.train()
    for step in range(start_step, cfg.schedule.steps):
        if step == cfg.fault_at_step and rank == 0:
            marker = Path(ctx["run_dir"]) / FAULT_MARKER
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
        if ctx["world_size"] > 1:
            stats = stats.to(device)
            dist.all_reduce(stats)
            stats = stats.cpu()
        mean_loss = stats[0].item() / ctx["world_size"]
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
            tracker.log_picture(out.target[0], out.reconstruction[0].detach(), done)
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
                digests = rank_param_digests(model, ctx["world_size"])
                metrics["ranks_in_sync"] = float(len(set(digests)) == 1)
                ctx["rank_digests"] = digests
                tracker.log_metrics({"ranks_in_sync": metrics["ranks_in_sync"]}, done)
            report_checkpoint(ctx, done, metrics, example_input if final else None)
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


def report_checkpoint(ctx: dict[str, Any], step: int, metrics: dict, example_input) -> None:
    """All ranks report (a barrier); rank 0 alone writes the checkpoint directory."""
    import ray.train
    from ray.train import Checkpoint

    cfg: TrainConfig = ctx["cfg"]
    name = f"checkpoint_{step:08d}"
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if ctx["rank"] != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    local = ctx["local_mode"]
    # In local mode (num_workers=0) Ray does not persist checkpoints: write them in place.
    directory = (
        Path(ctx["run_dir"]) / name if local else Path(tempfile.mkdtemp(prefix="mast-ckpt-"))
    )
    save_checkpoint(
        directory,
        model=ctx["model"],
        optimizer=ctx["optimizer"],
        scheduler=ctx["scheduler"],
        step=step,
        config=to_dict(cfg),
        data_position={"start_step": step, "seed": cfg.seed},
        metrics=metrics,
    )
    if example_input is not None:
        torch.save(example_input, directory / EXAMPLE_INPUT_FILE)
        digests = {"rank_param_digests": ctx.get("rank_digests", [])}
        (directory / RANK_DIGESTS_FILE).write_text(json.dumps(digests))
    ray.train.report(
        metrics, checkpoint=Checkpoint.from_directory(str(directory)), checkpoint_dir_name=name
    )
    if local:
        prune_local(Path(ctx["run_dir"]), cfg.checkpoint.keep)
    else:
        shutil.rmtree(directory, ignore_errors=True)  # Ray has copied it to storage (sync upload)


def prune_local(run_dir: Path, keep: int) -> None:
    dirs = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    for old in dirs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def restore(ctx: dict[str, Any], resume_from: str | None) -> int:
    """Latest checkpoint (resume) > checkpoint.init_from (stage start) > fresh; return start step."""
    import ray.train

    cfg: TrainConfig = ctx["cfg"]
    model = ctx["model"]
    ray_ckpt = ray.train.get_checkpoint()
    # Ray's record of the run (restored by name) can lag the storage: a job killed after a
    # checkpoint landed but before Ray's snapshot recorded it. The newer one is taken;
    # load_latest_valid falls back from it if it is incomplete.
    candidates = [p for p in (ray_ckpt.path if ray_ckpt else None, resume_from) if p]
    latest = max(candidates, key=lambda p: checkpoint_step(Path(p))) if candidates else None
    if latest:
        try:
            state, used, skipped = load_latest_valid(latest)
        except NoReadableCheckpoint as e:  # e.g. killed while writing the first one
            log.warning("rank %d: %s; the stage starts afresh", ctx["rank"], e)
            ctx["tracker"].set_tag("corrupt_checkpoints_skipped", ",".join(e.skipped))
            latest = None
    if latest:
        check_compatible(state, model.model_args, str(used))
        step = restore_training_state(state, model, ctx["optimizer"], ctx["scheduler"])
        # Other ranks draw their own channel-dropout stream; the loader reseeds by start_step.
        if ctx["rank"] != 0:
            torch.manual_seed(cfg.seed * 1000003 + ctx["rank"] * 7919 + step)
        ctx["tracker"].set_tag("resumed_from", str(used))
        ctx["tracker"].log_metrics({"resumed_from_step": step}, step)
        if skipped:
            ctx["tracker"].set_tag("corrupt_checkpoints_skipped", ",".join(skipped))
        log.info("rank %d resumed from %s at step %d", ctx["rank"], used, step)
        return step
    torch.manual_seed(cfg.seed * 1000003 + ctx["rank"] * 7919)
    if cfg.checkpoint.init_from:
        from jobs.registry import load_state

        state = load_state(cfg.checkpoint.init_from, ctx["tracking_uri"] or None)
        check_compatible(state, model.model_args, cfg.checkpoint.init_from)
        model.load_state_dict(state["model"])
        ctx["tracker"].set_tag("init_from", cfg.checkpoint.init_from)
        log.info("rank %d starts from weights %s", ctx["rank"], cfg.checkpoint.init_from)
    return 0


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point. `config`: {"train": TrainConfig dict, "source": shard list,
    "run_dir": abs path, "tracking_uri": str, "mlflow_run_id": str, "resume_from": str|None}."""
    import ray.train

    from model import MAST
    from pipeline.loader import make_train_loader

    cfg = from_dict(TrainConfig, config["train"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    threads = cfg.scaling.threads_per_worker or max(1, int(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    device = select_device(config.get("local_mode", False))
    torch.manual_seed(cfg.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = MAST(cfg.model).to(device)
    optimizer, scheduler = build_optimizer(cfg, model)
    os.makedirs(config["run_dir"], exist_ok=True)
    tracker = RankZeroTracker(
        rank == 0,
        config.get("tracking_uri", ""),
        config.get("mlflow_run_id", ""),
        cfg.mlflow.system_metrics,
    )
    ctx = {
        "cfg": cfg,
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "rank": rank,
        "world_size": world_size,
        "device": device,
        "tracker": tracker,
        "run_dir": config["run_dir"],
        "local_mode": config.get("local_mode", False),
        "tracking_uri": config.get("tracking_uri", ""),
    }
    with tracker:
        start_step = restore(ctx, config.get("resume_from"))
        if world_size > 1:
            ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
            ctx["model"] = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
        if start_step >= cfg.schedule.steps:  # a finished run rerun: nothing left to do
            ray.train.report({"step": start_step})
            return {"stopped": "", "step": start_step}
        ctx["loader"] = make_train_loader(
            config["source"],
            cfg.loader,
            rank=rank,
            world_size=world_size,
            seed=cfg.seed,
            start_step=start_step,
            long_term_gap=cfg.model.long_term_gap,
        )
        result = train_steps(ctx, start_step)
        if result["stopped"]:
            tracker.set_tag("stopped", result["stopped"])
        return result
