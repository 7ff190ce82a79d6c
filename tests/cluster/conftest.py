"""Fixtures for tests that need a real multi-node Ray cluster and a real MLflow server.

`ray_cluster`: a head and a worker node started with `ray start` as separate processes on
loopback (see local_cluster.py for the ports, token auth and teardown details). The head
carries the custom resource {"head": 1}, the worker {"worker_node": 1}, so work can be pinned
to a node with `.options(resources={"worker_node": 0.01})`. Module scoped: each test module
gets a fresh cluster (a fault-tolerance test that kills the worker cannot poison the next).

`mlflow_server`: `mlflow server` with a SQLite backend store and a separate artifact root,
session scoped; `job_runtime_env` builds the runtime_env that every submitted job uses: the
project's infra/runtime_env.yaml (same excludes an engineer ships to a real cluster) with the
tracking URI pointed at this server.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster.local_cluster import LocalRayCluster, MlflowServer

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RUNTIME_ENV_FILE = PROJECT_ROOT / "infra" / "runtime_env.yaml"


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = LocalRayCluster.create()
    started = time.monotonic()
    try:
        cluster.start(workers=("worker",))
        log.info(
            "two-node Ray cluster up in %.1fs at %s",
            time.monotonic() - started,
            cluster.dashboard_url,
        )
        yield cluster
    finally:
        stopping = time.monotonic()
        cluster.stop()
        log.info("Ray cluster stopped in %.1fs", time.monotonic() - stopping)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(root=tmp_path_factory.mktemp("mlflow-server"))
    started = time.monotonic()
    server.start()
    log.info("mlflow server healthy in %.1fs at %s", time.monotonic() - started, server.uri)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def job_runtime_env(mlflow_server) -> dict:
    """infra/runtime_env.yaml with the project as working_dir and MLflow on the test server."""
    env = yaml.safe_load(RUNTIME_ENV_FILE.read_text())
    env["working_dir"] = str(PROJECT_ROOT)
    env["env_vars"] = {**env.get("env_vars", {}), "MLFLOW_TRACKING_URI": mlflow_server.uri}
    return env
