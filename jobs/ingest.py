"""Ingest: raw videos -> sharded WebDataset tars of stored-Lab clips, on Ray.

    python -m jobs.ingest --input SRC --output DST [--config FILE] [--overwrite] [--verify]
        [key=value ...]
    ray job submit --working-dir . -- python -m jobs.ingest \\
        --input s3://bucket/videos/ --output s3://bucket/shards/pretrain \\
        --config configs/ingest/pretrain.yaml

SRC: a directory (recursive), a glob, a single video or a .txt/.csv/.parquet list (`path`
column); local paths or fsspec URLs. DST: a directory or URL. Ray: the cluster named by
RAY_ADDRESS, else a local one.

Resumable and deterministic: DST/assignment.json fixes which videos go to which shard; a
shard with a valid stats file and tars of the sizes it records is done and skipped (with
`--verify`, also of the sha256 it records); a rerun finishes the rest; new input videos
become new shards; `--overwrite` deletes this job's files in DST and starts over. At the end
DST/manifest.json is (re)written and a summary table printed; a run where no video gave a
clip writes no manifest (and removes one left from before), and says what to do.

One run at a time per DST: a run holds DST/.ingest.lock (storage.lock) from start to end; a
second one is refused, naming the holder, and a dead run's lock is taken over. Temp files
carry the run's id, so a run removes only its own and those of dead runs.

Exit code 0 when every shard is complete (broken videos are accounted, not errors), 2 when
some shard failed twice, 1 on bad input or config, or when no video gave a clip, 3 when DST
is locked by another run (or this run lost its lock). Exit codes 1 and 3, and any run that
wrote no manifest, print one `error:` line.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import storage
from pipeline.config import IngestConfig
from pipeline.distributor import placeable, ray_may_grow, run_shards
from pipeline.manifest import MANIFEST, Manifest, build_manifest, read_manifest
from pipeline.ray_local import init_ray
from pipeline.reader import InputError, list_videos
from pipeline.shard_stats import damaged_tars, read_done, recorded_videos
from pipeline.sharding import ASSIGNMENT, AssignmentError, ShardSpec, assign
from pipeline.summary import summary_table
from typedconfig import ConfigError, config_help, load_config

log = logging.getLogger("jobs.ingest")

# Without --config: runs of consecutive frames, one shard set for every stage.
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "ingest",
                              "default.yaml")  # fmt: skip

LOCK = ".ingest.lock"  # storage.OutputLock's file in DST


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.ingest",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (key=value overrides, defaults shown):\n" + config_help(IngestConfig),
    )
    parser.add_argument("--input", required=True, help="SRC: directory, glob, list file or URL")
    parser.add_argument("--output", required=True, help="DST: directory or URL for the shards")
    parser.add_argument(
        "--config", default=None,
        help="YAML file (configs/ingest/*.yaml); default: configs/ingest/default.yaml, runs "
        "of frames that serve every stage",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="delete DST's shards first")
    parser.add_argument(
        "--verify", action="store_true",
        help="hash the tars of done shards against their stats; write damaged shards again",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    # Intermixed: `key=value` overrides may come before or after the options.
    return parser.parse_intermixed_args(argv)


def _is_ours(name: str) -> bool:
    return (
        name in (ASSIGNMENT, MANIFEST)
        or (name.startswith("shard-") and (name.endswith(".tar") or name.endswith(".stats.json")))
        or storage.TMP_MARK in name
    )


def _outside(videos: list[str], dst: str) -> list[str]:
    """The videos not under DST: a glob over SRC that holds DST would take this job's own
    files (tars, stats) for videos."""
    under = (os.path.abspath(dst) if storage.is_local(dst) else dst).rstrip("/") + "/"
    keep = [
        v
        for v in videos
        if not (os.path.abspath(v) if storage.is_local(v) else v).startswith(under)
    ]
    if len(keep) < len(videos):
        log.warning("ignored %d input files under the output %s", len(videos) - len(keep), dst)
    return keep


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a block (back on after it, if it was on).

    The driver's bookkeeping loads the shard plan and every stats file: a million-video rerun
    holds a million small dicts from JSON, none in a cycle, which each full collection
    traversed again as the heap grew (bench/scale.py: a third of that rerun's CPU time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def clean(dst: str, run_id: str, *, everything: bool) -> None:
    """Remove the temp files of run `run_id` (a Ray worker killed mid-write leaves its
    half-written tar) and of dead runs; with `everything`, all of this job's files.

    Called while run `run_id` holds DST's lock, which is what makes removing other runs' temp
    files safe: a run that left one here and does not hold the lock is dead (its driver and,
    with it, its Ray tasks were killed), or lost the lock and stops at its next heartbeat.
    Untagged temp files are leftovers too (older versions'; assignment.json and manifest.json
    are written only by the lock's holder). The temp files of the run a live lock names are
    kept whoever calls this, and so are our lock's own (its heartbeat writes them)."""
    holder = storage.live_owner(storage.join(dst, LOCK))
    for name in storage.list_names(dst):
        tag = storage.tmp_tag(name)
        if tag is None:
            gone = everything and _is_ours(name)
        else:
            live_other = bool(tag) and tag == holder != run_id
            gone = not live_other and not (tag == run_id and name.startswith(LOCK))
        if gone:
            storage.remove(storage.join(dst, name))


def ingest(
    src: str,
    dst: str,
    cfg: IngestConfig,
    *,
    overwrite: bool = False,
    progress: bool = True,
    videos: list[str] | None = None,
    verify: bool = False,
    lock: storage.OutputLock | None = None,
    start_ray: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run the whole job holding DST's lock (`lock`, taken by the caller, or one taken here:
    storage.LockHeld when another run has it); returns the manifest's JSON object, plus run
    figures under keys starting with "_" (wall seconds, task CPU seconds, frames written,
    shards verified and found damaged with `verify`, the manifest's URL: "" when no video
    gave a clip, which writes no manifest). Ray is needed only when some shard is
    to be written: then `start_ray()` is called first (without it, Ray must be initialised);
    a rerun with every shard done decides so, and writes the manifest, without Ray."""
    start = time.perf_counter()
    if videos is None:
        videos = list_videos(src, cfg.extensions)
    videos = _outside(videos, dst)
    storage.makedirs(dst)
    with contextlib.ExitStack() as stack:
        if lock is None:
            lock = stack.enter_context(
                storage.OutputLock(storage.join(dst, LOCK), storage.new_run_id())
            )
        run_id = lock.owner
        clean(dst, run_id, everything=overwrite)
        # A garbage assignment.json is rebuilt from the shards' stats files, or refused.
        with gc_paused():
            shards = assign(videos, dst, cfg.videos_per_shard, lambda: recorded_videos(dst))
            stats = read_done(shards, cfg)
        damaged = _verify(shards, stats) if verify else []
        verified = len(stats) + len(damaged) if verify else 0
        todo = [s for s in shards if s.index not in stats]
        log.info(
            "%d videos in %d shards: %d done, %d to write -> %s",
            len(videos), len(shards), len(stats), len(todo), dst,
        )  # fmt: skip
        completed: list[dict[str, Any]] = []
        errors: dict[int, str] = {}
        if todo:
            if start_ray is not None:
                start_ray()
            completed, errors = run_shards(
                todo, cfg, progress=progress, run_id=run_id, check=lock.check
            )
            # A worker killed mid-shard (OOM, a lost node; Ray ran the task again) leaves its
            # half-written temp tar behind: removed now, not at the next run.
            clean(dst, run_id, everything=False)
        for s in completed:
            stats[s["index"]] = {k: v for k, v in s.items() if k not in ("seconds", "cpu_seconds")}
        with gc_paused():
            manifest = build_manifest(shards, stats, errors, cfg)
        lock.check()  # a run that lost its lock leaves the manifest to the run that has it
        if manifest.num_samples:
            url = manifest.write(dst)
        else:  # Nothing to train on: no manifest, and none left by an earlier run (older
            url = ""  # versions wrote them with 0 samples): it would not describe these shards.
            storage.remove(storage.join(dst, MANIFEST))
    # Run figures, not part of the written manifest (which is deterministic).
    return {
        **manifest.to_json(),
        "_seconds": time.perf_counter() - start,
        "_task_cpu_seconds": sum(s["cpu_seconds"] for s in completed),
        "_frames_written": sum(s["num_frames"] for s in completed),
        "_verified": verified,
        "_damaged": len(damaged),
        "_manifest_url": url,
    }


def _verify(shards: list[ShardSpec], stats: dict[int, dict[str, Any]]) -> list[int]:
    """Hash the tars of the done shards in `stats` against the sha256 their stats record;
    the damaged ones (same size, other bytes) leave `stats`, to be written again."""
    damaged = [s.index for s in shards if s.index in stats and damaged_tars(s, stats[s.index])]
    for index in damaged:
        del stats[index]
    log.info("verified %d done shards: %d damaged", len(stats) + len(damaged), len(damaged))
    return damaged


def check_output(dst: str) -> None:
    """DST must be a directory (created when missing): not a file, nor under one."""
    problem = storage.not_a_directory(dst)
    if problem:
        raise InputError(f"--output {dst} {problem}; give a directory path for the shards")


def check_task_cpus(cfg: IngestConfig, may_grow: bool) -> None:
    """A task no node can hold waits forever, and Ray says so only in its own logs: refused
    on the local instance this job started; on a joined cluster (`may_grow`: it may
    autoscale) a warning."""
    import ray

    alive = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if placeable(alive, cfg.task_cpus):
        return
    largest = max((r.get("CPU", 0) for r in alive), default=0)
    message = f"task_cpus={cfg.task_cpus:g} but the largest Ray node has {largest:g} CPUs"
    if not may_grow:  # the local instance this job started: no node will join it
        raise ConfigError(f"{message}; set task_cpus <= {largest:g}")
    log.warning("%s: tasks wait until a node that large joins the cluster", message)


def fail(error: Exception | str) -> None:
    """One `error: ...` line on stderr, as jobs.train and jobs.evaluate print theirs."""
    print("error: " + " ".join(str(error).splitlines()), file=sys.stderr)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(IngestConfig, args.config or DEFAULT_CONFIG, args.overrides)
        check_output(args.output)
        videos = list_videos(args.input, cfg.extensions)  # bad input fails before Ray starts
    except (ConfigError, InputError) as e:
        fail(e)
        return 1
    lock = storage.OutputLock(storage.join(args.output, LOCK), storage.new_run_id())
    try:
        lock.acquire()  # before Ray starts: a refusal is quick and changes nothing
    except storage.LockHeld as e:
        fail(e)
        return 3
    try:
        return _run(args, cfg, videos, lock)
    except storage.LockLost as e:
        fail(e)
        return 3
    finally:
        lock.release()


def _run(
    args: argparse.Namespace, cfg: IngestConfig, videos: list[str], lock: storage.OutputLock
) -> int:
    def start_ray() -> None:
        # The cluster RAY_ADDRESS (or `ray start`) names is joined; else a local one starts.
        init_ray(dashboard=False, log_to_driver=False)
        check_task_cpus(cfg, may_grow=ray_may_grow())

    try:
        # Ray starts only when some shard is to be written: a rerun of a finished job (a
        # million videos) decides "nothing to write" and rewrites the manifest without it.
        run = ingest(
            args.input, args.output, cfg, overwrite=args.overwrite,
            progress=not args.no_progress, videos=videos, verify=args.verify, lock=lock,
            start_ray=start_ray,
        )  # fmt: skip
        url = run["_manifest_url"]
        # What was written, through the reader training uses; without one, what was built.
        built = {k: v for k, v in run.items() if not k.startswith("_")}
        manifest = read_manifest(url) if url else Manifest.from_json(built, args.output)
    except (ConfigError, AssignmentError) as e:
        fail(e)
        return 1
    print(summary_table(manifest, run["_seconds"]))
    if args.verify:
        print(f"verified {run['_verified']} done shards against their sha256: "
              f"{run['_damaged']} damaged, written again")  # fmt: skip
    if url:
        print(f"manifest: {url}")
    else:
        fail(no_clips(manifest, args.input))
    if manifest.incomplete_shards:
        return 2
    return 0 if url else 1


def no_clips(manifest: Manifest, src: str) -> str:
    """What a run that stored no clip says: why (each video's reason is in the summary), and
    what to do; a done shard is not read again, so a video fixed in place needs --overwrite."""
    v, incomplete = manifest.videos, len(manifest.incomplete_shards)
    if incomplete:
        todo = f"rerun the same command to retry the {incomplete} incomplete shards"
    else:
        todo = (
            "add videos that give clips and rerun, or fix these and rerun with --overwrite "
            "(shards already done are not read again)"
        )
    return (
        f"no video in {src} gave a clip ({v.get('skipped', 0)} skipped, {v.get('failed', 0)} "
        f"failed; the summary above gives each one's reason), so no manifest was written: {todo}"
    )


if __name__ == "__main__":
    sys.exit(main(parse_args()))
