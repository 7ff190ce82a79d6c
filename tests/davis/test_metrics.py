"""DAVIS J/F metrics on hand-computed cases, the official tool's quirks, and a brute-force
cross-check of the boundary matching."""

from __future__ import annotations

import math

import numpy as np
import pytest

from davis.metrics import (
    MEASURES,
    MetricError,
    boundary_f,
    boundary_tolerance,
    decay_bins,
    disk,
    evaluate_sequence,
    f_measure,
    global_scores,
    jaccard,
    seg2bmap,
    statistics,
)


def box(h, w, top, left, bottom, right):
    m = np.zeros((h, w), bool)
    m[top:bottom, left:right] = True
    return m


def pixel(h, w, y, x):
    m = np.zeros((h, w), bool)
    m[y, x] = True
    return m


# ---------------------------------------------------------------------------------------------
# J


def test_jaccard_hand_computed_overlap():
    gt = box(4, 4, 0, 0, 2, 2)  # 4 px
    pred = box(4, 4, 0, 0, 1, 4)  # top row, 4 px, 2 shared
    assert jaccard(gt, pred) == pytest.approx(2 / 6)


def test_jaccard_empty_masks():
    empty = np.zeros((3, 5), bool)
    assert jaccard(empty, empty) == 1.0
    assert jaccard(box(3, 5, 0, 0, 1, 1), empty) == 0.0
    assert jaccard(empty, box(3, 5, 0, 0, 1, 1)) == 0.0


def test_jaccard_one_pixel_objects():
    assert jaccard(pixel(5, 5, 2, 2), pixel(5, 5, 2, 2)) == 1.0
    assert jaccard(pixel(5, 5, 2, 2), pixel(5, 5, 2, 3)) == 0.0


def test_jaccard_void_pixels_ignored():
    gt = box(4, 4, 0, 0, 2, 2)
    pred = box(4, 4, 0, 0, 2, 3)  # 2 extra pixels in column 2
    void = box(4, 4, 0, 2, 2, 3)
    assert jaccard(gt, pred) == pytest.approx(4 / 6)
    assert jaccard(gt, pred, void) == 1.0
    # Everything void: empty union -> 1.
    assert jaccard(gt, ~gt, np.ones((4, 4), bool)) == 1.0


def test_jaccard_per_frame():
    gt = np.stack([box(4, 4, 0, 0, 2, 2), np.zeros((4, 4), bool)])
    pred = np.stack([box(4, 4, 0, 0, 1, 2), np.zeros((4, 4), bool)])
    np.testing.assert_allclose(jaccard(gt, pred), [0.5, 1.0])


# ---------------------------------------------------------------------------------------------
# Boundaries and F


