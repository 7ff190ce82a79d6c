"""Registered models: how a finished stage is logged and registered in MLflow, and how any
model URI (models:/name@alias, models:/name/N, runs:/..., a checkpoint path) is loaded back.

The driver logs the model of each finished stage as plain files, in an MLflow 3 logged model
named `model` of the stage's run (runs:/<run_id>/model; no MLmodel, no pickled model):
- `mast_state.pt`: the final checkpoint's {"model_args", "model", "config", "step", "metrics"};
- `mast_example.pt`: a fixed example (input, seed, output), so that `load_model` +
  `load_example` reproduce the logged reconstruction exactly;
- `mast_model.json`: {"model_args", "stage", "step", "weights_sha256"}, for a reader without
  torch;
then registers a version of them (source `models:/<model_id>`; tags: stage, git commit, data
hash, final loss, run name, step: `jobs.mlflow_keys`) and moves the alias `<stage>-latest` to
it. Both .pt files hold only tensors, numbers and containers: they load with
`torch.load(weights_only=True)` (`jobs.tensor_files`), so nothing read from the registry runs
code. Versions registered before (an MLflow pytorch model with the same two files under
`extra_files/`) load the same way. A stage registered again after its job was killed between
registering and recording it finds its version (same run, same weights) instead of adding one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from jobs import mlflow_keys as keys
from jobs.rank_zero import comparison_image
from jobs.tensor_files import CheckpointError, load_tensors, read_bytes, tensor_bytes, write_file
from jobs.tracking import git_commit, mlflow_client, resolve_tracking_uri
from jobs.train_config import TrainConfig
from storage import as_location

log = logging.getLogger(__name__)

MODEL_STATE_FILE = "mast_state.pt"
EXAMPLE_FILE = "mast_example.pt"
MODEL_INFO_FILE = "mast_model.json"
MODEL_ARTIFACT_PATH = "model"  # the logged model's name in the stage's run: runs:/<run_id>/model


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


def weights_digest(state: dict[str, Any]) -> str:
    """sha256 of a state's weights: what says two registrations hold the same model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state["model"].items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def register_stage_model(
    *,
    uri: str,
    run_id: str,
    model_name: str,
    stage: str,
    state: dict[str, Any],
    example: dict[str, Any],
    tags: dict[str, str],
    description: str = "",
) -> int:
    """Log the stage's model files to its run, register a new version of them, tag it and
    describe it (the run too), move `<stage>-latest`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow_client(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    keep = ("model_args", "model", "config", "step", "metrics")
    info = {
        "model_args": state["model_args"], "stage": stage, "step": state.get("step"),
        "weights_sha256": weights_digest(state),
    }  # fmt: skip
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        image = comparison_image(example["target"][0], example["reconstruction"][0])
        mlflow.log_image(image, artifact_file=f"model_example/{stage}.png")
    # An MLflow 3 logged model of the run ("model": runs:/<run_id>/model) holding our three
    # files and nothing else (no MLmodel, no pickled model): its own artifact directory, so
    # no version's files ever change, and the page jobs.evaluate links its scores to.
    logged = new_logged_model(client, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        write_file(
            Path(tmp) / MODEL_STATE_FILE, tensor_bytes({k: state[k] for k in keep if k in state})
        )
        write_file(Path(tmp) / EXAMPLE_FILE, tensor_bytes(example))
        write_file(Path(tmp) / MODEL_INFO_FILE, json.dumps(info, indent=2).encode())
        client.log_model_artifacts(logged.model_id, tmp)  # through a server's artifact proxy
    client.finalize_logged_model(logged.model_id, "READY")
    try:
        client.create_registered_model(model_name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        model_name, f"models:/{logged.model_id}", run_id=run_id, tags=tags,
        model_id=logged.model_id, description=description or None,
    )  # fmt: skip
    if description:  # the run's description in the MLflow UI
        client.set_tag(run_id, keys.RUN_DESCRIPTION, f"{description}; registered as "
                       f"{model_name} version {version.version}")  # fmt: skip
    alias = keys.latest_alias(stage)
    client.set_registered_model_alias(model_name, alias, version.version)
    log.info("registered %s version %s (alias %s)", model_name, version.version, alias)
    return int(version.version)


def new_logged_model(client, run_id: str):
    """A fresh logged model "model" of the run; this run's unfinished ones (an upload killed
    before it was registered) are deleted first, so that runs:/<run_id>/model never finds one."""
    experiment_id = client.get_run(run_id).info.experiment_id
    for old in client.search_logged_models(
        [experiment_id], filter_string=f"name = '{MODEL_ARTIFACT_PATH}'"
    ):
        if old.source_run_id == run_id and str(old.status) == "PENDING":
            client.delete_logged_model(old.model_id)
    return client.create_logged_model(experiment_id, name=MODEL_ARTIFACT_PATH, source_run_id=run_id)


def logged_info(uri: str, artifact_uri: str) -> dict[str, Any] | None:
    """The `mast_model.json` logged under `artifact_uri`; None if there is none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        file = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{artifact_uri}/{MODEL_INFO_FILE}", tracking_uri=uri
        )
        info = json.loads(Path(file).read_text())
    except (MlflowException, OSError, ValueError):  # none (a version logged before), or torn
        return None
    return info if isinstance(info, dict) else None


