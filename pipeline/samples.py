"""Per training stage: which frames of a stored clip become references and target.

A stored clip holds T frames at source-frame indices `frame_indices` (from its JSON record).
A training sample is (refs..., target) in chronological order with `gaps[i]` = source frames
from reference i to the target (the model's `gaps` input):

- pretrain: one reference. A gap g is drawn from `pair_gaps` with `pair_probs` (renormalised
  over the gaps this clip offers), then a (reference, target) pair with that gap uniformly.
  The reference code's recipe: gaps 2/5/8 with p = 0.4/0.4/0.2.
- main: a target and `num_short_refs` earlier frames at most `long_term_gap` back (the
  model's setting, model.long_term_gap: the loader is given it).
- dynamic: additionally `num_long_refs` earlier frames MORE than `long_term_gap` back (the
  model reads those through the dilated ROI localisation). Long-term references come first.
All frames are cropped with one random window of `crop_size` (the same for every frame, so
correspondences stay aligned).

Shapes: lab (T, 3, H, W) uint8 stored Lab -> frames (K, 3, crop, crop), gaps (K-1,).

A stored run (IngestConfig.run_len) is a clip of T consecutive frames with T up to hundreds:
selection costs O(T log T) (sorted indices, searchsorted; no (T, T) matrix), the target is
drawn uniformly among the frames that can be one, so every layout lands anywhere in the run,
and only the K selected frames are decoded (`Frames.take`).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from model import MASTConfig
from pipeline.config import LoaderConfig

# What is long-term is the model's setting (model.long_term_gap); the loader is told it.
LONG_TERM_GAP = MASTConfig.long_term_gap


class UnusableClip(ValueError):
    """The clip offers no frame selection for the stage (e.g. too short a span)."""


def _pair(idx: np.ndarray, cfg: LoaderConfig, rng: np.random.Generator) -> list[int]:
    # References r with a target g frames later: searchsorted, O(T log T) per gap, so a run
    # of hundreds of frames costs no (T, T) matrix. Ordered by r, as the pairs always were.
    gaps, probs, refs = [], [], []
    for g, p in zip(cfg.pair_gaps, cfg.pair_probs):
        if p <= 0:
            continue
        pos = np.searchsorted(idx, idx + g)
        hit = np.flatnonzero(idx[np.minimum(pos, len(idx) - 1)] == idx + g)
        if len(hit):
            gaps.append(g)
            probs.append(p)
            refs.append((hit, pos[hit]))
    if not gaps:
        raise UnusableClip(
            f"no frame pair {list(cfg.pair_gaps)} apart in a clip at frames {_shown(idx)}"
        )
    ref, tgt = refs[rng.choice(len(gaps), p=np.asarray(probs) / sum(probs))]
    i = rng.integers(len(ref))
    return [int(ref[i]), int(tgt[i])]


def _shown(idx: np.ndarray) -> str:
    """Frame indices for a message: a run of hundreds is shown by its ends."""
    if len(idx) > 12:
        return f"[{idx[0]}, {idx[1]}, ..., {idx[-1]}] ({len(idx)} frames)"
    return str(idx.tolist())


def _memory(
    idx: np.ndarray, cfg: LoaderConfig, rng: np.random.Generator, long_term_gap: int
) -> list[int]:
    n_long = cfg.num_long_refs if cfg.stage == "dynamic" else 0
    n_short = cfg.num_short_refs
    # Frames before t more than long_term_gap back are a prefix [0, k_t) of the sorted
    # indices, those within it the rest [k_t, t): counts per target without a (T, T) matrix.
    k = np.searchsorted(idx, idx - long_term_gap)  # idx[j] < idx[t] - gap  <=>  j < k[t]
    positions = np.arange(len(idx))
    targets = np.flatnonzero((k >= n_long) & (positions - k >= n_short))
    if not len(targets):
        raise UnusableClip(
            f"stage {cfg.stage!r} needs {n_long} reference(s) more than {long_term_gap} "
            f"frames back and {n_short} within it; clip frames {_shown(idx)} have none. "
            "Ingest with configs/ingest/default.yaml, whose runs of consecutive frames serve "
            f"every stage (or, for this stage alone, the legacy layout: Ingest with "
            f"configs/ingest/{cfg.stage}.yaml)"
        )
    t = int(targets[rng.integers(len(targets))])
    chosen_long = np.sort(rng.choice(int(k[t]), n_long, replace=False)) if n_long else []
    short = np.arange(int(k[t]), t)
    chosen_short = np.sort(rng.choice(short, n_short, replace=False))
    return [*map(int, chosen_long), *map(int, chosen_short), t]


def select_frames(
    frame_indices: list[int],
    cfg: LoaderConfig,
    rng: np.random.Generator,
    long_term_gap: int = LONG_TERM_GAP,
) -> tuple[list[int], list[int]]:
    """(positions in the clip, references first and target last; gaps to the target)."""
    idx = np.asarray(frame_indices, dtype=np.int64)
    if cfg.stage == "pretrain":
        order = _pair(idx, cfg, rng)
    else:
        order = _memory(idx, cfg, rng, long_term_gap)
    gaps = [int(idx[order[-1]] - idx[i]) for i in order[:-1]]
    return order, gaps


def random_crop(lab: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """(K, 3, H, W) -> (K, 3, size, size), one window for every frame; size 0 = no crop."""
    H, W = lab.shape[-2:]
    if size == 0 or (H == size and W == size):
        return lab
    if H < size or W < size:
        raise UnusableClip(
            f"stored clips are {H}x{W}, smaller than loader.crop_size={size}; lower crop_size "
            "or ingest with a larger size"
        )
    top = int(rng.integers(H - size + 1))
    left = int(rng.integers(W - size + 1))
    return lab[..., top : top + size, left : left + size]


class Frames(Protocol):
    """Stored frames decoded on demand (a run: pipeline/records.py StoredRun)."""

    def take(self, positions: list[int]) -> np.ndarray:
        """(K, 3, H, W) stored Lab of the frames at these positions."""
        ...


def make_sample(
    lab: np.ndarray | Frames,
    frame_indices: list[int],
    cfg: LoaderConfig,
    rng: np.random.Generator,
    long_term_gap: int = LONG_TERM_GAP,
) -> tuple[np.ndarray, np.ndarray]:
    """Stored clip (decoded) or run (decoded frame by frame: only the frames selected) ->
    (frames (K, 3, crop, crop) uint8, gaps (K-1,) int64)."""
    order, gaps = select_frames(frame_indices, cfg, rng, long_term_gap)
    chosen = lab[order] if isinstance(lab, np.ndarray) else lab.take(order)
    frames = random_crop(chosen, cfg.crop_size, rng)
    return np.ascontiguousarray(frames), np.asarray(gaps, dtype=np.int64)
