"""Frames each training stage can use, and bytes per source frame: the per-stage clip layouts
(configs/ingest/{pretrain,main,dynamic}.yaml, one ingest per stage) against one ingest of
runs (configs/ingest/default.yaml), on the same corpus.

    python -m bench.layouts [--input SRC] [size=[256,256] ...]

SRC: anything jobs.ingest reads (default: the three sample videos). Each config is ingested
by the shard worker (no Ray). A source frame is "used" by a stage when some sample the loader
can draw for that stage (pipeline/samples.py, 2,000 draws per distinct clip or run layout)
holds it, as target or reference. Bytes per source frame: the shard bytes over every frame
of the corpus. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bench.loader import make_shards, sample_videos
from pipeline.config import STAGES, IngestConfig, LoaderConfig
from pipeline.manifest import read_manifest
from pipeline.reader import list_videos
from pipeline.samples import UnusableClip, select_frames
from pipeline.shard_reader import iter_shard
from typedconfig import load_config

CONFIGS = {"pretrain": "pretrain", "main": "main", "dynamic": "dynamic", "runs": "default"}
DRAWS = 2000


@functools.cache
def usable(offsets: tuple[int, ...], stage: str) -> frozenset[int]:
    """Offsets (from a clip's first frame) that some sample of `stage` holds."""
    rng = np.random.default_rng(0)
    cfg = LoaderConfig(stage=stage)
    used: set[int] = set()
    try:
        for _ in range(DRAWS):
            order, _ = select_frames(list(offsets), cfg, rng)
            used.update(offsets[i] for i in order)
    except UnusableClip:
        pass
    return frozenset(used)


def figures(
    manifest: Path,
) -> tuple[dict[str, set[tuple[str, int]]], dict[str, int], int, int]:
    """({stage: (video, frame) used}, {video: source frames}, shard bytes, frames stored) of
    a shard set."""
    meta = read_manifest(str(manifest))
    used: dict[str, set[tuple[str, int]]] = {s: set() for s in STAGES}
    frames: dict[str, int] = {}
    for url in meta.shard_set(str(manifest)).urls:
        for _, record, _, _ in iter_shard(url):
            idx = record["frame_indices"]
            frames[record["source"]] = record["num_source_frames"]
            rel = tuple(i - idx[0] for i in idx)
            for stage in STAGES:
                used[stage].update((record["source"], idx[0] + o) for o in usable(rel, stage))
    return used, frames, meta.bytes, meta.num_frames


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default="", help="SRC (default: the sample videos)")
    parser.add_argument("overrides", nargs="*", help="key=value for every config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench_layouts_"))
    result: dict = {}
    try:
        cfgs = {name: load_config(IngestConfig, f"configs/ingest/{file}.yaml", args.overrides)
                for name, file in CONFIGS.items()}  # fmt: skip
        videos = list_videos(args.input, cfgs["runs"].extensions) if args.input else None
        videos = videos or sample_videos()
        measured = {name: figures(make_shards(tmp / name, cfg, videos))
                    for name, cfg in cfgs.items()}  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    source: dict[str, int] = {}
    for _, frames, _, _ in measured.values():
        for video, n in frames.items():
            source[video] = max(n, source.get(video, 0))
    total = sum(source.values())
    result.update(videos=len(videos), source_frames=total)
    for name, (used, _, size, stored) in measured.items():
        result[f"{name}_bytes_per_source_frame"] = round(size / total)
        result[f"{name}_bytes_per_stored_frame"] = round(size / stored) if stored else None
        for stage in STAGES:
            result[f"{name}_{stage}_frames_used"] = round(len(used[stage]) / total, 3)
    # Before: each stage trains on its own ingest; after: every stage on the runs.
    result["before_bytes_per_source_frame_all_stages"] = sum(
        result[f"{s}_bytes_per_source_frame"] for s in STAGES
    )
    for stage in STAGES:
        result[f"before_{stage}_frames_used"] = result[f"{stage}_{stage}_frames_used"]
        result[f"after_{stage}_frames_used"] = result[f"runs_{stage}_frames_used"]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
