"""Baselines a trained MAST must beat, scored through the same propagation (model/propagate.py).

- `ColourMatch`: no network. Keys are the Lab frame itself averaged over each 4x4 cell (the
  stride-4 grid the model's features live on), L2-normalised per position; affinities are
  cosines divided by a temperature (0.05 by default), read with the model's memory schedule,
  windows and label feedback. Objects often differ from their background in colour, so this
  is a strong baseline on DAVIS: a model is worth its training only by the margin it beats it.
- `CopyFirst`: every frame predicted as the first annotation (no motion at all).

Shapes: T frames, (H, W) image, (h, w) = (ceil(H/4), ceil(W/4)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import MASTConfig
from .grid import to_cells
from .propagate import LabelPropagation

BASELINES = ("colour", "copy-first")


class ColourMatch(LabelPropagation, nn.Module):
    """Label propagation by colour alone.

    Args:
        temperature: cosine affinities are divided by it before the softmax (CRW's 0.05).
        config: radii and long-term settings of the memory read; None = MAST's.
    """

    def __init__(self, temperature: float = 0.05, config: MASTConfig | None = None) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        self.config = config or MASTConfig()
        self.temperature = temperature
        self.scale = 1.0 / temperature

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) normalised Lab -> (1, 3, h, w) unit vectors of the cell colours."""
        return F.normalize(to_cells(x), dim=1)  # (1, 3, h, w), the grid values live on


class CopyFirst(nn.Module):
    """Every frame is the first annotation."""

    @torch.no_grad()
    def propagate(
        self,
        frames: torch.Tensor,
        first_mask: torch.Tensor,
        **_: Sequence[int] | int | float | None,
    ) -> torch.Tensor:
        """(T, 3, H, W) frames, (H, W) first mask -> (T, H, W) the mask repeated; the protocol
        arguments of `LabelPropagation.propagate` are accepted and have nothing to change."""
        return first_mask.long().expand(frames.shape[0], *first_mask.shape).clone()


def build_baseline(name: str, temperature: float = 0.05) -> nn.Module:
    """A baseline by name (one of BASELINES)."""
    if name == "colour":
        return ColourMatch(temperature)
    if name == "copy-first":
        return CopyFirst()
    raise ValueError(f"unknown baseline {name!r}; choose one of {list(BASELINES)}")
