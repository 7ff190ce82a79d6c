"""A job's own local Ray instance keeps to itself when another one runs on the machine."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

OTHER = "import ray, sys, time; ray.init(include_dashboard=False); print('up', flush=True); time.sleep(600)"

# What Ray Train's placement-group cleaner does inside its actor: the state API with no
# address. Before init_ray it scanned the machine and found both instances.
JOB = textwrap.dedent(
    """
    import json, os, ray
    from pipeline.ray_local import init_ray

    started = init_ray(log_to_driver=False)

    @ray.remote
    def look_up():
        from ray.util.state import list_nodes
        return [len(list_nodes()), os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")]

    print(json.dumps([started, *ray.get(look_up.remote()), os.environ.get("RAY_COLOR_PREFIX")]))
    """
)


@pytest.mark.slow
@pytest.mark.ray
def test_a_local_instance_does_not_look_for_another_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["PYTHONPATH"] = str(ROOT)
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout.readline().strip() == "up"
        done = subprocess.run([sys.executable, "-c", JOB], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        started, nodes, watcher, colour = __import__("json").loads(
            done.stdout.strip().splitlines()[-1]
        )
        # Its own instance (one node), found by its workers without a scan; no preemption
        # watcher on one machine; no colour codes in output that is not a terminal.
        assert (started, nodes, watcher, colour) == (True, 1, "0", "0")
        assert "multiple active Ray instances" not in done.stderr
    finally:
        other.kill()
        other.wait(timeout=60)
