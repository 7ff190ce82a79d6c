"""read_memory: window semantics, one joint softmax, per-reference ROI offsets, chunking, grads."""

import pytest
import torch

from model.memory import read_memory, roi_dilation, roi_offset


def dense_window_attention(query, ref_feats, ref_values, radius, scale, top_k=None):
    """Dense attention over all reference positions, masked to the window (independent path);
    with top_k, each query's k largest window logits only (CRW's protocol)."""
    B, C, h, w = query.shape
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1)  # (hw, 2)
    inside = ((pos[:, None, :] - pos[None, :, :]).abs() <= radius).all(-1)  # (hw_q, hw_r)
    q = query.flatten(2)  # (B, C, hw)
    logits = [
        (torch.einsum("bcq,bcr->bqr", q, f.flatten(2)) * scale).masked_fill(~inside, float("-inf"))
        for f in ref_feats
    ]
    logits = torch.cat(logits, dim=2)  # (B, hw, refs * hw)
    if top_k is not None:  # random features: no ties, the k-th largest is a clean threshold
        kth = logits.topk(top_k, dim=2).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    attn = logits.softmax(dim=2)
    values = torch.cat([v.flatten(2) for v in ref_values], dim=2)  # (B, V, refs * hw)
    return torch.einsum("bqr,bvr->bvq", attn, values).view(B, -1, h, w)


def naive_zero_border(query, ref_feats, ref_values, radius, scale):
    """Reference-code semantics: out-of-image window positions have affinity 0 and value 0."""
    B, C, h, w = query.shape
    out = torch.zeros(B, ref_values[0].shape[1], h, w)
    for y in range(h):
        for x in range(w):
            logits, vals = [], []
            for f, v in zip(ref_feats, ref_values):
                for dy in range(-radius, radius + 1):
                    for dx in range(-radius, radius + 1):
                        if 0 <= y + dy < h and 0 <= x + dx < w:
                            logits.append(
                                (query[:, :, y, x] * f[:, :, y + dy, x + dx]).sum(1) * scale
                            )
                            vals.append(v[:, :, y + dy, x + dx])
                        else:
                            logits.append(torch.zeros(B))
                            vals.append(torch.zeros(B, v.shape[1]))
            a = torch.stack(logits, 1).softmax(1)  # (B, n)
            out[:, :, y, x] = torch.einsum("bn,bnv->bv", a, torch.stack(vals, 1))
    return out


