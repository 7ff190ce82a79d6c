"""correlate() against a per-element loop with the package's documented semantics."""

import pytest
import torch

from model import correlation
from model.correlation import correlate


def naive_correlate(q, k, P, d):
    B, C, H, W = q.shape
    out = torch.zeros(B, P, P, H, W, dtype=q.dtype)
    for i in range(P):
        for j in range(P):
            dy, dx = (i - P // 2) * d, (j - P // 2) * d
            for y in range(H):
                for x in range(W):
                    if 0 <= y + dy < H and 0 <= x + dx < W:
                        out[:, i, j, y, x] = (q[:, :, y, x] * k[:, :, y + dy, x + dx]).sum(1)
    return out


@pytest.mark.parametrize(
    "P,d,H,W",
    [(1, 1, 5, 7), (3, 1, 6, 5), (5, 2, 7, 9), (7, 3, 9, 4), (4, 1, 5, 6), (9, 4, 11, 13)],
)
def test_matches_naive_loop(P, d, H, W):
    g = torch.Generator().manual_seed(P * 100 + d)
    q = torch.randn(2, 3, H, W, generator=g)
    k = torch.randn(2, 3, H, W, generator=g)
    out = correlate(q, k, P, d)
    assert out.shape == (2, P, P, H, W)
    torch.testing.assert_close(out, naive_correlate(q, k, P, d), rtol=1e-5, atol=1e-5)


def test_centre_of_window_is_pixelwise_dot_product():
    q = torch.randn(1, 4, 5, 6)
    k = torch.randn(1, 4, 5, 6)
    out = correlate(q, k, 5, 2)
    torch.testing.assert_close(out[:, 2, 2], (q * k).sum(1))
    # Offsets reaching outside the image read zeros: top-left corner, window row 0 (dy = -4).
    assert torch.all(out[:, 0, :, :4] == 0)


def test_gradcheck_float64():
    q = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: correlate(a, b, 3, 2), (q, k))


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="equal shape"):
        correlate(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 5), 3)


def test_cpu_uses_torch_backend():
    assert correlation.backend_for(torch.zeros(1)) == "torch"


@pytest.mark.skipif(
    correlation._cuda_correlate is None or not torch.cuda.is_available(),
    reason="spatial_correlation_sampler and a GPU are needed for the CUDA backend",
)
def test_cuda_backend_matches_torch():  # pragma: no cover - GPU images only
    q = torch.randn(2, 8, 12, 15, device="cuda")
    k = torch.randn(2, 8, 12, 15, device="cuda")
    for P, d in [(5, 1), (7, 2)]:
        fast = correlate(q, k, P, d)
        ours = correlation._correlate_torch(q, k, P, d).view_as(fast)
        torch.testing.assert_close(fast, ours, rtol=1e-4, atol=1e-4)
