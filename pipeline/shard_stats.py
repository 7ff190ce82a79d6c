"""A shard's stats file, `DST/shard-NNNNNN.stats.json`: the done marker, owned here.

    stats = shard_stats(spec, cfg, videos, tars)   # what a shard task records (pipeline/worker.py)
    write_stats(spec, stats, run_id)               # atomically, after the shard's tars
    done = read_done(shards, cfg)                  # {index: stats} of the shards already done
    tars = shard_tars(spec, stats)                 # a done shard's tars (what the manifest lists)

A stats file (deterministic: sorted keys, no timings, so a rerun writes the same bytes):
    shard, index         the shard's name (its first tar's, also when it has none), index
    num_samples          clips (or runs) in its tars
    num_frames           frames stored
    bytes                of its tars
    sha256               its one tar's sha256; else (several parts, or none) the sha256 over
                         one line "name:sha256" per tar
    tars                 [{name, num_samples, bytes, sha256}] in order; [] when no video gave
                         a clip: no tar is written, the stats alone mark the shard done
                         (versions up to cb08598 wrote an empty tar, 10240 bytes, and listed
                         it with 0 samples: read as it is, tests/fixtures/empty_shard_cb08598).
                         Absent in stats written before `shard_mb` existed: the shard's one
                         tar at top level.
    config_hash          `config_hash` of the ingest config it was written with
    videos               one entry per video of the shard, in order: path, id, status ("ok",
                         "skipped", "failed"), clips, message, and for videos that were read
                         frames, fps, size (and rotation, decoder, anamorphic, stored_frames,
                         tar when they apply)

The config hashes (`config_hash`, `accepted_hashes`) live here too: they are what a done
shard's stats are checked against, so a rerun with another content config is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any

import storage
from pipeline.config import IngestConfig
from pipeline.sharding import ShardSpec
from typedconfig import ConfigError, to_dict

log = logging.getLogger(__name__)


def config_hash(cfg: IngestConfig, omit: tuple[str, ...] = ()) -> str:
    """Hash of the fields that change shard content (not Ray/fan-out settings), less `omit`."""
    defaults = to_dict(IngestConfig())
    fields = {
        k: v
        for k, v in to_dict(cfg).items()
        if k in CONTENT_FIELDS and k not in omit and not (k in LATER_FIELDS and v == defaults[k])
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def accepted_hashes(cfg: IngestConfig) -> set[str]:
    """`config_hash(cfg)` and the hashes that shard sets of the same content were written
    with before a field of HASHED_SINCE_ADDED existed (when those fields are at default)."""
    default = IngestConfig()
    older = tuple(k for k in HASHED_SINCE_ADDED if getattr(cfg, k) == getattr(default, k))
    return {config_hash(cfg), config_hash(cfg, omit=older)} if older else {config_hash(cfg)}


CONTENT_FIELDS = (
    "clip_len", "frame_step", "frame_offsets", "clips_per_video", "clip_stride",
    "size", "resize", "storage", "lab", "dtype", "quality", "videos_per_shard", "shard_mb",
    "run_len", "frame_folder_fps",
)  # fmt: skip
# Content fields added after shard sets were written. At its default such a field leaves the
# content as it was, so those shard sets must stay valid (reruns skip their done shards,
# appends extend them): a LATER_FIELDS field is hashed only when set off its default;
# HASHED_SINCE_ADDED fields have been hashed at every value since they were added (shard_mb,
# 943eb14), so shard sets written before then are recognised by `accepted_hashes`. A new
# content field goes into LATER_FIELDS (tests/pipeline/test_reader_sharding.py pins hashes).
LATER_FIELDS = ("dtype", "run_len", "frame_folder_fps")
# Config fields added after manifests recorded their ingest config: listed in a manifest's
# `config` only when set off their default, so a shard set of an earlier layout rebuilds the
# manifest it had, byte for byte (pipeline/manifest.py).
UNLISTED_AT_DEFAULT = ("run_len", "frame_folder_fps")
HASHED_SINCE_ADDED = ("shard_mb",)


def shard_stats(
    spec: ShardSpec, cfg: IngestConfig, videos: list[dict[str, Any]], tars: list[dict[str, Any]]
) -> dict[str, Any]:
    """The stats of shard `spec`: its videos' status entries, in order, and its `tars`
    ({"name", "num_samples", "bytes", "sha256"} each, in order)."""
    clips = sum(v["clips"] for v in videos)
    # One tar: its hash; several parts: a hash over their names and hashes.
    parts = "".join(f"{t['name']}:{t['sha256']}\n" for t in tars).encode()
    sha = tars[0]["sha256"] if len(tars) == 1 else hashlib.sha256(parts).hexdigest()
    return {
        "shard": spec.name,
        "index": spec.index,
        "num_samples": clips,
        # Frames stored: runs differ in length (each video's entry counts its own).
        "num_frames": sum(v.get("stored_frames", 0) for v in videos)
        if cfg.run_len
        else clips * len(cfg.offsets),
        "bytes": sum(t["bytes"] for t in tars),
        "sha256": sha,
        "tars": tars,
        "config_hash": config_hash(cfg),
        "videos": videos,
    }


def write_stats(spec: ShardSpec, stats: dict[str, Any], run_id: str = "") -> None:
    """Write the done marker of shard `spec` (atomically, the temp file tagged `run_id`): after
    its tars, so a shard with a stats file has them all."""
    body = json.dumps(stats, indent=1, sort_keys=True).encode()
    storage.atomic_write_bytes(spec.stats_url, body, tag=run_id)


def shard_tars(spec: ShardSpec, stats: dict[str, Any]) -> list[dict[str, Any]]:
    """The tars of a done shard: {"name", "num_samples", "bytes", "sha256"} each, none when no
    video gave a clip (stats written before `shard_mb` existed describe their one tar at the
    top level)."""
    if "tars" in stats:
        return stats["tars"]
    return [{"name": spec.name, **{k: stats[k] for k in ("num_samples", "bytes", "sha256")}}]


_STATS_KEYS = {"config_hash": str, "num_samples": int, "num_frames": int, "bytes": int,
               "sha256": str, "videos": list}  # fmt: skip
_TAR_KEYS = {"name": str, "num_samples": int, "bytes": int, "sha256": str}
_VIDEO_KEYS = {"path": str, "status": str, "message": str}


def _stats_problem(stats: Any) -> str:
    """What makes `stats` unlike what `process_shard` writes ("" when nothing does)."""

    def invalid(entry: Any, keys: dict[str, type]) -> str:
        if not isinstance(entry, dict):
            return "not a JSON object"
        bad = [k for k, kind in keys.items() if not isinstance(entry.get(k), kind)]
        return f"no valid {bad[0]!r}" if bad else ""

    if problem := invalid(stats, _STATS_KEYS):
        return problem
    if not isinstance(stats.get("tars", []), list):
        return "no valid 'tars'"
    for name, keys in (("tars", _TAR_KEYS), ("videos", _VIDEO_KEYS)):
        for entry in stats.get(name, []):
            if problem := invalid(entry, keys):
                return f"an entry of {name!r}: {problem}"
    return ""


def read_stats(url: str, *, warn: bool = True) -> dict[str, Any] | None:
    """The stats file at `url`, or None when it is not one (torn, garbage, keys missing): its
    shard is then not done, and is written again (the same bytes); a warning names the file."""
    try:
        stats = json.loads(storage.read_bytes(url))
        problem = _stats_problem(stats)
    except ValueError as e:  # not UTF-8, not JSON
        problem = f"{type(e).__name__}: {str(e)[:100]}"
    if not problem:
        return stats
    if warn:
        log.warning("%s is not a valid stats file (%s): writing its shard again", url, problem)
    return None


def recorded_videos(dst: str) -> dict[int, list[str]]:
    """{shard index: its videos, in order} from every valid stats file in DST: what
    assignment.json said of those shards (a shard's stats list each of its videos)."""
    found = {}
    for name in storage.list_names(dst):
        m = re.fullmatch(r"shard-(\d{6,})\.stats\.json", name)
        stats = read_stats(storage.join(dst, name), warn=False) if m else None
        if m and stats is not None:
            found[int(m.group(1))] = [v["path"] for v in stats["videos"]]
    return found


def damaged_tars(spec: ShardSpec, stats: dict[str, Any]) -> list[str]:
    """Names of the done shard's tars whose bytes do not hash to the sha256 its stats record
    (damage that keeps the size, which `read_done` cannot see), each with a warning."""
    damaged = []
    for t in shard_tars(spec, stats):
        digest = hashlib.sha256()
        fs, path = storage.get_fs(storage.join(spec.output, t["name"]))
        with fs.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != t["sha256"]:
            damaged.append(t["name"])
            log.warning(
                "%s has the size its stats record but not their sha256: writing shard %d again",
                storage.join(spec.output, t["name"]), spec.index,
            )  # fmt: skip
    return damaged


def read_done(shards: list[ShardSpec], cfg: IngestConfig) -> dict[int, dict[str, Any]]:
    """{shard index: stats} of the shards already written (their stats file is the done
    marker); a shard whose tars were since deleted, truncated or replaced, or whose stats file
    is not valid, is not done. A shard written with another content config is refused: rerun
    with --overwrite or a new output."""
    sizes = storage.list_sizes(shards[0].output) if shards else {}
    done = {}
    expected, accepted = config_hash(cfg), accepted_hashes(cfg)
    for spec in shards:
        if spec.stats_url.rsplit("/", 1)[-1] not in sizes:
            continue
        stats = read_stats(spec.stats_url)
        if stats is None:
            continue
        # A tar deleted, truncated or replaced after the shard was done: write the shard
        # again (the same bytes). Sizes are what can be checked without reading every tar.
        # A shard without clips lists no tar: its stats alone say it is done.
        damaged = [t for t in shard_tars(spec, stats) if sizes.get(t["name"]) != t["bytes"]]
        if damaged:
            t = damaged[0]
            log.warning(
                "%s is %s, its stats say %d bytes: writing shard %d again",
                storage.join(spec.output, t["name"]),
                f"{sizes[t['name']]} bytes" if t["name"] in sizes else "missing",
                t["bytes"],
                spec.index,
            )
            continue
        if stats.get("config_hash") not in accepted:
            raise ConfigError(
                f"{spec.stats_url} was written with a different ingest config "
                f"({stats.get('config_hash')} != {expected}); rerun with --overwrite or choose "
                "a new --output"
            )
        done[spec.index] = stats
    return done
