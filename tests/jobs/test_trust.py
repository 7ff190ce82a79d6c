"""Nothing loaded from a checkpoint or the registry runs code.

A real crafted pickle (`Payload`: unpickled, it runs a shell command that creates a marker
file) is planted where the jobs read: a checkpoint's checkpoint.pt, a final checkpoint's
example_input.pt, a registered version's state and example (overwritten inside the artifact
store of a real SQLite-backed registry) and a `checkpoint.init_from` path. Then what a user
runs runs: `jobs.evaluate`, `jobs.train` with `checkpoint.init_from=`, a resume with the
planted checkpoint in the run directory, `jobs.registry.load_model`. Each says clearly that
the file may hold code and was NOT run (a resume records the checkpoint as unreadable and
skips it), and the marker file never exists. The planter also rewrites the checkpoint's
marker hashes, as anyone who can write the file could: the refusal must not rest on them."""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from jobs.checkpoint import MARKER_FILE, CheckpointError, load_checkpoint, save_checkpoint
from jobs.eval_config import EvalConfig
from jobs.evaluate import EvalError, cli, evaluate
from jobs.registry import compute_example, load_example, load_model, register_stage_model
from jobs.stage_dir import read_example_input
from jobs.tensor_files import UnsafeFileError, file_record
from jobs.tracking import setup_runs
from jobs.train import main, parse_args
from model import MAST
from tests.jobs.conftest import make_davis_sample
from typedconfig import load_config

ROOT = Path(__file__).resolve().parents[2]
SHARDS = ROOT / "tests" / "fixtures" / "main_dc3dea1" / "shards"
REFUSED = r"may hold code: unpickling it would call posix.system.*was NOT run"


class Payload:
    """Unpickled with weights_only=False, this runs `touch <marker>`: any code could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def plant(file: Path, marker: Path) -> None:
    """Overwrite `file` with its own content plus the payload; fix its checkpoint's hashes."""
    content = torch.load(file, weights_only=True) if file.exists() else {}
    buffer = io.BytesIO()
    torch.save({**content, "payload": Payload(marker)}, buffer)
    file.write_bytes(buffer.getvalue())
    complete = file.parent / MARKER_FILE
    if complete.exists():
        record = json.loads(complete.read_text())
        if file.name in record.get("files", {}):
            record["files"][file.name] = file_record(buffer.getvalue())
            complete.write_text(json.dumps(record))


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PAYLOAD_RAN"
    yield path
    assert not path.exists(), "a planted pickle was unpickled"


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory):
    return make_davis_sample(tmp_path_factory.mktemp("davis"), "num_sequences=1", "num_frames=4")


def _checkpoint(directory: Path, step: int = 2) -> Path:
    torch.manual_seed(0)
    model = MAST(width=4, feat_dim=8)
    return save_checkpoint(
        directory, model=model, optimizer=None, scheduler=None, step=step, config={},
        data_position={"start_step": step}, metrics={"loss": 1.0},
    )  # fmt: skip


def _train_args(tmp_path: Path, *extra: str, run: str):
    shards = tmp_path / "shards"
    if not shards.exists():
        shutil.copytree(SHARDS, shards)
    return parse_args(
        [
            "--config", str(ROOT / "configs/train/demo.yaml"), "--stages", "pretrain",
            "--data", str(shards / "manifest.json"), "--run-name", run,
            f"storage_path={tmp_path / 'ray'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}",
            "scaling.num_workers=0", "schedule.steps=4", "checkpoint.every_steps=2",
            "model.width=4", "model.feat_dim=8", "loader.crop_size=32", "loader.batch_size=2",
            "mlflow.system_metrics=false", *extra,
        ]
    )  # fmt: skip


def test_the_payload_is_real(tmp_path):
    ran = tmp_path / "control"
    file = tmp_path / "x.pt"
    plant(file, ran)
    torch.load(file, weights_only=False)  # the unsafe load the jobs no longer make
    assert ran.exists()


def test_evaluate_refuses_a_planted_checkpoint(tmp_path, davis_root, marker):
    ckpt = _checkpoint(tmp_path / "checkpoint_00000002")
    plant(ckpt / "checkpoint.pt", marker)
    bare = tmp_path / "untrained.pt"  # the form jobs.demo's baseline has
    torch.save({"model_args": MAST(width=4, feat_dim=8).model_args}, bare)
    plant(bare, marker)
    cfg = load_config(
        EvalConfig,
        overrides=[f"output={tmp_path / 'eval'}", "ray.enabled=false", "mlflow.enabled=false"],
    )
    for target, convert in ((ckpt, ckpt), (bare, bare)):
        with pytest.raises(EvalError, match=REFUSED) as refused:
            evaluate(str(target), davis_root, cfg)
        assert f"python -m jobs.checkpoint convert {convert}" in str(refused.value)
    assert not (tmp_path / "eval" / "summary.json").exists()


