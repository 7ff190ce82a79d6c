"""Baselines scored through the model's own propagation: colour matching and copy-first."""

from __future__ import annotations

import pytest
import torch

from model import ColourMatch, CopyFirst, build_baseline
from model.colour import quantise_lab, rgb_to_lab


def moving_square(frames=6, size=48, side=16, step=4):
    """(T, 3, H, W) stored Lab of a red square moving right over green; (T, H, W) its masks."""
    rgb = torch.zeros(frames, 3, size, size)
    rgb[:, 1] = 0.6
    masks = torch.zeros(frames, size, size, dtype=torch.long)
    for t in range(frames):
        x = 4 + t * step
        rgb[t, :, 16 : 16 + side, x : x + side] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
        masks[t, 16 : 16 + side, x : x + side] = 1
    return quantise_lab(rgb_to_lab(rgb)), masks


def iou(a, b):
    return ((a == 1) & (b == 1)).sum().item() / ((a == 1) | (b == 1)).sum().item()


def test_colour_matching_follows_an_object_that_differs_from_its_background():
    frames, masks = moving_square()
    labels = ColourMatch(temperature=0.05).propagate(frames, masks[0], radius=4)
    assert labels.shape == masks.shape and torch.equal(labels[0], masks[0])
    for t in range(1, len(masks)):
        assert iou(labels[t], masks[t]) > 0.85, t  # moved with the square, 4 px a frame
    # Copying the first mask falls behind the moving object.
    copied = CopyFirst().propagate(frames, masks[0])
    assert torch.equal(copied, masks[0].expand_as(masks)) and iou(copied[-1], masks[-1]) < 0.2


def test_keys_are_unit_cell_colours_on_the_stride_4_grid():
    lab = torch.rand(1, 3, 10, 13) * 2 - 1  # a size that is not a multiple of 4
    keys = ColourMatch().encode(lab)
    assert keys.shape == (1, 3, 3, 4)
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(1, 3, 4))
    cell = lab[0, :, :4, :4].mean(dim=(1, 2))
    torch.testing.assert_close(keys[0, :, 0, 0], cell / cell.norm())


def test_baselines_by_name():
    assert isinstance(build_baseline("colour", 0.1), ColourMatch)
    assert build_baseline("colour", 0.1).scale == pytest.approx(10.0)
    assert isinstance(build_baseline("copy-first"), CopyFirst)
    with pytest.raises(
        ValueError, match=r"unknown baseline 'x'; choose one of \['colour', 'copy-first'\]"
    ):
        build_baseline("x")
