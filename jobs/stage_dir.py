"""Where a stage of a training run lives: `<storage_path>/<run_name>-<stage>/`, holding Ray
Train's `checkpoint_<step>` directories, `stage_data.json` (the data it started on, written
when it starts) and `stage_done.json` (written last, when the stage is registered)."""

from __future__ import annotations

from pathlib import Path

from jobs.train_config import TrainConfig

DONE_FILE = "stage_done.json"
DATA_FILE = "stage_data.json"  # the data a stage trains on, written when it starts


def stage_dir(cfg: TrainConfig, run_name: str) -> Path:
    return Path(cfg.storage_path) / f"{run_name}-{cfg.stage}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    return dirs[-1] if dirs else None
