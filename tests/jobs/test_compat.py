"""Files written by main before the ground-floor refactor (tests/fixtures/main_dc3dea1) still
load, resume and evaluate: shards and manifest, mid-stage and final checkpoints, a registered
model's state, and a checkpoint whose model_args predate a setting."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from jobs.checkpoint import load_checkpoint
from jobs.eval_config import EvalConfig
from jobs.evaluate import evaluate
from jobs.registry import load_model
from jobs.train import main, parse_args
from model import MAST, MASTConfig
from tests.jobs.conftest import make_davis_sample
from typedconfig import load_config

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "main_dc3dea1"
LEGACY_ARGS = MASTConfig(width=4, feat_dim=8).as_args()


def _legacy_state(step: int) -> dict:
    # Today's format is a pickle (what main at dc3dea1 wrote); the reader is jobs.checkpoint.
    return load_checkpoint(FIXTURE / "checkpoints" / f"checkpoint_{step:08d}")


def test_legacy_checkpoints_and_registered_state_load():
    for step in (2, 4):
        state = _legacy_state(step)
        assert state["step"] == step and state["model_args"] == LEGACY_ARGS
        model = MAST.from_state(state)
        assert model.config == MASTConfig(width=4, feat_dim=8)
    registered = torch.load(
        FIXTURE / "checkpoints" / "registered_mast_state.pt", map_location="cpu", weights_only=False
    )
    final = load_model(str(FIXTURE / "checkpoints" / "checkpoint_00000004"))
    for a, b in zip(MAST.from_state(registered).state_dict().values(), final.state_dict().values()):
        assert torch.equal(a, b)  # the registered weights are the final checkpoint's


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory):
    return make_davis_sample(tmp_path_factory.mktemp("davis"), "num_sequences=1", "num_frames=4")


def test_legacy_final_checkpoint_evaluates(davis_root, tmp_path):
    cfg = load_config(
        EvalConfig,
        overrides=[f"output={tmp_path}", "ray.enabled=false", "mlflow.enabled=false"],
    )
    ckpt = str(FIXTURE / "checkpoints" / "checkpoint_00000004")
    summary = evaluate(ckpt, davis_root, cfg)
    assert summary["scored"] == 1 and not summary["failed"]
    assert 0.0 <= summary["scores"]["J&F-Mean"] <= 1.0
    again = evaluate(str(FIXTURE / "checkpoints" / "registered_mast_state.pt"), davis_root, cfg)
    assert again["scores"] == summary["scores"]  # same weights, same scores


@pytest.mark.parametrize("drop_key", [None, "chunk_size"])
def test_legacy_run_resumes_to_the_planned_step(tmp_path, drop_key):
    shards = shutil.copytree(FIXTURE / "shards", tmp_path / "shards")
    stage = tmp_path / "ray" / "legacy-pretrain"
    shutil.copytree(FIXTURE / "checkpoints" / "checkpoint_00000002", stage / "checkpoint_00000002")
    shutil.copy(FIXTURE / "checkpoints" / "stage_data.json", stage / "stage_data.json")
    if drop_key:  # written before the setting existed: resumed with its default
        file = stage / "checkpoint_00000002" / "checkpoint.pt"
        state = torch.load(file, map_location="cpu", weights_only=False)
        del state["model_args"][drop_key]
        torch.save(state, file)
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    out = main(
        parse_args(
            [
                "--config", str(ROOT / "configs/train/demo.yaml"), "--stages", "pretrain",
                "--data", str(shards / "manifest.json"), "--run-name", "legacy",
                f"storage_path={tmp_path / 'ray'}", f"mlflow.tracking_uri={uri}",
                "scaling.num_workers=0", "schedule.steps=4", "checkpoint.every_steps=2",
                "model.width=4", "model.feat_dim=8", "loader.crop_size=32",
                "loader.batch_size=2", "mlflow.system_metrics=false",
            ]
        )
    )  # fmt: skip
    final = Path(out["pretrain"]["checkpoint"])
    assert final.name == "checkpoint_00000004" and out["pretrain"]["version"] == 1
    state = load_checkpoint(final)
    assert state["step"] == 4 and state["model_args"] == LEGACY_ARGS
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (child,) = client.search_runs(
        [client.get_experiment_by_name("mast-train").experiment_id], "tags.`mast.role` = 'stage'"
    )
    assert child.data.metrics["resumed_from_step"] == 2
    assert json.loads((stage / "stage_done.json").read_text())["version"] == 1
