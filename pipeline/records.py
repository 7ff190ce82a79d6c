"""What a shard sample must be before its clip is decoded: the JSON record's schema, the
clip's checksum and the size its header declares (`open_sample`).

The record is the one pipeline/worker.py writes beside each clip (`<key>.json`):
    frame_indices      source-frame index of each stored frame: a non-empty list of
                       strictly increasing ints >= 0, one per frame of the clip (required)
    clip_sha256        sha256 of the clip member (shards written before checksums existed
                       lack it: read only with `loader.allow_unverified_clips`)
    key, source, clip_index, fps, original_size, rotation, num_source_frames, shape,
    storage, dtype     optional; when present they must have the type ingest writes, and
                       key, shape and storage must agree with the sample
A run (a `run.*` member, IngestConfig.run_len: frames coded one by one, back to back) adds
    header_bytes       bytes at the member's start every frame's image begins with (a
                       JPEG header shared by the frames; 0 for png, raw) (required)
    frame_bytes        each frame's own byte length in the member, after the header: ints
                       >= 1, one per frame, with header_bytes summing to its size (required)
    frame_sha256       each frame's sha256 (required unless allow_unverified, as clip_sha256;
                       the loader checks only the frames it decodes, so a damaged frame
                       refuses the samples that use it, not the run)
Keys this version does not know are ignored (a later ingest may add some).

A sample that fails raises BadSample, whose `kind` names the check (the loader counts and
warns once per kind); a clip that does not decode or match its checksum raises
ClipDecodeError, as `decode_clip` does.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.codec import (
    EXTENSIONS,
    FRAME_EXTENSION,
    RUN_EXTENSIONS,
    ClipDecodeError,
    ClipSizeError,
    check_clip_size,
    decode_clip,
    run_frame,
)
from pipeline.config import MAX_RUN_LEN
from pipeline.manifest import ClipLayout
from pipeline.shard_reader import OversizedMember, RawSample

# Kinds of BadSample (the loader counts UNVERIFIED apart: a config choice, not broken data).
OVERSIZED, BAD_RECORD, UNVERIFIED, CLIP_SIZE = (
    "oversized member", "bad record", "unverified clip", "clip size",
)  # fmt: skip
# Frames a clip or run may hold (a record lists each; config.MAX_RUN_LEN is this).
MAX_CLIP_FRAMES = MAX_RUN_LEN
MAX_FRAME_INDEX = 2**31 - 1
UNVERIFIED_MESSAGE = (
    "the record has no clip_sha256 (a shard written before ingest recorded checksums); set "
    "loader.allow_unverified_clips=true to read such shards unverified"
)


class BadSample(ValueError):
    """One sample refused before its clip is decoded; `kind` is one of the kinds above."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _ints(n: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and len(v) == n and all(_int(x) for x in v)


def _str_in(allowed: Any) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and v in allowed


_OPTIONAL: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "key": ("a string", lambda v: isinstance(v, str)),
    "source": ("a string", lambda v: isinstance(v, str)),
    "clip_index": ("an int >= 0", _int),
    "fps": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "original_size": ("[height, width], ints >= 0", _ints(2)),
    "rotation": ("an int", lambda v: _int(v, low=-(2**31))),
    "num_source_frames": ("an int >= 0", _int),
    "shape": ("[frames, 3, height, width], ints >= 0", lambda v: _ints(4)(v) and v[1] == 3),
    "storage": (f"one of {list(EXTENSIONS)}", _str_in(EXTENSIONS)),
    "dtype": ("'uint8' or 'float16'", _str_in(("uint8", "float16"))),
    "clip_sha256": ("64 lowercase hex digits", lambda v: isinstance(v, str)
                    and re.fullmatch("[0-9a-f]{64}", v) is not None),
}  # fmt: skip


def _sha256s(n: int) -> Callable[[Any], bool]:
    return lambda v: (
        isinstance(v, list) and len(v) == n and all(map(_OPTIONAL["clip_sha256"][1], v))
    )


