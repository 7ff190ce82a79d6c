"""jobs.evaluate's fan-out: one Ray task per DAVIS sequence, bounded in flight, or the same
function in this process (`ray.enabled=false`: identical numbers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jobs.eval_config import EvalConfig
from jobs.eval_sequence import SequenceResult, run_sequence_task
from pipeline.progress import progress as progress_bar
from pipeline.ray_local import init_ray
from typedconfig import to_dict


def run_local(
    state, root, names, output, cfg, progress: Callable[[], None]
) -> list[SequenceResult]:
    results = []
    for name in names:
        results.append(run_sequence_task(state, str(root), name, str(output), to_dict(cfg)))
        progress()
    return results


def run_ray(state, root, names, output, cfg, progress: Callable[[], None]) -> list[SequenceResult]:
    """One task per sequence, at most ray.max_in_flight at once; results in `names` order."""
    import ray

    init_ray(cfg.ray.address, dashboard=False, log_to_driver=False)
    options: dict[str, Any] = {
        "num_cpus": cfg.ray.num_cpus,
        "num_gpus": cfg.ray.num_gpus,
        "max_retries": cfg.ray.max_retries,
    }
    if cfg.ray.memory_gb > 0:
        options["memory"] = int(cfg.ray.memory_gb * 2**30)
    task = ray.remote(run_sequence_task).options(**options)
    state_ref = ray.put(state)  # shipped once, shared by every task on a node
    cfg_dict = to_dict(cfg)
    queue, pending, done = list(names), {}, {}
    while queue or pending:
        while queue and len(pending) < cfg.ray.max_in_flight:
            name = queue.pop(0)
            pending[task.remote(state_ref, str(root), name, str(output), cfg_dict)] = name
        ready, _ = ray.wait(list(pending), num_returns=1)
        name = pending.pop(ready[0])
        try:
            done[name] = ray.get(ready[0])
        except ray.exceptions.RayError as e:  # worker died after all retries
            done[name] = SequenceResult(name, "failed", error=f"Ray task failed: {e}"[:2000])
        progress()
    return [done[n] for n in names]


def run_sequences(state, root, names, output, cfg: EvalConfig) -> list[SequenceResult]:
    with progress_bar(total=len(names), desc="DAVIS sequences", unit="seq") as bar:
        runner = run_ray if cfg.ray.enabled else run_local
        return runner(state, root, names, output, cfg, lambda: bar.update(1))
