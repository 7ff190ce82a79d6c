"""Label propagation (semi-supervised VOS, DAVIS): the memory read of MAST_NOTES "Test-time
memory" copying first-frame object masks through a video, for any module that says how it
turns a frame into keys (`encode`) and how sharp its affinities are (`scale`): the MAST
network, and the baselines of `model/baselines.py` scored the same way.

The test protocol is an argument (MAST_NOTES "Other test-time protocols": the protocol moves
J&F by points for the same features): which frames are in memory (`long_term` frames, frames
`short_term` offsets back), the window radius, the temperature, and top-k. The defaults are
MAST's; the notes' CRW row reads as short_term=1..20, top_k=10, radius=12, temperature=0.05.

Shapes: T frames, (H, W) image, (h, w) = (ceil(H/4), ceil(W/4)) feature map, C key channels,
K label channels.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .colour import normalise_lab
from .config import MASTConfig
from .grid import from_cells, to_cells
from .memory import read_memory

VOID_LABEL = 255


def memory_frames(t: int, long_term: Sequence[int], short_term: Sequence[int]) -> list[int]:
    """The frames read to predict frame t, sorted, each once: the `long_term` frames before t
    and t - s for every `short_term` offset s that exists. MAST (0, 5) + (1, 3, 5): t = 2 reads
    [0, 1], t = 7 reads [0, 2, 4, 5, 6]."""
    return sorted({i for i in long_term if i < t} | {t - s for s in short_term if t - s >= 0})


def check_protocol(
    long_term: Sequence[int],
    short_term: Sequence[int],
    top_k: int | None,
    temperature: float | None,
) -> None:
    """ValueError for a protocol `propagate` cannot run: every frame needs a reference."""
    if any(i < 0 for i in long_term) or any(s < 1 for s in short_term):
        raise ValueError(
            f"long_term frames must be >= 0 and short_term offsets >= 1, got "
            f"{list(long_term)} and {list(short_term)}"
        )
    if 1 not in short_term and 0 not in long_term:  # then frame 1 would read nothing
        raise ValueError(
            f"frame 1 has no reference with long_term={list(long_term)}, short_term="
            f"{list(short_term)}: include offset 1 in short_term or frame 0 in long_term"
        )
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (None keeps every affinity)")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 (None = the model's own)")


class LabelPropagation:
    """Mixin: `propagate` and the memory read, given `self.config` (MASTConfig: radii and
    long-term settings), `self.scale` (affinity scale, the model's own temperature's inverse)
    and `self.encode` ((1, 3, H, W) normalised Lab -> (1, C, h, w) keys)."""

    config: MASTConfig
    scale: float

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(
        self, query, ref_feats, ref_values, gaps, radius, *, top_k=None, scale=None
    ) -> torch.Tensor:
        """read_memory with this module's ROI settings; scale None = self.scale."""
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
                scale=self.scale if scale is None else scale,
                top_k=top_k,
                long_term_gap=c.long_term_gap,
                coarse_radius=c.coarse_radius,
                max_dilation=c.max_dilation,
                chunk_size=c.chunk_size,
            )

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
        top_k: int | None = None,
        temperature: float | None = None,
    ) -> torch.Tensor:
        """Propagate the first frame's object mask through a video (semi-supervised VOS).

        Args:
            frames: (T, 3, H, W) stored uint8 Lab or normalised Lab.
            first_mask: (H, W) integer labels of frame 0: 0 background, 1..K objects,
                255 void (no label mass; void pixels vote for nothing).
            max_objects: number of label channels (background included); None = the largest
                id in `first_mask` + 1. Ids >= max_objects raise a ValueError.
            radius: window radius; None = test_radius (MAST: 12).
            long_term: absolute frame indices always kept in memory (MAST: 0 and 5).
            short_term: offsets back from the current frame (MAST: t-1, t-3, t-5).
            top_k: weigh only each query's k largest affinities over all references (CRW:
                10); None = all (MAST).
            temperature: affinities are divided by it before the softmax; None = the
                module's own (`1 / self.scale`: MAST's 1/sqrt(C) scale, the colour
                baseline's 0.05).

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
        check_protocol(long_term, short_term, top_k, temperature)
        radius = self.config.test_radius if radius is None else radius
        scale = self.scale if temperature is None else 1.0 / temperature
        read = functools.partial(self._read, top_k=top_k, scale=scale)  # this protocol's read
        lab = normalise_lab(frames) if frames.dtype == torch.uint8 else frames.float()
        feats = [self.encode(lab[t : t + 1]) for t in range(T)]  # each (1, C, h, w)

        def to_values(labels: torch.Tensor) -> torch.Tensor:  # (H, W) -> (1, K, h, w) one-hot
            keep = labels != VOID_LABEL
            onehot = F.one_hot(torch.where(keep, labels, 0), K).permute(2, 0, 1).float()
            onehot = onehot * keep  # void pixels carry no label mass
            return to_cells(onehot)[None]  # cell averages: soft labels at the cell centres

        values = [to_values(mask)]
        predictions = [mask]
        for t in range(1, T):
            refs = memory_frames(t, long_term, short_term)
            out = read(
                feats[t],
                [feats[i] for i in refs],
                [values[i] for i in refs],
                [t - i for i in refs],
                radius,
            )  # (1, K, h, w)
            probs = from_cells(out, (H, W))  # the grid to_values put the labels on
            labels = probs[0].argmax(dim=0)  # (H, W) hard labels, fed back as memory
            predictions.append(labels)
            values.append(to_values(labels))
        return torch.stack(predictions)
