"""Frame-folder ingest beside video ingest, on the same frames: frames per CPU-second.

    python -m bench.ingest_frames [--video bigbuckbunny] [--copies 4] [--config FILE]

The frames of a sample video (bigbuckbunny.mp4, 1280x720, the resolution of YouTube-VOS) are
written as JPEG q95 images, `00000.jpg ...`, one frame folder per copy of the video (YouTube-VOS
ships its frames so); the same number of copies of the video file is the video-side input.
Measured in a process confined to one core (as bench/ingest.py; Ray CPUs = cores), best of
`--rounds` interleaved runs, on both inputs:
- decode + resize alone (frames per CPU-second of the process, all its threads): the worker's
  decord reader for the video; `FrameFolder.frames` (its thread pool, libjpeg's reduced-scale
  decode) for the folders;
- the whole ingest job on a local 1-CPU Ray instance (per CPU-second of the tasks).
Keys (last line, one JSON object): frame_folder_ingest_frames_per_cpu_s,
video_ingest_frames_per_cpu_s, frame_folder_vs_video_ratio (ingest), and the decode + resize
figures and ratio; `source_bytes_per_frame` of both inputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2

from bench.ingest import decode_limit, sample_video
from jobs.ingest import ingest
from pipeline.config import IngestConfig
from pipeline.decode import clip_starts
from pipeline.frame_folder import FrameFolder
from typedconfig import load_config, replace


def write_inputs(video: Path, tmp: Path, copies: int) -> tuple[Path, Path]:
    """(folder of `copies` video files, folder of `copies` frame folders), the same frames.
    Copies beyond the first are hard links: what is read is the same either way."""
    import av

    videos, folders = tmp / "videos", tmp / "frames"
    first = folders / "f0"
    first.mkdir(parents=True)
    videos.mkdir()
    with av.open(str(video)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            bgr = frame.to_ndarray(format="bgr24")
            cv2.imwrite(str(first / f"{i:05d}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    for c in range(copies):
        shutil.copy(video, videos / f"v{c}.mp4")
        if c:
            (folders / f"f{c}").mkdir()
            for image in first.iterdir():
                os.link(image, folders / f"f{c}" / image.name)
    return videos, folders


def folder_limit(folders: list[Path], cfg: IngestConfig) -> float:
    """Frames per CPU-second of reading, decoding and resizing the frames ingest stores."""
    cv2.setNumThreads(1)
    frames, cpu_start = 0, time.process_time()
    for path in folders:
        folder = FrameFolder.open(str(path))
        starts = clip_starts(folder.num_frames, cfg)
        wanted = sorted({s + o for s in starts for o in cfg.offsets})
        for _ in folder.frames(wanted, cfg.size, cfg.resize, cfg.decoder_threads or 1):
            frames += 1
    return frames / (time.process_time() - cpu_start)


def _measure(core: int, queue, videos: Path, folders: Path, cfg: IngestConfig, rounds: int):
    os.sched_setaffinity(0, [core])  # before ray.init: every process Ray starts inherits it
    logging.basicConfig(level=logging.WARNING)
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    best: dict[str, float] = {}
    out = videos.parent / "out"
    try:
        for name, src in (("video", videos), ("frame_folder", folders)):  # warm-up
            ingest(str(src), str(out / f"warm-{name}"), replace(cfg, clips_per_video=1),
                   progress=False)  # fmt: skip
        for r in range(rounds):
            _, _, per_cpu = decode_limit(sorted(videos.glob("*.mp4")), cfg)
            best["video_limit"] = max(best.get("video_limit", 0.0), per_cpu)
            per_cpu = folder_limit(sorted(folders.iterdir()), cfg)
            best["frame_folder_limit"] = max(best.get("frame_folder_limit", 0.0), per_cpu)
            for name, src in (("video", videos), ("frame_folder", folders)):
                manifest = ingest(str(src), str(out / f"{name}-{r}"), cfg, progress=False)
                per_cpu = manifest["_frames_written"] / manifest["_task_cpu_seconds"]
                best[name] = max(best.get(name, 0.0), per_cpu)
                best[f"{name}_frames"] = manifest["num_frames"]
    finally:
        ray.shutdown()
    queue.put(best)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--video", default="bigbuckbunny", help="sample video (bench.ingest)")
    parser.add_argument("--copies", type=int, default=4, help="copies of the video / folder")
    parser.add_argument("--config", default="configs/ingest/pretrain.yaml")
    parser.add_argument("--rounds", type=int, default=2, help="best of N interleaved runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(IngestConfig, args.config, ["videos_per_shard=1"])
    tmp = Path(tempfile.mkdtemp(prefix="bench_frames_"))
    try:
        videos, folders = write_inputs(sample_video(args.video, tmp), tmp, args.copies)
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        core = sorted(os.sched_getaffinity(0))[0]
        proc = ctx.Process(target=_measure, args=(core, queue, videos, folders, cfg, args.rounds))
        proc.start()
        best = queue.get()
        proc.join()
        video_bytes = sum(p.stat().st_size for p in videos.glob("*.mp4"))
        image_bytes = sum(p.stat().st_size for p in (folders / "f0").iterdir()) * args.copies
        frames = len(list((folders / "f0").iterdir())) * args.copies
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert best["video_frames"] == best["frame_folder_frames"]  # the same frames stored
    result = {
        "video": args.video,
        "frames_stored": best["frame_folder_frames"],
        "frame_folder_ingest_frames_per_cpu_s": round(best["frame_folder"], 1),
        "video_ingest_frames_per_cpu_s": round(best["video"], 1),
        "frame_folder_vs_video_ratio": round(best["frame_folder"] / best["video"], 3),
        "frame_folder_decode_resize_frames_per_cpu_s": round(best["frame_folder_limit"], 1),
        "video_decode_resize_frames_per_cpu_s": round(best["video_limit"], 1),
        "decode_resize_ratio": round(best["frame_folder_limit"] / best["video_limit"], 3),
        "source_bytes_per_frame": {
            "jpeg_q95": round(image_bytes / frames),
            "video": round(video_bytes / frames),
        },  # fmt: skip
        "decoder_threads": cfg.decoder_threads,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
