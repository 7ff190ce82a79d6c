"""Checkpoints: full round trip, compatibility errors, corrupt ones recorded and skipped."""

from __future__ import annotations

import json

import pytest
import torch

from jobs.checkpoint import (
    CORRUPT_LOG,
    CheckpointError,
    NoReadableCheckpoint,
    check_compatible,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
)
from jobs.stage_dir import load_latest_valid
from model import MAST

ARGS = dict(width=8, feat_dim=8)


def _trained(seed: int = 0):
    torch.manual_seed(seed)
    model = MAST(**ARGS)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    frames = torch.randint(0, 256, (2, 2, 3, 32, 32), dtype=torch.uint8)
    out = model(frames, [[2], [5]])
    out.loss.backward()
    opt.step()
    sched.step()
    return model, opt, sched


def _save(directory, model, opt, sched, step):
    return save_checkpoint(
        directory,
        model=model,
        optimizer=opt,
        scheduler=sched,
        step=step,
        config={"model": ARGS},
        data_position={"start_step": step, "seed": 0},
        metrics={"loss": 1.5},
    )


def test_round_trip_restores_everything(tmp_path):
    model, opt, sched = _trained()
    ddp_like = torch.nn.Module()
    ddp_like.module = model  # saved unwrapped, like a DDP wrapper
    _save(tmp_path / "checkpoint_00000007", ddp_like, opt, sched, 7)
    expected_draw = torch.rand(3)  # the RNG continues from the saved state
    state = load_checkpoint(tmp_path / "checkpoint_00000007")
    assert state["model_args"] == model.model_args
    assert all(not k.startswith("module.") for k in state["model"])
    assert state["data"] == {"start_step": 7, "seed": 0} and state["metrics"] == {"loss": 1.5}

    fresh = MAST(**ARGS)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, 1, gamma=0.5)
    step = restore_training_state(state, fresh, fresh_opt, fresh_sched)
    assert step == 7
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh_sched.get_last_lr() == sched.get_last_lr() == [5e-4]
    assert torch.equal(
        fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )
    assert torch.equal(torch.rand(3), expected_draw)
    x = torch.linspace(-1, 1, 3 * 16 * 16).reshape(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(MAST.from_state(state).eval().encode(x), model.eval().encode(x))


def test_incompatible_config_names_each_key(tmp_path):
    model, opt, sched = _trained()
    _save(tmp_path / "c", model, opt, sched, 1)
    state = load_checkpoint(tmp_path / "c")
    check_compatible(state, dict(model.model_args), "c")  # same args: fine
    other = dict(model.model_args, width=16, train_radius=3)
    with pytest.raises(
        CheckpointError,
        match=r"model.train_radius: checkpoint 6 != config 3.*model.width: checkpoint 8 != config 16",
    ):
        check_compatible(state, other, "c")


def test_corrupt_latest_falls_back_to_previous_and_is_recorded(tmp_path):
    model, opt, sched = _trained()
    _save(tmp_path / "checkpoint_00000010", model, opt, sched, 10)
    _save(tmp_path / "checkpoint_00000020", model, opt, sched, 20)
    _save(tmp_path / "checkpoint_00000030", model, opt, sched, 30)
    (tmp_path / "checkpoint_00000030" / "checkpoint.pt").write_bytes(b"garbage, not a zip")
    (tmp_path / "checkpoint_00000020" / "complete.json").unlink()  # crashed while writing
    for _ in range(2):  # the driver's preflight and the worker's restore both meet them
        state, used, skipped = load_latest_valid(tmp_path / "checkpoint_00000030")
        assert state["step"] == 10 and used.name == "checkpoint_00000010"
        names = [s.rsplit("/", 1)[-1] for s in skipped]
        assert names == ["checkpoint_00000030", "checkpoint_00000020"]
    records = [json.loads(line) for line in (tmp_path / CORRUPT_LOG).read_text().splitlines()]
    assert len(records) == 2  # recorded once each
    assert "corrupt" in records[0]["error"] and "not finished" in records[1]["error"]


def test_all_corrupt_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint_00000001").mkdir()
    (tmp_path / "checkpoint_00000001" / "checkpoint.pt.tmp-123").write_bytes(b"PK")  # killed
    with pytest.raises(NoReadableCheckpoint, match="no readable checkpoint") as raised:
        load_latest_valid(tmp_path / "checkpoint_00000001")
    assert raised.value.skipped == [str(tmp_path / "checkpoint_00000001")]
    assert isinstance(raised.value, CheckpointError)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
