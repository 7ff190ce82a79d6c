"""Run shard tasks on Ray: bounded fan-out, retries, a retry round, progress, no end-of-run hang.

- At most `max_in_flight` tasks are submitted at once (default 2 x cluster CPUs / task_cpus);
  a new one goes out whenever one finishes, so the object store and scheduler never hold the
  whole corpus.
- A task whose worker process dies (OOM kill, node loss: a *system* failure) is retried by Ray
  up to `max_retries` times. A task that raises (e.g. the destination refused a write) is
  recorded and, with `retry_failed_shards`, run once more after the first round.
- `task_timeout_s` > 0 cancels a task that runs longer (a decoder stuck on a pathological
  file is the usual cause of "hangs at the end" in video pipelines) and treats it as failed.
- Progress: one tqdm bar over videos with clips, clips/s and failed/skipped videos.
- Every task gets the run's id (`run_id`, which tags its temp files; Ray's retries of a task
  keep its arguments), and `check()` is called at every poll: it raises to stop the run (the
  driver lost its lock on DST to another run).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import Any

from pipeline.config import IngestConfig
from pipeline.progress import progress as progress_bar
from pipeline.sharding import ShardSpec
from pipeline.worker import process_shard
from typedconfig import to_dict

log = logging.getLogger(__name__)


def ray_may_grow() -> bool:
    """Whether nodes may join the Ray instance this process is connected to: False only when
    this process started it (`ray.init()` with no cluster to join). A cluster it joined, by
    RAY_ADDRESS or one started on this machine with `ray start`, may have other nodes or an
    autoscaler. Ray has no public API for this: the driver's node object says whether it is
    a head node this process started (when in doubt, True)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return not getattr(node, "head", False)


def placeable(resources: list[dict[str, float]], cpus: float, gpu: bool = False) -> int:
    """How many tasks or workers of `cpus` CPUs (and a GPU each with `gpu`) these nodes'
    resources hold, each on one node, counted as Ray does (in units of 1e-4)."""
    each = max(1, round(cpus * 1e4))
    return sum(
        min(round(r.get("CPU", 0) * 1e4) // each, int(r.get("GPU", 0)) if gpu else 10**9)
        for r in resources
    )


def _in_flight_limit(cfg: IngestConfig) -> int:
    import ray

    if cfg.max_in_flight:
        return cfg.max_in_flight
    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(1, int(2 * cpus / cfg.task_cpus))


def run_shards(
    shards: list[ShardSpec],
    cfg: IngestConfig,
    *,
    on_done: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    run_id: str = "",
    check: Callable[[], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """Process `shards`; returns (stats of completed shards, {shard index: error} of the rest)."""
    import ray

    task = ray.remote(process_shard).options(
        num_cpus=cfg.task_cpus, max_retries=cfg.max_retries, retry_exceptions=False
    )
    cfg_dict = to_dict(cfg)
    limit = _in_flight_limit(cfg)
    poll = min(1.0, cfg.task_timeout_s) if cfg.task_timeout_s else 1.0  # timeout resolution
    done: list[dict[str, Any]] = []
    errors: dict[int, str] = {}
    bar = progress_bar(
        total=sum(len(s.videos) for s in shards), desc="videos", unit="video", enabled=progress
    )
    clips = failures = skipped = 0
    start = time.perf_counter()
    rounds = [collections.deque(shards)]  # popleft: list.pop(0) was quadratic in shards
    round_no = 0
    while rounds:
        queue = rounds.pop(0)
        failed_now: list[ShardSpec] = []
        pending: dict[Any, tuple[ShardSpec, float]] = {}
        while queue or pending:
            while queue and len(pending) < limit:
                spec = queue.popleft()
                pending[task.remote(spec, cfg_dict, run_id)] = (spec, time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=poll)
            if check is not None:
                try:
                    check()
                except Exception:  # stopping: tasks in flight would go on writing
                    for ref in pending:
                        ray.cancel(ref, force=True)
                    raise
            for ref in ready:
                spec, _t = pending.pop(ref)
                try:
                    stats = ray.get(ref)
                except Exception as e:  # task boundary: recorded and retried once below
                    errors[spec.index] = f"{type(e).__name__}: {str(e).splitlines()[-1][:300]}"
                    log.warning("shard %s failed: %s", spec.name, errors[spec.index])
                    failed_now.append(spec)
                    continue
                errors.pop(spec.index, None)
                done.append(stats)
                if on_done is not None:
                    on_done(stats)
                clips += stats["num_samples"]
                failures += sum(v["status"] == "failed" for v in stats["videos"])
                skipped += sum(v["status"] == "skipped" for v in stats["videos"])
                if round_no == 0:
                    bar.update(len(spec.videos))
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(
                    clips=clips, clips_s=f"{clips / elapsed:.1f}", failed=failures, skipped=skipped
                )
            if cfg.task_timeout_s:
                now = time.monotonic()
                for ref, (spec, submitted) in list(pending.items()):
                    if now - submitted > cfg.task_timeout_s:
                        ray.cancel(ref, force=True)
                        del pending[ref]
                        errors[spec.index] = f"timed out after {cfg.task_timeout_s:g}s"
                        log.warning("shard %s %s; cancelled", spec.name, errors[spec.index])
                        failed_now.append(spec)
        if round_no == 0:
            bar.update(sum(len(s.videos) for s in failed_now))
            if failed_now and cfg.retry_failed_shards:
                log.warning("retrying %d failed shards once", len(failed_now))
                rounds.append(collections.deque(failed_now))
        round_no += 1
    bar.close()
    return done, errors
