"""StageDir: the checkpoints to resume from and to register, the data and done records, pruning,
on checkpoints and records that main wrote at dc3dea1 (copied and converted to the tensors-only
format, `python -m jobs.checkpoint convert`: the fixtures stay untouched)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from jobs.checkpoint import CORRUPT_LOG, MARKER_FILE, NoReadableCheckpoint
from jobs.checkpoint_convert import convert
from jobs.stage_dir import (
    EXAMPLE_INPUT_FILE,
    RANK_DIGESTS_FILE,
    StageData,
    StageDir,
    StageDone,
    checkpoint_name,
    checkpoint_step,
    final_files,
    read_example_input,
)
from jobs.train_config import load_stage_configs
from jobs.worker import LoopConfig
from typedconfig import ConfigError

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests/fixtures/main_dc3dea1/checkpoints"


@pytest.fixture
def stage(tmp_path) -> StageDir:
    """A stage directory holding main's checkpoint_00000002 and checkpoint_00000004."""
    where = StageDir(tmp_path / "legacy-pretrain")
    for name in ("checkpoint_00000002", "checkpoint_00000004"):
        shutil.copytree(FIXTURE / name, where.path / name)
        convert(where.path / name)  # they pickle numpy's RNG state: refused as they are
    return where


def _corrupt(checkpoint: Path) -> None:
    (checkpoint / "checkpoint.pt").write_bytes(b"\x00" * 100)  # a torn write


