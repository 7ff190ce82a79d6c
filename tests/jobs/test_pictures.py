"""The pictures a user sees in MLflow explain themselves: titled training panels naming the
dropped channel, labelled and numbered evaluation frames."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from jobs.eval_config import EvalConfig
from jobs.eval_sequence import LABEL_HEIGHT, write_overlay
from jobs.rank_zero import MIN_PANEL_WIDTH, TITLE_HEIGHT, comparison_image, titled
from typedconfig import load_config


def test_training_picture_is_three_titled_panels_of_the_dropped_channel():
    target = torch.linspace(-1, 1, 32 * 32).reshape(1, 32, 32)
    reconstruction = torch.zeros(1, 32, 32)
    image = comparison_image(target, reconstruction, dropped=2)
    k = MIN_PANEL_WIDTH // 32  # 32-px crops are enlarged 4x
    assert image.shape == (TITLE_HEIGHT + 32 * k, 3 * 32 * k) and image.dtype == np.uint8
    body = image[TITLE_HEIGHT:]
    # The panels hold the values, enlarged by whole pixels: target, reconstruction, |error|.
    expected_target = ((target[0] + 1) * 127.5).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(body[::k, : 32 * k : k], expected_target)
    assert (body[:, 32 * k : 64 * k] == 128).all()  # zero -> mid grey
    error = (target[0].abs().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(body[::k, 64 * k :: k], error)
    # Each title is drawn (white text on black) and names the channel: compare with drawings.
    for i, title in enumerate(["target (b)", "reconstruction (b)", "|error|"]):
        header = image[:TITLE_HEIGHT, i * 32 * k : (i + 1) * 32 * k]
        assert header.max() == 255
        np.testing.assert_array_equal(
            header, titled(np.zeros((32, 32), np.uint8), title)[:TITLE_HEIGHT]
        )
    unnamed = comparison_image(target, reconstruction)
    assert not np.array_equal(unnamed[:TITLE_HEIGHT], image[:TITLE_HEIGHT])  # "target" alone


def test_evaluation_picture_labels_ground_truth_and_prediction_and_numbers_frames(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 48, 64, 3), dtype=np.uint8)
    gt = np.zeros((6, 48, 64), np.uint8)
    gt[:, 10:30, 10:40] = 1
    pred = np.roll(gt, 5, axis=2)
    cfg = load_config(EvalConfig, overrides=["overlay_frames=3", "overlay_width=128"])
    path = write_overlay(tmp_path / "seq", images, gt, pred, cfg)
    frames = []
    with Image.open(path) as gif:
        assert gif.n_frames == 3
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("RGB")))
    height = 96  # 48 * 128 / 64, per half
    for frame in frames:
        assert frame.shape == (2 * height, 128, 3)
        for top in (0, height):  # a black band with white text over each half
            band = frame[top : top + LABEL_HEIGHT]
            assert band.max() > 200 and np.median(band) < 20
    # The labels differ between frames (their numbers) and between the halves.
    assert not np.array_equal(frames[0][:LABEL_HEIGHT], frames[1][:LABEL_HEIGHT])
    assert not np.array_equal(frames[0][:LABEL_HEIGHT], frames[0][height : height + LABEL_HEIGHT])