def test_short_term_equals_dense_window_attention():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 9, 11, generator=g)
    feats = [torch.randn(2, 8, 9, 11, generator=g) for _ in range(3)]
    values = [torch.randn(2, 3, 9, 11, generator=g) for _ in range(3)]
    out = read_memory(q, feats, values, [1, 3, 5], radius=2)
    expected = dense_window_attention(q, feats, values, 2, scale=8**-0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def window_inputs(seed=0, V=3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 8, 9, 11, generator=g)
    feats = [torch.randn(2, 8, 9, 11, generator=g) for _ in range(3)]
    values = [torch.randn(2, V, 9, 11, generator=g) for _ in range(3)]
    return q, feats, values


@pytest.mark.parametrize("top_k", [1, 10, 40])
def test_top_k_equals_dense_attention_over_the_k_largest(top_k):
    q, feats, values = window_inputs(seed=6)
    out = read_memory(q, feats, values, [1, 3, 5], radius=2, top_k=top_k, chunk_size=22)
    expected = dense_window_attention(q, feats, values, 2, scale=8**-0.5, top_k=top_k)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_top_1_copies_the_value_of_the_best_match():
    q, feats, values = window_inputs(seed=7)
    out = read_memory(q, feats, values, [1, 3, 5], radius=2, top_k=1)
    # Independently: the argmax over every reference's window, and the value found there.
    B, C, h, w = q.shape
    for b, y, x in [(0, 0, 0), (0, 4, 5), (1, 8, 10), (1, 2, 9)]:
        best, copied = -float("inf"), None
        for f, v in zip(feats, values):
            for yy in range(max(0, y - 2), min(h, y + 3)):
                for xx in range(max(0, x - 2), min(w, x + 3)):
                    dot = float((q[b, :, y, x] * f[b, :, yy, xx]).sum())
                    if dot > best:
                        best, copied = dot, v[b, :, yy, xx]
        torch.testing.assert_close(out[b, :, y, x], copied, rtol=0, atol=1e-6)


def test_top_k_at_least_the_window_entries_is_no_top_k():
    q, feats, values = window_inputs(seed=8)
    whole = read_memory(q, feats, values, [1, 3, 5], radius=2)
    entries = 3 * 5 * 5  # every entry of every reference's window
    for top_k in (entries, entries + 1, 10**6):
        same = read_memory(q, feats, values, [1, 3, 5], radius=2, top_k=top_k)
        torch.testing.assert_close(same, whole, rtol=0, atol=0)
    # One fewer entry than the windows hold changes the read (the smallest weight goes).
    fewer = read_memory(q, feats, values, [1, 3, 5], radius=2, top_k=entries - 1)
    assert (fewer - whole).abs().max() > 1e-7


def test_top_1_reads_a_long_term_reference_at_its_roi_match():
    q = distinctive_features(seed=9)
    _, _, h, w = q.shape
    dy, dx = 8, -6  # outside the 5x5 fine window; found by the coarse ROI step (d = 2)
    coords = coordinate_values(h, w)
    out = read_memory(q, [shifted(q, dy, dx)], [coords], [25], radius=2, scale=1.0, top_k=1)
    inner = (slice(None), slice(None), slice(12, h - 12), slice(12, w - 12))
    expected = coords + torch.tensor([dy, dx]).view(1, 2, 1, 1)
    torch.testing.assert_close(out[inner], expected[inner], atol=1e-3, rtol=0)


def test_zero_border_reproduces_reference_semantics():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 5, 6, generator=g)
    feats = [torch.randn(1, 4, 5, 6, generator=g) for _ in range(2)]
    values = [torch.rand(1, 2, 5, 6, generator=g) for _ in range(2)]
    out = read_memory(q, feats, values, [2, 4], radius=2, scale=1.0, border="zero")
    torch.testing.assert_close(
        out, naive_zero_border(q, feats, values, 2, 1.0), rtol=1e-5, atol=1e-5
    )
    # The leak: with constant values 1, excluding borders returns exactly 1, zeroing does not.
    ones = [torch.ones(1, 1, 5, 6)] * 2
    assert torch.allclose(read_memory(q, feats, ones, [2, 4], radius=2), torch.ones(1, 1, 5, 6))
    leaked = read_memory(q, feats, ones, [2, 4], radius=2, border="zero")
    assert leaked[0, 0, 0, 0] < 0.99  # a corner: most of its window is off-image


