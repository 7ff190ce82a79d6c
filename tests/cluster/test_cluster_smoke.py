"""The two-node cluster harness works: a submitted job runs tasks on both nodes and logs to MLflow."""

from __future__ import annotations

import json

import mlflow
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_cluster_has_two_nodes_with_their_labels(ray_cluster):
    nodes = ray_cluster.wait_for_nodes(2)
    labels = sorted(
        "head" if "head" in n["resources_total"] else "worker_node"
        for n in nodes
        if n["state"] == "ALIVE"
    )
    assert labels == ["head", "worker_node"]
    assert all(n["resources_total"]["CPU"] == ray_cluster.num_cpus for n in nodes)
    assert len({n["node_id"] for n in nodes}) == 2


def test_job_submit_runs_on_both_nodes_and_logs_to_mlflow(
    ray_cluster, mlflow_server, job_runtime_env
):
    submission_id, proc = ray_cluster.submit(
        ["python", "-m", "tests.cluster.smoke_job", "--experiment", "cluster-smoke"],
        runtime_env=job_runtime_env,
    )
    assert proc.returncode == 0, f"job failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert ray_cluster.job_status(submission_id) == "SUCCEEDED"

    # What the job says it did ...
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("SMOKE_RESULT "))
    summary = json.loads(line.removeprefix("SMOKE_RESULT "))
    by_label = {t["label"]: t for t in summary["tasks"]}
    assert summary["may_grow"] is True  # the job's driver joined the cluster
    # ... checked against the cluster's own view of which node carries which label.
    node_of = {
        ("head" if "head" in n["resources_total"] else "worker"): n["node_id"]
        for n in ray_cluster.list_nodes()
    }
    assert by_label["head"]["node_id"] == node_of["head"]
    assert by_label["worker"]["node_id"] == node_of["worker"]
    assert node_of["head"] != node_of["worker"]
    # Every worker ran inside the uploaded copy of the project, not in the source tree.
    assert all("working_dir_files" in t["cwd"] for t in summary["tasks"])

    # The tracking server holds what both nodes logged, and the artifact went through its proxy
    # to the separate artifact root on disk.
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["head_node_id"] == node_of["head"]
    assert run.data.params["worker_node_id"] == node_of["worker"]
    assert run.data.params["num_alive_nodes"] == "2"
    assert run.data.metrics["task_head_pid"] == by_label["head"]["pid"]
    assert run.data.metrics["task_worker_pid"] == by_label["worker"]["pid"]
    stored = list(mlflow_server.artifact_root.rglob("placement.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text()) == summary["tasks"]


def test_working_dir_upload_excludes_heavy_directories(ray_cluster, job_runtime_env):
    """The venv, git history and run outputs never travel with the code."""
    probe = (
        "import os,sys; bad=[d for d in ('.venv','.git','runs','data') if os.path.exists(d)]; "
        "print('PRESENT', bad); sys.exit(1 if bad or not os.path.isdir('jobs') else 0)"
    )
    _, proc = ray_cluster.submit(["python", "-c", probe], runtime_env=job_runtime_env)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "PRESENT []" in proc.stdout
