"""The MAST memory read: attention from a query frame into reference frames (MAST_NOTES
"Memory read"), memory-bounded.

Short-term references (gap <= long_term_gap) are read in a P x P window (P = 2R + 1) around
each query position. Long-term references (gap > long_term_gap) use two-step ROI localisation:
a dilated coarse correlation (window 2 * coarse_radius + 1, dilation
d = min(max_dilation, gap // 15 + 1)) whose soft-argmax gives a per-pixel offset, then a P x P
window bilinearly sampled around pixel + offset. All affinities of all references go through
one joint softmax; output = sum(affinity x value). With `top_k` (CRW's test protocol, MAST_NOTES
"Other test-time protocols") that softmax spans only each query's k largest affinities over all
references; the others weigh 0. The coarse ROI soft-argmax is not truncated: it only places the
fine window.

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

How a band is read (the one primitive, `_window_dots`): a single GEMM of the band's queries
against the key rows its windows can reach, then a gather of each query's window entries.
Short-term windows are integer windows. ROI windows gather the (P+1)^2 integer neighbours and
blend them bilinearly with each query's fractional offset: exactly grid_sample(align_corners=
True, zero padding) of the keys followed by the dot product, since the dot product is linear,
and differentiable through the offset. The dilated coarse window is an undilated window on the
subgrid of positions congruent to the query modulo d, so it is read one residue class at a time.

Shapes: B batch, C feature channels, V value channels, (h, w) feature map, P window side,
N = n * w query positions in a band of n rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

BORDER_MODES = ("exclude", "zero")
DILATION_PERIOD = 15  # frames per step of coarse dilation (MAST_NOTES: d = min(4, gap // 15 + 1))
DEFAULT_BUDGET = 1 << 22  # elements per band of the dense (queries x reachable keys) product


def roi_dilation(gap: int, max_dilation: int = 4) -> int:
    """Coarse-window dilation for a long-term reference `gap` frames back."""
    return min(max_dilation, gap // DILATION_PERIOD + 1)


class _Window:
    """Integer windows of a band's queries in one reference: top-left (base_y, base_x), side
    `size`, and the dense product with the key rows [r0, r1) that the windows reach."""

    def __init__(self, q, feat, base_y, base_x, size: int) -> None:
        B, C, N = q.shape
        H, W = feat.shape[-2:]
        span = torch.arange(size, device=q.device)
        self.Y = base_y[..., None] + span  # (B, N, size)
        self.X = base_x[..., None] + span
        self.r0 = r0 = int(self.Y.min().clamp(0, H - 1))
        self.r1 = r1 = int(self.Y.max().clamp(r0, H - 1)) + 1
        self.shape = (B, N, size, size)
        self.H, self.W = H, W
        # Only the key rows some window reaches take part in the product.
        dense = torch.bmm(q.transpose(1, 2), feat[:, :, r0:r1].flatten(2))  # (B, N, M)
        row = (self.Y - r0).clamp(0, r1 - r0 - 1) * W
        self.index = (row[..., :, None] + self.X.clamp(0, W - 1)[..., None, :]).flatten(2)
        self.dots = dense.gather(2, self.index).view(self.shape)  # off-image entries: garbage

    def inside(self) -> torch.Tensor:
        """(B, N, size, size) bool: window entry inside the image."""
        iy = (self.Y >= 0) & (self.Y < self.H)
        ix = (self.X >= 0) & (self.X < self.W)
        return iy[..., :, None] & ix[..., None, :]

    def read_values(self, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """sum over the window of weights (B, N, size, size) x values (B, V, H, W) -> (B, V, N).

        Scatter the weights onto the reachable rows and multiply by the value rows: cheaper
        than gathering V values per window entry. Off-image entries must carry weight 0.
        """
        B, N = self.shape[:2]
        dense = weights.new_zeros(B, N, (self.r1 - self.r0) * self.W)
        dense.scatter_add_(2, self.index, weights.flatten(2))
        rows = values[:, :, self.r0 : self.r1].flatten(2)  # (B, V, M)
        return torch.bmm(rows, dense.transpose(1, 2))  # (B, V, N)


def _axis_bias(pos: torch.Tensor, lo: float, hi: float, dtype) -> torch.Tensor:
    """0 where lo <= pos <= hi, a large negative number elsewhere (one axis of the mask).

    Two axes add up to at most finfo.min / 2: no overflow, and a query with no valid entry
    reads uniformly (its values are all 0) instead of producing NaN.
    """
    return ((pos < lo) | (pos > hi)).to(dtype) * (torch.finfo(dtype).min / 4)


def _bilinear(x, fy, fx):
    """Blend (B, N, P+1, P+1) integer samples into (B, N, P, P) at fractions (B, N)."""
    fy, fx = fy[..., None, None], fx[..., None, None]
    top = x[..., :-1, :-1] * (1 - fx) + x[..., :-1, 1:] * fx
    bottom = x[..., 1:, :-1] * (1 - fx) + x[..., 1:, 1:] * fx
    return top * (1 - fy) + bottom * fy


def _bilinear_transpose(a, fy, fx):
    """Adjoint of `_bilinear`: spread (B, N, P, P) weights onto (B, N, P+1, P+1) integers."""
    fy, fx = fy[..., None, None], fx[..., None, None]
    pad = torch.nn.functional.pad
    top, bottom = a * (1 - fy), a * fy
    return (
        pad(top * (1 - fx), (0, 1, 0, 1))
        + pad(top * fx, (1, 0, 0, 1))
        + pad(bottom * (1 - fx), (0, 1, 1, 0))
        + pad(bottom * fx, (1, 0, 1, 0))
    )


def _grid(y0: int, n: int, w: int, B: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n * w) row and column of each query position of rows y0 .. y0 + n - 1."""
    ys = torch.arange(y0, y0 + n, device=device).repeat_interleave(w)
    xs = torch.arange(w, device=device).repeat(n)
    return ys.expand(B, -1), xs.expand(B, -1)


