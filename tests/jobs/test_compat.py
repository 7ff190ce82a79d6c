"""Files written by main before the ground-floor refactor (tests/fixtures/main_dc3dea1) still
load, resume and evaluate: shards and manifest, mid-stage and final checkpoints, a registered
model's state, a version registered the way main did, and a checkpoint whose model_args
predate a setting.

main's checkpoints pickle numpy's RNG state (numpy objects): they are refused as they are (may
hold code, NOT run) with the command that converts them, and after that command they load,
resume and evaluate exactly as before. Its registered files hold only tensors: they load as
they are, without pickle. The fixtures are never modified (converted copies only)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from jobs.checkpoint import NoReadableCheckpoint, load_checkpoint
from jobs.checkpoint_convert import convert
from jobs.eval_config import EvalConfig
from jobs.evaluate import EvalError, evaluate
from jobs.registry import compute_example, load_example, load_model, run_example
from jobs.stage_dir import StageDir
from jobs.tensor_files import UnsafeFileError
from jobs.train import main, parse_args
from model import MAST, MASTConfig
from tests.jobs.conftest import make_davis_sample
from typedconfig import load_config

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "main_dc3dea1"
LEGACY_ARGS = MASTConfig(width=4, feat_dim=8).as_args()


def _legacy(step: int) -> Path:
    return FIXTURE / "checkpoints" / f"checkpoint_{step:08d}"


def _converted(tmp_path: Path) -> Path:
    """Copies of main's two checkpoints, converted by the command their refusal names."""
    out = tmp_path / "converted"
    copies = [shutil.copytree(_legacy(step), out / _legacy(step).name) for step in (2, 4)]
    done = subprocess.run(
        [sys.executable, "-m", "jobs.checkpoint", "convert", *map(str, copies)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "now loads with weights_only=True" in done.stderr
    return out


def test_legacy_checkpoints_are_refused_until_converted_and_registered_state_loads(tmp_path):
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in FIXTURE.rglob("*.pt")}
    for step in (2, 4):
        with pytest.raises(UnsafeFileError) as refused:
            load_checkpoint(_legacy(step))
        message = str(refused.value)
        assert f"{_legacy(step) / 'checkpoint.pt'} may hold code" in message
        assert "numpy" in message and "was NOT run" in message
        assert f"python -m jobs.checkpoint convert {_legacy(step)}" in message
    converted = _converted(tmp_path)
    for step in (2, 4):
        state = load_checkpoint(converted / _legacy(step).name)
        assert state["step"] == step and state["model_args"] == LEGACY_ARGS
        model = MAST.from_state(state)
        assert model.config == MASTConfig(width=4, feat_dim=8)
    registered = torch.load(
        FIXTURE / "checkpoints" / "registered_mast_state.pt", map_location="cpu", weights_only=True
    )  # tensors, dicts and ints only: no conversion needed
    final = load_model(str(converted / "checkpoint_00000004"))
    for a, b in zip(MAST.from_state(registered).state_dict().values(), final.state_dict().values()):
        assert torch.equal(a, b)  # the registered weights are the final checkpoint's
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in FIXTURE.rglob("*.pt")}


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory):
    return make_davis_sample(tmp_path_factory.mktemp("davis"), "num_sequences=1", "num_frames=4")


def test_legacy_final_checkpoint_evaluates(davis_root, tmp_path):
    cfg = load_config(
        EvalConfig,
        overrides=[f"output={tmp_path}", "ray.enabled=false", "mlflow.enabled=false"],
    )
    with pytest.raises(EvalError, match=r"may hold code.*NOT run.*jobs.checkpoint convert"):
        evaluate(str(_legacy(4)), davis_root, cfg)
    ckpt = tmp_path / "checkpoint_00000004"
    shutil.copytree(_legacy(4), ckpt)
    convert(ckpt)
    summary = evaluate(str(ckpt), davis_root, cfg)
    assert summary["scored"] == 1 and not summary["failed"]
    assert 0.0 <= summary["scores"]["J&F-Mean"] <= 1.0
    again = evaluate(str(FIXTURE / "checkpoints" / "registered_mast_state.pt"), davis_root, cfg)
    assert again["scores"] == summary["scores"]  # same weights, same scores


@pytest.mark.parametrize("drop_key", [None, "chunk_size"])
def test_legacy_run_resumes_to_the_planned_step(tmp_path, drop_key):
    shards = shutil.copytree(FIXTURE / "shards", tmp_path / "shards")
    stage = tmp_path / "ray" / "legacy-pretrain"
    shutil.copytree(_legacy(2), stage / "checkpoint_00000002")
    shutil.copy(FIXTURE / "checkpoints" / "stage_data.json", stage / "stage_data.json")
    if drop_key:  # written before the setting existed: resumed with its default
        file = stage / "checkpoint_00000002" / "checkpoint.pt"
        # The copy of our own fixture, edited as main would have written it: trusted.
        state = torch.load(file, map_location="cpu", weights_only=False)
        del state["model_args"][drop_key]
        torch.save(state, file)
    # As it is, a resume records it as unreadable (with the command) and would start afresh.
    with pytest.raises(NoReadableCheckpoint, match="no readable checkpoint"):
        StageDir(stage).resume_checkpoint(None)
    (record,) = (stage / "corrupt_checkpoints.jsonl").read_text().splitlines()
    assert f"python -m jobs.checkpoint convert {stage / 'checkpoint_00000002'}" in record
    convert(stage / "checkpoint_00000002")
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


def test_a_version_registered_as_main_did_loads_without_pickle(tmp_path, monkeypatch):
    import mlflow
    import mlflow.pytorch

    from jobs.tracking import mlflow_client, setup_runs

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    state = torch.load(
        FIXTURE / "checkpoints" / "registered_mast_state.pt", map_location="cpu", weights_only=True
    )
    model = MAST.from_state(state).eval()
    example_input = torch.load(_legacy(4) / "example_input.pt", weights_only=True)
    example = compute_example(model, example_input["frames"], example_input["gaps"], seed=0)
    run_id = setup_runs(uri, "exp", "legacy", {"pretrain": {}}).child_run_ids["pretrain"]
    # jobs.registry.register_stage_model at main dc3dea1: a pickled MLflow pytorch model with
    # the state and the example as extra files.
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp) / "mast_state.pt", Path(tmp) / "mast_example.pt"]
        torch.save(state, files[0])
        torch.save(example, files[1])
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = mlflow.pytorch.log_model(
                model, name="model", serialization_format="pickle",
                extra_files=[str(f) for f in files], pip_requirements=["torch", "mast-train"],
            )  # fmt: skip
    version = mlflow.register_model(info.model_uri, "mast-legacy")
    mlflow_client(uri).set_registered_model_alias("mast-legacy", "pretrain-latest", version.version)
    logged = Path(mlflow.artifacts.download_artifacts(info.model_uri, tracking_uri=uri))
    assert (logged / "extra_files" / "mast_state.pt").is_file()

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # as every job runs
    for uri_form in ("models:/mast-legacy@pretrain-latest", "models:/mast-legacy/1"):
        loaded = load_model(uri_form, tracking_uri=uri)
        stored = load_example(uri_form, tracking_uri=uri)
        assert torch.equal(run_example(loaded, stored), example["reconstruction"])