def test_disk_matches_skimage_definition():
    np.testing.assert_array_equal(disk(1), [[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    expected2 = np.array(
        [
            [0, 0, 1, 0, 0],
            [0, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
            [0, 1, 1, 1, 0],
            [0, 0, 1, 0, 0],
        ]
    )
    np.testing.assert_array_equal(disk(2), expected2)
    # Radius 8 (854x480): count the lattice points with x^2 + y^2 <= 64.
    count = sum(1 for x in range(-8, 9) for y in range(-8, 9) if x * x + y * y <= 64)
    assert disk(8).shape == (17, 17) and disk(8).sum() == count == 197


def test_boundary_tolerance():
    assert boundary_tolerance((480, 854)) == 8  # ceil(0.008 * 979.6)
    assert boundary_tolerance((10, 10)) == 1
    assert boundary_tolerance((480, 854), bound_th=3) == 3  # >= 1: absolute pixels
    assert boundary_tolerance((5, 1000)) == math.ceil(0.008 * math.hypot(5, 1000))


def test_seg2bmap_one_pixel_object():
    b = seg2bmap(pixel(4, 4, 1, 1))
    # The boundary sits half a pixel towards the origin: the pixel and its up/left neighbours.
    assert sorted(zip(*np.nonzero(b))) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_seg2bmap_at_image_edges():
    # Bottom-right corner pixel: it is never a boundary itself (official edge handling).
    b = seg2bmap(pixel(4, 5, 3, 4))
    assert sorted(zip(*np.nonzero(b))) == [(2, 3), (2, 4), (3, 3)]
    # A mask covering the whole image has no boundary at all.
    assert not seg2bmap(np.ones((4, 5), bool)).any()
    # A mask touching the right edge: the image edge itself is not a boundary; the left
    # boundary sits in column 2, the top one in row 0 (half a pixel towards the origin).
    expected = [
        [0, 0, 1, 1, 1, 1],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0],
    ]
    np.testing.assert_array_equal(seg2bmap(box(4, 6, 1, 3, 3, 6)), expected)


def test_f_measure_hand_computed_shift():
    gt = pixel(10, 10, 5, 5)  # tolerance ceil(0.008 * 14.1) = 1: a plus-shaped disk
    assert f_measure(gt, gt) == 1.0
    # Shift by 1: every boundary pixel is within 1 of the other boundary: F = 1 (J = 0).
    assert f_measure(gt, pixel(10, 10, 5, 6)) == 1.0
    assert jaccard(gt, pixel(10, 10, 5, 6)) == 0.0
    # Shift by 2: half of each boundary matches: P = R = 0.5.
    assert f_measure(gt, pixel(10, 10, 5, 7)) == pytest.approx(0.5)
    # Diagonal shift by (1, 1) is outside the plus-shaped disk for two of four pixels each
    # side... (4,4),(4,5),(5,4),(5,5) vs (5,5),(5,6),(6,5),(6,6): matched 3 of 4 each way.
    assert f_measure(gt, pixel(10, 10, 6, 6)) == pytest.approx(0.75)


def test_f_measure_empty_cases():
    empty = np.zeros((6, 6), bool)
    obj = box(6, 6, 1, 1, 3, 3)
    assert f_measure(empty, empty) == 1.0
    assert f_measure(obj, empty) == 0.0  # P = 1, R = 0
    assert f_measure(empty, obj) == 0.0  # P = 0, R = 1
    # Full-image masks have no boundary: F(full, empty) = 1 in the official tool.
    assert f_measure(np.ones((6, 6), bool), empty) == 1.0


def test_f_measure_asymmetric_precision_recall():
    # 40x40: tolerance ceil(0.008 * 56.6) = 1. GT a 10x10 square, prediction the GT plus a far
    # away single pixel: recall 1, precision = 36 / (36 + 4).
    gt = box(40, 40, 5, 5, 15, 15)
    pred = gt | pixel(40, 40, 30, 30)
    n_gt = seg2bmap(gt).sum()
    assert n_gt == 40  # 10x10 square: 4 * 10 boundary pixels shifted towards the origin
    p, r = n_gt / (n_gt + 4), 1.0
    assert f_measure(gt, pred) == pytest.approx(2 * p * r / (p + r))


def test_f_measure_void_removes_boundaries():
    gt = box(10, 10, 2, 2, 6, 6)
    pred = box(10, 10, 2, 2, 6, 9)
    void = box(10, 10, 0, 6, 10, 10)
    assert f_measure(gt, pred) < 1.0
    assert f_measure(gt, pred, void) == 1.0


def brute_force_f(gt, pred, radius):
    """Independent F: a boundary pixel matches if any other-boundary pixel lies within
    Euclidean distance `radius` (the definition of dilation by disk(radius))."""
    bg, bp = np.argwhere(seg2bmap(gt)), np.argwhere(seg2bmap(pred))
    if len(bg) == 0 or len(bp) == 0:
        return None
    d2 = ((bp[:, None, :] - bg[None, :, :]) ** 2).sum(-1)
    precision = (d2.min(1) <= radius**2).mean()
    recall = (d2.min(0) <= radius**2).mean()
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize("radius", [1, 2, 3, 5])
def test_f_measure_matches_brute_force_on_random_blobs(radius):
    rng = np.random.default_rng(radius)
    for _ in range(10):
        h, w = rng.integers(8, 30, size=2)
        gt = rng.random((h, w)) < 0.3
        pred = gt ^ (rng.random((h, w)) < 0.15)
        expected = brute_force_f(gt, pred, radius)
        if expected is not None:
            assert f_measure(gt, pred, bound_th=radius) == pytest.approx(expected, abs=1e-12)


def test_boundary_f_per_frame():
    gt = np.stack([pixel(10, 10, 5, 5)] * 2)
    pred = np.stack([pixel(10, 10, 5, 5), pixel(10, 10, 5, 7)])
    np.testing.assert_allclose(boundary_f(gt, pred), [1.0, 0.5])


# ---------------------------------------------------------------------------------------------
# Statistics


def test_statistics_hand_computed():
    mean, recall, decay = statistics(np.array([1.0, 0.6, 0.4, 0.2, 0.0]))
    assert mean == pytest.approx(0.44)
    assert recall == pytest.approx(0.4)  # values strictly above 0.5
    assert decay == pytest.approx((1.0 + 0.6) / 2 - (0.2 + 0.0) / 2)


def test_decay_bins_overlap_and_short_sequences():
    assert decay_bins(10) == [slice(0, 3), slice(2, 6), slice(5, 8), slice(7, 10)]
    assert decay_bins(1) == [slice(0, 1)] * 4
    assert decay_bins(2) == [slice(0, 1), slice(0, 2), slice(1, 2), slice(1, 2)]
    assert statistics(np.array([0.9, 0.3]))[2] == pytest.approx(0.6)
    assert statistics(np.array([0.7]))[2] == 0.0


def test_decay_wraps_like_official_after_256_frames():
    # ids are cast to uint8 by the official tool: 299 -> 43, so the last bin is empty.
    assert decay_bins(300)[3] == slice(224, 44)
    assert math.isnan(statistics(np.linspace(1, 0, 300))[2])


def test_statistics_exactly_half_is_not_recalled():
    assert statistics(np.array([0.5, 0.5, 0.51]))[1] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------
# Sequences


def three_object_sequence(t=6, h=12, w=16):
    gt = np.zeros((t, h, w), np.uint8)
    for i in range(t):
        gt[i, 1:4, i : i + 3] = 1
        gt[i, 6:9, 2:5] = 2
        gt[i, 9:12, 10 + i % 3 : 13 + i % 3] = 3
    return gt


def test_prediction_equal_to_gt_scores_one():
    gt = three_object_sequence()
    objects = evaluate_sequence("seq", gt, gt.copy())
    assert [o.name for o in objects] == ["seq_1", "seq_2", "seq_3"]
    for o in objects:
        assert len(o.j_frames) == 4  # 6 frames minus first and last
        assert o.j == (1.0, 1.0, 0.0) and o.f == (1.0, 1.0, 0.0)
    assert global_scores(objects) == dict.fromkeys(MEASURES, 1.0) | {
        "J-Decay": 0.0,
        "F-Decay": 0.0,
    }


def test_first_and_last_frames_are_not_scored():
    gt = three_object_sequence()
    pred = gt.copy()
    pred[0] = 0
    pred[-1] = 0
    assert all(o.j == (1.0, 1.0, 0.0) for o in evaluate_sequence("seq", gt, pred))


def test_missing_object_is_empty_and_extra_object_is_an_error():
    gt = three_object_sequence()
    pred = gt.copy()
    pred[pred == 3] = 0
    objects = evaluate_sequence("seq", gt, pred)
    assert objects[2].j_frames == (0.0,) * 4 and objects[2].f_frames == (0.0,) * 4
    assert objects[0].j[0] == 1.0
    pred = gt.copy()
    pred[2, 0, 0] = 4
    with pytest.raises(MetricError, match="object id 4 but the ground truth has 3"):
        evaluate_sequence("seq", gt, pred)
    # An id above K only in the unscored last frame is not an error (official reads 1..T-2).
    pred = gt.copy()
    pred[-1, 0, 0] = 4
    assert len(evaluate_sequence("seq", gt, pred)) == 3


def test_objects_are_ids_up_to_the_first_frame_maximum():
    gt = three_object_sequence()
    gt[gt == 2] = 0  # id 2 never appears: still an object (empty GT, empty prediction -> 1)
    gt[3, 0, 0] = 5  # id 5 appears later only: not an object
    pred = gt.copy()
    pred[pred == 5] = 0
    objects = evaluate_sequence("seq", gt, pred)
    assert [o.object_id for o in objects] == [1, 2, 3]
    assert objects[1].j_frames == (1.0,) * 4 and objects[1].f_frames == (1.0,) * 4


def test_void_counts_as_background_by_default_like_the_official_tool():
    gt = three_object_sequence()
    gt[:, 6:9, 5:7] = 255  # void beside object 2
    pred = gt.copy()
    pred[pred == 255] = 2  # the prediction spreads object 2 into the void
    official = evaluate_sequence("seq", gt, pred)
    assert official[1].j_frames == pytest.approx((9 / 15,) * 4)
    assert official[1].f[0] < 1.0
    ignored = evaluate_sequence("seq", gt, pred, ignore_void=True)
    assert ignored[1].j == (1.0, 1.0, 0.0) and ignored[1].f == (1.0, 1.0, 0.0)
    # Void does not make an object; a predicted 255 is an id above K, an error.
    assert len(evaluate_sequence("seq", gt, np.where(gt == 255, 0, gt))) == 3
    with pytest.raises(MetricError, match="object id 255"):
        evaluate_sequence("seq", gt, gt.copy())


def test_sequence_errors():
    gt = three_object_sequence()
    with pytest.raises(MetricError, match="same size"):
        evaluate_sequence("seq", gt, gt[:, :-1])
    with pytest.raises(MetricError, match="no object"):
        evaluate_sequence("seq", np.zeros_like(gt), np.zeros_like(gt))
    with pytest.raises(MetricError, match="2 frames"):
        evaluate_sequence("seq", gt[:2], gt[:2])
    with pytest.raises(MetricError, match="no object was scored"):
        global_scores([])


def test_global_scores_average_over_objects():
    gt = three_object_sequence(t=7)
    pred = gt.copy()
    pred[pred == 3] = 0  # object 3 lost: J = F = 0 on every scored frame
    pred[3][pred[3] == 1] = 0  # object 1 lost on one of 5 scored frames
    objects = evaluate_sequence("seq", gt, pred)
    j1 = objects[0].j
    assert j1[0] == pytest.approx(0.8) and j1[1] == pytest.approx(0.8)
    g = global_scores(objects)
    assert g["J-Mean"] == pytest.approx((0.8 + 1.0 + 0.0) / 3)
    assert g["J-Recall"] == pytest.approx((0.8 + 1.0 + 0.0) / 3)
    assert g["J&F-Mean"] == pytest.approx((g["J-Mean"] + g["F-Mean"]) / 2)
    assert list(g) == list(MEASURES)