def run_problem(record: dict[str, Any], frames: int, layout: ClipLayout) -> str:
    """What is wrong with the run keys of a record of `frames` frames, or ""."""
    if not _int(record.get("header_bytes")):
        return f"header_bytes is {str(record.get('header_bytes'))[:80]!r}: expected an int >= 0"
    sizes = record.get("frame_bytes")
    if not (_ints(frames)(sizes) and all(n >= 1 for n in sizes)):
        return f"frame_bytes is {str(sizes)[:80]!r}: expected {frames} byte lengths >= 1"
    if "frame_sha256" in record and not _sha256s(frames)(record["frame_sha256"]):
        return f"frame_sha256 is not {frames} sha256s of 64 lowercase hex digits"
    if layout.run_len and frames > layout.run_len:
        return f"a run of {frames} frames; the manifest's runs hold at most {layout.run_len}"
    return ""


def record_problem(record: Any, key: str, ext: str, layout: ClipLayout) -> str:
    """What is wrong with a parsed record of sample `key` (clip member `ext`) read with
    `layout` (the manifest's; empty when unknown), or ""."""
    if not isinstance(record, dict):
        return f"the record is a JSON {type(record).__name__}, not an object"
    idx = record.get("frame_indices")
    if not isinstance(idx, list) or not idx:
        return f"frame_indices is {idx!r}: expected a non-empty list of source-frame indices"
    if not all(_int(i) and i <= MAX_FRAME_INDEX for i in idx):
        return f"frame_indices {idx[:12]} must be ints in [0, {MAX_FRAME_INDEX}]"
    if any(b <= a for a, b in zip(idx, idx[1:])):
        return f"frame_indices {idx[:12]} must strictly increase"
    frames = len(layout.frame_offsets)
    if ext in FRAME_EXTENSION:
        problem = run_problem(record, len(idx), layout)
        if problem:
            return problem
    elif frames and len(idx) != frames:
        return f"{len(idx)} frame_indices; the manifest's clips hold {frames} frames"
    if len(idx) > MAX_CLIP_FRAMES:
        return f"{len(idx)} frame_indices; a clip may hold at most {MAX_CLIP_FRAMES}"
    for name, (kind, ok) in _OPTIONAL.items():
        if name in record and not ok(record[name]):
            return f"{name} is {str(record[name])[:80]!r}: expected {kind}"
    if record.get("key", key) != key:
        return f"the record names key {record['key']!r}"
    if "storage" in record and ext not in (EXTENSIONS[record["storage"]],
                                           RUN_EXTENSIONS[record["storage"]]):  # fmt: skip
        return f"the record says storage {record['storage']!r}, the clip member is {ext}"
    shape = record.get("shape")
    if shape and (shape[0] != len(idx) or (layout.size and tuple(shape[2:]) != layout.size)):
        return f"the record's shape {shape} disagrees with its frames or the layout"
    return ""


def parse_record(raw: bytes, key: str, ext: str, layout: ClipLayout) -> dict[str, Any]:
    """The record of sample `key`, parsed and checked (`record_problem`); BadSample if not."""
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise BadSample(BAD_RECORD, f"the record is not JSON: {str(e)[:200]}") from None
    problem = record_problem(record, key, ext, layout)
    if problem:
        raise BadSample(BAD_RECORD, problem)
    return record


