"""storage.location: a run-directory place on an object store behaves as a local Path does
for what run directories use (fsspec's in-memory filesystem stands in for the store here;
tests/jobs/test_object_store.py runs the jobs against a real S3 endpoint)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from storage import ObjectPath, append_text, as_location, remove_tree


@pytest.fixture
def root() -> ObjectPath:
    place = ObjectPath(f"memory://bucket-{uuid.uuid4().hex[:8]}/runs")
    yield place
    remove_tree(place)


def test_as_location_and_names():
    assert as_location("runs/ray") == Path("runs/ray")
    assert as_location("file:///tmp/x") == Path("/tmp/x")
    assert as_location("s3://bucket/runs/") == ObjectPath("s3://bucket/runs")
    place = as_location("s3://bucket/runs") / "r-main" / "checkpoint_00000004"
    assert str(place) == "s3://bucket/runs/r-main/checkpoint_00000004"
    assert place.name == "checkpoint_00000004" and place.parent.name == "r-main"
    assert ObjectPath("s3://bucket").parent == ObjectPath("s3://bucket")
    assert as_location(place) is place and {place: 1}[ObjectPath(str(place))] == 1
    with pytest.raises(ValueError, match="not an object-store URL"):
        ObjectPath("runs/ray")


def test_files_listing_and_removal(root):
    stage = root / "r-pretrain"
    assert not stage.exists() and not stage.is_dir() and list(stage.iterdir()) == []
    stage.mkdir(parents=True, exist_ok=True)  # nothing to make on a store
    (stage / "checkpoint_00000002" / "complete.json").write_text("{}")
    (stage / "checkpoint_00000010" / "checkpoint.pt").write_bytes(b"\x01\x02")
    (stage / "stage_data.json").write_text('{"data": "d"}')
    assert stage.is_dir() and (stage / "checkpoint_00000002").is_dir()
    assert (stage / "stage_data.json").is_file() and not (stage / "stage_data.json").is_dir()
    assert (stage / "checkpoint_00000010" / "checkpoint.pt").read_bytes() == b"\x01\x02"
    assert sorted(p.name for p in stage.iterdir()) == [
        "checkpoint_00000002", "checkpoint_00000010", "stage_data.json",
    ]  # fmt: skip
    found = sorted(stage.glob("checkpoint_*"), key=str)
    assert found == [stage / "checkpoint_00000002", stage / "checkpoint_00000010"]
    (stage / "stage_data.json").unlink()
    (stage / "stage_data.json").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        (stage / "stage_data.json").unlink()
    with pytest.raises(FileNotFoundError):
        (stage / "stage_data.json").read_bytes()
    remove_tree(stage / "checkpoint_00000010")
    remove_tree(stage / "nothing")
    assert [p.name for p in stage.iterdir()] == ["checkpoint_00000002"]


def test_append_text_local_and_object_store(root, tmp_path):
    for log in (root / "corrupt_checkpoints.jsonl", tmp_path / "corrupt_checkpoints.jsonl"):
        append_text(log, "a\n")
        append_text(log, "b\n")
        assert log.read_text() == "a\nb\n"
