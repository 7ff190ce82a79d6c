"""DAVIS layout reading, indexed-PNG writing and the official CSV format."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from davis.io import (
    DAVIS_PALETTE,
    DavisError,
    read_mask,
    read_result_masks,
    read_sequence,
    read_split,
    sequence_files,
    write_image,
    write_mask,
    write_results_csvs,
)
from davis.metrics import ObjectScore


def make_root(root, name="seq", frames=3, size=(8, 12), mask_size=None, skip_mask=None):
    h, w = size
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text(f"{name}\n\n")
    for t in range(frames):
        write_image(
            root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg", np.full((h, w, 3), 90, np.uint8)
        )
        if t != skip_mask:
            mh, mw = mask_size or size
            labels = np.zeros((mh, mw), np.uint8)
            labels[1:3, 1:4] = 1
            write_mask(root / "Annotations" / "480p" / name / f"{t:05d}.png", labels)
    return root


def test_palette_is_the_davis_palette():
    pal = np.array(DAVIS_PALETTE).reshape(256, 3)
    assert pal[0].tolist() == [0, 0, 0]
    assert pal[1].tolist() == [128, 0, 0]
    assert pal[2].tolist() == [0, 128, 0]
    assert pal[3].tolist() == [128, 128, 0]
    assert pal[4].tolist() == [0, 0, 128]
    assert pal[255].tolist() == [224, 224, 192]


def test_write_and_read_mask_roundtrip(tmp_path):
    labels = np.zeros((5, 7), np.uint8)
    labels[1, 2], labels[3, 4], labels[0, 0] = 1, 2, 255
    path = tmp_path / "a" / "00000.png"
    write_mask(path, labels)
    with Image.open(path) as im:
        assert im.mode == "P"
        assert im.getpalette()[3:6] == [128, 0, 0]
    np.testing.assert_array_equal(read_mask(path), labels)
    assert sorted(p.name for p in path.parent.iterdir()) == ["00000.png"]  # no temp files
    with pytest.raises(ValueError, match="0..255"):
        write_mask(path, np.full((2, 2), 256))


def test_read_mask_rejects_rgb_png(tmp_path):
    path = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    with pytest.raises(DavisError, match="rgb.png: mode RGB is not an indexed PNG"):
        read_mask(path)


def test_read_split_and_sequence(tmp_path):
    root = make_root(tmp_path)
    assert read_split(root, "val") == ["seq"]
    files = sequence_files(root, "seq")
    assert files.frame_ids == ("00000", "00001", "00002")
    images, masks = read_sequence(files)
    assert images.shape == (3, 8, 12, 3) and abs(int(images[0, 0, 0, 0]) - 90) <= 2
    assert masks.shape == (3, 8, 12) and masks[0, 1:3, 1:4].all() and masks.sum() == 18


def test_missing_split_file_names_the_path(tmp_path):
    with pytest.raises(DavisError, match="ImageSets/2017/test.txt does not exist"):
        read_split(tmp_path, "test")


def test_missing_frames_and_annotations(tmp_path):
    root = make_root(tmp_path, skip_mask=1)
    with pytest.raises(DavisError, match=r"annotations missing for frames \['00001'\]"):
        sequence_files(root, "seq")
    with pytest.raises(DavisError, match="no frames in"):
        sequence_files(root, "other")


def test_size_mismatch_names_the_file(tmp_path):
    root = make_root(tmp_path, mask_size=(8, 10))
    with pytest.raises(
        DavisError, match="00000.png: annotation is 10x8 but the frames of seq are 12x8"
    ):
        read_sequence(sequence_files(root, "seq"))


def test_read_result_masks_reports_missing_png(tmp_path):
    write_mask(tmp_path / "seq" / "00001.png", np.ones((2, 2), np.uint8))
    assert read_result_masks(tmp_path, "seq", ["00001"]).tolist() == [[[1, 1], [1, 1]]]
    with pytest.raises(DavisError, match="00002.png is missing"):
        read_result_masks(tmp_path, "seq", ["00001", "00002"])


def test_csvs_in_the_official_format_and_always_rewritten(tmp_path):
    objects = [
        ObjectScore("bear", 1, (1.0, 0.6, 0.4, 0.2, 0.0), (1.0,) * 5),
        ObjectScore("bear", 2, (0.5,) * 5, (0.25,) * 5),
    ]
    (tmp_path / "global_results-val.csv").write_text("stale\n")
    g, s = write_results_csvs(tmp_path, "val", objects)
    # J: means 0.44, 0.5; recalls 0.4, 0; decays 0.7, 0. F: means 1, 0.25; recalls 1, 0.
    assert g.read_text() == (
        "J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay\n"
        "0.547,0.470,0.200,0.350,0.625,0.500,0.000\n"
    )
    assert s.read_text() == "Sequence,J-Mean,F-Mean\nbear_1,0.440,1.000\nbear_2,0.500,0.250\n"
    assert s.name == "per-sequence_results-val.csv"