class StoredRun:
    """A run member whose record was checked, its frames decoded on demand (`take`): each
    frame's header size checked, then its sha256, then decoded, once (kept for the other
    samples drawn from the same read). `decoded` counts the frames decoded."""

    def __init__(self, ext: str, data: bytes, record: dict[str, Any], size: tuple[int, ...]):
        self.ext, self.data, self.size = FRAME_EXTENSION[ext], data, size
        self.header: int = record["header_bytes"]
        self.frame_bytes: list[int] = record["frame_bytes"]
        self.starts = (self.header + np.cumsum([0, *self.frame_bytes[:-1]])).tolist()
        self.sha256: list[str] | None = record.get("frame_sha256")
        self.frames: dict[int, np.ndarray] = {}
        self.decoded = 0

    def take(self, positions: list[int]) -> np.ndarray:
        """(K, 3, H, W) stored Lab of the frames at `positions`; BadSample (CLIP_SIZE) for a
        frame whose header declares another size, ClipDecodeError for one that is corrupt."""
        for t in positions:
            if t not in self.frames:
                self.frames[t] = self._decode(t)
        return np.stack([self.frames[t] for t in positions])

    def _decode(self, t: int) -> np.ndarray:
        data = run_frame(self.data, self.header, self.starts, self.frame_bytes, t)
        try:
            check_clip_size(self.ext, data, 1, self.size)
        except ClipSizeError as e:
            raise BadSample(CLIP_SIZE, f"frame {t}: {e}") from None
        if self.sha256 and hashlib.sha256(data).hexdigest() != self.sha256[t]:
            raise ClipDecodeError(f"frame {t}: bytes do not match the frame_sha256 recorded")
        self.decoded += 1
        return decode_clip(self.ext, data, 1, self.size)[0]


def open_sample(
    sample: RawSample, layout: ClipLayout, allow_unverified: bool = False
) -> tuple[list[int], np.ndarray | StoredRun]:
    """(frame_indices, clip (T, 3, H, W) stored Lab) of a sample, checked in this order:
    members under their caps, the record, its clip_sha256 (required unless
    `allow_unverified`), the size the clip's header declares (the layout's when known, else at
    most MAX_CLIP_PIXELS values; and the record's `shape` when it has one), the checksum, then
    the decode. Raises BadSample, or ClipDecodeError for a corrupt clip (checksum, decode)."""
    for member in (sample.record, sample.clip):
        if isinstance(member, OversizedMember):
            raise BadSample(OVERSIZED, f"{member} (skipped unread)")
    record = parse_record(sample.record, sample.key, sample.ext, layout)
    idx, expected_sha = record["frame_indices"], record.get("clip_sha256")
    if sample.ext in FRAME_EXTENSION:
        return idx, _open_run(sample, record, layout, allow_unverified)
    if not expected_sha and not allow_unverified:
        raise BadSample(UNVERIFIED, UNVERIFIED_MESSAGE)
    data = sample.clip
    try:
        shape = check_clip_size(sample.ext, data, len(idx), layout.size)
    except ClipSizeError as e:
        raise BadSample(CLIP_SIZE, str(e)) from None
    declared = record.get("shape")
    if declared and sample.ext != EXTENSIONS["raw"]:
        declared = [declared[0] * 3 * declared[2], declared[3]]  # the plane image's (rows, W)
    if declared and list(shape) != declared:
        raise BadSample(CLIP_SIZE, f"{sample.ext} header declares {shape}, the record {declared}")
    # JPEG decoders accept damaged data (libjpeg only warns on stderr): the checksum catches it.
    if expected_sha and hashlib.sha256(data).hexdigest() != expected_sha:
        raise ClipDecodeError(f"{sample.ext} bytes do not match the clip_sha256 recorded")
    return idx, decode_clip(sample.ext, data, len(idx), layout.size)


def _open_run(
    sample: RawSample, record: dict[str, Any], layout: ClipLayout, allow_unverified: bool
) -> StoredRun:
    """A run's member checked as a whole (frame lengths tile it, the declared frame size is
    the layout's): its frames are checked one by one when they are decoded (StoredRun)."""
    if "frame_sha256" not in record and not allow_unverified:
        raise BadSample(UNVERIFIED, UNVERIFIED_MESSAGE.replace("clip_sha256", "frame_sha256"))
    stored = record["header_bytes"] + sum(record["frame_bytes"])
    if stored != len(sample.clip):
        raise BadSample(BAD_RECORD, f"header_bytes and frame_bytes sum to {stored:,} bytes, "
                        f"the {sample.ext} member holds {len(sample.clip):,}")  # fmt: skip
    declared = tuple(record["shape"][2:]) if record.get("shape") else ()
    if layout.size and declared and declared != tuple(layout.size):
        raise BadSample(
            CLIP_SIZE, f"the record's frames are {declared}, the layout's {layout.size}"
        )
    return StoredRun(sample.ext, sample.clip, record, layout.size or declared)
