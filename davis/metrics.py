"""DAVIS-2017 semi-supervised metrics: region J, boundary F and their per-object statistics.

Pure functions on numpy arrays, written to give the same numbers as the official
davis2017-evaluation (MAST_NOTES "Official DAVIS-2017 semi-supervised evaluation"), including
its quirks, so a CSV written here can be compared with published tables:

- Objects are ids 1..K with K = the largest id in the first ground-truth frame (void 255
  excluded); an id in 1..K absent from the first frame is still an object (empty in the GT).
- First and last frames are not scored.
- Missing predicted objects are empty masks; a predicted id above K is an error.
- Void (255): the official loader turns GT void into background *before* the void mask is
  taken, so its void mask is always empty and void pixels count as background. That is the
  default here (`ignore_void=False`); `ignore_void=True` excludes void pixels from J and F, as
  the protocol intends (numbers then differ from the official tool on sequences with void).
- Decay bins come from `round(linspace(1, n, 5) + 1e-10) - 1` cast to uint8, as the official
  code does; sequences longer than 256 scored frames wrap around exactly as they do there.

Shapes: masks are (H, W) or (T, H, W); object masks (K, T, H, W) bool; labels int.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Sequence

import cv2
import numpy as np

VOID_LABEL = 255
BOUND_TH = 0.008  # boundary tolerance as a fraction of the image diagonal
MEASURES = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")

log = logging.getLogger(__name__)


class MetricError(ValueError):
    """The prediction cannot be scored against the ground truth (e.g. more objects than GT)."""


# ---------------------------------------------------------------------------------------------
# Region similarity J.


def jaccard(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> np.ndarray:
    """|M n G| / |M u G| per frame over the last two axes, void pixels excluded; 1 if the union
    is empty. Returns a float for (H, W) input, (T,) for (T, H, W)."""
    if gt.shape != pred.shape:
        raise MetricError(f"ground truth {gt.shape} and prediction {pred.shape} differ in size")
    gt, pred = gt.astype(bool), pred.astype(bool)
    keep = np.ones_like(gt) if void is None else ~void.astype(bool)
    inter = np.sum(gt & pred & keep, axis=(-2, -1))
    union = np.sum((gt | pred) & keep, axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        j = inter / union
    j = np.where(union == 0, 1.0, j)
    return float(j) if j.ndim == 0 else j.astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Boundary F-measure.


def disk(radius: int) -> np.ndarray:
    """The disk structuring element of skimage.morphology.disk: all (x, y) in
    [-r, r]^2 with x^2 + y^2 <= r^2. (2r+1, 2r+1) uint8."""
    r = int(radius)
    offsets = np.arange(-r, r + 1)
    x, y = np.meshgrid(offsets, offsets)
    return (x**2 + y**2 <= r**2).astype(np.uint8)


def boundary_tolerance(shape: Sequence[int], bound_th: float = BOUND_TH) -> int:
    """Dilation radius in pixels: ceil(bound_th * diagonal), or bound_th itself if >= 1."""
    if bound_th >= 1:
        return int(bound_th)
    return int(math.ceil(bound_th * math.hypot(shape[-2], shape[-1])))


def seg2bmap(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundary map of a binary (H, W) mask: a pixel is on the boundary if it differs
    from its right, lower or lower-right neighbour. On the last row only the right neighbour is
    compared, on the last column only the lower one, and the bottom-right pixel is never a
    boundary (the official seg2bmap's edge handling)."""
    seg = mask.astype(bool)
    right = np.zeros_like(seg)
    down = np.zeros_like(seg)
    diag = np.zeros_like(seg)
    right[:, :-1] = seg[:, 1:]
    down[:-1, :] = seg[1:, :]
    diag[:-1, :-1] = seg[1:, 1:]
    bmap = (seg ^ right) | (seg ^ down) | (seg ^ diag)
    bmap[-1, :] = seg[-1, :] ^ right[-1, :]
    bmap[:, -1] = seg[:, -1] ^ down[:, -1]
    bmap[-1, -1] = False
    return bmap


def f_measure(
    gt: np.ndarray,
    pred: np.ndarray,
    void: np.ndarray | None = None,
    bound_th: float = BOUND_TH,
) -> float:
    """Boundary F-measure of one (H, W) frame: boundaries matched within a disk of radius
    `boundary_tolerance`; precision over predicted boundary, recall over GT boundary."""
    if gt.shape != pred.shape or gt.ndim != 2:
        raise MetricError(f"f_measure needs two (H, W) masks, got {gt.shape} and {pred.shape}")
    keep = np.ones(gt.shape, bool) if void is None else ~void.astype(bool)
    pred_b = seg2bmap(pred.astype(bool) & keep)
    gt_b = seg2bmap(gt.astype(bool) & keep)
    kernel = disk(boundary_tolerance(gt.shape, bound_th))
    # cv2.dilate ignores pixels outside the image (its default border for dilation), i.e. a
    # binary dilation with a zero border, as the official code.
    pred_dil = cv2.dilate(pred_b.astype(np.uint8), kernel).astype(bool)
    gt_dil = cv2.dilate(gt_b.astype(np.uint8), kernel).astype(bool)
    n_pred, n_gt = int(pred_b.sum()), int(gt_b.sum())
    if n_pred == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    elif n_pred == 0:
        precision, recall = 1.0, 0.0
    elif n_gt == 0:
        precision, recall = 0.0, 1.0
    else:
        precision = int((pred_b & gt_dil).sum()) / n_pred
        recall = int((gt_b & pred_dil).sum()) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def boundary_f(
    gt: np.ndarray,
    pred: np.ndarray,
    void: np.ndarray | None = None,
    bound_th: float = BOUND_TH,
) -> np.ndarray:
    """F per frame for (T, H, W) masks (or a float for one (H, W) frame)."""
    if gt.shape != pred.shape:
        raise MetricError(f"ground truth {gt.shape} and prediction {pred.shape} differ in size")
    if gt.ndim == 2:
        return f_measure(gt, pred, void, bound_th)
    return np.array(
        [
            f_measure(gt[t], pred[t], None if void is None else void[t], bound_th)
            for t in range(gt.shape[0])
        ],
        dtype=np.float64,
    )


