import cv2
import numpy as np
import pytest
import torch

from model.colour import (
    dequantise_lab,
    drop_channel,
    lab_to_rgb,
    normalise_lab,
    quantise_lab,
    rgb_to_lab,
)


def test_rgb_to_lab_matches_opencv(real_frames):
    rgb = real_frames["bikes.mp4"][0]  # (H, W, 3) uint8
    expected = cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)
    ours = rgb_to_lab(torch.from_numpy(rgb).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    # OpenCV approximates the sRGB curve with splines/LUTs (a, b in 1/64 steps): up to ~0.3 L
    # apart from the exact CIE formula we use. The exact anchors below pin our side.
    assert np.abs(ours - expected).max() < 0.5
    assert np.abs(ours - expected).mean() < 0.1
    # Known anchors: white is L=100, a=b=0; pure red is about (53.2, 80.1, 67.2).
    white = rgb_to_lab(torch.ones(3, 1, 1))[:, 0, 0]
    torch.testing.assert_close(white, torch.tensor([100.0, 0.0, 0.0]), atol=0.01, rtol=0)
    red = rgb_to_lab(torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1))[:, 0, 0]
    torch.testing.assert_close(red, torch.tensor([53.24, 80.09, 67.20]), atol=0.05, rtol=0)


def test_quantisation_round_trip_and_opencv_8bit_layout(real_frames):
    rgb = torch.from_numpy(real_frames["bikes.mp4"][1]).permute(2, 0, 1)
    lab = rgb_to_lab(rgb)
    lab8 = quantise_lab(lab)
    err = (dequantise_lab(lab8) - lab).abs()
    assert err[0].max() <= 100 / 255 / 2 + 1e-4 and err[1:].max() <= 0.5 + 1e-4
    cv8 = cv2.cvtColor(real_frames["bikes.mp4"][1], cv2.COLOR_RGB2Lab)  # OpenCV's 8-bit layout
    assert np.abs(lab8.permute(1, 2, 0).numpy().astype(int) - cv8.astype(int)).max() <= 2


def test_normalisation_ranges_and_inverse():
    lab8 = torch.tensor([[[0]], [[128]], [[255]]], dtype=torch.uint8)
    x = normalise_lab(lab8)[:, 0, 0]
    torch.testing.assert_close(x, torch.tensor([-1.0, 0.0, 127 / 127]), atol=1e-6, rtol=0)
    rgb = torch.rand(3, 4, 5)
    back = lab_to_rgb(rgb_to_lab(rgb))
    torch.testing.assert_close(back, rgb, atol=2e-3, rtol=0)


def test_reference_dropout_drops_one_colour_channel_per_clip():
    frames = torch.ones(64, 3, 3, 2, 2)
    inputs, dropped = drop_channel(frames, "reference", torch.Generator().manual_seed(0))
    assert set(dropped.tolist()) == {1, 2}
    for b in range(64):
        kept = [c for c in range(3) if c != dropped[b]]
        assert torch.all(inputs[b, :, dropped[b]] == 0)  # same channel in every frame
        assert torch.all(inputs[b, :, kept] == 1.5)  # 3 / (3 - 1)
    assert torch.all(inputs[:, :, 0] == 1.5)  # L is never dropped


def test_paper_dropout_sometimes_drops_both_colours():
    frames = torch.ones(400, 2, 3, 1, 1)
    inputs, dropped = drop_channel(frames, "paper", torch.Generator().manual_seed(0))
    both = (inputs[:, 0, 1:] == 0).all(dim=1).squeeze()
    assert 0.4 < both.float().mean() < 0.6
    assert torch.all(inputs[both, :, 0] == 3.0)  # only L kept: scaled by 3 / 1
    assert torch.all(inputs[torch.arange(400), 0, dropped] == 0)  # the target is always dropped


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="choose one of"):
        drop_channel(torch.ones(1, 2, 3, 1, 1), "sometimes")
