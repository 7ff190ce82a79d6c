"""DAVIS evaluation cost at full 480p on CPU: frames/s and peak memory per propagated frame,
against a reference-style (unfold-and-repeat) memory read measured in the same run.

One propagated frame, exactly as `MAST.propagate` does it (MAST_NOTES "Test-time memory"):
encode the target frame (854x480 -> 214x120 features), read the memory of 5 references
(long-term frames 0 and 5, short-term t-1, t-3, t-5; gaps 30, 25, 1, 3, 5 seen from t = 30)
with R = 12 and 7 one-hot label channels, upsample to 480x854, argmax. Frames are real
(bigbuckbunny resized to 854x480); weights are random (cost does not depend on them).

Each side runs in a fresh subprocess; peak memory is the resident peak above the steady state
(model + cached reference features), read from /proc (VmHWM after resetting it through
clear_refs), so the two cannot inflate each other. The reference-style read materialises all
625 window positions at once (bench.memory_read.reference_read, by the lead); by default it is
measured on a half-size feature map and scaled by 4 (its memory is linear in h*w; a full-size
run needs ~10 GB on a shared 24 GB machine): --reference-scale 1 measures it directly.

    python -m bench.evaluate [--frames 2] [--scale 1.0] [--reference-scale 0.5]
Last line: {"frames_per_s": .., "peak_memory_gb": .., "reference_peak_memory_gb": .., ...}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.memory_read import proc_status

GAPS = (30, 25, 1, 3, 5)  # frame 30's references: frames 0, 5 (long-term), 29, 27, 25
LABELS = 7  # DAVIS has at most 5 objects + background; 7 as the reference code
RADIUS = 12


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False if not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def real_frames(count: int, size: tuple[int, int]) -> torch.Tensor:
    """(count, 3, H, W) stored uint8 Lab from consecutive frames of a real sample video."""
    from davis.sample import read_video_frames, sample_video_dir
    from model.colour import quantise_lab, rgb_to_lab

    rgb = read_video_frames(sample_video_dir() / "bigbuckbunny.mp4", count, 0, 1, size)
    return quantise_lab(rgb_to_lab(torch.from_numpy(rgb).permute(0, 3, 1, 2)))


def run_ours(frames: int, scale: float) -> dict:
    """Propagate `frames` target frames with a 5-reference memory; time and peak per frame."""
    from model import MAST
    from model.colour import normalise_lab
    from model.grid import from_cells

    H, W = round(480 * scale) // 4 * 4, round(854 * scale) // 2 * 2
    model = MAST().eval()
    lab = normalise_lab(real_frames(len(GAPS) + frames, (W, H)))  # (N, 3, H, W)
    with torch.no_grad():
        ref_feats = [model.encode(lab[i : i + 1]) for i in range(len(GAPS))]  # (1, C, h, w)
        h, w = ref_feats[0].shape[-2:]
        labels = torch.randint(
            0, LABELS, (len(GAPS), h, w), generator=torch.Generator().manual_seed(0)
        )
        ref_values = [F.one_hot(lab_, LABELS).permute(2, 0, 1)[None].float() for lab_ in labels]
        baseline = proc_status("VmRSS")
        reset = _reset_peak()
        seconds, cpu_seconds = [], []
        for t in range(frames):
            start, cpu_start = time.perf_counter(), time.process_time()
            query = model.encode(lab[len(GAPS) + t : len(GAPS) + t + 1])
            # The same read propagate() calls (model._read binds the model's ROI settings).
            out = model._read(query, ref_feats, ref_values, list(GAPS), RADIUS)  # (1, K, h, w)
            probs = from_cells(out, (H, W))  # (1, K, H, W), the grid propagate() uses
            prediction = probs[0].argmax(0)  # (H, W)
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
            del query, out, probs
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_bytes": proc_status("VmHWM") - baseline if reset else None,
        "process_peak_bytes": proc_status("VmHWM"),
        "size": [H, W],
        "features": [h, w],
        "predicted_labels": int(prediction.unique().numel()),
    }


def run_reference(scale: float) -> dict:
    """The reference-style read of one frame on an (120, 214) * scale feature map."""
    from bench.memory_read import make_inputs, reference_read

    query, feats, values, gaps = make_inputs(scale)
    with torch.no_grad():
        baseline = proc_status("VmRSS")
        reset = _reset_peak()
        start = time.perf_counter()
        reference_read(query, feats, values, list(GAPS), RADIUS)
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_bytes": proc_status("VmHWM") - baseline if reset else None,
        "features": list(query.shape[-2:]),
        "gaps": list(gaps),
    }


def _child(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench.evaluate", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=2, help="propagated frames timed")
    parser.add_argument("--scale", type=float, default=1.0, help="frame size factor (1 = 854x480)")
    parser.add_argument(
        "--reference-scale",
        type=float,
        default=0.5,
        help="feature size factor of the reference-style read",
    )
    parser.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "ours":
        print(json.dumps(run_ours(args.frames, args.scale)))
        return {}
    if args.child == "reference":
        print(json.dumps(run_reference(args.reference_scale)))
        return {}
    ours = _child(["--child", "ours", "--frames", str(args.frames), "--scale", str(args.scale)])
    ref = _child(["--child", "reference", "--reference-scale", str(args.reference_scale)])
    gb = 2**30
    # Reference memory is linear in the feature area: scale the measurement to our map size.
    area = (ours["features"][0] * ours["features"][1]) / (ref["features"][0] * ref["features"][1])
    mean_s = sum(ours["seconds"]) / len(ours["seconds"])
    figures = {
        "frames_per_s": round(1.0 / mean_s, 4),
        "seconds_per_frame": round(mean_s, 2),
        # CPU time (all threads) per frame: less sensitive to other jobs sharing the machine.
        "cpu_seconds_per_frame": round(sum(ours["cpu_seconds"]) / len(ours["cpu_seconds"]), 2),
        "load_average": round(os.getloadavg()[0], 2),
        "peak_memory_gb": round(ours["peak_bytes"] / gb, 3)
        if ours["peak_bytes"] is not None
        else None,
        "process_peak_memory_gb": round(ours["process_peak_bytes"] / gb, 3),
        "reference_peak_memory_gb": round(ref["peak_bytes"] * area / gb, 3)
        if ref["peak_bytes"] is not None
        else None,
        "reference_measured_gb": round(ref["peak_bytes"] / gb, 3)
        if ref["peak_bytes"] is not None
        else None,
        "reference_features": ref["features"],
        "reference_read_seconds": round(ref["seconds"], 2),
        "frame_size": ours["size"],
        "features": ours["features"],
        "references": len(GAPS),
        "long_term_references": sum(g > 15 for g in GAPS),
        "radius": RADIUS,
        "threads": torch.get_num_threads(),
    }
    if figures["peak_memory_gb"] and figures["reference_peak_memory_gb"]:
        figures["memory_ratio"] = round(
            figures["peak_memory_gb"] / figures["reference_peak_memory_gb"], 4
        )
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
