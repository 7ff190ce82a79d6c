"""The label grid (model/grid.py): values, the read and the upsampling agree, so a mask copied
through identical frames comes back where it was, pixel for pixel on its boundary."""

import pytest
import torch

from model.config import MASTConfig
from model.grid import cell_shape, from_cells, to_cells
from model.propagate import LabelPropagation


class IdentityMatch(LabelPropagation):
    """Every position's key is its own one-hot code: the read copies each cell to itself."""

    def __init__(self) -> None:
        self.config = MASTConfig(test_radius=3)
        self.scale = 50.0  # e^50 against e^0: the softmax is the identity to 1e-21

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h, w = cell_shape(*x.shape[-2:])
        return torch.eye(h * w).reshape(1, h * w, h, w)


def edges(mask: torch.Tensor) -> tuple[int, int]:
    """First and last True index of a 1-D mask."""
    idx = mask.nonzero().squeeze(1)
    return int(idx[0]), int(idx[-1])


@pytest.mark.parametrize("width", [48, 50, 51])
def test_a_step_edge_comes_back_at_every_offset(width):
    """1-D: an object from a to b (any offsets, any image width) round-trips exactly."""
    for a in range(2, width - 12):  # not within 2 px of the image edge: no cell beyond
        for b in range(a + 8, width - 2):
            mask = torch.zeros(1, 1, 1, width)
            mask[..., a : b + 1] = 1
            back = from_cells(to_cells(mask), (1, width))[0, 0, 0] > 0.5
            assert edges(back) == (a, b), (a, b, width)


def test_the_reference_grid_shifts_the_edges():
    """What the grid replaces: [::4] sampling + upsampling to (H, W) moves boundaries."""
    mask = torch.zeros(1, 1, 1, 50)
    mask[..., 13:39] = 1  # object at 13..38
    old = torch.nn.functional.interpolate(
        mask[..., ::4], size=(1, 50), mode="bilinear", align_corners=False
    )
    assert edges(old[0, 0, 0] > 0.5) == (15, 37)  # shifted 2 px at the left, 1 at the right
    assert edges(from_cells(to_cells(mask), (1, 50))[0, 0, 0] > 0.5) == (13, 38)


def test_cells_average_and_complete_cut_cells_from_the_edge():
    x = torch.arange(6.0).reshape(1, 6)  # width 6: a whole cell and a cut one (4, 5, 5, 5)
    assert to_cells(x).tolist() == [[1.5, 4.75]]
    assert cell_shape(37, 50) == (10, 13) == to_cells(torch.zeros(2, 3, 37, 50)).shape[-2:]


BOXES = {1: ((4, 17), (13, 38)), 2: ((26, None), (5, 20))}  # label: (rows, columns), inclusive


def two_boxes(H: int, W: int) -> torch.Tensor:
    """A first mask with two boxes whose edges lie on no cell boundary, and a void patch."""
    first = torch.zeros(H, W, dtype=torch.long)
    first[4:18, 13:39] = 1
    first[26:, 5:21] = 2  # touches the bottom edge (a cut cell when H = 37)
    first[30:, 40:] = 255  # void (votes for nothing), away from both boxes
    return first


def identical_frames(T: int, H: int, W: int) -> torch.Tensor:
    frames = torch.randint(0, 256, (1, 3, H, W), generator=torch.Generator().manual_seed(0))
    return frames.to(torch.uint8).expand(T, 3, H, W)


@pytest.mark.parametrize("size", [(37, 50), (40, 48)])
def test_a_mask_read_through_identical_frames_comes_back_unshifted(size):
    """Every frame reads the first mask only: each edge comes back pixel for pixel; only the
    corners round off (bilinear on a product of two edges), within 3 px of both edges."""
    H, W = size
    first = two_boxes(H, W)
    out = IdentityMatch().propagate(identical_frames(4, H, W), first, long_term=(0,), short_term=())
    expected = torch.where(first == 255, 0, first)  # void gets no votes: background
    for t in (1, 2, 3):
        pred = out[t]
        for label, ((r0, r1), (c0, c1)) in BOXES.items():
            r1 = H - 1 if r1 is None else r1
            for r in range(r0 + 4, r1 - 3):
                assert edges(pred[r] == label) == (c0, c1), (t, label, r)
            for c in range(c0 + 4, c1 - 3):
                assert edges(pred[:, c] == label) == (r0, r1), (t, label, c)
        wrong = (pred != expected).nonzero().tolist()
        for y, x in wrong:
            assert any(
                min(abs(y - r0), abs(y - (H - 1 if r1 is None else r1))) <= 3
                and min(abs(x - c0), abs(x - c1)) <= 3
                for (r0, r1), (c0, c1) in BOXES.values()
            ), (t, y, x)
        assert 0 < len(wrong) <= 4 * 6, (t, len(wrong))  # 6 corners inside the image
        assert torch.equal(pred, out[1])  # identical reads, identical answers


def test_fed_back_masks_do_not_drift():
    """The default memory (frames 0 and 5, t-1, t-3, t-5) feeds hard predictions back: corners
    keep rounding off and an edge may give up a pixel, but nothing drifts: through 11 frames
    the boxes never grow, the middle row and column of each keep their ends within 1 px
    inwards, and the centroids stay within 0.5 px (the reference grid moves
    a mask by about 1.5 px per read; box 2 touches the bottom: columns only)."""
    H, W = 40, 48
    first = two_boxes(H, W)
    out = IdentityMatch().propagate(identical_frames(12, H, W), first)
    for label, ((r0, r1), (c0, c1)) in BOXES.items():
        r1 = H - 1 if r1 is None else r1
        y0, x0 = (first == label).nonzero().float().mean(0).tolist()
        for t in range(1, 12):
            pred = out[t] == label
            assert not (pred & (first != label)).any(), (t, label)  # it never grows
            for (a, b), (a0, b0) in (
                (edges(pred[(r0 + r1) // 2]), (c0, c1)),
                (edges(pred[:, (c0 + c1) // 2]), (r0, r1)),
            ):
                assert a0 <= a <= a0 + 1 and b0 - 1 <= b <= b0, (t, label, (a, b), (a0, b0))
            assert pred.sum() > 0.85 * (first == label).sum(), (t, label)
            y, x = pred.nonzero().float().mean(0).tolist()
            assert abs(x - x0) < 0.5, (t, label, x, x0)
            assert label == 2 or abs(y - y0) < 0.25, (t, label, y, y0)