def test_a_planted_registered_version_is_refused(tmp_path, davis_root, marker, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    torch.manual_seed(0)
    model = MAST(width=4, feat_dim=8).eval()
    frames = torch.randint(0, 256, (1, 2, 3, 32, 32), dtype=torch.uint8)
    example = compute_example(model, frames, torch.tensor([[2]]), seed=0)
    run_id = setup_runs(uri, "exp", "trust", {"pretrain": {}}).child_run_ids["pretrain"]
    register_stage_model(
        uri=uri, run_id=run_id, model_name="mast-trust", stage="pretrain",
        state={"model_args": model.model_args, "model": model.state_dict(), "step": 2},
        example=example, tags={"stage": "pretrain"},
    )  # fmt: skip
    version_uri = "models:/mast-trust@pretrain-latest"
    assert load_model(version_uri, uri) is not None  # intact, it loads
    files = MlflowClient(uri).get_model_version_download_uri("mast-trust", "1")
    stored = Path(files.removeprefix("file://"))  # the files inside the artifact store
    plant(stored / "mast_state.pt", marker)
    plant(stored / "mast_example.pt", marker)

    with pytest.raises(UnsafeFileError, match="mast_state.pt " + REFUSED):
        load_model(version_uri, uri)
    with pytest.raises(UnsafeFileError, match="mast_example.pt " + REFUSED):
        load_example(version_uri, uri)
    code = cli(
        ["--model", version_uri, "--davis-root", str(davis_root), "--output",
         str(tmp_path / "eval"), "ray.enabled=false", f"mlflow.tracking_uri={uri}"]
    )  # fmt: skip
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after MLflow's log lines
    assert code == 2 and error.startswith("error: cannot load model 'models:/mast-trust@")
    assert "may hold code" in error and "NOT run" in error
    with pytest.raises(CheckpointError, match=f"init_from='{version_uri}': .*{REFUSED}"):
        main(_train_args(tmp_path, f"checkpoint.init_from={version_uri}", run="v"))


def test_train_refuses_a_planted_init_from_checkpoint(tmp_path, marker):
    ckpt = _checkpoint(tmp_path / "elsewhere" / "checkpoint_00000002")
    plant(ckpt / "checkpoint.pt", marker)
    with pytest.raises(CheckpointError, match=f"init_from=.*checkpoint_00000002.*{REFUSED}"):
        main(_train_args(tmp_path, f"checkpoint.init_from={ckpt}", run="i"))
    assert not list((tmp_path / "ray" / "i-pretrain").glob("checkpoint_*"))


def test_a_planted_checkpoint_in_the_run_directory_is_recorded_and_skipped(tmp_path, marker):
    args = _train_args(tmp_path, "fault_at_step=3", run="r")
    with pytest.raises(RuntimeError, match="injected fault at step 3"):
        main(args)
    stage = tmp_path / "ray" / "r-pretrain"
    planted = stage / "checkpoint_00000002"
    plant(planted / "checkpoint.pt", marker)
    out = main(args)  # the same command: resumes, finds it unreadable, starts afresh
    assert out["pretrain"]["checkpoint"].endswith("checkpoint_00000004")
    (record,) = [json.loads(line) for line in (stage / "corrupt_checkpoints.jsonl").open()]
    assert record["checkpoint"] == str(planted) and "may hold code" in record["error"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    (child,) = client.search_runs(
        [client.get_experiment_by_name("mast-train").experiment_id], "tags.`mast.role` = 'stage'"
    )
    assert child.data.tags["corrupt_checkpoints_skipped"] == str(planted)
    assert "resumed_from_step" not in child.data.metrics
    assert load_checkpoint(planted)["step"] == 2  # written again by the fresh start


def test_a_planted_example_input_is_never_unpickled(tmp_path, marker):
    args = _train_args(tmp_path, run="e")
    first = main(args)
    final = Path(first["pretrain"]["checkpoint"])
    (final.parent / "stage_done.json").unlink()  # as if killed before the stage was recorded
    plant(final / "example_input.pt", marker)
    with pytest.raises(UnsafeFileError, match="example_input.pt " + REFUSED):
        read_example_input(final)  # what registering the stage reads
    with pytest.raises(UnsafeFileError):
        load_checkpoint(final)  # a checkpoint is readable as a whole only
    out = main(args)  # skips it (recorded), trains its last steps again from step 2
    assert Path(out["pretrain"]["checkpoint"]) == final and out["pretrain"]["version"] in (1, 2)
    records = (final.parent / "corrupt_checkpoints.jsonl").read_text()
    assert str(final) in records and "example_input.pt may hold code" in records
    assert sorted(read_example_input(final)) == ["frames", "gaps"]
