"""Run directories on an object store, for real: `storage_path=s3://bucket/runs` against moto in
server mode on loopback (tests/object_store.py), reached through the standard AWS variables.

- Three stages in local mode (every file of the run directory written by us): the job
  SIGKILLs itself while uploading pretrain's last checkpoint (its state file is up, its
  marker is not: MAST_TEST_KILL_AT, `jobs.tensor_files.kill_hook`); the same command again
  resumes pretrain from the object store at step 2, records the unfinished checkpoint, and
  finishes all three stages with exactly the planned steps, one MLflow run per stage and one
  registered version per stage.
- One stage in Ray mode (Ray Train persists the checkpoint through pyarrow's S3 filesystem)
  registering to an `mlflow server --artifacts-destination s3://bucket/mlflow`;
  `jobs.registry.load_model` reads the version back through the server.
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
import torch
from mlflow.tracking import MlflowClient

from jobs.checkpoint import CORRUPT_LOG, MARKER_FILE, load_checkpoint
from jobs.registry import load_model
from jobs.stage_dir import DATA_FILE, DONE_FILE, read_example_input
from storage import ObjectPath
from tests.cluster.local_cluster import MlflowServer
from tests.object_store import moto_s3

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STAGES = ["pretrain", "main", "dynamic"]
STEPS = 4
RUNS = "s3://bucket/runs"


@pytest.fixture(scope="module")
def s3():
    with moto_s3("bucket") as env:
        yield env


@pytest.fixture
def tmpdir_short():
    # Short: Ray's socket paths under it must stay within AF_UNIX's 107 characters.
    path = Path(tempfile.mkdtemp(prefix="ms", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _command(manifest: Path, run_name: str, stages: list[str], *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "jobs.train", "--config", str(ROOT / "configs/train/demo.yaml"),
        "--stages", ",".join(stages), "--data", str(manifest), "--run-name", run_name,
        f"storage_path={RUNS}", "scaling.max_failures=0", "checkpoint.keep=1",
        "model.width=4", "model.feat_dim=8", "loader.crop_size=32", "loader.batch_size=2",
        "mlflow.system_metrics=false", *overrides,
    ]  # fmt: skip


def _run(command: list[str], s3: dict[str, str], tmpdir: Path, kill_at: str = ""):
    drop = ("MAST_TEST_KILL_AT", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    env = {k: v for k, v in os.environ.items() if k not in drop} | s3  # the endpoint, as a user
    env["TMPDIR"] = str(tmpdir)
    if kill_at:
        env["MAST_TEST_KILL_AT"] = kill_at
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _names(url: str) -> list[str]:
    return sorted(p.name for p in ObjectPath(url).iterdir())


def test_three_stages_killed_mid_stage_resume_from_the_object_store(
    s3, train_shards, tmp_path, tmpdir_short
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = _command(
        train_shards, "s3kill", STAGES, f"mlflow.tracking_uri={uri}", "scaling.num_workers=0",
        f"schedule.steps={STEPS}", "checkpoint.every_steps=2",
    )  # fmt: skip
    killed = _run(command, s3, tmpdir_short, f"checkpoint.pt:{STEPS}")
    output = killed.stdout + killed.stderr
    assert killed.returncode == -signal.SIGKILL, output[-3000:]
    pretrain = f"{RUNS}/s3kill-pretrain"
    # On the object store: step 2 complete, step 4's state uploaded but not its marker.
    assert _names(pretrain) == ["checkpoint_00000002", "checkpoint_00000004", DATA_FILE]
    assert MARKER_FILE in _names(f"{pretrain}/checkpoint_00000002")
    assert _names(f"{pretrain}/checkpoint_00000004") == ["checkpoint.pt"]
    assert _names(RUNS) == ["s3kill-pretrain"]  # main and dynamic never started

    again = _run(command, s3, tmpdir_short)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    out = json.loads(again.stdout.strip().splitlines()[-1])
    assert out == {
        stage: {"version": i + 1, "checkpoint": f"{RUNS}/s3kill-{stage}/checkpoint_{STEPS:08d}"}
        for i, stage in enumerate(STAGES)
    }
    for stage in STAGES:
        final = out[stage]["checkpoint"]
        state = load_checkpoint(final)  # read from the store, every file verified
        assert state["step"] == STEPS and state["scheduler"]["last_epoch"] == STEPS
        assert state["config"]["loader"]["stage"] == stage
        assert sorted(read_example_input(final)) == ["frames", "gaps"]
        done = json.loads(ObjectPath(f"{RUNS}/s3kill-{stage}/{DONE_FILE}").read_text())
        assert done["checkpoint"] == final and done["version"] == out[stage]["version"]
        assert _names(f"{RUNS}/s3kill-{stage}")[:1] == [f"checkpoint_{STEPS:08d}"]  # pruned
    (record,) = ObjectPath(f"{pretrain}/{CORRUPT_LOG}").read_text().splitlines()
    assert json.loads(record)["checkpoint"] == f"{pretrain}/checkpoint_00000004"
    assert "not finished" in json.loads(record)["error"]

    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("mast-train").experiment_id
    runs = client.search_runs([experiment], "tags.`mast.run_name` = 's3kill'")
    assert sorted(r.data.tags["mast.role"] for r in runs) == ["parent", "stage", "stage", "stage"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    by_stage = {
        r.data.tags.get("mast.stage"): r for r in runs if r.data.tags["mast.role"] == "stage"
    }
    assert sorted(by_stage) == sorted(STAGES)
    assert by_stage["pretrain"].data.metrics["resumed_from_step"] == 2
    assert "resumed_from_step" not in by_stage["main"].data.metrics
    assert by_stage["main"].data.tags["init_from"] == out["pretrain"]["checkpoint"]
    assert by_stage["dynamic"].data.tags["init_from"] == out["main"]["checkpoint"]
    versions = client.search_model_versions("name='mast'")
    assert sorted((v.tags["stage"], v.tags["step"]) for v in versions) == sorted(
        (s, str(STEPS)) for s in STAGES
    )
    for stage in STAGES:
        alias = client.get_model_version_by_alias("mast", f"{stage}-latest")
        assert alias.run_id == by_stage[stage].info.run_id


class S3ArtifactsMlflowServer(MlflowServer):
    """`mlflow server` on loopback whose artifacts go to the object store (proxied)."""

    @property
    def artifact_root(self) -> str:  # type: ignore[override]
        return "s3://bucket/mlflow"


def test_ray_stage_on_s3_registered_to_a_server_with_s3_artifacts(
    s3, train_shards, tmp_path, tmpdir_short
):
    server = S3ArtifactsMlflowServer(tmp_path / "mlflow").start()  # AWS_* from this process
    try:
        command = _command(
            train_shards, "s3ray", ["pretrain"], f"mlflow.tracking_uri={server.uri}",
            "scaling.num_workers=1", "schedule.steps=2", "checkpoint.every_steps=2",
        )  # fmt: skip
        done = _run(command, s3, tmpdir_short)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        final = json.loads(done.stdout.strip().splitlines()[-1])["pretrain"]["checkpoint"]
        assert final == f"{RUNS}/s3ray-pretrain/checkpoint_00000002"
        # Ray Train persisted the worker's directory through pyarrow's S3 filesystem.
        assert _names(final) == [
            "checkpoint.pt",
            MARKER_FILE,
            "example_input.pt",
            "rank_digests.json",
        ]
        state = load_checkpoint(final)
        assert state["step"] == 2
        fs, path = ObjectPath("s3://bucket/mlflow").fs()
        logged = [key.rsplit("/", 1)[-1] for key in fs.find(path)]
        assert "mast_state.pt" in logged and "mast_example.pt" in logged
        model = load_model("models:/mast@pretrain-latest", server.uri)
        loaded = model.state_dict()
        assert sorted(loaded) == sorted(state["model"])
        assert all(torch.equal(loaded[k], state["model"][k]) for k in loaded)
    finally:
        server.stop()
