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
"""

from __future__ import annotations

import numpy as np

from model import MASTConfig
from pipeline.config import LoaderConfig

# What is long-term is the model's setting (model.long_term_gap); the loader is told it.
LONG_TERM_GAP = MASTConfig.long_term_gap


class UnusableClip(ValueError):
    """The clip offers no frame selection for the stage (e.g. too short a span)."""


def _pair(idx: np.ndarray, cfg: LoaderConfig, rng: np.random.Generator) -> list[int]:
    diffs = idx[None, :] - idx[:, None]  # (T, T): diffs[r, t] = idx[t] - idx[r]
    gaps, probs = [], []
    for g, p in zip(cfg.pair_gaps, cfg.pair_probs):
        if p > 0 and (diffs == g).any():
            gaps.append(g)
            probs.append(p)
    if not gaps:
        raise UnusableClip(
            f"no frame pair {list(cfg.pair_gaps)} apart in a clip at frames {idx.tolist()}"
        )
    g = gaps[rng.choice(len(gaps), p=np.asarray(probs) / sum(probs))]
    pairs = np.argwhere(diffs == g)  # (n, 2) rows (reference, target)
    ref, tgt = pairs[rng.integers(len(pairs))]
    return [int(ref), int(tgt)]


def _memory(
    idx: np.ndarray, cfg: LoaderConfig, rng: np.random.Generator, long_term_gap: int
) -> list[int]:
    n_long = cfg.num_long_refs if cfg.stage == "dynamic" else 0
    n_short = cfg.num_short_refs
    targets = []
    for t in range(len(idx)):
        back = idx[t] - idx[:t]
        short = np.flatnonzero(back <= long_term_gap)
        long = np.flatnonzero(back > long_term_gap)
        if len(short) >= n_short and len(long) >= n_long:
            targets.append((t, short, long))
    if not targets:
        raise UnusableClip(
            f"stage {cfg.stage!r} needs {n_long} reference(s) more than {long_term_gap} "
            f"frames back and {n_short} within it; clip frames {idx.tolist()} have none. "
            f"Ingest with configs/ingest/{cfg.stage}.yaml"
        )
    t, short, long = targets[rng.integers(len(targets))]
    chosen_long = np.sort(rng.choice(long, n_long, replace=False)) if n_long else []
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


def make_sample(
    lab: np.ndarray,
    frame_indices: list[int],
    cfg: LoaderConfig,
    rng: np.random.Generator,
    long_term_gap: int = LONG_TERM_GAP,
) -> tuple[np.ndarray, np.ndarray]:
    """Stored clip -> (frames (K, 3, crop, crop) uint8, gaps (K-1,) int64)."""
    order, gaps = select_frames(frame_indices, cfg, rng, long_term_gap)
    frames = random_crop(lab[order], cfg.crop_size, rng)
    return np.ascontiguousarray(frames), np.asarray(gaps, dtype=np.int64)
