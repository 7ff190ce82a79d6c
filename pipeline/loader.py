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

Per (rank, DataLoader worker) the stream is a `wds.DataPipeline`: shard source (above) ->
WebDataset's tar reader and key grouping -> `wds.shuffle` over `shuffle_buffer`
still-compressed clips (cheap) -> decode + frame selection per stage and random crop
(pipeline/samples.py) -> `wds.shuffle` of the samples drawn from one clip. The shard source is
ours rather than `wds.ResampledShards`/`split_by_node`: it weights shards by their sample
counts and splits an epoch by samples, not shards, which is what makes batch counts equal.
`samples_per_clip` = k draws k training samples from each decoded clip (resampled mode),
dividing shard reads and decodes per sample by k (bench/loader.py: k = 4 keeps one GPU's
feed under 100 MB/s and 4 CPUs).

Corrupt shards (unreadable tar, duplicate members, or fewer samples than the manifest says)
and corrupt clips (undecodable, or bytes that differ from the record's `clip_sha256`) are
skipped with a warning and counted in `loader.stats` (shared across DataLoader workers;
`corrupt_shards` counts reads, so a resampled stream counts a bad shard each time it draws
it); the epoch loader pads the batches that corrupt data leaves short, from other shards when
a rank's whole share is unreadable, so the batch count stays equal on every rank. A manifest
whose clip layout cannot serve the stage is refused when the loader is made.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import multiprocessing
import random
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import storage
from model.colour import normalise_lab
from pipeline.codec import CLIP_EXTENSIONS, ClipDecodeError, decode_clip
from pipeline.config import LoaderConfig
from pipeline.manifest import ClipLayout, ShardSet, ShardSource, resolve_shards
from pipeline.samples import LONG_TERM_GAP, UnusableClip, make_sample, select_frames

log = logging.getLogger(__name__)

COUNTERS = ("samples", "corrupt_shards", "corrupt_samples", "unusable_samples", "padded")
# What reading a broken shard raises: tarfile and I/O errors, a truncated stream, a clip
# without its json (ClipDecodeError), duplicate members (WebDataset's group_by_keys).
SHARD_ERRORS = (tarfile.TarError, OSError, ClipDecodeError, EOFError, ValueError)


def check_layout(
    layout: ClipLayout, cfg: LoaderConfig, source: str, long_term_gap: int = LONG_TERM_GAP
) -> None:
    """Raise UnusableClip, naming the fix, when the clips (frame offsets, size, from the
    manifest) cannot serve `cfg.stage`: otherwise every sample would be skipped one by one (an
    epoch of nothing, or a rank without batches while the others train)."""
    offsets, size = layout.frame_offsets, layout.size
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


def iter_shard(url: str) -> Iterator[tuple[str, dict[str, Any], str, bytes]]:
    """(key, record, clip extension, clip bytes) per sample; raises on a corrupt tar.

    WebDataset's own tar reader and grouping (`tar_file_expander`, `group_by_keys`: key =
    member name up to the first dot) over an fsspec stream, so s3://, gs://, ... work."""
    fs, path = storage.get_fs(url)
    with fs.open(path, "rb") as f:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": f}], eof_value=None)
        for sample in wds.tariterators.group_by_keys(files):
            yield _complete(sample)


def _complete(sample: dict[str, Any]) -> tuple[str, dict[str, Any], str, bytes]:
    key = sample["__key__"]
    ext = next((e for e in CLIP_EXTENSIONS if e in sample), None)
    if ext is None or "json" not in sample:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise ClipDecodeError(f"sample {key} lacks a clip or its json ({members})")
    return key, json.loads(sample["json"]), ext, sample[ext]


class ClipStream(IterableDataset):
    """Training samples from shards; see the module docstring for the two modes."""

    def __init__(
        self,
        shards: ShardSet,
        cfg: LoaderConfig,
        *,
        rank: int,
        world_size: int,
        seed: int,
        start_step: int,
        long_term_gap: int = LONG_TERM_GAP,
    ) -> None:
        if not shards.urls:
            raise ValueError(f"the loader source ({shards.name}) names no shards")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.urls, self.counts, self.cfg = list(shards.urls), shards.samples_per_shard, cfg
        self.rank, self.world_size, self.seed, self.start_step = rank, world_size, seed, start_step
        self.resampled, self.long_term_gap = cfg.resampled, long_term_gap
        self._expected = dict(zip(self.urls, self.counts)) if self.counts else {}
        ctx = multiprocessing.get_context()
        self.counters = {name: ctx.Value("q", 0) for name in COUNTERS}
        self.plan = None if self.resampled else self._epoch_plan()

    # -- bookkeeping ------------------------------------------------------------------------
    def _count(self, name: str, n: int = 1) -> None:
        with self.counters[name].get_lock():
            self.counters[name].value += n

    @property
    def stats(self) -> dict[str, int]:
        return {name: int(v.value) for name, v in self.counters.items()}

    def _epoch_plan(self) -> list[tuple[str, list[int]]]:
        """This rank's (shard URL, sample positions) pieces, padding included."""
        counts = self.counts
        if counts is None:  # no manifest: count by reading (slow for big corpora)
            counts = []
            for url in self.urls:
                try:
                    counts.append(sum(1 for _ in iter_shard(url)))
                except SHARD_ERRORS as e:
                    log.warning("corrupt shard %s skipped in the epoch plan: %s", url, e)
                    counts.append(0)
        total = sum(counts)
        per_rank = -(-total // self.world_size)
        # Ranges differ by at most one sample; a short one is padded with the samples after
        # it (wrapping around), also when fewer samples than ranks leave it empty.
        lo = self.rank * total // self.world_size
        mine = [g % total for g in range(lo, lo + per_rank)] if total else []
        starts = np.cumsum([0, *counts])
        pieces: dict[int, list[int]] = {}
        for g in mine:
            s = int(np.searchsorted(starts, g, side="right") - 1)
            pieces.setdefault(s, []).append(g - int(starts[s]))
        self.epoch_samples = per_rank
        return [(self.urls[s], sorted(p)) for s, p in sorted(pieces.items())]

    # -- iteration --------------------------------------------------------------------------
    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _samples(
        self, url: str, positions: list[int] | None
    ) -> Iterator[tuple[str, Any, str, bytes]]:
        wanted = None if positions is None else {p: positions.count(p) for p in set(positions)}
        expected = self._expected.get(url)
        read = 0
        try:
            for pos, (key, record, ext, data) in enumerate(iter_shard(url)):
                read = pos + 1
                if wanted is not None and pos not in wanted:
                    continue
                for _ in range(1 if wanted is None else wanted[pos]):
                    yield key, record, ext, data  # still compressed: cheap to buffer
        except SHARD_ERRORS as e:
            self._count("corrupt_shards")
            log.warning("corrupt shard %s skipped (%s: %s)", url, type(e).__name__, e)
            return
        # tarfile ends a stream quietly at a garbled header: compare with the manifest.
        if expected is not None and read < expected:
            self._count("corrupt_shards")
            log.warning("corrupt shard %s: ended after %d of %d samples", url, read, expected)

    def spare_samples(self, n: int) -> list[dict[str, Any]]:
        """Up to `n` samples from any shard, for a rank whose own share gave none: it must
        still yield its batches, or DDP hangs. Raises if no shard gives one."""
        spare: list[dict[str, Any]] = []
        nprng = np.random.default_rng([self.seed, self.rank, self.start_step])
        for url in self.urls:
            for sample in self._decoded(self._samples(url, None), nprng, per_clip=1):
                spare.append(sample)
                if len(spare) == n:
                    return spare
        if not spare:
            raise RuntimeError(
                f"no usable sample in any of {len(self.urls)} shards for stage "
                f"{self.cfg.stage!r} (see the warnings above); check the shards and the stage"
            )
        return spare

    def _raw(self, rng: random.Random) -> Iterator[tuple[str, Any, str, bytes]]:
        worker, workers = self._worker()
        if not self.resampled:
            pieces = self.plan[worker::workers]
            rng.shuffle(pieces)
            for url, positions in pieces:
                yield from self._samples(url, positions)
            return
        weights = self.counts or [1] * len(self.urls)
        misses = 0
        while True:
            url = rng.choices(self.urls, weights=weights)[0]
            got = 0
            for item in self._samples(url, None):
                got += 1
                yield item
            misses = 0 if got else misses + 1
            if misses > 10 * len(self.urls):
                raise RuntimeError(f"no sample could be read from {len(self.urls)} shards")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, _ = self._worker()
        tag = f"{self.seed}-{self.rank}-{self.start_step}-{worker}"
        rng = random.Random(tag)
        nprng = np.random.default_rng(list(tag.encode()))
        per_clip = self.cfg.samples_per_clip if self.resampled else 1
        buffer = self.cfg.shuffle_buffer
        pipeline = wds.DataPipeline(
            lambda: self._raw(rng),  # shards (resampled or this rank's epoch plan), read by wds
            wds.shuffle(buffer, initial=buffer, rng=rng),  # still-compressed clips: cheap
            functools.partial(self._decoded, nprng=nprng, per_clip=per_clip),
            # spread one clip's samples over several batches
            wds.shuffle(4 * per_clip, initial=4 * per_clip, rng=rng) if per_clip > 1 else None,
        )
        return iter(pipeline)

    def _decoded(
        self, items: Iterator[Any], nprng: np.random.Generator, per_clip: int
    ) -> Iterator[dict[str, Any]]:
        unusable = 0
        for key, record, ext, data in items:
            try:
                # JPEG decoders accept damaged data (libjpeg only warns on stderr): the
                # checksum ingest records (shards written since clip_sha256 exists) catches it.
                expected = record.get("clip_sha256")
                if expected and hashlib.sha256(data).hexdigest() != expected:
                    raise ClipDecodeError(f"{ext} bytes do not match the clip_sha256 recorded")
                lab = decode_clip(ext, data, len(record["frame_indices"]))
            except ClipDecodeError as e:
                self._count("corrupt_samples")
                log.warning("corrupt clip %s skipped: %s", key, e)
                continue
            for _ in range(per_clip):
                try:
                    frames, gaps = make_sample(
                        lab, record["frame_indices"], self.cfg, nprng, self.long_term_gap
                    )
                except UnusableClip as e:
                    self._count("unusable_samples")
                    unusable += 1
                    if unusable >= 1000 and self.resampled:
                        raise UnusableClip(str(e)) from None
                    break
                unusable = 0
                self._count("samples")
                clip = torch.from_numpy(frames)
                float_lab = clip.dtype != torch.uint8  # float16 Lab units: normalise here
                yield {
                    "frames": normalise_lab(clip) if self.cfg.normalise or float_lab else clip,
                    "gaps": torch.from_numpy(gaps),
                    "key": key,
                }


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
            self.stream._count("padded", remaining)
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
