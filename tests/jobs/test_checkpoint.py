"""Checkpoints: full round trip, compatibility errors, corrupt ones recorded and skipped, files
that hold only tensors and are verified against the marker's hashes, I/O errors retried."""

from __future__ import annotations

import errno
import fractions
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import tensor_files
from jobs.checkpoint import (
    CORRUPT_LOG,
    MARKER_FILE,
    STATE_FILE,
    CheckpointError,
    NoReadableCheckpoint,
    check_compatible,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
)
from jobs.checkpoint_convert import convert
from jobs.stage_dir import load_latest_valid
from jobs.tensor_files import (
    CheckpointReadError,
    UnsafeFileError,
    file_record,
    kill_hook,
    tensor_bytes,
)
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


def test_saved_files_are_tensors_only_and_hashed_in_the_marker(tmp_path):
    model, opt, sched = _trained()
    np.random.seed(5)
    expected_numpy = np.random.get_state()
    extra = {"notes.json": b'{"a": 1}'}
    ckpt = save_checkpoint(
        tmp_path / "c", model=model, optimizer=opt, scheduler=sched, step=3, config={},
        data_position={}, metrics={"loss": np.float64(0.25)}, extra_files=extra,
    )  # fmt: skip
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)  # no pickle
    assert type(state["metrics"]["loss"]) is float and state["metrics"]["loss"] == 0.25
    key = state["rng"]["numpy"]["key"]
    assert key.dtype == torch.uint32 and np.array_equal(key.numpy(), expected_numpy[1])
    np.random.seed(6)
    restore_training_state(state, MAST(**ARGS))  # numpy's stream continues from the save
    assert np.random.rand() == np.random.RandomState(5).rand()
    marker = json.loads((ckpt / MARKER_FILE).read_text())
    assert marker["format"] == 2 and marker["step"] == 3
    assert sorted(marker["files"]) == ["checkpoint.pt", "notes.json"]
    for name, record in marker["files"].items():
        data = (ckpt / name).read_bytes()
        assert record == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert not [p.name for p in ckpt.iterdir() if ".tmp-" in p.name]


def test_a_file_that_differs_from_its_marker_is_corrupt(tmp_path):
    # E.g. Ray's copy to storage killed half way: the marker landed, checkpoint.pt did not.
    model, opt, sched = _trained()
    old = _save(tmp_path / "checkpoint_00000002", model, opt, sched, 2)
    new = _save(tmp_path / "checkpoint_00000004", model, opt, sched, 4)
    data = (new / STATE_FILE).read_bytes()
    (new / STATE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"checkpoint_00000004/checkpoint.pt is corrupt: "):
        load_checkpoint(new)
    state, used, skipped = load_latest_valid(new)
    assert used == old and state["step"] == 2 and skipped == [str(new)]
    # A stale marker in a directory saved into again vouches for nothing: removed first.
    marker = (new / MARKER_FILE).read_bytes()
    _save(new, model, opt, sched, 4)
    assert (new / MARKER_FILE).read_bytes() != marker and load_checkpoint(new)["step"] == 4


def test_io_errors_are_retried_then_raised_not_recorded(tmp_path, monkeypatch):
    model, opt, sched = _trained()
    older = _save(tmp_path / "checkpoint_00000001", model, opt, sched, 1)
    ckpt = _save(tmp_path / "checkpoint_00000002", model, opt, sched, 2)
    monkeypatch.setattr(tensor_files, "READ_RETRY_S", 0.0)
    real_read = Path.read_bytes
    failures = {"left": 2}

    def flaky(path: Path) -> bytes:
        if path.name == STATE_FILE and path.parent == ckpt and failures["left"]:
            failures["left"] -= 1
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", flaky)
    assert load_checkpoint(ckpt)["step"] == 2  # two transient failures: the third read works
    failures["left"] = 99
    with pytest.raises(
        CheckpointReadError, match=r"cannot read .*checkpoint_00000002/checkpoint.pt"
    ):
        load_latest_valid(ckpt)  # not skipped for the older one: the file may be fine
    assert not (tmp_path / CORRUPT_LOG).exists() and older.exists()


def test_a_file_holding_more_than_tensors_is_refused_and_skipped(tmp_path):
    model, opt, sched = _trained()
    older = _save(tmp_path / "checkpoint_00000001", model, opt, sched, 1)
    ckpt = _save(tmp_path / "checkpoint_00000002", model, opt, sched, 2)
    state = torch.load(ckpt / STATE_FILE, weights_only=True)
    state["config"] = {"when": fractions.Fraction(1, 3)}  # harmless, but not a tensor type
    data = tensor_bytes(state)
    (ckpt / STATE_FILE).write_bytes(data)
    marker = json.loads((ckpt / MARKER_FILE).read_text())
    marker["files"][STATE_FILE] = file_record(data)  # as if its writer had made it
    (ckpt / MARKER_FILE).write_text(json.dumps(marker))
    with pytest.raises(UnsafeFileError) as refused:
        load_checkpoint(ckpt)
    message = str(refused.value)
    assert f"{ckpt / STATE_FILE} may hold code" in message and "fractions.Fraction" in message
    assert "NOT run" in message and f"python -m jobs.checkpoint convert {ckpt}" in message
    assert isinstance(refused.value, CheckpointError)
    resume = load_latest_valid(ckpt)
    assert resume.path == older and resume.skipped == [str(ckpt)]
    (record,) = [json.loads(line) for line in (tmp_path / CORRUPT_LOG).read_text().splitlines()]
    assert "may hold code" in record["error"]
    # convert turns numpy values into tensors; another class is refused, the file left as it was.
    with pytest.raises(CheckpointError, match="still holds other objects"):
        convert(ckpt)
    assert (ckpt / STATE_FILE).read_bytes() == data


def test_the_kill_hook_is_inert_unless_it_names_the_step(monkeypatch):
    monkeypatch.delenv("MAST_TEST_KILL_AT", raising=False)
    kill_hook(2)("checkpoint.pt")  # this process lives on
    monkeypatch.setenv("MAST_TEST_KILL_AT", "checkpoint.pt:4")
    kill_hook(2)("checkpoint.pt")
    kill_hook(4)("complete.json")
