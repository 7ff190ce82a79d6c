"""Registered models: how a finished stage is logged and registered in MLflow, and how any
model URI (models:/name@alias, models:/name/N, runs:/..., a checkpoint path) is loaded back.

The driver logs the model of each finished stage, registers it (tags: stage, git commit,
data hash, final loss, run name, step: `jobs.mlflow_keys`) and moves the alias
`<stage>-latest` to it. The logged model carries our checkpoint state (`mast_state.pt`) and
a fixed example (input, seed, output: `mast_example.pt`) so that `load_model` +
`load_example` reproduce the logged reconstruction exactly.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from jobs import mlflow_keys as keys
from jobs.rank_zero import comparison_image
from jobs.tracking import git_commit, mlflow_client, resolve_tracking_uri
from jobs.train_config import TrainConfig

log = logging.getLogger(__name__)

MODEL_STATE_FILE = "mast_state.pt"
EXAMPLE_FILE = "mast_example.pt"


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
    client = mlflow_client(uri)
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
    alias = keys.latest_alias(stage)
    client.set_registered_model_alias(model_name, alias, version.version)
    log.info("registered %s version %s (alias %s)", model_name, version.version, alias)
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
    return register_stage_model(
        uri=uri,
        run_id=run_id,
        model_name=cfg.mlflow.registered_model,
        stage=cfg.stage,
        state=state,
        example=example,
        tags=tags,
    )
