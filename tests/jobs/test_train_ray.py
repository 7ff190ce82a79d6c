"""jobs.train on a real local Ray instance with 2 CPU workers (DDP over gloo): rank sync,
learning, worker-failure recovery and resume of an interrupted run by its name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from jobs.ray_fit import TrainingError
from jobs.registry import load_model
from jobs.stage_dir import FAULT_MARKER, RANK_DIGESTS_FILE
from jobs.train import main, parse_args
from jobs.train_config import load_stage_configs
from model import MAST
from pipeline.loader import make_epoch_loader

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():  # left over by another module: start our own with our settings
        ray.shutdown()
    # Workers inherit the environment of the raylet this starts: sample system metrics each second.
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _args(tmp_path, manifest, *extra, run="t", workers=2):
    return parse_args(
        [
            "--config", str(ROOT / "configs/train/demo.yaml"), "--stages", "pretrain",
            "--data", str(manifest), "--run-name", run, f"storage_path={tmp_path / 'ray'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"scaling.num_workers={workers}", "loader.batch_size=2", *extra,
        ]
    )  # fmt: skip


def _stage_run(tmp_path, run):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mast-train")
    runs = client.search_runs([exp.experiment_id], f"tags.`mast.run_name` = '{run}'")
    assert len(runs) == 2, [r.info.run_name for r in runs]  # one parent + one stage run
    return client, next(r for r in runs if r.data.tags["mast.role"] == "stage")


def _fixed_loss(model, batches) -> float:
    model.train()  # batch statistics: comparable between initial and trained BatchNorm
    total = 0.0
    with torch.no_grad():
        for i, batch in enumerate(batches):
            torch.manual_seed(i)
            total += model(batch["frames"], batch["gaps"]).loss.item()
    return total / len(batches)


def test_ddp_ranks_stay_identical_and_loss_decreases(ray_local, tmp_path, train_shards):
    args = _args(
        tmp_path, train_shards, "schedule.steps=40", "mlflow.log_every_steps=10",
        "checkpoint.every_steps=40", "schedule.milestones=[0.9]",
        "mlflow.system_metrics=true",
    )  # fmt: skip
    out = main(args)
    final = Path(out["pretrain"]["checkpoint"])
    digests = json.loads((final / RANK_DIGESTS_FILE).read_text())["rank_param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # parameters, bit-identical
    client, run = _stage_run(tmp_path, "t")
    assert run.data.metrics["ranks_in_sync"] == 1
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == [10, 20, 30, 40]
    # Learning, measured without batch noise: a fixed set of clips (epoch loader, own seed),
    # fixed channel-dropout seeds, the initial weights (same seed as the loop) vs the final.
    cfg = load_stage_configs(
        ROOT / "configs/train/demo.yaml", ["pretrain"], ["loader.batch_size=8"]
    )[0]
    batches = list(make_epoch_loader(str(train_shards), cfg.loader, rank=0, world_size=1, seed=123))
    final_model = load_model(str(final))
    torch.manual_seed(0)
    initial_model = MAST(**final_model.model_args)
    before, after = _fixed_loss(initial_model, batches), _fixed_loss(final_model, batches)
    assert after < 0.7 * before, (before, after)
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics)
    wait = client.get_metric_history(run.info.run_id, "data_wait_fraction")
    assert all(0 <= m.value < 1 for m in wait)


def test_worker_failure_recovers_from_last_checkpoint(ray_local, tmp_path, train_shards):
    args = _args(
        tmp_path, train_shards, "schedule.steps=8", "checkpoint.every_steps=3", "fault_at_step=5",
        "scaling.max_failures=1", "mlflow.log_every_steps=1", "mlflow.register=false",
    )  # fmt: skip
    out = main(args)
    assert (tmp_path / "ray" / "t-pretrain" / FAULT_MARKER).read_text() == "5"  # it did fail
    assert Path(out["pretrain"]["checkpoint"]).name == "checkpoint_00000008"  # exact step count
    client, run = _stage_run(tmp_path, "t")  # a single MLflow run across both attempts
    assert run.info.status == "FINISHED" and run.data.metrics["resumed_from_step"] == 3
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")})
    assert steps == list(range(1, 9))


@pytest.mark.parametrize("rays_record", ["kept", "lost", "behind"])
def test_rerun_with_same_name_resumes(ray_local, tmp_path, train_shards, rays_record):
    import shutil

    args = _args(
        tmp_path, train_shards, "schedule.steps=6", "checkpoint.every_steps=2", "fault_at_step=4",
        "scaling.max_failures=0", "mlflow.register=false", run="again", workers=1,
    )  # fmt: skip
    with pytest.raises(TrainingError, match="injected fault at step 4"):
        main(args)
    # A job killed after a checkpoint landed but before Ray's snapshot of the run recorded it
    # leaves Ray's record behind the disk. "lost": no record at all (Ray restores nothing:
    # the stage must still go on from the newest checkpoint). "behind": killed after the
    # stage's last checkpoint landed; made from a finished run by putting back Ray's record
    # (and the checkpoint it names) from before, and removing the stage's done file.
    run_dir = tmp_path / "ray" / "again-pretrain"
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if rays_record == "lost":
        snapshot.unlink()
    if rays_record == "behind":
        record, kept = snapshot.read_bytes(), tmp_path / "checkpoint_00000002"
        shutil.copytree(run_dir / kept.name, kept)
        main(args)
        (run_dir / "stage_done.json").unlink()
        snapshot.write_bytes(record)
        if not (run_dir / kept.name).exists():
            shutil.copytree(kept, run_dir / kept.name)
    out = main(args)  # the same command: Ray restores the run by name from storage_path
    assert Path(out["pretrain"]["checkpoint"]).name == "checkpoint_00000006"
    client, run = _stage_run(tmp_path, "again")
    resumed = 6 if rays_record == "behind" else 4
    assert run.data.metrics["resumed_from_step"] == resumed and run.info.status == "FINISHED"
