"""MLflow tracking and registry for training: where runs go, how they resume, how models load.

- Tracking URI: `mlflow.tracking_uri` from the config, else $MLFLOW_TRACKING_URI, else an
  embedded SQLite store at <runs>/mlflow/mlflow.db with artifacts in <runs>/mlflow/artifacts
  (<runs> = $MAST_RUNS_DIR or <project>/runs; absolute paths, since Ray workers chdir).
  Under `ray job submit` the working dir is a temporary copy: point the URI at a server or an
  absolute path there.
- One parent run per pipeline invocation (run name = `run_name`) and one child run per stage
  (`<run_name>-<stage>`); both are found again by their tags, so rerunning the same command
  or a Ray worker restart continues the same runs instead of creating duplicates.
- Rank 0 of the training workers logs metrics, system metrics and pictures
  (`jobs.rank_zero`); registered models are logged and loaded by `jobs.registry`; every tag
  key and alias is in `jobs.mlflow_keys`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

from jobs import mlflow_keys as keys

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class TrackingError(RuntimeError):
    """The tracking store is unreachable or unusable; the message names the URI and the fix."""


def runs_dir() -> Path:
    return Path(os.environ.get("MAST_RUNS_DIR", PROJECT_ROOT / "runs")).resolve()


def resolve_tracking_uri(configured: str = "") -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        uri = f"sqlite:///{runs_dir() / 'mlflow' / 'mlflow.db'}"  # absolute: sqlite:////...
    return uri


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :])


def artifact_location(uri: str) -> str | None:
    """Artifacts beside an SQLite store (MLflow would otherwise use ./mlruns of the cwd)."""
    db = sqlite_path(uri)
    return (db.parent / "artifacts").as_uri() if db is not None else None


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise TrackingError with the cause and the fix unless `uri` can be used right now."""
    db = sqlite_path(uri)
    if db is not None:
        if not db.is_absolute():
            raise TrackingError(
                f"MLflow tracking URI {uri} is relative; Ray workers change directory, use an "
                f"absolute path: sqlite:///{Path(db).resolve()}"
            )
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"cannot create the MLflow store directory {db.parent}: {e}") from e
        if not os.access(db.parent, os.W_OK):
            raise TrackingError(f"MLflow store directory {db.parent} is not writable")
        return
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
                if r.status != 200:
                    raise TrackingError(f"MLflow server {uri} answered {r.status} on /health")
            # MLflow's basic-auth app leaves /health open, so it proves nothing about the
            # login: one authenticated read does, before any Ray worker or GPU is started.
            _check_credentials(uri.rstrip("/"), timeout_s)
        except TrackingError:
            raise
        except (urllib.error.URLError, OSError) as e:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({e}). Start it (`mlflow server "
                "--backend-store-uri sqlite:////abs/mlflow.db`), fix mlflow.tracking_uri / "
                "MLFLOW_TRACKING_URI, or leave both unset to use the embedded SQLite store."
            ) from e
        return
    if uri.startswith("file:") or "://" not in uri:
        raise TrackingError(
            f"MLflow tracking URI {uri!r}: MLflow 3 refuses the file store; use "
            "sqlite:////absolute/path/mlflow.db or http://host:port"
        )
    if uri.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "mysql", "mssql", "databricks"):
        return  # MLflow's other stores: the first call reports their own errors
    raise TrackingError(
        f"MLflow tracking URI {uri!r} is not supported; use sqlite:////absolute/path/mlflow.db, "
        "http(s)://server:port or a database URI MLflow takes (postgresql://, mysql://); set "
        "mlflow.tracking_uri or MLFLOW_TRACKING_URI"
    )


