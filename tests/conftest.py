"""Isolation every test gets, whatever it imports.

MLflow keeps the tracking and registry URIs of `mlflow.set_tracking_uri` /
`mlflow.set_registry_uri` in module globals AND exports them as MLFLOW_TRACKING_URI /
MLFLOW_REGISTRY_URI into os.environ, so that subprocesses inherit them. A test that runs job
code in-process (jobs.registry sets both) would otherwise leave its store behind for every
later test: a client built with only a tracking URI, and every job a later test starts as a
subprocess, then talked to a server that test had already stopped (connection refused, after
minutes of retries).
"""

from __future__ import annotations

import os
import sys

import pytest

MLFLOW_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def _isolate_mlflow_uris():
    saved = {name: os.environ.get(name) for name in MLFLOW_URI_VARS}
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        mlflow.set_tracking_uri(None)  # public setters: None clears the global (and the env)
        mlflow.set_registry_uri(None)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