# ---------------------------------------------------------------------------------------------
# Per-object statistics.


def decay_bins(n: int) -> list[slice]:
    """The four overlapping, inclusive-end frame bins of the official decay statistic."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the uint8 cast wraps past 255
        ids = (np.round(np.linspace(1, n, 5) + 1e-10) - 1).astype(np.uint8)
    return [slice(int(ids[i]), int(ids[i + 1]) + 1) for i in range(4)]


def statistics(per_frame: np.ndarray) -> tuple[float, float, float]:
    """(Mean, Recall, Decay) of one object's per-frame J or F values.

    Mean = nanmean; Recall = fraction of frames > 0.5; Decay = mean of the first quarter
    minus mean of the last quarter (bins from `decay_bins`).
    """
    values = np.asarray(per_frame, dtype=np.float64)
    if len(values) > 256:
        log.warning("%d scored frames: decay bins wrap like the official tool's", len(values))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # empty input gives nan, as official
        mean = float(np.nanmean(values))
        recall = float(np.nanmean(values > 0.5))
        bins = [values[b] for b in decay_bins(len(values))]
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return mean, recall, decay


@dataclasses.dataclass(frozen=True)
class ObjectScore:
    """One object of one sequence: the row `<sequence>_<k>` of the per-sequence CSV."""

    sequence: str
    object_id: int
    j_frames: tuple[float, ...]  # per scored frame (frames 1..T-2)
    f_frames: tuple[float, ...]

    @property
    def name(self) -> str:
        return f"{self.sequence}_{self.object_id}"

    @property
    def j(self) -> tuple[float, float, float]:
        return statistics(np.array(self.j_frames))

    @property
    def f(self) -> tuple[float, float, float]:
        return statistics(np.array(self.f_frames))


def num_objects(first_gt: np.ndarray) -> int:
    """K = the largest non-void id in the first ground-truth frame (0 if none)."""
    labels = np.where(first_gt == VOID_LABEL, 0, first_gt)
    return int(labels.max()) if labels.size else 0


def split_objects(labels: np.ndarray, k: int) -> np.ndarray:
    """(T, H, W) ids -> (k, T, H, W) bool, object i+1 in slot i."""
    ids = np.arange(1, k + 1).reshape(k, *([1] * labels.ndim))
    return labels[None] == ids


def evaluate_sequence(
    sequence: str,
    gt: np.ndarray,
    pred: np.ndarray,
    *,
    ignore_void: bool = False,
    bound_th: float = BOUND_TH,
) -> list[ObjectScore]:
    """Score one sequence. gt, pred: (T, H, W) integer ids over all frames (frame 0 included;
    it and the last frame are not scored). Raises MetricError if the prediction has more
    objects than the ground truth, sizes differ, or the first GT frame has no object."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape or gt.ndim != 3:
        raise MetricError(
            f"{sequence}: ground truth {gt.shape} and prediction {pred.shape} must both be "
            "(T, H, W) with the same size"
        )
    k = num_objects(gt[0])
    if k == 0:
        raise MetricError(f"{sequence}: the first annotation has no object (ids 1..254)")
    if gt.shape[0] < 3:
        raise MetricError(f"{sequence}: {gt.shape[0]} frames; scoring skips first and last")
    gt_scored, pred_scored = gt[1:-1], pred[1:-1]
    k_pred = int(pred_scored.max())
    if k_pred > k:
        raise MetricError(
            f"{sequence}: prediction holds object id {k_pred} but the ground truth has {k} "
            "object(s); ids must match the first annotation"
        )
    void = gt_scored == VOID_LABEL if ignore_void else None
    # Official loader: GT void becomes background; a predicted id absent in a frame is empty.
    gt_objects = split_objects(np.where(gt_scored == VOID_LABEL, 0, gt_scored), k)
    pred_objects = split_objects(pred_scored, k)
    scores = []
    for i in range(k):
        j = jaccard(gt_objects[i], pred_objects[i], void)
        f = boundary_f(gt_objects[i], pred_objects[i], void, bound_th)
        scores.append(ObjectScore(sequence, i + 1, tuple(map(float, j)), tuple(map(float, f))))
    return scores


def global_scores(objects: Sequence[ObjectScore]) -> dict[str, float]:
    """The seven global measures: each statistic averaged over all objects (np.mean, as the
    official tool), J&F-Mean = (J-Mean + F-Mean) / 2."""
    if not objects:
        raise MetricError("no object was scored")
    j = np.array([o.j for o in objects])  # (N, 3) mean, recall, decay
    f = np.array([o.f for o in objects])
    j_mean, j_recall, j_decay = (float(v) for v in j.mean(axis=0))
    f_mean, f_recall, f_decay = (float(v) for v in f.mean(axis=0))
    values = ((j_mean + f_mean) / 2, j_mean, j_recall, j_decay, f_mean, f_recall, f_decay)
    return dict(zip(MEASURES, values))
