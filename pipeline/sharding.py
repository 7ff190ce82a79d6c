"""Deterministic, append-only assignment of videos to shards.

Shard i holds a fixed, ordered list of videos, recorded in `DST/assignment.json` before any
task starts. A rerun over the same input reads it back, so shard names and contents do not
move. Videos that appear in SRC later are sorted and packed into NEW shards after the last
one: old shards are never rewritten. Videos that vanished from SRC stay in their shard's
entry (a done shard keeps its content; an unfinished one reports them as failed).

An assignment.json that cannot be read (torn, garbage) is rebuilt from what the done shards
record (`recover_plan`), or the run is refused when that cannot be done safely.

Only these small descriptions travel to Ray tasks, never video data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable

import storage

log = logging.getLogger(__name__)

ASSIGNMENT = "assignment.json"


def shard_name(index: int, part: int = 0) -> str:
    """Tar of shard `index`; parts after the first (`IngestConfig.shard_mb`) get a suffix."""
    return f"shard-{index:06d}.tar" if part == 0 else f"shard-{index:06d}_{part:03d}.tar"


def stats_name(index: int) -> str:
    return f"shard-{index:06d}.stats.json"


def video_id(url: str) -> str:
    """A stable 16-hex-digit id of a video URL: the first part of its sample keys."""
    # surrogateescape: a file name that is not UTF-8 (os.fsdecode's surrogates) hashes as
    # its bytes instead of failing the whole shard.
    return hashlib.sha1(url.encode("utf-8", "surrogateescape")).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """What one task needs: its index, its videos, where to write."""

    index: int
    videos: tuple[str, ...]
    output: str  # DST

    @property
    def name(self) -> str:
        return shard_name(self.index)

    def part_url(self, part: int) -> str:
        return storage.join(self.output, shard_name(self.index, part))

    @property
    def stats_url(self) -> str:
        return storage.join(self.output, stats_name(self.index))


def _key(video: str) -> str:
    """How a recorded video is matched with the input: the input's local paths are absolute
    (pipeline.reader), and a path an earlier version recorded relative to the directory it
    ran in matches its absolute form from that directory."""
    if video.startswith("/") and "//" not in video and "/." not in video and video[-1] != "/":
        # Already absolute and normal (what pipeline.reader gives): abspath would return it
        # as it is, at ~1 us per call, several calls per video (a million-video rerun).
        return video
    return os.path.abspath(video) if storage.is_local(video) else video


def plan_shards(videos: list[str], existing: list[list[str]], per_shard: int) -> list[list[str]]:
    """Keep `existing` shards as they are and pack the videos they lack into new shards."""
    assigned = {_key(v) for shard in existing for v in shard}
    new = sorted(v for v in set(videos) if _key(v) not in assigned)
    shards = [list(s) for s in existing]
    for start in range(0, len(new), per_shard):
        shards.append(new[start : start + per_shard])
    return shards


class AssignmentError(ValueError):
    """DST's assignment.json cannot be read, nor the shard plan be rebuilt safely."""


def load_assignment(dst: str) -> list[list[str]]:
    """The recorded plan ([] when there is none); raises AssignmentError naming the file when
    it is not one `assign` writes."""
    url = storage.join(dst, ASSIGNMENT)
    if not storage.exists(url):
        return []
    try:
        shards = json.loads(storage.read_bytes(url))["shards"]
        if not isinstance(shards, list) or not all(
            isinstance(s, list) and all(isinstance(v, str) for v in s) for s in shards
        ):
            raise TypeError("'shards' is not a list of lists of paths")
    except (ValueError, TypeError, KeyError) as e:
        raise AssignmentError(f"{url} is not valid ({type(e).__name__}: {str(e)[:100]})") from e
    return [list(s) for s in shards]


def recover_plan(
    videos: list[str], recorded: dict[int, list[str]], per_shard: int, why: str
) -> list[list[str]]:
    """The shard plan when assignment.json is unreadable (`why`), from the input and
    `recorded`, {shard index: its videos} of the shards whose stats survive: the done shards
    must keep index and content, or their tars would be taken for other videos.

    - If the first-run plan of the input (sorted, packed) agrees with every recorded shard,
      it is the plan (a shard set never appended to: every shard as it was).
    - Else, if the recorded shards are 0..k-1, those, with the rest of the input packed after
      them (appends after a done prefix; only unfinished shards are planned anew).
    - Else (a recorded shard after one without stats: its neighbours' content is unknown) the
      run is refused: the fix is --overwrite, or the file restored."""
    fresh = plan_shards(videos, [], per_shard)
    keys = {i: [_key(v) for v in shard] for i, shard in recorded.items()}
    if all(i < len(fresh) and [_key(v) for v in fresh[i]] == k for i, k in keys.items()):
        return [recorded.get(i, shard) for i, shard in enumerate(fresh)]
    if sorted(recorded) == list(range(len(recorded))):
        return plan_shards(videos, [recorded[i] for i in range(len(recorded))], per_shard)
    gap = min(set(range(max(recorded))) - set(recorded))
    raise AssignmentError(
        f"{why}, and the shard plan cannot be rebuilt safely: shard {gap} has no valid stats "
        f"file while shard {max(recorded)} has, and the input's plan differs from what the "
        "written shards hold. Rerun with --overwrite (writes every shard again) or restore "
        "the file"
    )


def assign(
    videos: list[str],
    dst: str,
    per_shard: int,
    recorded: Callable[[], dict[int, list[str]]] | None = None,
) -> list[ShardSpec]:
    """The shard plan for DST: the recorded one, extended by new videos (written atomically).
    An unreadable assignment.json is rebuilt by `recover_plan` from `recorded()` (the videos
    of the shards written so far), with a warning; without `recorded` it is an error."""
    try:
        existing = load_assignment(dst)
    except AssignmentError as e:
        if recorded is None:
            raise
        shards = recover_plan(videos, recorded(), per_shard, str(e))
        log.warning("%s: rebuilt from the input and the shards' stats files, rewritten", e)
        return _write(shards, dst, per_shard)
    given = {_key(v) for v in videos}
    missing = {v for s in existing for v in s if _key(v) not in given}
    if missing:
        log.warning(
            "%d videos recorded in %s are no longer in the input (kept in their shards), e.g. %s",
            len(missing),
            storage.join(dst, ASSIGNMENT),
            sorted(missing)[0],
        )
    shards = plan_shards(videos, existing, per_shard)
    if shards != existing:
        if existing:
            log.info(
                "appending %d new shards after %d existing",
                len(shards) - len(existing),
                len(existing),
            )
        return _write(shards, dst, per_shard)
    return [ShardSpec(i, tuple(v), dst) for i, v in enumerate(shards)]


def _write(shards: list[list[str]], dst: str, per_shard: int) -> list[ShardSpec]:
    body = json.dumps({"videos_per_shard": per_shard, "shards": shards}, indent=1)
    storage.atomic_write_bytes(storage.join(dst, ASSIGNMENT), body.encode("utf-8"))
    return [ShardSpec(i, tuple(v), dst) for i, v in enumerate(shards)]
