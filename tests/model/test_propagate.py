"""The test protocol of label propagation: which frames are read, and the read's top-k and
temperature overrides reaching the memory read (model/propagate.py)."""

from __future__ import annotations

import pytest
import torch

from model import ColourMatch
from model.propagate import memory_frames
from tests.model.test_baselines import iou, moving_square


def test_mast_memory_is_frames_0_and_5_and_t_minus_1_3_5():
    mast = [memory_frames(t, (0, 5), (1, 3, 5)) for t in range(1, 9)]
    assert mast == [
        [0],
        [0, 1],
        [0, 2],
        [0, 1, 3],
        [0, 2, 4],
        [0, 1, 3, 5],  # frame 5 is both t-1 and long-term: read once
        [0, 2, 4, 5, 6],
        [0, 3, 5, 7],  # t-5 = 3, t-3 = 5 = the long-term frame, t-1 = 7
    ]


def test_crw_style_and_spa_then_temp_style_memories():
    preceding_20 = tuple(range(1, 21))
    assert memory_frames(3, (), preceding_20) == [0, 1, 2]
    assert memory_frames(30, (), preceding_20) == list(range(10, 30))
    # Frame 0 always kept, with the 20 preceding ones.
    assert memory_frames(30, (0,), preceding_20) == [0, *range(10, 30)]
    assert memory_frames(30, (0,), (1,)) == [0, 29]


class Recording(ColourMatch):
    """ColourMatch that records each read's references (as gaps) and protocol arguments."""

    def __init__(self, temperature=0.05):
        super().__init__(temperature)
        self.reads = []

    def _read(self, query, ref_feats, ref_values, gaps, radius, *, top_k=None, scale=None):
        self.reads.append({"gaps": list(gaps), "radius": radius, "top_k": top_k, "scale": scale})
        return super()._read(query, ref_feats, ref_values, gaps, radius, top_k=top_k, scale=scale)


def test_propagate_reads_the_protocols_frames_with_its_top_k_radius_and_temperature():
    frames, masks = moving_square(frames=8)
    model = Recording()
    model.propagate(frames, masks[0], radius=3, long_term=(0,), short_term=(2,))
    assert [r["gaps"] for r in model.reads] == [[1], [2], [3, 2], [4, 2], [5, 2], [6, 2], [7, 2]]
    assert {r["radius"] for r in model.reads} == {3}
    # No override: the module's own temperature (0.05 -> scale 20), every affinity.
    assert [(r["top_k"], r["scale"]) for r in model.reads] == [(None, pytest.approx(20.0))] * 7
    model.reads.clear()
    model.propagate(frames[:3], masks[0], radius=3, top_k=10, temperature=0.2)
    assert [r["gaps"] for r in model.reads] == [[1], [2, 1]]  # MAST's memory by default
    assert [(r["top_k"], r["scale"]) for r in model.reads] == [(10, pytest.approx(5.0))] * 2


def test_a_temperature_override_is_that_temperature():
    frames, masks = moving_square()
    overridden = ColourMatch(0.05).propagate(frames, masks[0], radius=4, temperature=2.0)
    native = ColourMatch(2.0).propagate(frames, masks[0], radius=4)
    assert torch.equal(overridden, native)
    # At temperature 2 colour cosines (all in [-1, 1]) weigh nearly alike: the object blurs
    # into its background and is lost, unlike at the model's own 0.05.
    sharp = ColourMatch(0.05).propagate(frames, masks[0], radius=4)
    assert iou(sharp[-1], masks[-1]) > 0.85 and iou(overridden[-1], masks[-1]) < 0.5


def test_top_k_covering_every_window_entry_changes_nothing_and_top_1_still_tracks():
    frames, masks = moving_square()
    model = ColourMatch()
    whole = model.propagate(frames, masks[0], radius=4)
    # 6 frames: at most 3 references (t = 5 reads 0, 2, 4), each a 9 x 9 window.
    assert torch.equal(model.propagate(frames, masks[0], radius=4, top_k=3 * 81), whole)
    copied = model.propagate(frames, masks[0], radius=4, top_k=1)  # copy the best match
    assert all(iou(copied[t], masks[t]) > 0.85 for t in range(1, len(masks)))


@pytest.mark.parametrize(
    "protocol, message",
    [
        ({"long_term": (), "short_term": (3,)}, "frame 1 has no reference"),
        ({"long_term": (5,), "short_term": (2, 3)}, "include offset 1 in short_term or frame 0"),
        ({"short_term": (0, 1)}, "short_term offsets >= 1"),
        ({"long_term": (-1, 0)}, "long_term frames must be >= 0"),
        ({"top_k": 0}, "top_k=0 must be >= 1"),
        ({"temperature": 0.0}, "temperature=0.0 must be > 0"),
    ],
)
def test_protocols_that_cannot_run_are_refused(protocol, message):
    frames, masks = moving_square(frames=3)
    with pytest.raises(ValueError, match=message):
        ColourMatch().propagate(frames, masks[0], **protocol)
