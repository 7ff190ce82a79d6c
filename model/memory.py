"""The MAST memory read: attention from a query frame into reference frames (MAST_NOTES
"Memory read"), memory-bounded.

Short-term references (gap <= long_term_gap) are read in a P x P window (P = 2R + 1) around
each query position. Long-term references (gap > long_term_gap) use two-step ROI localisation:
a dilated coarse correlation (window 2 * coarse_radius + 1, dilation
d = min(max_dilation, gap // 15 + 1)) whose soft-argmax gives a per-pixel offset, then a P x P
window bilinearly sampled around pixel + offset. All affinities of all references go through
one joint softmax; output = sum(affinity x value).

Deliberate differences from the reference code:
- Each long-term reference uses its own ROI offset for both affinities and values (defect 1).
- Affinities are scaled by `scale`, 1/sqrt(C) by default (defect 3); scale=1.0 is the
  reference behaviour.
- Bilinear sampling uses align_corners=True with coordinates normalised the same way, so a
  sample at feature pixel (y, x) reads exactly that pixel (defect 4).
- Border handling: window positions outside the reference image are excluded from the softmax
  (`border="exclude"`, default). The reference code gives them affinity 0 against value 0,
  which leaks softmax mass and darkens/erodes outputs near borders; `border="zero"` reproduces
  that. Exclusion applies to the coarse soft-argmax too, so offsets never point off-image.
- Memory (defect 7): the reference code repeats feature maps P*P times (about 22 GB at DAVIS
  size). Here the read runs over bands of query rows: only one band's windows exist at a
  time, so peak memory grows linearly with image area, independent of the window size beyond
  one band. Under autograd each band is checkpointed (recomputed in backward), so training
  memory is bounded the same way.

Shapes: B batch, C feature channels, V value channels, (h, w) feature map, P window side,
N = n * w query positions in a band of n rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .correlation import correlate_rows, pad_for_window

BORDER_MODES = ("exclude", "zero")
DILATION_PERIOD = 15  # frames per step of coarse dilation (MAST_NOTES: d = min(4, gap // 15 + 1))
DEFAULT_BUDGET = 1 << 24  # elements (64 MiB in fp32) for the largest per-band temporary


def roi_dilation(gap: int, max_dilation: int = 4) -> int:
    """Coarse-window dilation for a long-term reference `gap` frames back."""
    return min(max_dilation, gap // DILATION_PERIOD + 1)


def _rows_per_band(per_position: int, width: int, chunk_size: int) -> int:
    positions = chunk_size if chunk_size > 0 else DEFAULT_BUDGET // max(per_position, 1)
    return max(1, positions // width)


def _masked(affinity: torch.Tensor, valid: torch.Tensor, border: str) -> torch.Tensor:
    if border == "zero":
        return affinity.masked_fill(~valid, 0.0)
    # finfo.min rather than -inf: a band with no valid position then reads uniformly (all
    # values there are 0) instead of producing NaN.
    return affinity.masked_fill(~valid, torch.finfo(affinity.dtype).min)


def _axis_valid(start: int, n: int, size: int, P: int, d: int, device) -> torch.Tensor:
    """(P, n) bool: is position start + k + (i - P//2) * d inside [0, size)?"""
    pos = torch.arange(start, start + n, device=device)[None, :]
    shifts = (torch.arange(P, device=device)[:, None] - P // 2) * d
    return ((pos + shifts) >= 0) & ((pos + shifts) < size)


def roi_offset(
    query: torch.Tensor,
    ref_feat: torch.Tensor,
    dilation: int,
    coarse_radius: int = 12,
    *,
    scale: float,
    border: str = "exclude",
    chunk_size: int = 0,
) -> torch.Tensor:
    """Coarse ROI localisation: soft-argmax of a dilated correlation.

    Returns:
        (B, 2, h, w) offsets (dy, dx) in feature pixels: the expected displacement of each
        query position's match in the reference.
    """
    B, C, h, w = query.shape
    P = 2 * coarse_radius + 1
    padded = pad_for_window(ref_feat, P, dilation)
    shifts = (torch.arange(P, device=query.device, dtype=query.dtype) - coarse_radius) * dilation
    rows = _rows_per_band(P * P, w, chunk_size)
    offsets = []
    for y0 in range(0, h, rows):
        n = min(rows, h - y0)
        corr = correlate_rows(query[:, :, y0 : y0 + n], padded, y0, P, dilation) * scale
        valid = (
            _axis_valid(y0, n, h, P, dilation, query.device)[:, None, :, None]
            & _axis_valid(0, w, w, P, dilation, query.device)[None, :, None, :]
        ).reshape(1, P * P, n, w)
        prob = _masked(corr, valid, border).softmax(dim=1).view(B, P, P, n, w)
        dy = (prob.sum(dim=2) * shifts.view(1, P, 1, 1)).sum(dim=1)  # (B, n, w)
        dx = (prob.sum(dim=1) * shifts.view(1, P, 1, 1)).sum(dim=1)  # (B, n, w)
        offsets.append(torch.stack([dy, dx], dim=1))
    return torch.cat(offsets, dim=2)


@dataclass
class _Reference:
    long_term: bool
    feat: torch.Tensor  # short: padded (B, C, h+2R, w+2R); long: (B, C, h, w)
    value: torch.Tensor  # short: padded (B, V, h+2R, w+2R); long: (B, V, h, w)
    offset: torch.Tensor | None = None  # long: (B, 2, h, w)


def _short_window(q, ref: _Reference, y0: int, n: int, h: int, w: int, P: int):
    """Window read of a short-term reference for query rows y0..y0+n-1.

    Returns affinities (B, P*P, N), values (B, V, P*P, N), validity (1, P*P, N).
    """
    B, C = q.shape[:2]
    feat_band = ref.feat[:, :, y0 : y0 + n + P - 1]  # (B, C, n + 2R, w + 2R)
    keys = F.unfold(feat_band, P).view(B, C, P * P, n * w)
    affinity = torch.einsum("bcn,bcpn->bpn", q.reshape(B, C, n * w), keys)
    value_band = ref.value[:, :, y0 : y0 + n + P - 1]
    values = F.unfold(value_band, P).view(B, -1, P * P, n * w)
    valid = (
        _axis_valid(y0, n, h, P, 1, q.device)[:, None, :, None]
        & _axis_valid(0, w, w, P, 1, q.device)[None, :, None, :]
    ).reshape(1, P * P, n * w)
    return affinity, values, valid


def _roi_window(q, ref: _Reference, y0: int, n: int, h: int, w: int, P: int):
    """Bilinear P x P window of a long-term reference centred at pixel + its own offset."""
    B, C = q.shape[:2]
    R = P // 2
    offset = ref.offset[:, :, y0 : y0 + n]  # (B, 2, n, w)
    ys = torch.arange(y0, y0 + n, device=q.device, dtype=q.dtype).view(1, n, 1)
    xs = torch.arange(w, device=q.device, dtype=q.dtype).view(1, 1, w)
    centre_y = (ys + offset[:, 0]).reshape(B, n * w, 1)
    centre_x = (xs + offset[:, 1]).reshape(B, n * w, 1)
    window = torch.arange(-R, R + 1, device=q.device, dtype=q.dtype)
    sample_y = centre_y + window.repeat_interleave(P).view(1, 1, P * P)  # (B, N, P*P)
    sample_x = centre_x + window.repeat(P).view(1, 1, P * P)
    # align_corners=True: -1 and +1 are the centres of the first and last pixels (defect 4).
    grid = torch.stack(
        [2 * sample_x / max(w - 1, 1) - 1, 2 * sample_y / max(h - 1, 1) - 1], dim=-1
    )  # (B, N, P*P, 2)
    keys = F.grid_sample(ref.feat, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    affinity = torch.einsum("bcn,bcnp->bpn", q.reshape(B, C, n * w), keys)  # (B, P*P, N)
    values = F.grid_sample(
        ref.value, grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    values = values.transpose(2, 3)  # (B, V, P*P, N)
    valid = (
        (sample_y >= 0) & (sample_y <= h - 1) & (sample_x >= 0) & (sample_x <= w - 1)
    ).transpose(1, 2)  # (B, P*P, N)
    return affinity, values, valid


def _read_band(
    q, refs: list[_Reference], y0: int, h: int, w: int, P: int, scale: float, border: str
):
    B = q.shape[0]
    n = q.shape[2]
    affinities, values = [], []
    for ref in refs:
        window = _roi_window if ref.long_term else _short_window
        affinity, value, valid = window(q, ref, y0, n, h, w, P)
        affinities.append(_masked(affinity * scale, valid, border))
        values.append(value)
    weights = torch.cat(affinities, dim=1).softmax(dim=1)  # one joint softmax (B, sum P*P, N)
    out = 0
    for k, value in enumerate(values):
        out = out + torch.einsum("bpn,bvpn->bvn", weights[:, k * P * P : (k + 1) * P * P], value)
    return out.view(B, -1, n, w)


def read_memory(
    query: torch.Tensor,
    ref_feats: Sequence[torch.Tensor],
    ref_values: Sequence[torch.Tensor],
    gaps: Sequence[int],
    radius: int,
    *,
    scale: float | None = None,
    long_term_gap: int = 15,
    coarse_radius: int = 12,
    max_dilation: int = 4,
    border: str = "exclude",
    chunk_size: int = 0,
) -> torch.Tensor:
    """Read the memory: reconstruct values for `query` from the references.

    Args:
        query: (B, C, h, w) query features.
        ref_feats: per reference, (B, C, h, w) features.
        ref_values: per reference, (B, V, h, w) values at feature resolution.
        gaps: per reference, frames between it and the query; > long_term_gap = long-term.
        radius: R of the P x P (P = 2R + 1) short-term window and fine ROI window.
        scale: affinity scale before the softmax; None = 1/sqrt(C).
        long_term_gap, coarse_radius, max_dilation: ROI localisation settings.
        border: "exclude" (default) or "zero" (reference code), see module docstring.
        chunk_size: query positions per band; 0 = automatic (about 64 MiB of temporaries).

    Returns:
        (B, V, h, w).
    """
    if not (len(ref_feats) == len(ref_values) == len(gaps)) or not ref_feats:
        raise ValueError(
            f"read_memory needs one feature map, value map and gap per reference, got "
            f"{len(ref_feats)}, {len(ref_values)}, {len(gaps)}"
        )
    if border not in BORDER_MODES:
        raise ValueError(f"border={border!r}; choose one of {BORDER_MODES}")
    B, C, h, w = query.shape
    for feat, value in zip(ref_feats, ref_values):
        if feat.shape != query.shape or value.shape[0] != B or value.shape[-2:] != (h, w):
            raise ValueError(
                f"reference shapes {tuple(feat.shape)} / {tuple(value.shape)} do not match the "
                f"query {tuple(query.shape)}; values must already be at feature resolution"
            )
    scale = 1.0 / math.sqrt(C) if scale is None else float(scale)
    P = 2 * radius + 1
    refs = []
    for feat, value, gap in zip(ref_feats, ref_values, gaps):
        value = value.to(query.dtype)
        if gap > long_term_gap:
            offset = roi_offset(
                query,
                feat,
                roi_dilation(int(gap), max_dilation),
                coarse_radius,
                scale=scale,
                border=border,
                chunk_size=chunk_size,
            )
            refs.append(_Reference(True, feat, value, offset))
        else:
            refs.append(_Reference(False, pad_for_window(feat, P, 1), pad_for_window(value, P, 1)))
    V = ref_values[0].shape[1]
    per_position = P * P * (len(refs) * (1 + V) + C)  # affinities + value windows + one key window
    rows = _rows_per_band(per_position, w, chunk_size)
    grad = torch.is_grad_enabled() and (
        query.requires_grad or any(t.requires_grad for r in refs for t in (r.feat, r.value))
    )
    bands = []
    for y0 in range(0, h, rows):
        q = query[:, :, y0 : y0 + rows]
        if grad:  # recompute the band in backward instead of keeping its windows
            band = checkpoint(_read_band, q, refs, y0, h, w, P, scale, border, use_reentrant=False)
        else:
            band = _read_band(q, refs, y0, h, w, P, scale, border)
        bands.append(band)
    return torch.cat(bands, dim=2)