def _check_credentials(server: str, timeout_s: float) -> None:
    """Raise TrackingError unless `server` accepts the credentials MLflow's client would send.

    The same environment variables as the client (mlflow.utils.rest_utils): Basic auth from
    MLFLOW_TRACKING_USERNAME + MLFLOW_TRACKING_PASSWORD, else a Bearer MLFLOW_TRACKING_TOKEN.
    A server without authentication answers 200 whatever is sent.
    """
    import base64

    path = "/api/2.0/mlflow/experiments/search?max_results=1"
    request = urllib.request.Request(server + path)
    username = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN", "")
    if username and password:
        basic = base64.b64encode(f"{username}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
    elif token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return
    except urllib.error.HTTPError as e:
        answer = e.read(300).decode(errors="replace").strip()
        if e.code not in (401, 403):
            raise TrackingError(
                f"MLflow tracking server {server} answered HTTP {e.code} on {path}: {answer}"
            ) from e
        if "Host header" in answer:  # MLflow's --allowed-hosts check, not the login
            raise TrackingError(
                f"MLflow tracking server {server} refused the Host header (HTTP {e.code}): add "
                "this host name to the server's --allowed-hosts"
            ) from e
        sent = (
            f"user {username!r}"
            if username and password
            else "a request without credentials (MLFLOW_TRACKING_USERNAME/PASSWORD not both set)"
        )
        raise TrackingError(
            f"MLflow tracking server {server} refused {sent} (HTTP {e.code}: {answer}). It "
            "requires a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a "
            "user of that server (in the cluster: the Secret mlflow-jobs, infra/README.md)."
        ) from e


def mlflow_client(uri: str):
    """An MLflow client whose registry is the same store as its tracking."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri))


@dataclasses.dataclass(frozen=True)
class StageRuns:
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    child_run_ids: dict[str, str]


def _find_run(client, exp_id: str, tags: dict[str, str]) -> str | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([exp_id], filter_string=query, max_results=2)
    if len(runs) > 1:
        log.warning("several MLflow runs match %s; continuing the first", tags)
    return runs[0].info.run_id if runs else None


def setup_runs(
    uri: str, experiment: str, run_name: str, stage_params: dict[str, dict[str, Any]]
) -> StageRuns:
    """Find or create the parent run and one child run per stage (in `stage_params` order)."""
    from mlflow.entities import Param

    client = mlflow_client(uri)
    exp_id = ensure_experiment(uri, experiment)
    parent_tags = {keys.RUN_NAME: run_name, keys.ROLE: keys.ROLE_PARENT}
    parent = _find_run(client, exp_id, parent_tags)
    if parent is None:
        described = parent_tags | {
            keys.RUN_DESCRIPTION: f"MAST training run {run_name!r}: stages "
            f"{' -> '.join(stage_params)}, one child run and one registered version per stage"
        }
        parent = client.create_run(exp_id, run_name=run_name, tags=described).info.run_id
    else:
        log.info("continuing MLflow parent run %s (%s)", run_name, parent)
    children = {}
    for stage, params in stage_params.items():
        tags = {keys.RUN_NAME: run_name, keys.ROLE: keys.ROLE_STAGE, keys.STAGE: stage}
        child = _find_run(client, exp_id, tags)
        if child is None:
            tags["mlflow.parentRunId"] = parent
            child = client.create_run(exp_id, run_name=f"{run_name}-{stage}", tags=tags)
            child = child.info.run_id
        # Params are immutable in MLflow: log only new keys, warn about changed ones.
        logged = client.get_run(child).data.params
        fresh = []
        for k, v in params.items():
            value = str(v)[:6000]
            if k not in logged:
                fresh.append(Param(k, value))
            elif logged[k] != value:
                log.warning(
                    "param %s changed on resume (%s -> %s); keeping the first", k, logged[k], value
                )
        for i in range(0, len(fresh), 100):
            client.log_batch(child, params=fresh[i : i + 100])
        children[stage] = child
    return StageRuns(uri, exp_id, parent, children)


def log_dataset(
    uri: str,
    run_id: str,
    source: str,
    content_hash: str,
    num_samples: int,
    tags: dict[str, str] | None = None,
) -> None:
    """Lineage: the manifest URI and the content hash of what is trained on as the run's
    training input; `tags` (e.g. the shards skipped) go with it."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    client = mlflow_client(uri)
    existing = client.get_run(run_id).inputs.dataset_inputs
    digest = content_hash[:32]
    if any(d.dataset.digest == digest for d in existing):
        return
    with warnings.catch_warnings():  # a local path matches two equivalent source classes
        warnings.simplefilter("ignore", UserWarning)
        resolved = resolve_dataset_source(source)
    ds = MetaDataset(resolved, name=Path(source).parent.name or "data", digest=digest)
    inp = DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "train")])
    client.log_inputs(run_id, datasets=[inp])
    client.set_tag(run_id, keys.DATA_HASH, content_hash)
    client.set_tag(run_id, keys.DATA_NUM_SAMPLES, str(num_samples))
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)


def set_tag(uri: str, run_id: str, key: str, value: str) -> None:
    mlflow_client(uri).set_tag(run_id, key, value)


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    mlflow_client(uri).set_terminated(run_id, status)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
