"""MLflow tracking and registry for training: where runs go, how they resume, how models load.

- Tracking URI: `mlflow.tracking_uri` from the config, else $MLFLOW_TRACKING_URI, else an
  embedded SQLite store at <runs>/mlflow/mlflow.db with artifacts in <runs>/mlflow/artifacts
  (<runs> = $MAST_RUNS_DIR or <project>/runs; absolute paths, since Ray workers chdir).
  Under `ray job submit` the working dir is a temporary copy: point the URI at a server or an
  absolute path there.
- One parent run per pipeline invocation (run name = `run_name`) and one child run per stage
  (`<run_name>-<stage>`); both are found again by their tags, so rerunning the same command
  or a Ray worker restart continues the same runs instead of creating duplicates.
- Rank 0 of the training workers logs metrics, system metrics and pictures (`RankZeroTracker`).
- The driver logs the model of each finished stage, registers it (tags: stage, git commit,
  data hash, final loss) and moves the alias `<stage>-latest` to it. The model carries our
  checkpoint file and a fixed example (input, seed, output) so that `load_model` +
  `load_example` reproduce the logged reconstruction exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TAG_RUN_NAME = "mast.run_name"
TAG_ROLE = "mast.role"
TAG_STAGE = "mast.stage"
MODEL_STATE_FILE = "mast_state.pt"
EXAMPLE_FILE = "mast_example.pt"


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


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    client = _client(uri)
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

    client = _client(uri)
    exp_id = ensure_experiment(uri, experiment)
    parent_tags = {TAG_RUN_NAME: run_name, TAG_ROLE: "parent"}
    parent = _find_run(client, exp_id, parent_tags)
    if parent is None:
        parent = client.create_run(exp_id, run_name=run_name, tags=parent_tags).info.run_id
    else:
        log.info("continuing MLflow parent run %s (%s)", run_name, parent)
    children = {}
    for stage, params in stage_params.items():
        tags = {TAG_RUN_NAME: run_name, TAG_ROLE: "stage", TAG_STAGE: stage}
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

    client = _client(uri)
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
    client.set_tag(run_id, "data.hash", content_hash)
    client.set_tag(run_id, "data.num_samples", str(num_samples))
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)


def set_tag(uri: str, run_id: str, key: str, value: str) -> None:
    _client(uri).set_tag(run_id, key, value)


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(uri).set_terminated(run_id, status)


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


def comparison_image(target: torch.Tensor, reconstruction: torch.Tensor) -> np.ndarray:
    """(H, 3W) uint8 picture: target | reconstruction | |error| (normalised channel in [-1, 1])."""
    t = target.detach().float().cpu().reshape(target.shape[-2:])
    r = reconstruction.detach().float().cpu().reshape(reconstruction.shape[-2:])
    to_u8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    err = ((r - t).abs().clamp(0, 1) * 255).round().to(torch.uint8)
    return torch.cat([to_u8(t), to_u8(r), err], dim=1).numpy()


class RankZeroTracker:
    """Every MLflow side effect of a training worker; a no-op on ranks other than 0."""

    def __init__(self, enabled: bool, uri: str, run_id: str, system_metrics: bool = True):
        self.enabled = enabled and bool(run_id)
        self.uri, self.run_id, self.system_metrics = uri, run_id, system_metrics
        self.logged_until: dict[str, int] = {}  # metric -> last step already in the run

    def __enter__(self) -> RankZeroTracker:
        if self.enabled:
            import mlflow

            mlflow.set_tracking_uri(self.uri)
            # A resumed attempt replays the steps after its checkpoint; whatever the failed
            # attempt already logged for them stays, and is not logged a second time.
            client = _client(self.uri)
            for key in client.get_run(self.run_id).data.metrics:
                history = client.get_metric_history(self.run_id, key)
                self.logged_until[key] = max((m.step for m in history), default=-1)
            mlflow.start_run(run_id=self.run_id, log_system_metrics=self.system_metrics)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.enabled:
            import mlflow

            # A failed attempt leaves the run RUNNING: the retried attempt continues it.
            mlflow.end_run(status="FINISHED" if exc_type is None else "RUNNING")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            import mlflow

            fresh = {k: float(v) for k, v in metrics.items() if step > self.logged_until.get(k, -1)}
            if fresh:
                mlflow.log_metrics(fresh, step=step)

    def log_picture(self, target: torch.Tensor, reconstruction: torch.Tensor, step: int) -> None:
        if self.enabled:
            import mlflow

            image = comparison_image(target, reconstruction)
            mlflow.log_image(image, artifact_file=f"images/step_{step:08d}.png")

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
            import mlflow

            mlflow.set_tag(key, value)


def compute_example(
    model: torch.nn.Module, frames: torch.Tensor, gaps: torch.Tensor, seed: int = 0
):
    """The fixed example stored with a registered model: its input, seed and exact output."""
    model.eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model(frames, gaps)
    return {
        "frames": frames.cpu(),
        "gaps": gaps.cpu(),
        "seed": seed,
        "reconstruction": out.reconstruction.float().cpu(),
        "target": out.target.float().cpu(),
        "loss": float(out.loss),
    }


def run_example(model: torch.nn.Module, example: dict[str, Any]) -> torch.Tensor:
    return compute_example(model, example["frames"], example["gaps"], example["seed"])[
        "reconstruction"
    ]


def register_stage_model(
    *,
    uri: str,
    run_id: str,
    model_name: str,
    stage: str,
    state: dict[str, Any],
    example: dict[str, Any],
    tags: dict[str, str],
) -> int:
    """Log the stage's model to its run, register a new version, tag it, move `<stage>-latest`."""
    import mlflow
    import mlflow.pytorch

    from model import MAST

    model = MAST.from_state(state).eval()
    client = _client(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        state_file, example_file = Path(tmp) / MODEL_STATE_FILE, Path(tmp) / EXAMPLE_FILE
        keep = ("model_args", "model", "config", "step", "metrics")
        torch.save({k: state[k] for k in keep if k in state}, state_file)
        torch.save(example, example_file)
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            image = comparison_image(example["target"][0], example["reconstruction"][0])
            mlflow.log_image(image, artifact_file=f"model_example/{stage}.png")
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                serialization_format="pickle",
                extra_files=[str(state_file), str(example_file)],
                # Explicit requirements: skips MLflow's slow environment inference.
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "mast-train"],
            )
    version = mlflow.register_model(info.model_uri, model_name, tags=tags)
    client.set_registered_model_alias(model_name, f"{stage}-latest", version.version)
    log.info("registered %s version %s (alias %s-latest)", model_name, version.version, stage)
    return int(version.version)


