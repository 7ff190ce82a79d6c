"""StageDir under an object-store storage_path: the same choices as on a local disk (resume,
register, corrupt ones recorded and skipped, records, pruning), on main's checkpoints uploaded
to fsspec's in-memory filesystem (a stand-in for s3://; tests/jobs/test_object_store.py runs
whole jobs against a real S3 endpoint)."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest

from jobs.checkpoint import CORRUPT_LOG, MARKER_FILE, NoReadableCheckpoint, load_checkpoint
from jobs.checkpoint_convert import convert
from jobs.stage_dir import StageData, StageDir, StageDone, load_latest_valid
from jobs.train_config import load_stage_configs
from jobs.worker import LoopConfig
from storage import ObjectPath, remove_tree

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests/fixtures/main_dc3dea1/checkpoints"  # as tests/jobs/test_stage_dir.py


@pytest.fixture
def stage(tmp_path):
    """main's checkpoint_00000002 and checkpoint_00000004, uploaded file by file."""
    where = StageDir(ObjectPath(f"memory://bucket-{uuid.uuid4().hex[:8]}/runs/legacy-pretrain"))
    for name in ("checkpoint_00000002", "checkpoint_00000004"):
        local = tmp_path / name
        shutil.copytree(FIXTURE / name, local)
        convert(local)
        for file in local.iterdir():
            (where.path / name / file.name).write_bytes(file.read_bytes())
    yield where
    remove_tree(where.path.parent.parent)


def test_stage_dir_of_an_object_store_storage_path():
    (cfg,) = load_stage_configs(ROOT / "configs/train/demo.yaml", ["main"],
                                ["storage_path=s3://bucket/runs"])  # fmt: skip
    where = StageDir.of(cfg, "run")
    assert where.path == ObjectPath("s3://bucket/runs/run-main") and not where.is_local
    loop = LoopConfig(train=cfg, source=None, run_dir=str(where.path))
    assert LoopConfig.from_dict(loop.to_dict()).stage_dir == where  # as the workers see it
    # Ray reports a checkpoint on its pyarrow filesystem: without the scheme.
    ray_path = "bucket/runs/run-main/checkpoint_00000004"
    assert where.ray_checkpoint(ray_path) == where.path / "checkpoint_00000004"


def test_resume_register_and_corrupt_on_the_store(stage):
    two, four = stage.path / "checkpoint_00000002", stage.path / "checkpoint_00000004"
    assert stage.checkpoints() == [two, four] and stage.newest_checkpoint() == four
    resume = stage.resume_checkpoint(None)
    assert resume.path == four and resume.state["step"] == 4 and resume.skipped == []
    assert stage.final_checkpoint(two) == four
    assert load_checkpoint(str(four))["step"] == 4
    (four / "checkpoint.pt").write_bytes(b"\x00" * 100)  # a torn upload, as old code left
    resume = stage.resume_checkpoint(str(four))
    assert resume.path == two and resume.skipped == [str(four)]
    assert stage.final_checkpoint(two) == two
    (record,) = [json.loads(line) for line in stage.corrupt_log.read_text().splitlines()]
    assert record["checkpoint"] == str(four) and "sha256" in record["error"]
    stage.resume_checkpoint(None)  # met again: recorded once
    assert len(stage.corrupt_log.read_text().splitlines()) == 1
    assert load_latest_valid(str(four)).path == two
    (two / MARKER_FILE).unlink()  # killed before its marker was uploaded
    with pytest.raises(NoReadableCheckpoint):
        stage.resume_checkpoint(None)
    stage.prune(1)
    assert stage.checkpoints() == [four] and (stage.path / CORRUPT_LOG).exists()


def test_records_on_the_store(stage):
    assert stage.read_data() is None and not stage.is_done()
    record = StageData("s3://d/manifest.json", "ab" * 32)
    stage.write_data_once(record)
    stage.write_data_once(StageData("s3://other/manifest.json", "cd" * 32))
    assert stage.read_data() == record
    done = StageDone(str(stage.path / "checkpoint_00000004"), 3, {"loss": 0.5}, "run-id")
    stage.write_done(done)
    assert stage.is_done() and stage.read_done() == done
