"""Lab colour space, the stored (quantised) Lab format, normalisation and channel dropout.

Conventions (MAST_NOTES "Colour space and channel dropout"):
- Lab from float sRGB in [0, 1], D65 white, OpenCV's convention: L in [0, 100], a and b in
  about [-127, 127].
- Stored Lab (shards, 8 bits per channel) is OpenCV's 8-bit Lab layout:
  L8 = round(L * 255 / 100), a8 = round(a + 128), b8 = round(b + 128), clipped to [0, 255].
  Quantisation error is at most 0.2 L units and 0.5 a/b units.
- Network input is normalised: (L - 50) / 50, a / 127, b / 127, channel order L, a, b.

Shapes: frames are (..., 3, H, W) channel-first tensors.
"""

from __future__ import annotations

import torch

# sRGB (linear) -> XYZ, D65; the matrix OpenCV uses.
_RGB_TO_XYZ = torch.tensor(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ],
    dtype=torch.float64,
)
_WHITE_D65 = (0.950456, 1.0, 1.088754)

CHANNEL_NAMES = ("L", "a", "b")
DROPOUT_POLICIES = ("reference", "paper", "none")


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB -> Lab. `rgb` (..., 3, H, W): uint8 in [0, 255] or float in [0, 1].

    Returns float32 Lab with L in [0, 100] (OpenCV convention).
    """
    if rgb.shape[-3] != 3:
        raise ValueError(f"rgb_to_lab expects 3 channels in dim -3, got shape {tuple(rgb.shape)}")
    x = rgb.float() / 255.0 if rgb.dtype == torch.uint8 else rgb.float()
    x = x.clamp(0.0, 1.0)
    # Undo the sRGB transfer function (OpenCV applies it for float and 8-bit input alike).
    linear = torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    m = _RGB_TO_XYZ.to(dtype=linear.dtype, device=linear.device)
    xyz = torch.einsum("ij,...jhw->...ihw", m, linear)  # (..., 3, H, W)
    white = torch.tensor(_WHITE_D65, dtype=linear.dtype, device=linear.device).view(3, 1, 1)
    t = xyz / white
    eps = 0.008856
    f = torch.where(t > eps, t.clamp_min(1e-12) ** (1.0 / 3.0), 7.787 * t + 16.0 / 116.0)
    fx, fy, fz = f.unbind(-3)
    ty = t.select(-3, 1)
    L = torch.where(ty > eps, 116.0 * fy - 16.0, 903.3 * ty)
    a = 500.0 * (fx - fy)
    b = 200.0 * (fy - fz)
    return torch.stack([L, a, b], dim=-3)


def quantise_lab(lab: torch.Tensor) -> torch.Tensor:
    """Float Lab (L in [0, 100]) -> stored uint8 Lab (OpenCV 8-bit layout)."""
    L, a, b = lab.unbind(-3)
    q = torch.stack([L * (255.0 / 100.0), a + 128.0, b + 128.0], dim=-3)
    return q.round().clamp(0, 255).to(torch.uint8)


def dequantise_lab(lab8: torch.Tensor) -> torch.Tensor:
    """Stored uint8 Lab -> float Lab (L in [0, 100])."""
    q = lab8.float()
    L, a, b = q.unbind(-3)
    return torch.stack([L * (100.0 / 255.0), a - 128.0, b - 128.0], dim=-3)


def normalise_lab(lab: torch.Tensor) -> torch.Tensor:
    """Lab -> network input: (L - 50) / 50, a / 127, b / 127.

    Accepts stored uint8 Lab (dequantised first) or float Lab with L in [0, 100].
    """
    if lab.dtype == torch.uint8:
        lab = dequantise_lab(lab)
    L, a, b = lab.float().unbind(-3)
    return torch.stack([(L - 50.0) / 50.0, a / 127.0, b / 127.0], dim=-3)


def denormalise_lab(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `normalise_lab`: network-space Lab -> float Lab (L in [0, 100])."""
    L, a, b = x.unbind(-3)
    return torch.stack([L * 50.0 + 50.0, a * 127.0, b * 127.0], dim=-3)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Float Lab (L in [0, 100]) -> float sRGB in [0, 1]; for pictures of reconstructions."""
    L, a, b = lab.double().unbind(-3)
    fy = (L + 16.0) / 116.0
    fx = fy + a / 500.0
    fz = fy - b / 200.0
    delta = 6.0 / 29.0

    def finv(f: torch.Tensor) -> torch.Tensor:
        return torch.where(f > delta, f**3, 3 * delta**2 * (f - 4.0 / 29.0))

    white = torch.tensor(_WHITE_D65, dtype=torch.float64, device=lab.device).view(3, 1, 1)
    xyz = torch.stack([finv(fx), finv(fy), finv(fz)], dim=-3) * white
    m_inv = torch.linalg.inv(_RGB_TO_XYZ).to(lab.device)
    linear = torch.einsum("ij,...jhw->...ihw", m_inv, xyz).clamp(0.0, 1.0)
    srgb = torch.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return srgb.clamp(0.0, 1.0).float()


def drop_channel(
    frames: torch.Tensor, policy: str = "reference", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel dropout for self-supervision.

    Args:
        frames: (B, T, 3, H, W) normalised Lab clip.
        policy: "reference" (reference code: exactly one of a/b dropped, the same channel in
            every frame of a clip, the remaining channels scaled by 3/2); "paper" (each of a/b
            dropped with p = 0.5 independently per clip, at least one of them, and the kept
            channels rescaled by 3 / kept); "none" (nothing dropped; for inference).
        generator: optional RNG for reproducible choices.

    Returns:
        (inputs, dropped): inputs (B, T, 3, H, W) with dropped channels zeroed and rescaled;
        dropped (B,) index in {1, 2} of the channel to reconstruct (the target channel). With
        "paper" and both a and b dropped, the target is chosen uniformly among them.
    """
    if policy not in DROPOUT_POLICIES:
        raise ValueError(f"channel dropout policy {policy!r}; choose one of {DROPOUT_POLICIES}")
    B = frames.shape[0]
    device = frames.device
    if policy == "none":
        return frames, torch.ones(B, dtype=torch.long, device=device)
    dropped = torch.randint(1, 3, (B,), generator=generator).to(device)  # 1 = a, 2 = b
    keep = torch.ones(B, 3, device=device, dtype=frames.dtype)
    keep[torch.arange(B, device=device), dropped] = 0.0
    if policy == "paper":
        # The other colour channel is dropped too with p = 0.5 (never L, so something remains).
        also = torch.rand(B, generator=generator).to(device) < 0.5
        other = 3 - dropped
        keep[torch.arange(B, device=device)[also], other[also]] = 0.0
    scale = 3.0 / keep.sum(dim=1)  # (B,) 3/(3-1) = 1.5 with one channel dropped
    mask = (keep * scale[:, None]).view(B, 1, 3, 1, 1)
    return frames * mask, dropped
