"""The ingest driver and the loader's planning at the sizes users have, simulated where this
machine is too small: nothing is decoded, the real planning code runs on real files.

    python -m bench.scale [--sizes 10000,100000,1000000] [--shards 10000] [--ranks 64]
        [--workers 4] [--quick] [--work DIR]

- Ingest rerun, per size N (listed inputs): a .txt list of N video paths (they need not
  exist: planning reads no video), the real first-run plan (`pipeline.sharding.assign`,
  timed as `first_plan_<N>_s`), then a completed run simulated by its files: per shard the
  stats file (the done marker) and sparse tars of the sizes it records. The stats are those
  `pipeline.worker.process_shard` writes: one real shard of a sample video is ingested with
  the same config and its video entry becomes every video's (path and id replaced; every
  100th video "failed" with the real message of a missing file), serialised as the worker
  does; `read_done` accepts them (else the rerun would not find "nothing to write"). Then a
  fresh process runs the driver, `jobs.ingest.ingest`, on that list and DST without Ray:
  list, lock, clean, assign, resume check (`read_done`), manifest build and write. Reported:
  its wall and CPU time, its peak RSS (VmHWM), whether it imported Ray, the manifest's
  bytes; `plan_growth_exponent` is the log-log slope of CPU time against N (of wall time:
  `plan_growth_exponent_wall`, which other jobs on a shared machine distort).
  Goal: at 1,000,000 inputs under 60 s and 2 GB.
- Loader, `--shards` shards x `--ranks` ranks x `--workers` DataLoader workers: a manifest
  of that many shards (50-150 samples each, by `build_manifest`), every rank's epoch loader
  made in this process (`make_epoch_loader`: manifest read, epoch plan), each worker's part
  of the plan as `ClipStream.epoch_pieces` gives it. Reported: whether every rank has the
  same batch count, the fraction of the manifest's samples some (rank, worker) reads, the
  start-up time per rank (mean, max), and the peak RSS of a fresh process making one rank's
  loader (beside one that only imports the loader). No shard is read: the shards of the
  manifest do not exist.

Files go under a temporary directory (--work, default under /tmp), removed at the end.
Last line: one JSON object (rerun_1m_s, rerun_1m_peak_gb, plan_growth_exponent,
loader_64_ranks_equal_batches, loader_epoch_coverage, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from pipeline.config import IngestConfig
from pipeline.sharding import ShardSpec, assign, shard_name, video_id

SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (2_000, 20_000)
FAILED_EVERY = 100  # one video in this many is simulated as failed (a missing file)
log = logging.getLogger("bench.scale")


# -- a completed ingest run, simulated by its files -----------------------------------------
def template_shard(work: Path, cfg: IngestConfig) -> dict[str, Any]:
    """Stats of one real shard (a sample video ingested by the worker with `cfg`), and a
    second with a missing video: the entries every simulated shard is made of."""
    from pipeline.worker import process_shard
    from storage import sample_video_dir
    from typedconfig import to_dict

    out = work / "template"
    out.mkdir(parents=True)
    video = str(sample_video_dir() / "carphone_pristine.mp4")
    ok = process_shard(ShardSpec(0, (video,), str(out)), to_dict(cfg))
    failed = process_shard(ShardSpec(1, (str(out / "missing.mp4"),), str(out)), to_dict(cfg))
    shutil.rmtree(out)
    return {"ok": ok["videos"][0], "failed": failed["videos"][0], "config_hash":
            ok["config_hash"], "bytes_per_clip": ok["bytes"] // max(1, ok["num_samples"])}  # fmt: skip


def shard_stats(spec: ShardSpec, template: dict[str, Any], cfg: IngestConfig) -> dict[str, Any]:
    """The stats `process_shard` would write for `spec` if each of its videos were the
    template's (the same keys and layout)."""
    videos = []
    for i, url in enumerate(spec.videos):
        failed = (spec.index * cfg.videos_per_shard + i) % FAILED_EVERY == 0
        kind = template["failed" if failed else "ok"]
        entry = dict(kind, path=url, id=video_id(url))
        if failed:
            entry["message"] = kind["message"].replace(kind["path"], url)
        else:
            entry["tar"] = spec.name
        videos.append(entry)
    clips = sum(v["clips"] for v in videos)
    size = 1024 + clips * template["bytes_per_clip"]
    sha = video_id(spec.name) * 4  # a stand-in: only --verify reads the tars' bytes
    tar = {"name": spec.name, "num_samples": clips, "bytes": size, "sha256": sha}
    return {
        "shard": spec.name, "index": spec.index, "num_samples": clips,
        "num_frames": clips * len(cfg.offsets), "bytes": size, "sha256": sha, "tars": [tar],
        "config_hash": template["config_hash"], "videos": videos,
    }  # fmt: skip


