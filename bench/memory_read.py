"""DAVIS-size memory read: our banded read vs a reference-style read, in the same run.

Setting (MAST_NOTES "Test-time memory"): features 120 x 214 x 64, 5 references of which 2
long-term (frames 0 and 5 seen from frame 30: gaps 30 and 25) and 3 short-term (gaps 1, 3, 5),
7 label channels, radius 12 (25 x 25 windows).

The reference-style read does what the reference code does: every window position of every
query pixel is materialised at once (unfold / 625-fold repeat of the feature maps, grid_sample
over all windows), then one joint softmax. It uses our semantics (border exclusion, own
offsets, align_corners=True) so the outputs can be compared number for number; only the
memory layout differs. Each implementation runs in a fresh subprocess and its peak resident
memory above the inputs is read from /proc (VmHWM), so one cannot inflate the other.

    python -m bench.memory_read [--scale 0.5]
Last line: {"peak_memory_ratio": .., "time_ratio": .., "max_abs_diff": .., ...}
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model.memory import read_memory, roi_dilation, roi_offset


def make_inputs(scale: float = 1.0, seed: int = 0):
    h, w = max(8, round(120 * scale)), max(8, round(214 * scale))
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(1, 64, h, w, generator=g)
    feats = [torch.randn(1, 64, h, w, generator=g) for _ in range(5)]
    labels = torch.randint(0, 7, (5, h, w), generator=g)
    values = [F.one_hot(lab, 7).permute(2, 0, 1)[None].float() for lab in labels]
    gaps = [30, 25, 1, 3, 5]
    return query, feats, values, gaps


def reference_read(
    query,
    ref_feats,
    ref_values,
    gaps,
    radius,
    *,
    scale=None,
    long_term_gap=15,
    coarse_radius=12,
    max_dilation=4,
):
    """All windows at once, as the reference code lays them out (memory O(P^2 * C * h * w))."""
    B, C, h, w = query.shape
    scale = 1.0 / math.sqrt(C) if scale is None else scale
    P, R = 2 * radius + 1, radius
    q = query.reshape(B, C, 1, h * w)
    ys = torch.arange(h, dtype=query.dtype).view(h, 1).expand(h, w).reshape(1, h * w, 1)
    xs = torch.arange(w, dtype=query.dtype).view(1, w).expand(h, w).reshape(1, h * w, 1)
    win = torch.arange(-R, R + 1, dtype=query.dtype)
    affinities, windows = [], []
    for feat, value, gap in zip(ref_feats, ref_values, gaps):
        if gap > long_term_gap:
            offset = roi_offset(
                query, feat, roi_dilation(gap, max_dilation), coarse_radius, scale=scale
            )
            cy = ys + offset[:, 0].reshape(B, h * w, 1)
            cx = xs + offset[:, 1].reshape(B, h * w, 1)
            sy = cy + win.repeat_interleave(P).view(1, 1, P * P)  # (B, hw, P*P)
            sx = cx + win.repeat(P).view(1, 1, P * P)
            grid = torch.stack([2 * sx / (w - 1) - 1, 2 * sy / (h - 1) - 1], -1)
            keys = F.grid_sample(feat, grid, align_corners=True).permute(
                0, 1, 3, 2
            )  # (B, C, P*P, hw)
            vals = F.grid_sample(value, grid, align_corners=True).permute(0, 1, 3, 2)
            valid = ((sy >= 0) & (sy <= h - 1) & (sx >= 0) & (sx <= w - 1)).transpose(1, 2)
        else:
            keys = F.unfold(F.pad(feat, (R,) * 4), P).view(B, C, P * P, h * w)
            vals = F.unfold(F.pad(value, (R,) * 4), P).view(B, -1, P * P, h * w)
            ones = F.pad(torch.ones(1, 1, h, w), (R,) * 4)
            valid = F.unfold(ones, P).view(1, P * P, h * w) > 0.5
        affinity = (q * keys).sum(1) * scale  # (B, P*P, hw): the 625-fold product
        del keys
        affinities.append(affinity.masked_fill(~valid, torch.finfo(affinity.dtype).min))
        windows.append(vals)
    weights = torch.cat(affinities, 1).softmax(1)
    out = sum(
        (weights[:, k * P * P : (k + 1) * P * P, None] * windows[k].transpose(1, 2)).sum(1)
        for k in range(len(windows))
    )
    return out.view(B, -1, h, w)


def proc_status(field: str) -> int:
    """A byte count from /proc/self/status (VmRSS, VmHWM, ...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_one(impl: str, scale: float, out_path: str) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    query, feats, values, gaps = make_inputs(scale)
    fn = read_memory if impl == "ours" else reference_read
    with torch.no_grad():
        fn(
            query[..., :16, :16],
            [f[..., :16, :16] for f in feats],
            [v[..., :16, :16] for v in values],
            gaps,
            12,
        )
        baseline = proc_status("VmRSS")
        start = time.perf_counter()
        out = fn(query, feats, values, gaps, 12)
        seconds = time.perf_counter() - start
    peak = proc_status("VmHWM") - baseline
    torch.save(out, out_path)
    return {"impl": impl, "seconds": seconds, "peak_bytes": peak}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="feature map size factor (1.0 = 120x214)"
    )
    parser.add_argument("--impl", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.impl:  # child process: one implementation, result as JSON
        print(json.dumps(run_one(args.impl, args.scale, args.out)))
        return {}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl in ("ours", "reference"):
            out = str(Path(tmp) / f"{impl}.pt")
            cmd = [
                sys.executable,
                "-m",
                "bench.memory_read",
                "--impl",
                impl,
                "--scale",
                str(args.scale),
                "--out",
                out,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
        diff = (
            (torch.load(Path(tmp) / "ours.pt") - torch.load(Path(tmp) / "reference.pt"))
            .abs()
            .max()
            .item()
        )
    ours, ref = results["ours"], results["reference"]
    figures = {
        "peak_memory_ratio": round(ours["peak_bytes"] / ref["peak_bytes"], 4),
        "time_ratio": round(ours["seconds"] / ref["seconds"], 3),
        "max_abs_diff": diff,
        "ours_peak_gb": round(ours["peak_bytes"] / 2**30, 3),
        "reference_peak_gb": round(ref["peak_bytes"] / 2**30, 3),
        "ours_seconds": round(ours["seconds"], 2),
        "reference_seconds": round(ref["seconds"], 2),
        "feature_size": list(make_inputs(args.scale)[0].shape[-2:]),
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