def test_names_and_listing(stage):
    assert checkpoint_name(42) == "checkpoint_00000042" and checkpoint_step(Path("x/c")) == -1
    assert checkpoint_step("/r/checkpoint_00000042") == 42
    (stage.path / "checkpoint_00000010").mkdir()
    (stage.path / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's: a file
    (stage.path / "checkpoint_tmp").mkdir()  # no step: not a checkpoint
    names = [p.name for p in stage.checkpoints()]
    assert names == ["checkpoint_00000002", "checkpoint_00000004", "checkpoint_00000010"]
    assert stage.newest_checkpoint() == stage.path / "checkpoint_00000010"
    assert stage.checkpoint_path(4) == stage.path / "checkpoint_00000004"
    assert StageDir(stage.path / "nothing").newest_checkpoint() is None


def test_of_names_the_stage_directory(tmp_path):
    (cfg,) = load_stage_configs(
        ROOT / "configs/train/demo.yaml", ["main"], [f"storage_path={tmp_path}"]
    )
    where = StageDir.of(cfg, "run")
    assert where.path == tmp_path / "run-main"
    assert where.done_file == tmp_path / "run-main" / "stage_done.json"
    assert where.data_file == tmp_path / "run-main" / "stage_data.json"
    assert where.fault_marker == tmp_path / "run-main" / "fault_injected"
    assert where.corrupt_log == tmp_path / "run-main" / "corrupt_checkpoints.jsonl"


def test_resume_takes_the_disk_when_rays_record_is_older(stage):
    resume = stage.resume_checkpoint(stage.path / "checkpoint_00000002")
    assert resume.path == stage.path / "checkpoint_00000004"
    assert resume.state["step"] == 4 and resume.skipped == []
    lost = stage.resume_checkpoint(None)  # Ray's snapshot lost: the disk alone
    assert lost.path == stage.path / "checkpoint_00000004" and lost.state["step"] == 4
    assert StageDir(stage.path.parent / "fresh").resume_checkpoint(None) is None


def test_resume_falls_back_from_a_corrupt_newest(stage):
    _corrupt(stage.path / "checkpoint_00000004")
    for _ in range(2):  # the driver's preflight and the worker's restore both meet it
        resume = stage.resume_checkpoint(stage.path / "checkpoint_00000002")
        assert resume.path == stage.path / "checkpoint_00000002" and resume.state["step"] == 2
        assert resume.skipped == [str(stage.path / "checkpoint_00000004")]
    records = [json.loads(line) for line in stage.corrupt_log.read_text().splitlines()]
    assert [r["checkpoint"] for r in records] == [str(stage.path / "checkpoint_00000004")]
    (stage.path / "checkpoint_00000002" / "complete.json").unlink()  # killed while writing
    with pytest.raises(NoReadableCheckpoint, match="no readable checkpoint") as raised:
        stage.resume_checkpoint(None)
    assert [Path(p).name for p in raised.value.skipped] == [
        "checkpoint_00000004",
        "checkpoint_00000002",
    ]


def test_final_checkpoint(stage):
    two, four = stage.path / "checkpoint_00000002", stage.path / "checkpoint_00000004"
    assert stage.final_checkpoint(None) == four  # local mode: the newest written in place
    assert stage.final_checkpoint(str(four)) == four  # Ray's record is the newest
    # Killed after the last checkpoint landed, before Ray recorded it: the newer one, read.
    assert stage.final_checkpoint(two) == four
    _corrupt(four)
    assert stage.final_checkpoint(two) == two  # the newer one is corrupt: Ray's
    _corrupt(two)
    assert stage.final_checkpoint(two) == two  # nothing reads: Ray's, as it says
    assert StageDir(stage.path.parent / "fresh").final_checkpoint(None) is None


def test_prune_keeps_the_newest(stage):
    for step in (6, 8):
        shutil.copytree(stage.path / "checkpoint_00000004", stage.checkpoint_path(step))
    (stage.path / "checkpoint_manager_snapshot.json").write_text("{}")
    stage.prune(2)
    assert [p.name for p in stage.checkpoints()] == ["checkpoint_00000006", "checkpoint_00000008"]
    assert (stage.path / "checkpoint_manager_snapshot.json").exists()
    stage.prune(0)  # keep=0 keeps everything (nothing to resume from would be worse)
    assert len(stage.checkpoints()) == 2


def test_data_record_round_trip_and_written_once(tmp_path):
    where = StageDir(tmp_path / "r-pretrain")
    assert where.read_data() is None
    record = StageData("/d/manifest.json", "ab" * 32, ("s-1.tar: empty tar",))
    where.write_data_once(record)
    assert where.read_data() == record
    expected = {
        "data": "/d/manifest.json",
        "data_hash": "ab" * 32,
        "skipped_shards": ["s-1.tar: empty tar"],
    }
    assert where.data_file.read_text() == json.dumps(expected)  # today's bytes
    where.write_data_once(StageData("/other/manifest.json", "cd" * 32))  # a resume: kept
    assert where.read_data() == record


def test_data_record_written_by_main(tmp_path):
    where = StageDir(tmp_path / "legacy-pretrain")
    where.path.mkdir()
    shutil.copy(FIXTURE / "stage_data.json", where.data_file)
    assert where.read_data() == StageData(
        "/tmp/legacy/shards/manifest.json",
        "34a3d164355890e4cb5f01e5bfbcafde38fc1fec7cb51dc2bf44d709a0c25e7c",
        (),
    )
    where.data_file.write_text('{"data": "x"}')
    with pytest.raises(ConfigError, match="stage_data.json is not a stage data record"):
        where.read_data()
    where.data_file.write_text("{")
    with pytest.raises(ConfigError, match="stage_data.json is not valid JSON"):
        where.read_data()


def test_done_record_round_trip_and_todays_format(tmp_path):
    where = StageDir(tmp_path / "r-main")
    assert where.read_done() is None and not where.is_done()
    final = str(where.path / "checkpoint_00000004")
    done = StageDone(final, 3, {"loss": 0.25, "step": 4}, "run-id-1")
    where.write_done(done)
    assert where.is_done() and where.read_done() == done
    assert json.loads(where.done_file.read_text()) == {
        "checkpoint": final,
        "version": 3,
        "metrics": {"loss": 0.25, "step": 4},
        "run_id": "run-id-1",
    }
    # As main wrote it: mlflow.register=false (version null), a metric only str() could save.
    where.done_file.write_text(
        json.dumps(
            {"checkpoint": final, "version": None, "metrics": {"when": "2026"}, "run_id": "r2"}
        )
    )
    assert where.read_done() == StageDone(final, None, {"when": "2026"}, "r2")
    where.write_done(StageDone(final, None, {"path": Path("/a/b")}, "r3"))
    assert where.read_done().metrics == {"path": "/a/b"}  # json default=str, as before


def test_final_files_as_main_wrote_them(tmp_path):
    legacy = FIXTURE / "checkpoint_00000004"
    example = torch.load(legacy / "example_input.pt", map_location="cpu", weights_only=True)
    digests = json.loads((legacy / "rank_digests.json").read_text())["rank_param_digests"]
    files = final_files(example, digests)  # written by save_checkpoint, before its marker
    assert files[RANK_DIGESTS_FILE] == (legacy / "rank_digests.json").read_bytes()
    (tmp_path / EXAMPLE_INPUT_FILE).write_bytes(files[EXAMPLE_INPUT_FILE])
    again = torch.load(tmp_path / "example_input.pt", map_location="cpu", weights_only=True)
    assert sorted(again) == ["frames", "gaps"]
    assert torch.equal(again["frames"], example["frames"]) and torch.equal(
        again["gaps"], example["gaps"]
    )


def test_final_checkpoint_killed_before_its_final_files_is_skipped(stage):
    # Code before the marker covered them wrote example_input.pt after complete.json: a kill
    # in between left a last-step checkpoint every rerun resumed from, then failed to register.
    four, two = stage.path / "checkpoint_00000004", stage.path / "checkpoint_00000002"
    assert torch.equal(read_example_input(four)["gaps"], torch.tensor([[5], [2]]))
    marker = json.loads((four / MARKER_FILE).read_text())
    for name in (EXAMPLE_INPUT_FILE, RANK_DIGESTS_FILE):
        (four / name).unlink()
        del marker["files"][name]
    marker.pop("format"), marker.pop("files")  # as that code wrote it: no hashes
    (four / MARKER_FILE).write_text(json.dumps(marker))
    resume = stage.resume_checkpoint(None)
    assert resume.path == two and resume.skipped == [str(four)]
    (record,) = [json.loads(line) for line in (stage.path / CORRUPT_LOG).read_text().splitlines()]
    assert "has no example_input.pt: killed before it was written" in record["error"]


def test_loop_config_crosses_to_ray_as_a_plain_dict(tmp_path):
    (cfg,) = load_stage_configs(ROOT / "configs/train/demo.yaml", ["pretrain"], [])
    loop = LoopConfig(train=cfg, source=["/s/a.tar"], run_dir=str(tmp_path), local_mode=True)
    plain = loop.to_dict()
    assert isinstance(plain["train"], dict) and plain["source"] == ["/s/a.tar"]
    assert LoopConfig.from_dict(plain) == loop
    assert loop.stage_dir == StageDir(tmp_path)
    with pytest.raises(ConfigError, match="resume_from"):
        LoopConfig.from_dict({**plain, "resume_from": None})
    with pytest.raises(ConfigError, match="run_dir"):
        LoopConfig.from_dict({"train": plain["train"], "source": "m.json"})
