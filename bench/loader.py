"""Loader throughput per CPU against what a pairwise training step consumes, plus the shard
format's cost: bytes per stored frame and clip decode speed per codec.

    python -m bench.loader [--batches 12] [--train-steps 2]

Shards: the sample videos (bikes, carphone, bigbuckbunny) ingested with the default
config, configs/ingest/default.yaml (256x256, runs of up to 48 consecutive frames, each frame
coded alone, JPEG q95), by the shard worker; and, for the figures before runs, with
configs/ingest/pretrain.yaml (9-frame clips, one image per clip).
- loader: `make_train_loader` in the pretrain stage, batch 12, crop 256, in-process
  (num_workers=0), one torch and one OpenCV thread: clips per CPU-second (process CPU
  time; wall clock too). Also with samples_per_clip=4 (four pairs per read run), and on the
  pretrain-layout shards (`*_pretrain_layout`).
- storage: bytes per SOURCE frame (every frame of the corpus, stored or not) of both shard
  sets: a run stores every frame once, the pretrain layout all but a video's last < 9.
- training: `bench.train_step.measure_train_step(size=256, batch=4)` when it exists, else a
  forward + backward of `model.MAST()` on a (4, 2, 3, 256, 256) batch: clips/s.
- codec: bytes per frame and decode frames per CPU-second (one thread) for jpeg, png and raw
  runs (the carphone video), frame by frame as the loader decodes them.
- GPU budget (MAST_NOTES "Scale targets": ~1,100 pairs/s per H100): MB/s of shard reads and
  loader CPUs per GPU, for samples_per_clip 1 and 4 (a sample reads its whole run).
Last line: one JSON object; key loader_vs_train_ratio (target >= 5).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import torch

from pipeline.config import IngestConfig, LoaderConfig
from pipeline.loader import make_train_loader
from pipeline.manifest import MANIFEST, build_manifest, read_manifest
from pipeline.records import open_sample
from pipeline.shard_reader import iter_samples
from pipeline.sharding import assign
from pipeline.worker import process_shard
from storage import sample_video_dir
from typedconfig import load_config, replace, to_dict

GPU_PAIRS_PER_S = 1100.0


def sample_videos() -> list[str]:
    data = sample_video_dir()
    return [str(data / f"{n}.mp4") for n in ("bikes", "carphone_pristine", "bigbuckbunny")]


def make_shards(dst: Path, cfg: IngestConfig, videos: list[str]) -> Path:
    dst.mkdir(parents=True)
    specs = assign(videos, str(dst), 1)
    stats = {s.index: process_shard(s, to_dict(cfg)) for s in specs}
    build_manifest(specs, stats, {}, cfg).write(str(dst))
    return dst / MANIFEST


def codec_figures(manifest: Path) -> tuple[float, float]:
    """(bytes per frame, decode frames/s) over every frame of the shards' runs."""
    meta = read_manifest(str(manifest))
    runs = [open_sample(sample, meta.layout)[1]
            for url in meta.shard_set(str(manifest)).urls
            for sample in iter_samples(url)]  # fmt: skip
    start = time.process_time()  # CPU time: robust to other load on the machine
    for run in runs:
        run.take(list(range(len(run.frame_bytes))))
    frames = sum(run.decoded for run in runs)
    return meta.bytes / meta.num_frames, frames / (time.process_time() - start)


def source_frames(videos: list[str]) -> int:
    """Frames of the corpus (decord's count, as ingest records it)."""
    import decord

    return sum(len(decord.VideoReader(v)) for v in videos)


def loader_rate(manifest: Path, batches: int, per_clip: int) -> tuple[float, float]:
    """(clips/s wall clock, clips per CPU-second of this process) of the in-process loader."""
    cfg = LoaderConfig(stage="pretrain", batch_size=12, num_workers=0, crop_size=256,
                       shuffle_buffer=64, samples_per_clip=per_clip)  # fmt: skip
    loader = iter(make_train_loader(str(manifest), cfg, rank=0, world_size=1, seed=0))
    for _ in range(2):  # fill the shuffle buffer
        next(loader)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
        batch = next(loader)
    assert batch["frames"].shape == (12, 2, 3, 256, 256)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return batches * 12 / wall, batches * 12 / cpu


