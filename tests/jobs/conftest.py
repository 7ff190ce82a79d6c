"""Shared fixtures for the job tests: real shards from the ingest job, built once per session."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from storage import sample_video_dir

ROOT = Path(__file__).resolve().parents[2]


def sample_videos_dir() -> Path:
    return sample_video_dir()


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory) -> Path:
    """manifest.json of 64x64 shards from the three sample videos, usable by every stage:
    the default ingest config (configs/ingest/default.yaml), runs of up to 48 consecutive
    frames from which each stage draws its own layout (12 runs, 502 frames).
    """
    videos = tmp_path_factory.mktemp("train_videos")
    for name in ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"):
        shutil.copy(sample_videos_dir() / name, videos / name)
    out = tmp_path_factory.mktemp("train_shards")
    cmd = [
        sys.executable, "-m", "jobs.ingest", "--input", str(videos), "--output", str(out),
        "--config", str(ROOT / "configs/ingest/default.yaml"), "--no-progress",
        "size=[64,64]", "videos_per_shard=1",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "manifest.json").is_file()
    return out / "manifest.json"


def make_davis_sample(root: Path, *overrides: str) -> Path:
    """A small DAVIS-format folder generated from the sample videos (davis.sample)."""
    from davis.sample import SampleConfig, generate
    from typedconfig import load_config

    generate(load_config(SampleConfig, overrides=["width=64", "height=48", *overrides]), root)
    return root