def simulate_done(work: Path, n: int, cfg: IngestConfig, template: dict[str, Any]) -> dict:
    """A list of `n` video paths and DST holding a completed run over it (module docstring);
    returns {"list", "dst", "first_plan_s", "shards"}."""
    dst = work / f"dst-{n}"
    dst.mkdir(parents=True)
    videos = [f"/data/videos/{i // 1000:04d}/video-{i:07d}.mp4" for i in range(n)]
    listing = work / f"videos-{n}.txt"
    listing.write_text("\n".join(videos) + "\n")
    start = time.perf_counter()
    specs = assign(videos, str(dst), cfg.videos_per_shard)
    first_plan = time.perf_counter() - start
    for spec in specs:
        stats = shard_stats(spec, template, cfg)
        # The worker's serialisation; written plainly (the worker's fsync is not measured).
        (dst / f"{spec.name[:-4]}.stats.json").write_bytes(
            json.dumps(stats, indent=1, sort_keys=True).encode()
        )
        with open(dst / shard_name(spec.index), "wb") as f:
            f.truncate(stats["bytes"])  # sparse: the size is what a rerun checks
    return {"list": str(listing), "dst": str(dst), "first_plan_s": first_plan,
            "shards": len(specs)}  # fmt: skip


def rerun(listing: str, dst: str, cfg: IngestConfig) -> dict[str, Any]:
    """The ingest driver on a completed run, in this process: figures of `jobs.ingest.ingest`."""
    from jobs.ingest import ingest

    start, cpu_start = time.perf_counter(), time.process_time()
    run = ingest(listing, dst, cfg, progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "seconds": seconds,
        # CPU time varies less than wall time on a machine shared with other jobs.
        "cpu_seconds": cpu,
        "nothing_to_write": run["_frames_written"] == 0 and not run["incomplete_shards"],
        "imported_ray": "ray" in sys.modules,
        "shards": run["num_shards"],
        "videos": run["videos"]["total"],
        "problems": len(run["problems"]),
        "manifest_bytes": os.path.getsize(os.path.join(dst, "manifest.json")),
    }


def peak_rss_gb() -> float | None:
    """This process's peak RSS (VmHWM: its own, unlike ru_maxrss, which a child started by
    fork + exec inherits from a larger parent); None where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return kb / 2**20


def in_child(args: list[str]) -> tuple[dict[str, Any], float]:
    """(last-line JSON, peak RSS in GB) of `python -m bench.scale <args>` in a fresh process:
    the peak it reports itself (VmHWM), else its ru_maxrss from os.wait4."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.scale", *args], stdout=subprocess.PIPE, text=True
    )
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"bench.scale {' '.join(args)} exited with {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    peak = result.pop("peak_gb", None) or usage.ru_maxrss / 2**20  # KB -> GB
    return result, peak


