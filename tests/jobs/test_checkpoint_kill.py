"""kill -9 at every write point of a checkpoint save, the final one included, then the same
command again: the stage finishes exactly once.

A real training process (`python -m jobs.train --stages pretrain`, tiny sizes, 4 steps, a
checkpoint every 2) SIGKILLs itself at the write point the test hook names
(MAST_TEST_KILL_AT=<point>:<step>, `jobs.tensor_files.kill_hook`): after a file's temporary
write (`<file>.tmp`) or its rename (`<file>`), for checkpoint.pt, the final checkpoint's
example_input.pt and rank_digests.json and the marker complete.json; after Ray Train took the
report (`reported`), after pruning (`pruned`); in the driver after the fit (`trained`), after
registering (`registered`) and after stage_done.json (`done`). The rerun, without the hook,
must exit 0 with the final checkpoint at step 4, one stage MLflow run (+ its parent), one
registered version, having resumed from where the kill left a complete checkpoint (an
incomplete one recorded and skipped). Local mode (num_workers=0: checkpoints written in place)
at every point; Ray mode (1 worker: written to a temp dir, copied by Ray) at two.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from jobs.checkpoint import CORRUPT_LOG, MARKER_FILE, load_checkpoint
from jobs.stage_dir import read_example_input

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
# Write points in the order a save reaches them (the final save writes the example files).
SAVE = ["checkpoint.pt.tmp", "checkpoint.pt", "complete.json.tmp", "complete.json"]
FINAL = ["checkpoint.pt.tmp", "checkpoint.pt", "example_input.pt.tmp", "example_input.pt",
         "rank_digests.json.tmp", "rank_digests.json", "complete.json.tmp", "complete.json"]  # fmt: skip
AFTER = ["reported", "pruned"]
DRIVER = ["trained", "registered", "done"]
LOCAL_CASES = [(p, 2) for p in SAVE + AFTER] + [(p, STEPS) for p in FINAL + AFTER + DRIVER]


def _command(root: Path, manifest: Path, workers: int) -> list[str]:
    return [
        sys.executable, "-m", "jobs.train", "--config", str(ROOT / "configs/train/demo.yaml"),
        "--stages", "pretrain", "--data", str(manifest), "--run-name", "kill",
        f"storage_path={root / 'ray'}", f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        f"scaling.num_workers={workers}", "scaling.max_failures=0", f"schedule.steps={STEPS}",
        "checkpoint.every_steps=2", "checkpoint.keep=1", "model.width=4", "model.feat_dim=8",
        "loader.crop_size=32", "loader.batch_size=2", "mlflow.system_metrics=false",
    ]  # fmt: skip


def _run(command: list[str], tmpdir: Path, kill_at: str = "") -> subprocess.CompletedProcess:
    drop = ("MAST_TEST_KILL_AT", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["TMPDIR"] = str(tmpdir)  # where a Ray-mode save puts its mast-ckpt-* directory
    if kill_at:
        env["MAST_TEST_KILL_AT"] = kill_at
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def tmpdir_short():
    # Short: Ray's socket paths under it must stay within AF_UNIX's 107 characters.
    path = Path(tempfile.mkdtemp(prefix="mk", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _kill_and_rerun(tmp_path, tmpdir, manifest, point, step, workers):
    command = _command(tmp_path, manifest, workers)
    killed = _run(command, tmpdir, f"{point}:{step}")
    output = killed.stdout + killed.stderr
    assert f"MAST_TEST_KILL_AT={point}:{step}: SIGKILL" in output, output[-3000:]
    # Local mode: the job itself; Ray mode: its worker (the job then fails, no retry left).
    assert killed.returncode == (-signal.SIGKILL if workers == 0 else 1), output[-3000:]
    stage = tmp_path / "ray" / "kill-pretrain"
    # Directories only: Ray keeps its own checkpoint_manager_snapshot.json beside them.
    left = {
        p.name: sorted(f.name for f in p.iterdir())
        for p in stage.glob("checkpoint_*")
        if p.is_dir()
    }
    leftover_temp_dirs = sorted(tmpdir.glob("mast-ckpt-*"))

    again = _run(command, tmpdir)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    out = json.loads(again.stdout.strip().splitlines()[-1])["pretrain"]
    final = Path(out["checkpoint"])
    assert final == stage / f"checkpoint_{STEPS:08d}" and out["version"] == 1
    assert load_checkpoint(final)["step"] == STEPS and sorted(read_example_input(final)) == [
        "frames",
        "gaps",
    ]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("mast-train").experiment_id], "tags.`mast.run_name` = 'kill'"
    )
    assert sorted(r.data.tags["mast.role"] for r in runs) == ["parent", "stage"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    (version,) = client.search_model_versions("name='mast'")
    assert version.tags["step"] == str(STEPS)
    assert client.get_model_version_by_alias("mast", "pretrain-latest").version == version.version
    # No save of the rerun left its temp directory (one killed mid-save may: SIGKILL).
    assert sorted(tmpdir.glob("mast-ckpt-*")) == leftover_temp_dirs
    stage_run = next(r for r in runs if r.data.tags["mast.role"] == "stage")
    recorded = (stage / CORRUPT_LOG).read_text() if (stage / CORRUPT_LOG).exists() else ""
    return left, stage_run.data.metrics.get("resumed_from_step"), recorded


@pytest.mark.parametrize(("point", "step"), LOCAL_CASES, ids=[f"{p}:{s}" for p, s in LOCAL_CASES])
def test_local_mode_kill_at_every_write_point(tmp_path, tmpdir_short, train_shards, point, step):
    left, resumed, recorded = _kill_and_rerun(tmp_path, tmpdir_short, train_shards, point, step, 0)
    name = f"checkpoint_{step:08d}"
    order = FINAL if step == STEPS else SAVE
    complete = point not in order or order.index(point) >= order.index(MARKER_FILE)
    # What the kill left: the marker only once every file is in place, no temp file after.
    assert (MARKER_FILE in left[name]) == complete, left
    assert any(".tmp-" in f for f in left[name]) == point.endswith(".tmp"), left
    if complete:  # the rerun continued from it (a finished stage: skipped, nothing resumed)
        assert resumed == (None if point == "done" else step) and not recorded
    else:  # recorded as incomplete and skipped: the one before, or a fresh start
        assert resumed == (2 if step == STEPS else None)
        assert name in recorded and "not finished" in recorded


RAY_CASES = [("reported", 2), (MARKER_FILE, STEPS)]


@pytest.mark.ray
@pytest.mark.parametrize(("point", "step"), RAY_CASES, ids=[f"{p}:{s}" for p, s in RAY_CASES])
def test_ray_mode_kill_in_the_worker(tmp_path, tmpdir_short, train_shards, point, step):
    left, resumed, recorded = _kill_and_rerun(tmp_path, tmpdir_short, train_shards, point, step, 1)
    # Reported: Ray had copied it to storage. Complete only in the worker's temp directory:
    # Ray never saw it, storage holds the one before.
    assert sorted(left) == ["checkpoint_00000002"] and not recorded
    assert resumed == 2
