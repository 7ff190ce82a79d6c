"""The stride-4 grid features, values and predictions share (MAST_SPEC.md "Label grid").

An (H, W) image has (h, w) = (ceil(H/4), ceil(W/4)) cells of 4x4 pixels; cell i covers pixels
4i..4i+3 and stands for its centre, pixel 4i + 1.5. Values (labels, the dropped Lab channel)
go onto the grid as the average over each cell (`to_cells`) and come back by bilinear
interpolation with cell i at 4i + 1.5 (`from_cells`), so the two agree: a region whose
boundary lies anywhere in the image comes back with that boundary, pixel for pixel, through
an identity read (tests/model/test_grid.py), except within 2 pixels of the image's edge,
where no cell lies beyond to interpolate towards.

The reference code instead samples values at the top-left pixel of each cell ([::4, ::4],
centre 4i) and upsamples to (H, W) with align_corners=False (cell i at about 4i + 1.5, and
not on a multiple of 4 at all when H or W is not one): predictions move by about 1.5 pixels.
The encoder's receptive-field centre (4i: convolutions with symmetric padding) does not enter:
query and memory keys share it, so it cancels in the match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STRIDE = 4
# Names this grid in evaluation keys (jobs.eval_reuse): results from another grid are not reused.
LABEL_GRID = "cell-average-v1"


def cell_shape(height: int, width: int) -> tuple[int, int]:
    """(H, W) pixels -> (h, w) cells."""
    return -(-height // STRIDE), -(-width // STRIDE)


def to_cells(x: torch.Tensor) -> torch.Tensor:
    """(..., H, W) -> (..., h, w) cell averages; a cell cut by the image edge is completed by
    repeating the edge pixels (so it stands for the same centre as a whole cell)."""
    lead, (H, W) = x.shape[:-2], x.shape[-2:]
    h, w = cell_shape(H, W)
    flat = x.reshape(-1, 1, H, W).float()
    if (h * STRIDE, w * STRIDE) != (H, W):
        flat = F.pad(flat, (0, w * STRIDE - W, 0, h * STRIDE - H), mode="replicate")
    return F.avg_pool2d(flat, STRIDE).reshape(*lead, h, w)


def from_cells(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, H, W) bilinear, cell i centred on pixel 4i + 1.5 whatever H, W."""
    h, w = x.shape[-2:]
    up = F.interpolate(x, size=(h * STRIDE, w * STRIDE), mode="bilinear", align_corners=False)
    return up[..., : size[0], : size[1]]