def registered_version(
    uri: str, model_name: str, run_id: str, stage: str, digest: str
) -> int | None:
    """The version of `model_name` already registered from this stage run with these weights."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(uri)
    try:
        versions = client.search_model_versions(f"name='{model_name}' and run_id='{run_id}'")
    except MlflowException as e:  # no such registered model yet
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None
    for version in sorted(versions, key=lambda v: int(v.version)):
        if version.tags.get(keys.VERSION_STAGE) != stage:
            continue
        files = client.get_model_version_download_uri(model_name, version.version)
        if (logged_info(uri, files) or {}).get("weights_sha256") == digest:
            return int(version.version)
    return None


def is_mlflow_uri(uri: str) -> bool:
    """models:/..., runs:/... or a remote artifact URL; not a checkpoint (a local path, or a
    checkpoint directory or .pt file at an object-store URL: an object-store storage_path)."""
    if uri.startswith(("models:/", "runs:/")):
        return True
    if "://" not in uri or uri.startswith("file://"):
        return False
    from jobs.checkpoint import MARKER_FILE

    place = as_location(uri)
    is_checkpoint = place.name.startswith("checkpoint_") or place.name.endswith(".pt")
    return not (is_checkpoint or (place / MARKER_FILE).exists())


def _download(uri: str, tracking_uri: str | None) -> Path:
    import mlflow

    tracking_uri = resolve_tracking_uri(tracking_uri or "")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))


def _extra_file(root: Path, name: str, uri: str) -> Path:
    hits = sorted(root.rglob(name))  # model/<name>; before: model/extra_files/<name>
    if not hits:
        raise FileNotFoundError(f"{uri} has no {name}: it was not logged by jobs.train")
    return hits[0]


def _load_logged(uri: str, tracking_uri: str | None, name: str) -> Any:
    """One of a logged model's .pt files, tensors only (an UnsafeFileError names the file)."""
    file = _extra_file(_download(uri, tracking_uri), name, uri)
    return load_tensors(read_bytes(file), file)


def load_state(uri: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """The checkpoint dict behind `uri` (models:/name@alias, models:/name/N, runs:/..., path)."""
    from jobs.checkpoint import load_checkpoint

    if not is_mlflow_uri(uri):
        return load_checkpoint(uri.removeprefix("file://"))
    state = _load_logged(uri, tracking_uri, MODEL_STATE_FILE)
    if not isinstance(state, dict) or "model" not in state or "model_args" not in state:
        raise CheckpointError(f"{uri}: {MODEL_STATE_FILE} lacks 'model'/'model_args'")
    return state


def load_model(uri: str, tracking_uri: str | None = None):
    """A MAST in eval mode from models:/name@alias, models:/name/N, runs:/... or a checkpoint."""
    from model import MAST

    return MAST.from_state(load_state(uri, tracking_uri)).eval()


def load_example(uri: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """The fixed example (input, seed, output) stored with a registered model."""
    return _load_logged(uri, tracking_uri, EXAMPLE_FILE)


def register_stage(
    cfg: TrainConfig,
    state: dict[str, Any],
    example_input: dict[str, torch.Tensor],
    *,
    run_name: str,
    data_hash: str,
    uri: str,
    run_id: str,
) -> int:
    """Register a finished stage's final checkpoint `state` with the example computed on
    `example_input` (the first batch's first two clips); returns the version number."""
    from model import MAST

    example = compute_example(
        MAST.from_state(state), example_input["frames"], example_input["gaps"], cfg.seed
    )
    tags = {
        keys.VERSION_STAGE: cfg.stage,
        keys.VERSION_GIT_COMMIT: git_commit(),
        keys.VERSION_DATA_HASH: data_hash,
        keys.VERSION_FINAL_LOSS: f"{state.get('metrics', {}).get('loss', float('nan')):.6g}",
        keys.VERSION_RUN_NAME: run_name,
        keys.VERSION_STEP: str(state["step"]),
    }
    name = cfg.mlflow.registered_model
    # Killed after registering, before the stage was recorded done: the rerun resumed at the
    # last step and trained nothing, so a version of this run holds these very weights.
    version = registered_version(uri, name, run_id, cfg.stage, weights_digest(state))
    if version is not None:
        mlflow_client(uri).set_registered_model_alias(
            name, keys.latest_alias(cfg.stage), str(version)
        )
        log.info("stage %s: already registered as %s version %d", cfg.stage, name, version)
        return version
    return register_stage_model(
        uri=uri, run_id=run_id, model_name=name, stage=cfg.stage, state=state, example=example,
        tags=tags, description=stage_description(cfg, state, run_name, data_hash),
    )  # fmt: skip


def stage_description(
    cfg: TrainConfig, state: dict[str, Any], run_name: str, data_hash: str
) -> str:
    """One line a person reads on the version's and the run's page."""
    loss = state.get("metrics", {}).get("loss")
    return (
        f"MAST {cfg.stage} stage of training run {run_name!r}: {state['step']} steps, batch "
        f"{cfg.loader.batch_size} x {max(1, cfg.scaling.num_workers)} workers, "
        f"{cfg.loader.crop_size}px crops, on data {data_hash[:12]}"
        + (f"; final loss {loss:.4g}" if loss is not None else "")
    )
