"""Pairwise training step throughput: forward + backward of the full model on CPU.

    python -m bench.train_step [--size 256] [--batch 4] [--width 64] [--steps 3]
Last line: {"clips_per_s": .., "backend": .., ...}
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from model import MAST
from model.correlation import backend_for


def measure_train_step(
    size: int = 256, batch: int = 4, width: int = 64, steps: int = 3, seed: int = 0
) -> dict:
    """Clips (pairs) per second of forward + backward + Adam step, after one warm-up step."""
    torch.manual_seed(seed)
    model = MAST(width=width).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    frames = torch.randint(0, 256, (batch, 2, 3, size, size), dtype=torch.uint8)
    gaps = torch.full((batch, 1), 5)

    def step():
        out = model(frames, gaps)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    step()  # warm-up: allocator and kernels
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    return {
        "clips_per_s": round(batch * steps / seconds, 3),
        "backend": backend_for(frames),
        "size": size,
        "batch": batch,
        "width": width,
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    figures = measure_train_step(args.size, args.batch, args.width, args.steps)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