def train_rate(steps: int) -> tuple[float, str]:
    try:
        from bench.train_step import measure_train_step
    except ImportError:
        measure_train_step = None
    if measure_train_step is not None:
        return float(measure_train_step(size=256, batch=4)["clips_per_s"]), "bench.train_step"
    from model import MAST

    torch.set_num_threads(2)  # the trainer gets the whole (2-core) machine
    model = MAST()
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    frames = torch.randint(0, 256, (4, 2, 3, 256, 256), dtype=torch.uint8)
    gaps = torch.tensor([[2], [5], [8], [2]])

    def step() -> None:
        optim.zero_grad(set_to_none=True)
        model(frames, gaps).loss.backward()
        optim.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * 4 / (time.perf_counter() - start), "MAST forward+backward (4, 2, 3, 256, 256)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=12, help="timed loader batches")
    parser.add_argument("--train-steps", type=int, default=2, help="timed training steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(IngestConfig, "configs/ingest/default.yaml")
    before = load_config(IngestConfig, "configs/ingest/pretrain.yaml")
    tmp = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    result: dict = {}
    try:
        videos = sample_videos()
        manifest = make_shards(tmp / "jpeg", cfg, videos)
        pretrain = make_shards(tmp / "pretrain", before, videos)
        torch.set_num_threads(1)
        cv2.setNumThreads(1)
        for storage in ("jpeg", "png", "raw"):
            m = make_shards(tmp / f"codec_{storage}", replace(cfg, storage=storage), videos[1:2])
            bpf, fps = codec_figures(m)
            result[f"bytes_per_frame_{storage}"] = round(bpf)
            result[f"decode_fps_{storage}"] = round(fps)
        meta, old = read_manifest(str(manifest)), read_manifest(str(pretrain))
        source = source_frames(videos)
        wall1, loader1 = loader_rate(manifest, args.batches, 1)
        _, loader4 = loader_rate(manifest, args.batches, 4)
        _, loader1_old = loader_rate(pretrain, args.batches, 1)
        train, how = train_rate(args.train_steps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    clip_bytes = meta.bytes / meta.num_samples  # what one sample reads: its whole run
    result.update(
        {
            "source_frames": source,
            "stored_frames": meta.num_frames,
            "stored_frames_pretrain_layout": old.num_frames,
            "bytes_per_source_frame": round(meta.bytes / source),
            "bytes_per_source_frame_pretrain_layout": round(old.bytes / source),
            "loader_clips_per_cpu_s_pretrain_layout": round(loader1_old, 1),
            # Per CPU-second: process CPU time, one torch and one OpenCV thread (robust to
            # other load on the machine); wall clock alongside.
            "loader_clips_per_cpu_s": round(loader1, 1),
            "loader_clips_per_cpu_s_4_per_clip": round(loader4, 1),
            "loader_clips_per_s_wall": round(wall1, 1),
            "train_clips_per_s": round(train, 3),
            "train_measured_with": how,
            "loader_vs_train_ratio": round(loader1 / train, 1),
            "stored_frames_per_clip": round(meta.num_frames / meta.num_samples, 1),
            "read_mb_per_sample": round(clip_bytes / 1e6, 3),
            "read_mb_per_sample_pretrain_layout": round(old.bytes / old.num_samples / 1e6, 3),
            "gpu_pairs_per_s": GPU_PAIRS_PER_S,
            "gpu_read_mb_per_s": round(GPU_PAIRS_PER_S * clip_bytes / 1e6, 1),
            "gpu_read_mb_per_s_4_per_clip": round(GPU_PAIRS_PER_S * clip_bytes / 4 / 1e6, 1),
            # A sample reads its whole run: k >= 16 keeps one GPU's reads near 100 MB/s.
            "gpu_read_mb_per_s_16_per_clip": round(GPU_PAIRS_PER_S * clip_bytes / 16 / 1e6, 1),
            "gpu_loader_cpus": round(GPU_PAIRS_PER_S / loader1, 1),
            "gpu_loader_cpus_4_per_clip": round(GPU_PAIRS_PER_S / loader4, 1),
        }
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
