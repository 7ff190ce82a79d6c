"""Run every benchmark (`make bench`), each in its own process, and collect their figures.

Each benchmark module prints one JSON object as its last line; this collects them into
runs/bench/results.json and prints them as one JSON object (the last line).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = [
    "memory_read",
    "train_step",
    "ingest",
    "ingest_frames",
    "loader",
    "scale",
    "train",
    "evaluate",
]


def main() -> dict:
    results: dict[str, dict] = {}
    for name in BENCHMARKS:
        print(f"== bench.{name}", flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", f"bench.{name}"], capture_output=True, text=True
        )
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            results[name] = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
        else:
            results[name] = json.loads(lines[-1])
        print(json.dumps(results[name]), flush=True)
    out = Path("runs/bench/results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