def is_mlflow_uri(uri: str) -> bool:
    """models:/..., runs:/... or a remote artifact URL (not a local checkpoint path)."""
    return uri.startswith(("models:/", "runs:/")) or (
        "://" in uri and not uri.startswith("file://")
    )


def _download(uri: str, tracking_uri: str | None) -> Path:
    import mlflow

    tracking_uri = resolve_tracking_uri(tracking_uri or "")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))


def _extra_file(root: Path, name: str, uri: str) -> Path:
    hits = sorted(root.rglob(name))
    if not hits:
        raise FileNotFoundError(f"{uri} has no {name}: it was not logged by jobs.train")
    return hits[0]


def load_state(uri: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """The checkpoint dict behind `uri` (models:/name@alias, models:/name/N, runs:/..., path)."""
    from jobs.checkpoint import load_checkpoint

    if not is_mlflow_uri(uri):
        return load_checkpoint(uri.removeprefix("file://"))
    root = _download(uri, tracking_uri)
    file = _extra_file(root, MODEL_STATE_FILE, uri)
    return torch.load(file, map_location="cpu", weights_only=False)


def load_model(uri: str, tracking_uri: str | None = None):
    """A MAST in eval mode from models:/name@alias, models:/name/N, runs:/... or a checkpoint."""
    from model import MAST

    return MAST.from_state(load_state(uri, tracking_uri)).eval()


def load_example(uri: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """The fixed example (input, seed, output) stored with a registered model."""
    root = _download(uri, tracking_uri)
    return torch.load(_extra_file(root, EXAMPLE_FILE, uri), map_location="cpu", weights_only=False)