def growth_exponent(sizes: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) against log(size)."""
    xs, ys = [math.log(s) for s in sizes], [math.log(max(t, 1e-6)) for t in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def ingest_figures(work: Path, sizes: list[int], cfg: IngestConfig) -> dict[str, Any]:
    template = template_shard(work, cfg)
    out: dict[str, Any] = {}
    times: list[float] = []
    cpus: list[float] = []
    for n in sizes:
        sim = simulate_done(work, n, cfg, template)
        run, peak = in_child(["--child-rerun", sim["list"], sim["dst"]])
        if not run["nothing_to_write"] or run["videos"] != n:
            raise RuntimeError(f"the rerun over {n} inputs found work to do: {run}")
        tag = label(n)
        out.update({
            f"first_plan_{tag}_s": round(sim["first_plan_s"], 2),
            f"rerun_{tag}_s": round(run["seconds"], 2),
            f"rerun_{tag}_cpu_s": round(run["cpu_seconds"], 2),
            f"rerun_{tag}_peak_gb": round(peak, 3),
            f"rerun_{tag}_imported_ray": run["imported_ray"],
            f"manifest_{tag}_bytes": run["manifest_bytes"],
            f"shards_{tag}": sim["shards"],
        })  # fmt: skip
        times.append(run["seconds"])
        cpus.append(run["cpu_seconds"])
        log.info("%d inputs: %s", n, {k: v for k, v in out.items() if f"_{tag}" in k})
        shutil.rmtree(sim["dst"])
        os.remove(sim["list"])
    # Of CPU time: on a machine shared with other jobs, wall time measures their load too.
    out["plan_growth_exponent"] = round(growth_exponent(list(sizes), cpus), 3)
    out["plan_growth_exponent_wall"] = round(growth_exponent(list(sizes), times), 3)
    return out


def label(n: int) -> str:
    return (
        f"{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)
    )


# -- the loader's epoch plans at 64 ranks ---------------------------------------------------
def write_manifest(work: Path, num_shards: int, cfg: IngestConfig) -> Path:
    """A manifest of `num_shards` shards of 50-150 samples (deterministic), as ingest writes
    it (`build_manifest`); the shards themselves are not written."""
    import random

    from pipeline.manifest import build_manifest

    rng = random.Random(0)
    specs, stats = [], {}
    for i in range(num_shards):
        spec = ShardSpec(i, (f"/data/v{i}.mp4",), str(work))
        n = rng.randint(50, 150)
        video = {"path": spec.videos[0], "id": video_id(spec.videos[0]), "status": "ok",
                 "clips": n, "message": "", "tar": spec.name}  # fmt: skip
        tar = {"name": spec.name, "num_samples": n, "bytes": n * 1000, "sha256": "0" * 64}
        stats[i] = {"num_samples": n, "num_frames": n * len(cfg.offsets), "bytes": n * 1000,
                    "sha256": "0" * 64, "tars": [tar], "config_hash": "0" * 16,
                    "videos": [video]}  # fmt: skip
        specs.append(spec)
    build_manifest(specs, stats, {}, cfg).write(str(work))
    return work / "manifest.json"


def loader_figures(
    work: Path, num_shards: int, ranks: int, workers: int, *, children: bool = True
) -> dict[str, Any]:
    """Every rank's epoch plan over a `num_shards` manifest, made in this process; with
    `children`, one rank's start-up measured in a fresh process too."""
    import numpy as np

    from pipeline.config import LoaderConfig
    from pipeline.loader import make_epoch_loader
    from typedconfig import load_config

    cfg = load_config(IngestConfig, "configs/ingest/pretrain.yaml", [])  # clips serve pretrain
    manifest = write_manifest(work, num_shards, cfg)
    lcfg = LoaderConfig(stage="pretrain", batch_size=12, num_workers=workers)
    batches, startup = [], []
    seen: np.ndarray | None = None
    index: dict[str, int] = {}
    starts = np.zeros(1, dtype=np.int64)
    reads = 0
    for rank in range(ranks):
        start = time.perf_counter()
        loader = make_epoch_loader(str(manifest), lcfg, rank=rank, world_size=ranks, seed=0)
        startup.append(time.perf_counter() - start)
        batches.append(len(loader))
        stream = loader.stream
        if seen is None:
            index = {url: i for i, url in enumerate(stream.urls)}
            starts = np.cumsum([0, *stream.counts])
            seen = np.zeros(int(starts[-1]), dtype=bool)
        planned = 0
        for worker in range(workers):
            for url, positions in stream.epoch_pieces(worker, workers):
                pos = np.asarray(positions, dtype=np.int64)
                shard = index[url]
                if len(pos) and (pos.min() < 0 or pos.max() >= stream.counts[shard]):
                    raise RuntimeError(f"rank {rank} plans positions outside {url}")
                seen[starts[shard] + pos] = True
                planned += len(pos)
        if planned != stream.epoch_samples:  # the workers read exactly the rank's share
            raise RuntimeError(
                f"rank {rank}: {planned} samples planned, {stream.epoch_samples} due"
            )
        reads += planned
    assert seen is not None
    figures = {
        "loader_shards": num_shards,
        "loader_samples": int(len(seen)),
        "loader_ranks": ranks,
        "loader_workers": workers,
        "loader_equal_batches": len(set(batches)) == 1,
        f"loader_{ranks}_ranks_equal_batches": len(set(batches)) == 1,
        "loader_batches_per_rank": batches[0],
        "loader_epoch_coverage": round(float(seen.mean()), 6),
        "loader_epoch_padding": round(reads / len(seen) - 1, 6),
        "loader_rank_startup_mean_s": round(sum(startup) / len(startup), 4),
        "loader_rank_startup_max_s": round(max(startup), 4),
    }
    if children:
        args = ["--child-loader-rank", str(manifest), str(ranks), str(workers)]
        rank_run, rank_peak = in_child(args)
        _, import_peak = in_child(["--child-loader-imports"])
        figures.update({
            "loader_rank_child_startup_s": round(rank_run["seconds"], 4),
            "loader_rank_peak_gb": round(rank_peak, 3),
            "loader_rank_over_imports_gb": round(rank_peak - import_peak, 3),
        })  # fmt: skip
    return figures


