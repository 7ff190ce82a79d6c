"""Training loader over ingest shards (WebDataset tars of stored-Lab clips).

    loader = make_train_loader("s3://b/shards/manifest.json", cfg, rank=r, world_size=w, seed=0)
    for step, batch in zip(range(num_steps), loader): ...

The source: a ShardSet (pipeline/manifest.py; jobs.train resolves one in the driver), a
manifest's path or URL, a brace pattern ("shard-{000000..000009}.tar"), or shard URLs.

Batches: {"frames": uint8 (B, K, 3, crop, crop) stored Lab, references first, target last;
          "gaps": int64 (B, K-1) source frames from each reference to the target;
          "keys": list[str] sample keys}. By default the model normalises on its device
(model.colour.normalise_lab): uint8 keeps worker->trainer transfers 4x smaller than float.
`loader.normalise: true` yields float32 normalised Lab (L -> (L - 50) / 50, a, b -> / 127)
instead; the model accepts either. Clips ingested with `dtype: float16` (unquantised Lab) are
always yielded that way, float32 normalised: only uint8 frames are left to the model.

Two modes:
- `make_train_loader` (resampled): every (rank, DataLoader worker) draws shards with
  replacement, weighted by their sample counts, forever; the stream is infinite on every
  rank, so every rank yields the same number of batches by construction (training takes
  exactly N steps; no DDP hang on uneven shards). Seeded by (seed, rank, start_step, worker)
  so a resumed run continues with fresh data.
- `make_epoch_loader` (not resampled): the manifest's samples are split into `world_size`
  contiguous ranges differing by at most one; shorter ranges are padded with the samples
  that follow them (wrapping around), so every rank yields ceil(N / world_size) samples in
  ceil(that / B) batches, and the ranks together see every sample at least once.

Per (rank, DataLoader worker) the samples come from a ClipStream (pipeline/clip_stream.py:
the reading, decoding and frame selection, and how bad data is skipped and counted in
`loader.stats`); batches are made here. The epoch loader pads the batches bad data leaves
short, from other shards when a rank's whole share is unreadable, so the batch count stays
equal on every rank. A manifest whose clip layout cannot serve the stage is refused when the
loader is made.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from model.colour import normalise_lab
from pipeline.clip_stream import ClipStream
from pipeline.config import LoaderConfig
from pipeline.manifest import ClipLayout, ShardSource, resolve_shards
from pipeline.samples import LONG_TERM_GAP, UnusableClip, select_frames
from pipeline.shard_reader import iter_shard

# iter_shard lives in pipeline/shard_reader.py; tools and tests have read shards from here.
__all__ = ["ClipStream", "TrainLoader", "check_layout", "collate", "iter_shard",
           "make_epoch_loader", "make_train_loader"]  # fmt: skip
log = logging.getLogger(__name__)


def check_layout(
    layout: ClipLayout, cfg: LoaderConfig, source: str, long_term_gap: int = LONG_TERM_GAP
) -> None:
    """Raise UnusableClip, naming the fix, when the clips (frame offsets, size, from the
    manifest) cannot serve `cfg.stage`: otherwise every sample would be skipped one by one (an
    epoch of nothing, or a rank without batches while the others train)."""
    offsets, size = layout.frame_offsets, layout.size
    if not offsets and layout.run_len:  # runs: the longest serves every stage it can
        offsets = tuple(range(layout.run_len))
    try:
        if offsets:
            select_frames(list(offsets), cfg, np.random.default_rng(0), long_term_gap)
        if size and cfg.crop_size and min(size) < cfg.crop_size:
            raise UnusableClip(
                f"stored clips are {size[0]}x{size[1]}, smaller than loader.crop_size="
                f"{cfg.crop_size}; lower crop_size or ingest with a larger size"
            )
    except UnusableClip as e:
        raise UnusableClip(f"{source} cannot serve stage {cfg.stage!r}: {e}") from None


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    frames = [s["frames"] for s in samples]
    if len({f.dtype for f in frames}) > 1:  # uint8 and float16 shard sets mixed: normalise all
        frames = [normalise_lab(f) if f.dtype == torch.uint8 else f for f in frames]
    return {
        "frames": torch.stack(frames),  # (B, K, 3, h, w) uint8, or float32 normalised
        "gaps": torch.stack([s["gaps"] for s in samples]),  # (B, K-1) int64
        "keys": [s["key"] for s in samples],
    }


class TrainLoader:
    """An iterable of batches with `stats` (counts of samples and skipped data)."""

    def __init__(self, stream: ClipStream, cfg: LoaderConfig) -> None:
        self.stream, self.cfg = stream, cfg
        workers = cfg.num_workers
        extra = {"prefetch_factor": cfg.prefetch_factor} if workers else {}
        self.loader = DataLoader(
            stream,
            batch_size=cfg.batch_size if stream.resampled else None,
            collate_fn=collate if stream.resampled else None,
            num_workers=workers,
            persistent_workers=False,
            **extra,
        )

    @property
    def stats(self) -> dict[str, int]:
        return self.stream.stats

    def __len__(self) -> int:
        if self.stream.resampled:
            raise TypeError("the resampled training loader is infinite; take N steps from it")
        return -(-self.stream.epoch_samples // self.cfg.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.stream.resampled:
            yield from self.loader
            return
        # Epoch mode: batch here, after the workers, so the batch count is exact on every rank.
        B, remaining = self.cfg.batch_size, self.stream.epoch_samples
        batch: list[dict[str, Any]] = []
        pool: list[dict[str, Any]] = []  # early samples, reused if corrupt data leaves a gap
        for sample in self.loader:
            if remaining == 0:
                break
            batch.append(sample)
            remaining -= 1
            if len(pool) < B:
                pool.append(sample)
            if len(batch) == B or remaining == 0:
                yield collate(batch)
                batch = []
        if remaining and not pool:  # all of this rank's share was corrupt or unusable
            pool = self.stream.spare_samples(B)
        if remaining:
            log.warning("epoch short by %d samples (corrupt data); padding with repeats", remaining)
            self.stream.count("padded", remaining)
            while remaining:
                batch.append(pool[remaining % len(pool)])
                remaining -= 1
                if len(batch) == B or remaining == 0:
                    yield collate(batch)
                    batch = []


def make_train_loader(
    source: ShardSource,
    cfg: LoaderConfig,
    *,
    rank: int,
    world_size: int,
    seed: int,
    start_step: int = 0,
    long_term_gap: int = LONG_TERM_GAP,
) -> TrainLoader:
    """Infinite resampled stream of training batches (module docstring); a manifest's clip
    layout is checked against the stage first. With `cfg.resampled = False` this is
    `make_epoch_loader` with epoch = start_step."""
    shards = resolve_shards(source)
    check_layout(shards.layout, cfg, shards.name, long_term_gap)
    stream = ClipStream(shards, cfg, rank=rank, world_size=world_size, seed=seed,
                        start_step=start_step, long_term_gap=long_term_gap)  # fmt: skip
    return TrainLoader(stream, cfg)


def make_epoch_loader(
    source: ShardSource,
    cfg: LoaderConfig,
    *,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int = 0,
    long_term_gap: int = LONG_TERM_GAP,
) -> TrainLoader:
    """Every sample once per epoch, equal batch counts on every rank (module docstring)."""
    return make_train_loader(
        source, dataclasses.replace(cfg, resampled=False), rank=rank, world_size=world_size,
        seed=seed, start_step=epoch, long_term_gap=long_term_gap,
    )  # fmt: skip