def _rows_per_band(per_row: int, chunk_size: int, width: int) -> int:
    if chunk_size > 0:
        return max(1, chunk_size // width)
    return max(1, DEFAULT_BUDGET // max(per_row, 1))


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
    d, R = dilation, coarse_radius
    P = 2 * R + 1
    shifts = (torch.arange(P, device=query.device, dtype=query.dtype) - R) * d
    offset = query.new_zeros(B, 2, h, w)
    for ry in range(min(d, h)):
        for rx in range(min(d, w)):
            q_sub = query[:, :, ry::d, rx::d]  # the residue class: an undilated window there
            k_sub = ref_feat[:, :, ry::d, rx::d]
            hs, ws = q_sub.shape[-2:]
            rows = _rows_per_band((2 * R + 1 + 1) * ws * ws, chunk_size, ws)
            parts = []
            for y0 in range(0, hs, rows):
                n = min(rows, hs - y0)
                ys, xs = _grid(y0, n, ws, B, query.device)
                q = q_sub[:, :, y0 : y0 + n].flatten(2)
                win = _Window(q, k_sub, ys - R, xs - R, P)
                if border == "exclude":
                    logits = win.dots * scale + (
                        _axis_bias(win.Y, 0, hs - 1, q.dtype)[..., :, None]
                        + _axis_bias(win.X, 0, ws - 1, q.dtype)[..., None, :]
                    )
                else:
                    logits = win.dots * win.inside() * scale
                prob = logits.flatten(2).softmax(-1).view(B, n * ws, P, P)
                dy = (prob.sum(3) * shifts).sum(2)  # (B, N)
                dx = (prob.sum(2) * shifts).sum(2)
                parts.append(torch.stack([dy, dx], 1).view(B, 2, n, ws))
            offset[:, :, ry::d, rx::d] = torch.cat(parts, 2)
    return offset


@dataclass
class _Reference:
    feat: torch.Tensor  # (B, C, h, w)
    value: torch.Tensor  # (B, V, h, w)
    offset: torch.Tensor | None = None  # long-term: (B, 2, h, w); short-term: None


def _joint_softmax(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Softmax of (B, N, E) logits over E; with top_k, over each row's k largest only."""
    if top_k is None or top_k >= logits.shape[-1]:
        return logits.softmax(dim=-1)
    top, index = logits.topk(top_k, dim=-1)  # (B, N, k): exactly k, as CRW keeps them
    return torch.zeros_like(logits).scatter(-1, index, top.softmax(dim=-1))


def _read_band(
    q, refs: list[_Reference], y0: int, w: int, R: int, scale: float, border: str, top_k
):
    """Read rows y0 .. y0 + n - 1 of the query from every reference with one joint softmax."""
    B, C, n, _ = q.shape
    P = 2 * R + 1
    ys, xs = _grid(y0, n, w, B, q.device)
    q = q.flatten(2)  # (B, C, N)
    windows, logits = [], []
    for ref in refs:
        h = ref.feat.shape[2]
        if ref.offset is None:  # short-term: integer window around the same position
            win = _Window(q, ref.feat, ys - R, xs - R, P)
            dots, sy, sx, frac = win.dots, win.Y, win.X, None
        else:  # long-term: bilinear window around pixel + this reference's own offset
            cy = ys + ref.offset[:, 0, y0 : y0 + n].flatten(1)  # (B, N)
            cx = xs + ref.offset[:, 1, y0 : y0 + n].flatten(1)
            frac = (cy - cy.floor(), cx - cx.floor())
            win = _Window(q, ref.feat, cy.floor().long() - R, cx.floor().long() - R, P + 1)
            if border == "zero":  # grid_sample's zero padding for corners off the image
                win.dots = win.dots * win.inside()
            dots = _bilinear(win.dots, *frac)
            span = torch.arange(-R, R + 1, device=q.device, dtype=cy.dtype)
            sy, sx = cy[..., None] + span, cx[..., None] + span  # (B, N, P) sample positions
        if border == "exclude":
            bias = (
                _axis_bias(sy, 0, h - 1, dots.dtype)[..., :, None]
                + _axis_bias(sx, 0, w - 1, dots.dtype)[..., None, :]
            )
            logit = dots * scale + bias
        elif frac is None:  # "zero": off-image entries keep affinity 0 (and read value 0)
            logit = dots * win.inside() * scale
        else:
            logit = dots * scale
        windows.append((win, frac))
        logits.append(logit.flatten(2))  # (B, N, P*P)
    # One joint softmax over all references: (B, N, refs * P*P).
    weights = _joint_softmax(torch.cat(logits, dim=2), top_k)
    out = 0
    for k, (ref, (win, frac)) in enumerate(zip(refs, windows)):
        weight = weights[:, :, k * P * P : (k + 1) * P * P].view(B, -1, P, P)
        if frac is not None:
            weight = _bilinear_transpose(weight, *frac)
        out = out + win.read_values(weight * win.inside(), ref.value)  # (B, V, N)
    return out.view(B, -1, n, w)


def read_memory(
    query: torch.Tensor,
    ref_feats: Sequence[torch.Tensor],
    ref_values: Sequence[torch.Tensor],
    gaps: Sequence[int],
    radius: int,
    *,
    scale: float | None = None,
    top_k: int | None = None,
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
        top_k: softmax over each query's k largest affinities over all references, the
            rest weigh 0 (CRW keeps 10); None = all window entries (MAST).
        long_term_gap, coarse_radius, max_dilation: ROI localisation settings.
        border: "exclude" (default) or "zero" (reference code), see module docstring.
        chunk_size: query positions per band; 0 = automatic (bounded temporaries per band).

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
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (None keeps every affinity)")
    B, C, h, w = query.shape
    for feat, value in zip(ref_feats, ref_values):
        if feat.shape != query.shape or value.shape[0] != B or value.shape[-2:] != (h, w):
            raise ValueError(
                f"reference shapes {tuple(feat.shape)} / {tuple(value.shape)} do not match the "
                f"query {tuple(query.shape)}; values must already be at feature resolution"
            )
    scale = 1.0 / math.sqrt(C) if scale is None else float(scale)
    refs = []
    for feat, value, gap in zip(ref_feats, ref_values, gaps):
        offset = None
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
        refs.append(_Reference(feat, value.to(query.dtype), offset))
    P = 2 * radius + 1
    # Per query row: one dense product against the reachable key rows at a time (about P + 2
    # rows) and, for every reference, its window entries (dots, int64 index, logits). Values
    # are never gathered per entry (scatter + GEMM), so V does not enter.
    per_row = w * (w * (P + 2) + len(refs) * (P + 1) ** 2 * 4)
    rows = _rows_per_band(per_row, chunk_size, w)
    grad = torch.is_grad_enabled() and (
        query.requires_grad or any(t.requires_grad for t in (*ref_feats, *ref_values))
    )
    bands = []
    for y0 in range(0, h, rows):
        q = query[:, :, y0 : y0 + rows]
        if grad:  # recompute the band in backward instead of keeping its windows
            band = checkpoint(
                _read_band, q, refs, y0, w, radius, scale, border, top_k, use_reentrant=False
            )
        else:
            band = _read_band(q, refs, y0, w, radius, scale, border, top_k)
        bands.append(band)
    return torch.cat(bands, dim=2)