def shifted(x, dy, dx):
    """content at (y, x) of the result = content at (y - dy, x - dx) of x (circular)."""
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def distinctive_features(C=64, h=40, w=44, seed=0):
    """Random 64-d features: with scale 1 a true match (|q|^2 ~ 64) beats chance (sd ~ 8) by far,
    so the coarse soft-argmax is sharp and offsets are exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, C, h, w, generator=g)


def coordinate_values(h, w):
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    return torch.stack([ys, xs])[None]  # (1, 2, h, w): value = own coordinates


def test_long_term_references_each_use_their_own_offset():
    """Regression test for reference defect 1 (offset overwritten in the long-term loop)."""
    q = distinctive_features()
    _, _, h, w = q.shape
    shifts = [(6, -4), (-4, 8)]  # multiples of the coarse dilation (gap 20 -> d = 2)
    feats = [shifted(q, dy, dx) for dy, dx in shifts]
    # Each reference's value is its own pixel coordinate: a correct read of reference k at query
    # (y, x) returns (y + dy_k, x + dx_k). Value channels are separate per reference so each
    # reference's contribution can be checked on its own.
    coords = coordinate_values(h, w)
    values = [
        torch.cat([coords, torch.zeros_like(coords)], 1),
        torch.cat([torch.zeros_like(coords), coords], 1),
    ]
    out = read_memory(q, feats, values, [20, 20], radius=2, scale=1.0)
    inner = (slice(None), slice(None), slice(10, h - 10), slice(10, w - 10))
    # Both references match equally well, so each holds half of the softmax mass.
    for k, (dy, dx) in enumerate(shifts):
        expected = coords.clone()
        expected[:, 0] += dy
        expected[:, 1] += dx
        got = 2 * out[:, 2 * k : 2 * k + 2]
        # 0.05 px: the split is not exactly 50/50; the overwritten offset is off by ~10 px.
        torch.testing.assert_close(got[inner], expected[inner], atol=0.05, rtol=0)


def test_roi_recovers_displacement_beyond_the_fine_window():
    q = distinctive_features(seed=3)
    _, _, h, w = q.shape
    dy, dx = 12, -10  # outside a 7x7 fine window, inside the 25x25 coarse window at d = 2
    feat = shifted(q, dy, dx)
    coords = coordinate_values(h, w)
    out = read_memory(q, [feat], [coords], [25], radius=3, scale=1.0)
    inner = (slice(None), slice(None), slice(14, h - 14), slice(14, w - 14))
    expected = coords + torch.tensor([dy, dx]).view(1, 2, 1, 1)
    torch.testing.assert_close(out[inner], expected[inner], atol=1e-3, rtol=0)
    offset = roi_offset(q, feat, roi_dilation(25), 12, scale=1.0)
    assert torch.allclose(
        offset[0, :, 14:-14, 14:-14], torch.tensor([dy, dx]).view(2, 1, 1).float(), atol=1e-3
    )
    # The same displacement read as a short-term reference is not found.
    short = read_memory(q, [feat], [coords], [3], radius=3, scale=1.0)
    assert (short[inner] - expected[inner]).abs().max() > 5


def test_dilation_schedule():
    assert [roi_dilation(g) for g in (16, 29, 30, 44, 45, 60, 200)] == [2, 2, 3, 3, 4, 4, 4]


@pytest.mark.parametrize("gaps", [[1, 3, 5], [2, 20, 40]])
def test_chunked_equals_unchunked(gaps):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 16, 13, 17, generator=g)
    feats = [torch.randn(2, 16, 13, 17, generator=g) for _ in gaps]
    values = [torch.rand(2, 5, 13, 17, generator=g) for _ in gaps]
    whole = read_memory(q, feats, values, gaps, radius=4, chunk_size=10**9)
    for chunk in (17, 3 * 17, 5 * 17):
        banded = read_memory(q, feats, values, gaps, radius=4, chunk_size=chunk)
        torch.testing.assert_close(banded, whole, rtol=0, atol=1e-5)


def test_gradients_flow_through_the_roi_path():
    kw = dict(radius=1, coarse_radius=2, max_dilation=2)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    f = torch.randn(1, 2, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.rand(1, 1, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: read_memory(a, [b], [c], [30], **kw), (q, f, v))
    # The coarse soft-argmax is part of the graph: the offset has a gradient of its own.
    offset = roi_offset(q, f, 2, 2, scale=0.5)
    offset.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_rejects_inconsistent_references():
    q = torch.zeros(1, 4, 5, 5)
    with pytest.raises(ValueError, match="one feature map"):
        read_memory(q, [q], [], [1], radius=1)
    with pytest.raises(ValueError, match="feature resolution"):
        read_memory(q, [q], [torch.zeros(1, 1, 20, 20)], [1], radius=1)
    with pytest.raises(ValueError, match="border"):
        read_memory(q, [q], [torch.zeros(1, 1, 5, 5)], [1], radius=1, border="leak")
    with pytest.raises(ValueError, match="top_k=0 must be >= 1"):
        read_memory(q, [q], [torch.zeros(1, 1, 5, 5)], [1], radius=1, top_k=0)