def child_loader_rank(manifest: str, ranks: int, workers: int) -> dict[str, Any]:
    from pipeline.config import LoaderConfig
    from pipeline.loader import make_epoch_loader

    lcfg = LoaderConfig(stage="pretrain", batch_size=12, num_workers=workers)
    start = time.perf_counter()
    loader = make_epoch_loader(manifest, lcfg, rank=ranks - 1, world_size=ranks, seed=0)
    return {"seconds": time.perf_counter() - start, "batches": len(loader)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="2k and 20k inputs, 1,000 shards")
    parser.add_argument("--work", default=None, help="scratch directory (default: under /tmp)")
    parser.add_argument("--child-rerun", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-loader-rank", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--child-loader-imports", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # DataLoader warns that 4 workers exceed this machine's CPUs: none is started here.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    if args.child_rerun or args.child_loader_rank or args.child_loader_imports:
        result = {**child(args), "peak_gb": peak_rss_gb()}
    else:
        logging.getLogger("bench.scale").setLevel(logging.INFO)
        sizes = list(QUICK_SIZES) if args.quick else [int(s) for s in args.sizes.split(",")]
        shards = 1000 if args.quick else args.shards
        work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.work))
        try:
            result = {"sizes": sizes, **ingest_figures(work, sizes, IngestConfig())}
            (work / "loader").mkdir()
            result.update(loader_figures(work / "loader", shards, args.ranks, args.workers))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


def child(args: argparse.Namespace) -> dict[str, Any]:
    """What one measured child process does (`in_child`)."""
    if args.child_rerun:
        return rerun(*args.child_rerun, IngestConfig())
    if args.child_loader_rank:
        manifest, ranks, workers = args.child_loader_rank
        return child_loader_rank(manifest, int(ranks), int(workers))
    import pipeline.loader  # noqa: F401  (the baseline: what importing the loader takes)

    return {}


if __name__ == "__main__":
    main()
