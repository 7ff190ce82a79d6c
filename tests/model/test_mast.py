import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import MAST
from model.colour import quantise_lab, rgb_to_lab


def test_default_configuration_has_the_paper_parameter_count():
    model = MAST()
    assert sum(p.numel() for p in model.parameters()) == 5_291_648
    # Attribute names are checkpoint API (the reference code's names).
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"feature_extraction", "post_convolution"}
    assert model.encode(torch.zeros(1, 3, 256, 256)).shape == (1, 64, 64, 64)


def lab_clip(frames: np.ndarray, size=(64, 64)) -> torch.Tensor:
    """(T, H, W, 3) uint8 RGB -> (T, 3, h, w) stored uint8 Lab."""
    small = np.stack([cv2.resize(f, size[::-1], interpolation=cv2.INTER_AREA) for f in frames])
    return quantise_lab(rgb_to_lab(torch.from_numpy(small).permute(0, 3, 1, 2)))


def test_training_forward_reconstructs_the_dropped_channel(real_frames):
    torch.manual_seed(0)
    model = MAST(width=8)
    clip = lab_clip(real_frames["bikes.mp4"][:3])[None].repeat(2, 1, 1, 1, 1)  # (2, 3, 3, 64, 64)
    out = model(clip, torch.tensor([[8, 2], [20, 2]]))
    assert out.long_term_refs == 1  # the second sample's first reference is 20 frames back
    assert out.reconstruction.shape == out.target.shape == (2, 1, 64, 64)
    # The target is the dropped channel of the un-dropped target frame.
    lab = clip.float()
    for b in range(2):
        c = out.dropped[b]
        torch.testing.assert_close(out.target[b, 0], (lab[b, -1, c] - 128) / 127)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_loss_decreases_when_fitting_one_real_clip(real_frames):
    torch.manual_seed(0)
    model = MAST(width=8, channel_dropout="reference")
    clip = lab_clip(real_frames["bikes.mp4"][[0, 2]])[None]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        out = model(clip, [5])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def test_from_state_round_trip():
    model = MAST(width=8, test_radius=3).eval()
    clone = MAST.from_state({"model_args": model.model_args, "model": model.state_dict()}).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(clone.encode(x), model.encode(x), rtol=0, atol=0)
    assert clone.model_args == model.model_args
    with pytest.raises(ValueError, match="missing"):
        MAST.from_state({"model": {}})


class IdentityLikeMAST(MAST):
    """Features = the 4x4 Lab patch at each position (pixel_unshuffle), L2-normalised: a
    correspondence-preserving encoding, so propagation quality isolates the memory read."""

    def encode(self, x):
        return F.normalize(F.pixel_unshuffle(x, 4), dim=1)


def pasted_sequence(background: np.ndarray, sprite: np.ndarray, T=12, size=(96, 128)):
    """A real background with a real textured patch pasted and moved 4 px down, 4 px right per
    frame: stride-aligned, so the identity-like features below have an exact match each frame."""
    H, W = size
    bg = cv2.resize(background, (W, H), interpolation=cv2.INTER_AREA)
    sp = cv2.resize(sprite, (28, 24), interpolation=cv2.INTER_AREA)
    frames, masks = [], []
    for t in range(T):
        y, x = 8 + 4 * t, 12 + 4 * t
        frame, mask = bg.copy(), np.zeros((H, W), np.int64)
        frame[y : y + 24, x : x + 28] = sp
        mask[y : y + 24, x : x + 28] = 1
        frames.append(frame)
        masks.append(mask)
    return np.stack(frames), np.stack(masks)


def jaccard(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def test_propagate_follows_a_translating_object(real_frames):
    frames, masks = pasted_sequence(real_frames["bikes.mp4"][0], real_frames["bigbuckbunny.mp4"][5])
    lab8 = quantise_lab(rgb_to_lab(torch.from_numpy(frames).permute(0, 3, 1, 2)))
    model = IdentityLikeMAST(width=8, scale=1000.0, test_radius=6).eval()
    labels = model.propagate(lab8, torch.from_numpy(masks[0])).numpy()
    assert labels.shape == masks.shape and set(np.unique(labels)) <= {0, 1}
    scores = [jaccard(labels[t] == 1, masks[t] == 1) for t in range(1, len(masks))]
    # J-mean as DAVIS reports it; every frame stays close too (late frames lose a little where
    # background uncovered by the object has no exact match in memory).
    assert np.mean(scores) > 0.9 and min(scores) > 0.85, scores
    # Without memory of its moves a static copy of the first mask would fall far behind.
    assert jaccard(masks[0] == 1, masks[-1] == 1) < 0.3


def test_propagate_void_and_label_id_errors(real_frames):
    frames, masks = pasted_sequence(
        real_frames["bikes.mp4"][0], real_frames["bigbuckbunny.mp4"][5], T=4
    )
    lab8 = quantise_lab(rgb_to_lab(torch.from_numpy(frames).permute(0, 3, 1, 2)))
    model = IdentityLikeMAST(width=8, scale=50.0, test_radius=4).eval()
    first = torch.from_numpy(masks[0]).clone()
    first[:4] = 255  # a void band: carries no label
    labels = model.propagate(lab8, first, max_objects=7)
    assert labels[0, 0, 0] == 255 and set(labels[1:].unique().tolist()) <= {0, 1}
    first[50, 50] = 9
    with pytest.raises(ValueError, match="label id 9.*7 label channels"):
        model.propagate(lab8, first, max_objects=7)
    # Without max_objects the channels follow the mask: id 9 -> 10 channels, no crash.
    assert model.propagate(lab8[:2], first).shape == (2, 96, 128)


def test_memory_read_stays_fp32_under_bf16_autocast(real_frames):
    torch.manual_seed(0)
    model = MAST(width=8)
    clip = lab_clip(real_frames["bikes.mp4"][:2])[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(clip, [3])
    assert out.reconstruction.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
