"""Local spatial correlation, with the semantics of spatial-correlation-sampler.

    correlate(query, key, patch_size=P, dilation=d)[b, i, j, y, x]
        = sum_c query[b, c, y, x] * key[b, c, y + (i - P//2) * d, x + (j - P//2) * d]

and 0 where the key position falls outside the image. This is exactly
`SpatialCorrelationSampler(kernel_size=1, patch_size=P, stride=1, padding=0, dilation=1,
dilation_patch=d)(query, key)` as the reference code uses it (MAST_NOTES "Memory read").

Backends: the default is ours, in PyTorch: one shifted multiply-and-sum per window offset, so
memory is O(B * C * H * W) beyond the (B, P, P, H, W) output, never the P*P-fold unfolded key.
When the `spatial_correlation_sampler` package is installed (the `cuda` extra, GPU images) and
the tensors are on a GPU, its CUDA kernel runs instead. The backend in use is logged once.

Shapes: query, key (B, C, H, W) -> (B, P, P, H, W).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:  # optional CUDA kernel; its setup forces CUDA, so it is never installed on CPU machines
    from spatial_correlation_sampler import spatial_correlation_sample as _cuda_correlate
except ImportError:  # pragma: no cover - depends on the image
    _cuda_correlate = None

_announced: set[str] = set()


def _announce(backend: str) -> None:
    if backend not in _announced:
        _announced.add(backend)
        log.info("correlation backend: %s", backend)


def backend_for(t: torch.Tensor) -> str:
    """Name of the backend `correlate` uses for tensors like `t`."""
    if _cuda_correlate is not None and t.is_cuda:
        return "spatial_correlation_sampler"
    return "torch"


def _correlate_torch(
    query: torch.Tensor, key: torch.Tensor, patch_size: int, dilation: int
) -> torch.Tensor:
    """The PyTorch backend: one shifted multiply-and-sum per window offset -> (B, P*P, H, W)."""
    H, W = query.shape[-2:]
    P, d = patch_size, dilation
    reach = (P // 2) * d
    padded = F.pad(key, (reach, reach, reach, reach))  # zeros outside the image
    # Stacked, not written into a preallocated output: slice assignment would chain P*P
    # CopySlices nodes whose backward clones the whole gradient each time.
    planes = []
    for i in range(P):
        band = padded[:, :, i * d : i * d + H]  # key rows y + (i - P//2) * d
        for j in range(P):
            planes.append((query * band[..., j * d : j * d + W]).sum(1))  # (B, H, W)
    return torch.stack(planes, dim=1)


def correlate(
    query: torch.Tensor, key: torch.Tensor, patch_size: int, dilation: int = 1
) -> torch.Tensor:
    """Local correlation of `query` with `key` in a P x P window (see module docstring).

    Args:
        query: (B, C, H, W).
        key: (B, C, H, W), same shape as `query`.
        patch_size: P, the window side (odd values centre the window; even ones follow the
            package's P//2 convention).
        dilation: spacing d between window positions (`dilation_patch` in the package).

    Returns:
        (B, P, P, H, W), differentiable with respect to both inputs.
    """
    if query.dim() != 4 or query.shape != key.shape:
        raise ValueError(
            f"correlate expects query and key of equal shape (B, C, H, W), got "
            f"{tuple(query.shape)} and {tuple(key.shape)}"
        )
    if patch_size < 1 or dilation < 1:
        raise ValueError(f"patch_size and dilation must be >= 1, got {patch_size}, {dilation}")
    B, _, H, W = query.shape
    backend = backend_for(query)
    _announce(backend)
    if backend == "spatial_correlation_sampler":
        out = _cuda_correlate(
            query.contiguous(),
            key.contiguous(),
            kernel_size=1,
            patch_size=patch_size,
            stride=1,
            padding=0,
            dilation=1,
            dilation_patch=dilation,
        )
        return out.view(B, patch_size, patch_size, H, W)
    out = _correlate_torch(query, key, patch_size, dilation)  # (B, P*P, H, W)
    return out.view(B, patch_size, patch_size, H, W)
