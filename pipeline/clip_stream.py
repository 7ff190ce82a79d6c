"""One rank's stream of training samples from shards (ClipStream, a torch IterableDataset;
pipeline/loader.py batches it and documents the two modes).

Per (rank, DataLoader worker) the stream is a `wds.DataPipeline`: shard source (the two
modes) -> the tar reader (pipeline/shard_reader.py: WebDataset's key grouping, every member's
size capped before it is read) -> `wds.shuffle` over `shuffle_buffer`
still-compressed clips (cheap) -> decode + frame selection per stage and random crop
(pipeline/samples.py) -> `wds.shuffle` of the samples drawn from one clip. The shard source is
ours rather than `wds.ResampledShards`/`split_by_node`: it weights shards by their sample
counts and splits an epoch by samples, not shards, which is what makes batch counts equal.
`samples_per_clip` = k draws k training samples from each decoded clip (resampled mode),
dividing shard reads and decodes per sample by k (bench/loader.py: k = 4 keeps one GPU's
feed under 100 MB/s and 4 CPUs).

Bad data never ends a stream; it is skipped, counted in `loader.stats` (shared across
DataLoader workers; counts are of reads, so a resampled stream counts a bad shard or sample
each time it draws it) and warned about once per kind and process, with the shard and key:
- `corrupt_shards`: an unreadable tar (pipeline/shard_reader.py: also a clip without its json,
  duplicate members, a huge tar header, zstd) or one with fewer samples than the manifest says;
- per sample, from pipeline/records.py (for a run, per frame as a sample decodes it: a
  damaged frame skips the samples that use it, not the run): `bad_samples` (a member over
  its cap, a record that is not JSON or not the schema, a clip header declaring another
  size than the manifest's layout or too large a clip: refused before anything is
  allocated; and any other exception while decoding or sampling one clip),
  `unverified_samples` (no `clip_sha256`: read only with `loader.allow_unverified_clips`),
  `corrupt_samples` (undecodable, or bytes that differ from `clip_sha256`),
  `unusable_samples` (no frame selection for the stage).
A resampled stream that skips MAX_SKIPPED_IN_A_ROW samples in a row raises: its data serves
nothing (an epoch ends, and the loader pads it).

Poisoned samples and restarts (Ray Train re-runs the training loop after a failure, from
the last checkpoint): the stream stays a pure function of (seed, rank, start_step, worker),
so a restart from the checkpoint the failed attempt started from redraws its stream, bad
samples included, at the same steps. That is safe because no sample can end the stream any
more: every exception while opening or sampling one sample is caught and the sample
skipped, and the sizes a tar member, a record and a clip header declare are checked before
anything is allocated, so the failure Python cannot catch (the OOM killer, after a huge
allocation succeeded) does not happen either; only bytes whose sha256 ingest recorded reach
a decoder (unless `loader.allow_unverified_clips`). Within one stream a refused sample is
remembered by (shard, key) and skipped on later draws without being hashed or decoded
again. Nothing is kept across processes on purpose: a skip list on a node's disk, or a seed
mixed with a restart's pid or clock, would make a resumed stream depend on where and when
it ran, and the same (seed, start_step) would no longer give the same data.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import multiprocessing
import random
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from model.colour import normalise_lab
from pipeline.codec import ClipDecodeError
from pipeline.config import LoaderConfig
from pipeline.manifest import ShardSet
from pipeline.records import UNVERIFIED, BadSample, open_sample
from pipeline.samples import LONG_TERM_GAP, UnusableClip, make_sample
from pipeline.shard_reader import SHARD_ERRORS, RawSample, iter_samples, member_cap

log = logging.getLogger("pipeline.loader")  # one logger for the loader's warnings

COUNTERS = ("samples", "corrupt_shards", "corrupt_samples", "unusable_samples", "bad_samples",
            "unverified_samples", "padded")  # fmt: skip
MAX_SKIPPED_IN_A_ROW = 1000  # a resampled stream skipping this many gives up (raises)


class Skip(NamedTuple):
    """Why one sample is skipped: `kind` (warned once per process), the counter it moves."""

    kind: str
    counter: str
    reason: str


def _frame_skip(e: BadSample | ClipDecodeError) -> Skip:
    """Why a sample drawn from a run is skipped: a frame it uses failed its checks (the
    run's other frames still serve other samples)."""
    if isinstance(e, BadSample):
        return Skip(e.kind, "bad_samples", str(e))
    return Skip("corrupt clip", "corrupt_samples", str(e))


class ClipStream(IterableDataset):
    """Training samples from shards; see pipeline/loader.py for the two modes."""

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
        self.layout, self.member_cap = shards.layout, member_cap(shards.layout)
        self._warned: set[str] = set()  # kinds of bad sample warned about in this process
        self._expected = dict(zip(self.urls, self.counts)) if self.counts else {}
        ctx = multiprocessing.get_context()
        self.counters = {name: ctx.Value("q", 0) for name in COUNTERS}
        self.plan = None if self.resampled else self._epoch_plan()

    # -- bookkeeping ------------------------------------------------------------------------
    def count(self, name: str, n: int = 1) -> None:
        with self.counters[name].get_lock():
            self.counters[name].value += n

    def _skip(self, skip: Skip, url: str, key: str) -> None:
        self.count(skip.counter)
        if skip.kind in self._warned:
            log.debug("%s: sample %s of %s skipped: %s", skip.kind, key, url, skip.reason)
            return
        self._warned.add(skip.kind)
        log.warning(
            "%s: sample %s of %s skipped: %s (counted in loader.stats[%r]; further samples of "
            "this kind are counted without a warning)",
            skip.kind, key, url, skip.reason, skip.counter,
        )  # fmt: skip

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
                    counts.append(sum(1 for _ in iter_samples(url, self.member_cap)))
                except SHARD_ERRORS as e:
                    log.warning("corrupt shard %s skipped in the epoch plan: %s", url, e)
                    counts.append(0)
        total = sum(counts)
        per_rank = -(-total // self.world_size)
        # Ranges differ by at most one sample; a short one is padded with the samples after
        # it (wrapping around), also when fewer samples than ranks leave it empty.
        lo = self.rank * total // self.world_size
        self.epoch_samples = per_rank
        if not total:
            return []
        # Vectorised: one searchsorted over the rank's samples, not a call per sample (a
        # rank of a million-sample epoch made its plan in seconds).
        mine = np.arange(lo, lo + per_rank, dtype=np.int64) % total
        starts = np.cumsum([0, *counts])
        shard = np.searchsorted(starts, mine, side="right") - 1
        pos = mine - starts[shard]
        order = np.lexsort((pos, shard))  # by shard, then position
        shard, pos = shard[order], pos[order]
        cuts = np.flatnonzero(np.diff(shard)) + 1
        return [(self.urls[int(s[0])], p.tolist())
                for s, p in zip(np.split(shard, cuts), np.split(pos, cuts))]  # fmt: skip

    # -- iteration --------------------------------------------------------------------------
    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _samples(self, url: str, positions: list[int] | None) -> Iterator[tuple[str, RawSample]]:
        # Counter, not list.count per position: that was quadratic in a shard's samples.
        wanted = None if positions is None else collections.Counter(positions)
        expected = self._expected.get(url)
        read = 0
        try:
            for pos, sample in enumerate(iter_samples(url, self.member_cap)):
                read = pos + 1
                if wanted is not None and pos not in wanted:
                    continue
                for _ in range(1 if wanted is None else wanted[pos]):
                    yield url, sample  # still compressed: cheap to buffer
        except SHARD_ERRORS as e:
            self.count("corrupt_shards")
            log.warning("corrupt shard %s skipped (%s: %s)", url, type(e).__name__, e)
            return
        # tarfile ends a stream quietly at a garbled header: compare with the manifest.
        if expected is not None and read < expected:
            self.count("corrupt_shards")
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

    def epoch_pieces(self, worker: int, workers: int) -> list[tuple[str, list[int]]]:
        """The (shard URL, sample positions) pieces of this rank's epoch plan that DataLoader
        worker `worker` of `workers` reads (bench/scale.py checks their coverage)."""
        return self.plan[worker::workers]

    def _raw(self, rng: random.Random) -> Iterator[tuple[str, RawSample]]:
        worker, workers = self._worker()
        if not self.resampled:
            pieces = self.epoch_pieces(worker, workers)
            rng.shuffle(pieces)
            for url, positions in pieces:
                yield from self._samples(url, positions)
            return
        # Cumulative weights once: `choices(weights=...)` sums them at every draw, O(shards).
        cum_weights = list(itertools.accumulate(self.counts or [1] * len(self.urls)))
        misses = 0
        while True:
            url = rng.choices(self.urls, cum_weights=cum_weights)[0]
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

    def _open(self, sample: RawSample) -> tuple[list[int], np.ndarray] | Skip:
        """(frame_indices, clip (T, 3, H, W)) of a sample, or why it is skipped."""
        try:
            return open_sample(sample, self.layout, self.cfg.allow_unverified_clips)
        except BadSample as e:
            return Skip(e.kind, "unverified_samples" if e.kind == UNVERIFIED else "bad_samples",
                        str(e))  # fmt: skip
        except ClipDecodeError as e:
            return Skip("corrupt clip", "corrupt_samples", str(e))
        except Exception as e:  # one sample's task boundary: recorded and skipped, never fatal
            return Skip(f"{type(e).__name__} while decoding", "bad_samples", repr(e))

    def _decoded(
        self, items: Iterator[tuple[str, RawSample]], nprng: np.random.Generator, per_clip: int
    ) -> Iterator[dict[str, Any]]:
        skipped = 0  # samples skipped in a row
        refused: dict[tuple[str, str], Skip] = {}  # (url, key): drawn again, not decoded again
        for url, sample in items:
            where = (url, sample.key)
            opened = refused[where] if where in refused else self._open(sample)
            if isinstance(opened, Skip):
                refused[where] = opened
                self._skip(opened, url, sample.key)
                skipped += 1
                self._give_up_after(skipped)
                continue
            frame_indices, lab = opened
            for _ in range(per_clip):
                try:
                    frames, gaps = make_sample(
                        lab, frame_indices, self.cfg, nprng, self.long_term_gap
                    )
                except UnusableClip as e:
                    self.count("unusable_samples")
                    skipped += 1
                    self._give_up_after(skipped, e)
                    break
                except (BadSample, ClipDecodeError) as e:  # a run's frame, checked when used
                    self._skip(_frame_skip(e), url, sample.key)
                    skipped += 1
                    self._give_up_after(skipped)
                    break
                except Exception as e:  # sampling one clip: recorded and skipped, never fatal
                    self._skip(Skip(f"{type(e).__name__} while sampling", "bad_samples",
                                    repr(e)), url, sample.key)  # fmt: skip
                    skipped += 1
                    self._give_up_after(skipped)
                    break
                skipped = 0
                self.count("samples")
                clip = torch.from_numpy(frames)
                float_lab = clip.dtype != torch.uint8  # float16 Lab units: normalise here
                yield {
                    "frames": normalise_lab(clip) if self.cfg.normalise or float_lab else clip,
                    "gaps": torch.from_numpy(gaps),
                    "key": sample.key,
                }

    def _give_up_after(self, skipped: int, unusable: UnusableClip | None = None) -> None:
        """A resampled stream never ends by itself: raise once it has skipped
        MAX_SKIPPED_IN_A_ROW samples in a row (an epoch ends and pads instead)."""
        if skipped < MAX_SKIPPED_IN_A_ROW or not self.resampled:
            return
        if unusable is not None:
            raise UnusableClip(str(unusable))
        raise RuntimeError(
            f"{skipped} samples in a row skipped as bad data (see the warnings above): "
            f"loader.stats = {self.stats}"
        )
