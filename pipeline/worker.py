"""One Ray task = one shard: decode its videos, cut clips, convert to stored Lab, write the tar.

Per video the task records a status: "ok" (n clips), "skipped" (with the reason, e.g. shorter
than one clip) or "failed" (the error message). A broken video never fails its shard; only a
failure to write the shard does (the distributor retries those).

Order of writes: the tar (atomically, temp + rename, the temp file named with the run's id;
with `shard_mb`, its parts one after the other), then the stats JSON (atomically) as the done
marker. Tars are byte-for-byte
deterministic (sorted members, zero mtimes, owner and mode fixed), so a rerun or retry writes
identical bytes.

Decoding a video into clips of stored Lab frames is `pipeline/decode.py`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import itertools
import json
import logging
import re
import tarfile
import time
from collections.abc import Iterator
from typing import Any

import cv2

import storage
from pipeline.codec import encode_clip, encode_run
from pipeline.config import IngestConfig
from pipeline.decode import SkipVideo, video_clips
from pipeline.frame_folder import FrameFolderError
from pipeline.sharding import ShardSpec, shard_name, video_id
from typedconfig import ConfigError, from_dict, to_dict

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


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


Members = Iterator[tuple[str, bytes]]  # tar members (name, data) of one video, in order


def _ingest_video(url: str, cfg: IngestConfig) -> tuple[dict[str, Any], Members]:
    """(status entry, tar members) of one video. The members are produced clip by clip as
    they are consumed, so a long video never sits in memory; the entry is complete once
    they are exhausted."""
    entry: dict[str, Any] = {
        "path": url, "id": video_id(url), "status": "ok", "clips": 0, "message": "",
    }  # fmt: skip
    return entry, _video_members(url, cfg, entry)


def _video_members(url: str, cfg: IngestConfig, entry: dict[str, Any]) -> Members:
    """Members of `_ingest_video`, recording in `entry` what happens: a video that cannot
    be read, or stops before its first clip, is "failed"; one that stops later keeps the
    clips before and says where it stopped."""
    try:
        fs, fpath = storage.get_fs(url)
        if not fs.exists(fpath):
            raise FileNotFoundError(f"no such file: {url}")
        folder = fs.isdir(fpath)  # a frame folder: its images are read where they are
        if not folder and fs.size(fpath) == 0:
            raise ValueError("empty file (0 bytes)")
        with contextlib.nullcontext(url) if folder else storage.local_copy(url) as local:
            info, clips = video_clips(local, cfg)
            entry.update(frames=info.num_frames, fps=info.fps, size=[info.height, info.width])
            if info.rotation:
                entry["rotation"] = info.rotation
            if info.decoder != "decord":
                entry["decoder"] = info.decoder
            if info.anamorphic:
                entry["anamorphic"] = True  # scaled to square pixels: `size` as shown
            for ci, idx, lab in clips:
                key = f"{entry['id']}_c{ci:04d}"
                run: dict[str, Any] = {}
                if cfg.run_len:  # frames coded one by one: the loader decodes what it uses
                    ext, data, header, sizes, digests = encode_run(lab, cfg.storage, cfg.quality)
                    run = {"header_bytes": header, "frame_bytes": sizes, "frame_sha256": digests}
                else:
                    ext, data = encode_clip(lab, cfg.storage, cfg.quality)
                record = {
                    "key": key, "source": url, "clip_index": ci, "frame_indices": idx,
                    "fps": info.fps, "original_size": [info.height, info.width],
                    "rotation": info.rotation, "num_source_frames": info.num_frames,
                    "shape": list(lab.shape), "storage": cfg.storage, "dtype": cfg.dtype,
                    # JPEG decoders accept damaged bytes: the loader checks clips against it.
                    "clip_sha256": hashlib.sha256(data).hexdigest(), **run,
                }  # fmt: skip
                entry["clips"] += 1
                if cfg.run_len:
                    entry["stored_frames"] = entry.get("stored_frames", 0) + len(idx)
                yield f"{key}.json", json.dumps(record, sort_keys=True).encode()
                yield f"{key}.{ext}", data
    except SkipVideo as e:
        entry.update(status="skipped", message=str(e))
    except Exception as e:  # task boundary for one video: record, never fail the shard
        error = f"{type(e).__name__}: {_stable(str(e))[:400]}; {_fix(e)}"
        if entry["clips"]:  # a decode error mid-video: the clips before it stay
            entry["message"] = f"stopped after {entry['clips']} clips: {error}"
        else:
            entry.update(status="failed", message=error)


# decord's errors start with the wall-clock time ("[06:22:39] /github/workspace/src/..."): a
# rerun would write other stats for the same video. The time says nothing about the video.
_CLOCK = re.compile(r"\[\d\d:\d\d:\d\d\] ")


def _stable(message: str) -> str:
    """`message` without wall-clock times, so stats stay byte-identical across runs."""
    return _CLOCK.sub("", message)


def _fix(e: Exception) -> str:
    """What to do about a video that failed with `e` (the message names the file)."""
    if isinstance(e, FileNotFoundError):
        return "check the path (a list file's relative entries start at its directory)"
    if isinstance(e, PermissionError):
        return "make the file readable by the Ray workers"
    if isinstance(e, MemoryError):
        return "give tasks more memory or lower size"
    if isinstance(e, FrameFolderError):
        return e.fix
    return "the file is not a readable video: download it again or re-encode it"


class _Counting:
    """File wrapper that hashes and counts what is written (no second read)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.digest, self.size = inner, hashlib.sha256(), 0

    def tell(self) -> int:
        return self.size

    def write(self, b: Any) -> int:
        self.digest.update(b)
        self.size += len(b)
        return self.inner.write(b)


