"""The DAVIS-format sample generator: layout, exact masks, occlusions, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest

from davis.io import read_sequence, read_split, sequence_files
from davis.sample import SampleConfig, generate, main, parse_args, paste
from typedconfig import ConfigError, load_config

SMALL = ["num_sequences=2", "num_frames=5", "width=64", "height=48"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("davis")
    summary = generate(load_config(SampleConfig, overrides=SMALL), root)
    return root, summary


def test_layout_and_objects(sample):
    root, summary = sample
    names = read_split(root, "val")
    assert names == [s["name"] for s in summary["sequences"]] == ["bigbuckbunny-00", "bikes-01"]
    for seq in summary["sequences"]:
        images, masks = read_sequence(sequence_files(root, seq["name"]))
        assert images.shape == (5, 48, 64, 3) and masks.shape == (5, 48, 64)
        k = seq["objects"]
        assert 2 <= k <= 3
        assert sorted(np.unique(masks[0])) == list(range(k + 1))  # every object in frame 0
        assert images.std() > 20  # real video content, not a flat synthetic background
        assert not np.array_equal(masks[0], masks[-1])  # objects move
    assert json.loads((root / "sample.json").read_text()) == summary


def test_deterministic_given_seed(sample, tmp_path):
    root, _ = sample
    generate(load_config(SampleConfig, overrides=SMALL), tmp_path / "again")
    generate(load_config(SampleConfig, overrides=[*SMALL, "seed=1"]), tmp_path / "other")
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file()
    )
    for rel in files:
        assert (root / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    mask = "Annotations/480p/bigbuckbunny-00/00000.png"
    assert (root / mask).read_bytes() != (tmp_path / "other" / mask).read_bytes()


def test_paste_respects_z_order_exactly():
    frame, labels = np.zeros((6, 6, 3), np.uint8), np.zeros((6, 6), np.uint8)
    shape = np.ones((3, 3), bool)
    shape[0, 0] = False
    below, above = np.full((3, 3, 3), 50, np.uint8), np.full((3, 3, 3), 200, np.uint8)
    assert paste(frame, labels, below, shape, 1, 1, 1) == 8
    assert paste(frame, labels, above, shape, 2, 2, 2) == 8
    assert paste(frame, labels, above, shape, 3, 5, 4) == 1  # clipped at the corner
    assert paste(frame, labels, above, shape, 4, -3, 0) == 0  # fully outside
    assert (labels == 1).sum() == 8 - 3 and (labels == 2).sum() == 8 and (labels == 3).sum() == 1
    np.testing.assert_array_equal(frame[..., 0][labels == 1], 50)
    np.testing.assert_array_equal(frame[..., 0][labels == 2], 200)
    assert (frame[labels == 0] == 0).all()


def test_occlusions_happen(tmp_path):
    cfg = load_config(
        SampleConfig,
        overrides=[
            "num_sequences=3",
            "num_frames=12",
            "width=64",
            "height=48",
            "object_size=[0.4,0.5]",
        ],
    )
    summary = generate(cfg, tmp_path)
    assert sum(sum(s["occluded_frames"]) for s in summary["sequences"]) > 0


def test_cli_and_validation(tmp_path):
    summary = main(
        parse_args(
            [
                "--output",
                str(tmp_path),
                "--num-sequences",
                "1",
                "--num-frames",
                "3",
                "--width",
                "32",
                "--height",
                "32",
                "seed=4",
            ]
        )
    )
    assert summary["config"]["seed"] == 4 and len(read_split(tmp_path, "val")) == 1
    with pytest.raises(ConfigError, match="num_frames=2 must be >= 3"):
        load_config(SampleConfig, overrides=["num_frames=2"])
    with pytest.raises(ConfigError, match="max_objects=1"):
        load_config(SampleConfig, overrides=["max_objects=1"])
