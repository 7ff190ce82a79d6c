"""MAST: Memory-Augmented Self-supervised Tracker (Lai, Lu & Xie, CVPR 2020).

Training: one Lab colour channel is dropped from every frame of a clip; the encoder sees the
rest; the target frame's dropped channel is reconstructed from the references' dropped channel
through the memory read, and compared with smooth-L1 (x 20, as the reference code).
Inference (`propagate`): the same read copies one-hot object masks through a video with the
DAVIS memory schedule (MAST_NOTES "Test-time memory").

Shapes: B batch, T frames per clip (T - 1 references, then the target), (H, W) image,
(h, w) = (ceil(H/4), ceil(W/4)) feature map, C = feat_dim, K label channels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .colour import drop_channel, normalise_lab
from .config import MASTConfig
from .encoder import ResNet18
from .grid import from_cells, to_cells
from .propagate import LabelPropagation


@dataclasses.dataclass
class MASTOutput:
    loss: torch.Tensor  # scalar
    reconstruction: torch.Tensor  # (B, 1, H, W) normalised dropped channel of the target
    target: torch.Tensor  # (B, 1, H, W)
    dropped: torch.Tensor  # (B,) index of the dropped channel (1 = a, 2 = b)
    long_term_refs: int  # long-term references read in this batch (summed over samples)


class MAST(LabelPropagation, nn.Module):
    """MAST with a stride-4 ResNet-18 encoder and a 64-d key/query projection.

    Args:
        config: the model's settings (model/config.py, where each one is described);
            None = the paper's.
        **overrides: settings replaced on top of `config`, e.g. `MAST(width=8)`.
    """

    def __init__(self, config: MASTConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        config = dataclasses.replace(config or MASTConfig(), **overrides)
        config.validate()
        self.config = config
        width, feat_dim = config.width, config.feat_dim
        self.feature_extraction = ResNet18(3, width)
        self.post_convolution = nn.Conv2d(self.feature_extraction.out_channels, feat_dim, 3, 1, 1)
        self.scale = 1.0 / math.sqrt(feat_dim) if config.scale is None else config.scale

    @property
    def model_args(self) -> dict[str, Any]:
        """The settings as the plain dict every checkpoint stores (checkpoint API)."""
        return self.config.as_args()

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MAST:
        """Rebuild from a checkpoint dict {"model_args": ..., "model": state_dict, ...}."""
        missing = {"model_args", "model"} - set(state)
        if missing:
            raise ValueError(f"not a MAST checkpoint: missing {sorted(missing)}")
        model = cls(MASTConfig.from_args(state["model_args"]))
        model.load_state_dict(state["model"])
        return model

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised Lab -> (B, feat_dim, h, w) keys/queries."""
        return self.post_convolution(self.feature_extraction(x))

    def forward(self, frames: torch.Tensor, gaps: torch.Tensor | Sequence[int]) -> MASTOutput:
        """Self-supervised reconstruction of the target's dropped channel.

        Args:
            frames: (B, T, 3, H, W) stored uint8 Lab or normalised float Lab; frames[:, :-1]
                are the references, frames[:, -1] the target.
            gaps: (B, T - 1) or (T - 1,) frames between each reference and the target.
        """
        if frames.dim() != 5 or frames.shape[1] < 2 or frames.shape[2] != 3:
            raise ValueError(f"frames must be (B, T >= 2, 3, H, W), got {tuple(frames.shape)}")
        lab = normalise_lab(frames) if frames.dtype == torch.uint8 else frames.float()
        B, T, _, H, W = lab.shape
        gaps = torch.as_tensor(gaps, dtype=torch.long).to("cpu").expand(B, T - 1)
        inputs, dropped = drop_channel(lab, self.config.channel_dropout)
        feats = self.encode(inputs.flatten(0, 1)).unflatten(0, (B, T))  # (B, T, C, h, w)
        # Target and values: the dropped channel of the un-dropped frames (MAST_NOTES).
        batch = torch.arange(B, device=lab.device)
        channel = lab[batch, :, dropped]  # (B, T, H, W)
        values = to_cells(channel)[:, :, None]  # (B, T, 1, h, w) cell averages (model/grid.py)
        target = channel[:, -1:]  # (B, 1, H, W)
        # Samples with the same gaps share one read (gaps decide short vs long-term reads).
        out = feats.new_zeros(B, 1, *feats.shape[-2:], dtype=torch.float32)
        long_term = 0
        for row in torch.unique(gaps, dim=0):
            idx = (gaps == row).all(dim=1).nonzero().squeeze(1).to(lab.device)
            ref_gaps = row.tolist()
            out[idx] = self._read(
                feats[idx, -1],
                [feats[idx, k] for k in range(T - 1)],
                [values[idx, k] for k in range(T - 1)],
                ref_gaps,
                self.config.train_radius,
            )
            long_term += len(idx) * sum(g > self.config.long_term_gap for g in ref_gaps)
        reconstruction = from_cells(out, (H, W))
        w = self.config.loss_weight
        loss = F.smooth_l1_loss(reconstruction * w, target * w)
        return MASTOutput(loss, reconstruction, target, dropped, long_term)
