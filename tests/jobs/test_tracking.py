"""MLflow on SQLite: URIs, reachability, run reuse, registration (plain files, no pickled model)
and exact reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from jobs.checkpoint import save_checkpoint
from jobs.registry import (
    compute_example,
    load_example,
    load_model,
    register_stage_model,
    run_example,
)
from jobs.tracking import (
    TrackingError,
    artifact_location,
    check_reachable,
    log_dataset,
    resolve_tracking_uri,
    setup_runs,
)
from model import MAST

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"


def test_uri_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MAST_RUNS_DIR", str(tmp_path))
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    assert resolve_tracking_uri().startswith("sqlite:////")  # absolute
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri() == "http://mlflow:5000"
    assert resolve_tracking_uri("sqlite:////x/y.db") == "sqlite:////x/y.db"  # config wins
    assert artifact_location("sqlite:////x/y.db") == "file:///x/artifacts"


def test_unreachable_and_unusable_stores_are_clear_errors():
    with pytest.raises(TrackingError, match="unreachable.*mlflow server"):
        check_reachable("http://127.0.0.1:9", timeout_s=2)
    with pytest.raises(TrackingError, match="relative"):
        check_reachable("sqlite:///relative/mlflow.db")
    with pytest.raises(TrackingError, match="file store"):
        check_reachable("file:///tmp/mlruns")
    with pytest.raises(TrackingError, match=r"'foo://bar' is not supported; use sqlite:////.*"):
        check_reachable("foo://bar")
    check_reachable("postgresql://mlflow@db:5432/mlflow")  # MLflow's own: it reports errors


def test_runs_are_found_again_not_duplicated(uri, tmp_path):
    check_reachable(uri)
    params = {"pretrain": {"optim.lr": 1e-3, "model.width": 8}, "main": {"optim.lr": 1e-4}}
    first = setup_runs(uri, "exp", "r1", params)
    again = setup_runs(uri, "exp", "r1", params)
    assert again == first
    other = setup_runs(uri, "exp", "r2", {"pretrain": {}})
    assert other.parent_run_id != first.parent_run_id
    client = MlflowClient(uri)
    child = client.get_run(first.child_run_ids["pretrain"])
    assert child.data.params == {"optim.lr": "0.001", "model.width": "8"}
    assert child.data.tags["mlflow.parentRunId"] == first.parent_run_id
    assert len(client.search_runs([first.experiment_id])) == 5  # 2 parents + 3 children
    exp = client.get_experiment(first.experiment_id)
    assert exp.artifact_location == (tmp_path / "mlflow" / "artifacts").as_uri()

    manifest = tmp_path / "shards" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"shards": []}))
    for _ in range(2):  # logged once
        log_dataset(uri, child.info.run_id, str(manifest), "ab" * 32, 42)
    inputs = client.get_run(child.info.run_id).inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.digest == "ab" * 16
    assert str(manifest) in inputs[0].dataset.source
    assert client.get_run(child.info.run_id).data.tags["data.hash"] == "ab" * 32


def test_registered_model_reproduces_its_example(uri, tmp_path):
    torch.manual_seed(0)
    model = MAST(width=8, feat_dim=8)
    frames = torch.randint(0, 256, (2, 2, 3, 32, 32), dtype=torch.uint8)
    gaps = torch.tensor([[2], [5]])
    model.train()
    model(frames, gaps).loss.backward()  # BN running stats move away from their init
    ckpt = save_checkpoint(
        tmp_path / "checkpoint_00000001",
        model=model,
        optimizer=None,
        scheduler=None,
        step=1,
        config={},
        data_position={"start_step": 1},
        metrics={"loss": 0.5},
    )
    state = torch.load(ckpt / "checkpoint.pt", weights_only=True)
    example = compute_example(MAST.from_state(state), frames, gaps, seed=3)
    runs = setup_runs(uri, "exp", "reg", {"pretrain": {}})
    for expected in (1, 2):
        version = register_stage_model(
            uri=uri,
            run_id=runs.child_run_ids["pretrain"],
            model_name="mast-test",
            stage="pretrain",
            state=state,
            example=example,
            tags={"stage": "pretrain", "final_loss": "0.5"},
        )
        assert version == expected
    client = MlflowClient(uri)
    mv = client.get_model_version_by_alias("mast-test", "pretrain-latest")
    assert int(mv.version) == 2 and mv.tags["stage"] == "pretrain"

    run_uri = f"runs:/{runs.child_run_ids['pretrain']}/model"
    for model_uri in (
        "models:/mast-test@pretrain-latest",
        "models:/mast-test/1",
        run_uri,
        str(ckpt),
    ):
        loaded = load_model(model_uri, tracking_uri=uri)
        assert not loaded.training
        assert torch.equal(run_example(loaded, example), example["reconstruction"])
    stored = load_example("models:/mast-test@pretrain-latest", tracking_uri=uri)
    assert torch.equal(stored["reconstruction"], example["reconstruction"])
    assert torch.equal(stored["frames"], frames) and stored["seed"] == 3
    # The example output is not trivially reproducible: other weights give another output.
    assert not torch.equal(
        run_example(MAST(width=8, feat_dim=8), example), example["reconstruction"]
    )


def test_a_resumed_attempt_does_not_log_replayed_steps_twice(uri):
    from jobs.rank_zero import RankZeroTracker

    runs = setup_runs(uri, "exp", "r1", {"pretrain": {}})
    run_id = runs.child_run_ids["pretrain"]
    with RankZeroTracker(True, uri, run_id, system_metrics=False) as tracker:  # first attempt
        for step in range(1, 6):
            tracker.log_metrics({"loss": 1.0 / step}, step)
    # The second attempt resumes from a checkpoint at step 3 and replays steps 4.. onwards.
    with RankZeroTracker(True, uri, run_id, system_metrics=False) as tracker:
        for step in range(4, 9):
            tracker.log_metrics({"loss": 0.5 / step, "lr": 0.1}, step)
    history = MlflowClient(uri).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 9))  # each step exactly once
    assert {m.step: m.value for m in history}[5] == pytest.approx(0.2)  # the first attempt's value
    assert len(MlflowClient(uri).get_metric_history(run_id, "lr")) == 5  # a new metric: all steps


def test_a_version_is_plain_files_and_registering_it_again_finds_it(uri, tmp_path, monkeypatch):
    import mlflow

    from jobs.checkpoint import load_checkpoint
    from jobs.registry import register_stage, weights_digest
    from jobs.train_config import load_stage_configs
    from typedconfig import to_dict

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # as every job runs
    overrides = ["mlflow.registered_model=mast-files", "model.width=8", "model.feat_dim=8"]
    (cfg,) = load_stage_configs(ROOT / "configs/train/demo.yaml", ["pretrain"], overrides)
    torch.manual_seed(0)
    model = MAST(cfg.model)
    frames = torch.randint(0, 256, (2, 2, 3, 32, 32), dtype=torch.uint8)
    example_input = {"frames": frames, "gaps": torch.tensor([[2], [5]])}
    runs = setup_runs(uri, "exp", "files", {"pretrain": {}})
    run_id = runs.child_run_ids["pretrain"]
    versions = []
    # The second: a rerun after a kill between registering and stage_done.json. The third: the
    # same run trained on (its stage_done.json deleted): other weights, another version.
    for step in (4, 4, 6):
        if step == 6:
            with torch.no_grad():
                next(model.parameters()).add_(1.0)
        ckpt = save_checkpoint(
            tmp_path / f"checkpoint_{step:08d}", model=model, optimizer=None, scheduler=None,
            step=step, config=to_dict(cfg), data_position={}, metrics={"loss": 0.5},
        )  # fmt: skip
        state = load_checkpoint(ckpt)
        versions.append(
            register_stage(
                cfg,
                state,
                example_input,
                run_name="files",
                data_hash="ab" * 32,
                uri=uri,
                run_id=run_id,
            )  # fmt: skip
        )
    assert versions == [1, 1, 2]
    client = MlflowClient(uri)
    assert int(client.get_model_version_by_alias("mast-files", "pretrain-latest").version) == 2
    mv = client.get_model_version("mast-files", "1")
    assert mv.source.startswith("models:/m-") and mv.run_id == run_id  # an MLflow 3 logged model
    assert client.get_logged_model(mv.source.removeprefix("models:/")).source_run_id == run_id
    assert mv.tags["step"] == "4" and mv.tags["data_hash"] == "ab" * 32
    # Described for a person: the version and its run say what was trained on what.
    said = f"MAST pretrain stage of training run 'files': 4 steps, batch {cfg.loader.batch_size}"
    assert (
        mv.description.startswith(said) and "on data abababababab; final loss 0.5" in mv.description
    )
    parent = client.get_run(runs.parent_run_id).data.tags["mlflow.note.content"]
    assert (
        parent
        == "MAST training run 'files': stages pretrain, one child run and one registered version per stage"
    )
    run_said = client.get_run(run_id).data.tags["mlflow.note.content"]  # its latest version
    assert run_said.startswith(said.replace("4 steps", "6 steps"))
    assert run_said.endswith("; registered as mast-files version 2")
    # Version 2 came from the same run: its own files; version 1's stay as they were.
    assert client.get_model_version("mast-files", "2").source != mv.source
    for version, step in ((1, 4), (2, 6)):
        files = Path(
            mlflow.artifacts.download_artifacts(f"models:/mast-files/{version}", tracking_uri=uri)
        )
        # No MLmodel, no pickled model: files a reader without torch can inspect.
        assert sorted(p.name for p in files.iterdir()) == [
            "mast_example.pt",
            "mast_model.json",
            "mast_state.pt",
        ]
        info = json.loads((files / "mast_model.json").read_text())
        expected_args = json.loads(json.dumps(model.model_args))
        registered = torch.load(files / "mast_state.pt", weights_only=True)
        assert info == {
            "model_args": expected_args, "stage": "pretrain", "step": step,
            "weights_sha256": weights_digest(registered),
        }  # fmt: skip
        assert sorted(registered) == ["config", "metrics", "model", "model_args", "step"]
        assert registered["step"] == step
    assert torch.equal(load_example("models:/mast-files/1", uri)["frames"], frames)