def _write_tar(
    spec: ShardSpec,
    part: int,
    results: Iterator[tuple[dict[str, Any], Members]],
    carry: list[tuple[dict[str, Any], Members]],
    limit: float,
    videos: list[dict[str, Any]],
    run_id: str = "",
) -> dict[str, Any]:
    """Write part `part` of the shard (atomically) from the ingested videos `results` (after
    the one in `carry`, left by the previous part) until the tar holds `limit` bytes: the next
    video with clips is left in `carry`, so a part never ends up empty but for a shard without
    clips. Appends status entries to `videos`; returns {"name", "num_samples", "bytes",
    "sha256"} of the tar."""
    name = shard_name(spec.index, part)
    result: dict[str, Any] = {"name": name, "num_samples": 0}

    def write(f: Any) -> None:
        out = _Counting(f)
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for entry, members in itertools.chain([carry.pop()] if carry else [], results):
                first = next(members, None)  # the video up to its first clip, or its end
                if first is not None:
                    members = itertools.chain([first], members)
                    if out.size >= limit:
                        carry.append((entry, members))  # starts the next part
                        break
                    for member, data in members:
                        _add(tar, member, data)
                    entry["tar"] = name
                result["num_samples"] += entry["clips"]
                videos.append(entry)
        result.update(bytes=out.size, sha256=out.digest.hexdigest())

    storage.atomic_write(spec.part_url(part), write, tag=run_id)
    return result


def reuse_freed_buffers() -> None:
    """Let glibc keep freed buffers of up to 32 MB for reuse (this process, idempotent).

    By default it returns any freed block over a dynamic threshold (from 128 KB) to the
    kernel, and trims the heap top; every frame's Lab planes, clip array and JPEG buffer
    then lands on fresh pages that the kernel must fault in and zero. Keeping them: 2-3% less
    ingest CPU (bench/ingest.py; none for decoding alone), at the cost of the worker holding
    up to 64 MB of freed heap. A no-op where libc is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (glibc's maximum)
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def process_shard(spec: ShardSpec, cfg_dict: dict[str, Any], run_id: str = "") -> dict[str, Any]:
    """Write one shard (one tar, or several parts with `shard_mb`) and its stats file, temp
    files tagged with `run_id` (an argument of the task: Ray's retries keep it); returns the
    stats plus `seconds` and `cpu_seconds` (not stored: the stored stats are deterministic)."""
    cfg = from_dict(IngestConfig, cfg_dict)
    cv2.setNumThreads(max(1, int(cfg.task_cpus)))  # OpenCV's pool would oversubscribe the task
    reuse_freed_buffers()
    start, cpu_start = time.perf_counter(), time.process_time()
    limit = cfg.shard_mb * 1e6 if cfg.shard_mb > 0 else float("inf")
    videos: list[dict[str, Any]] = []
    results = (_ingest_video(url, cfg) for url in spec.videos)  # one video at a time
    carry: list[tuple[dict[str, Any], Members]] = []
    tars = [_write_tar(spec, 0, results, carry, limit, videos, run_id)]
    while carry:
        tars.append(_write_tar(spec, len(tars), results, carry, limit, videos, run_id))
    clips = sum(v["clips"] for v in videos)
    # One tar: its hash; several parts: a hash over their names and hashes.
    parts = "".join(f"{t['name']}:{t['sha256']}\n" for t in tars).encode()
    sha = tars[0]["sha256"] if len(tars) == 1 else hashlib.sha256(parts).hexdigest()
    stats = {
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
    # The done marker, last. Deterministic content: no timings (those go to the driver).
    body = json.dumps(stats, indent=1, sort_keys=True).encode()
    storage.atomic_write_bytes(spec.stats_url, body, tag=run_id)
    # process_time counts every thread of this worker process (decord decodes in its own).
    cpu = time.process_time() - cpu_start
    return {**stats, "seconds": time.perf_counter() - start, "cpu_seconds": cpu}


def shard_tars(spec: ShardSpec, stats: dict[str, Any]) -> list[dict[str, Any]]:
    """The tars of a done shard: {"name", "num_samples", "bytes", "sha256"} each (stats
    written before `shard_mb` existed describe their one tar at the top level)."""
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
