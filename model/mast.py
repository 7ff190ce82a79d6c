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
from .memory import read_memory

VOID_LABEL = 255
STRIDE = 4  # encoder output stride; values are sampled at feature resolution by [::4, ::4]


@dataclasses.dataclass
class MASTOutput:
    loss: torch.Tensor  # scalar
    reconstruction: torch.Tensor  # (B, 1, H, W) normalised dropped channel of the target
    target: torch.Tensor  # (B, 1, H, W)
    dropped: torch.Tensor  # (B,) index of the dropped channel (1 = a, 2 = b)
    long_term_refs: int  # long-term references read in this batch (summed over samples)


class MAST(nn.Module):
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

    def _read(self, query, ref_feats, ref_values, gaps, radius) -> torch.Tensor:
        c = self.config
        # The read runs in fp32 even under bf16 autocast: its softmax spans thousands of
        # entries and bf16's 8-bit mantissa would flatten it. The encoder keeps autocast.
        with torch.autocast(query.device.type, enabled=False):
            return read_memory(
                query.float(),
                [f.float() for f in ref_feats],
                [v.float() for v in ref_values],
                gaps,
                radius,
                scale=self.scale,
                long_term_gap=c.long_term_gap,
                coarse_radius=c.coarse_radius,
                max_dilation=c.max_dilation,
                chunk_size=c.chunk_size,
            )

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
        values = channel[:, :, None, ::STRIDE, ::STRIDE]  # (B, T, 1, h, w) strided, not pooled
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
        reconstruction = F.interpolate(out, size=(H, W), mode="bilinear", align_corners=False)
        w = self.config.loss_weight
        loss = F.smooth_l1_loss(reconstruction * w, target * w)
        return MASTOutput(loss, reconstruction, target, dropped, long_term)

    @torch.no_grad()
    def propagate(
        self,
        frames: torch.Tensor,
        first_mask: torch.Tensor,
        *,
        max_objects: int | None = None,
        radius: int | None = None,
        long_term: Sequence[int] = (0, 5),
        short_term: Sequence[int] = (1, 3, 5),
    ) -> torch.Tensor:
        """Propagate the first frame's object mask through a video (semi-supervised VOS).

        Args:
            frames: (T, 3, H, W) stored uint8 Lab or normalised Lab.
            first_mask: (H, W) integer labels of frame 0: 0 background, 1..K objects,
                255 void (no label mass; void pixels vote for nothing).
            max_objects: number of label channels (background included); None = the largest
                id in `first_mask` + 1. Ids >= max_objects raise a ValueError.
            radius: window radius; None = test_radius.
            long_term: absolute frame indices always kept in memory (DAVIS: 0 and 5).
            short_term: offsets back from the current frame (DAVIS: t-1, t-3, t-5).

        Returns:
            (T, H, W) int64 labels; frame 0 is `first_mask` (void kept as 255).
        """
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be (T, 3, H, W), got {tuple(frames.shape)}")
        T, _, H, W = frames.shape
        if first_mask.shape != (H, W):
            raise ValueError(f"first_mask {tuple(first_mask.shape)} does not match frames {(H, W)}")
        mask = first_mask.long().to(frames.device)
        ids = mask[mask != VOID_LABEL]
        largest = int(ids.max()) if ids.numel() else 0
        K = largest + 1 if max_objects is None else max_objects
        if largest >= K:
            raise ValueError(
                f"first mask has label id {largest} but the model reads {K} label channels "
                f"(max_objects={max_objects}); raise max_objects or remap the ids"
            )
        radius = self.config.test_radius if radius is None else radius
        lab = normalise_lab(frames) if frames.dtype == torch.uint8 else frames.float()
        feats = [self.encode(lab[t : t + 1]) for t in range(T)]  # each (1, C, h, w)

        def to_values(labels: torch.Tensor) -> torch.Tensor:  # (H, W) -> (1, K, h, w) one-hot
            keep = labels != VOID_LABEL
            onehot = F.one_hot(torch.where(keep, labels, 0), K).permute(2, 0, 1).float()
            onehot = onehot * keep  # void pixels carry no label mass
            return onehot[None, :, ::STRIDE, ::STRIDE]

        values = [to_values(mask)]
        predictions = [mask]
        for t in range(1, T):
            refs = sorted(
                {i for i in long_term if i < t} | {t - s for s in short_term if t - s >= 0}
            )
            out = self._read(
                feats[t],
                [feats[i] for i in refs],
                [values[i] for i in refs],
                [t - i for i in refs],
                radius,
            )  # (1, K, h, w)
            probs = F.interpolate(out, size=(H, W), mode="bilinear", align_corners=False)
            labels = probs[0].argmax(dim=0)  # (H, W) hard labels, fed back as memory
            predictions.append(labels)
            values.append(to_values(labels))
        return torch.stack(predictions)
