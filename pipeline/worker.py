"""One Ray task = one shard: decode its videos, cut clips, convert to stored Lab, write the tar.

Per video the task records a status: "ok" (n clips), "skipped" (with the reason, e.g. shorter
than one clip) or "failed" (the error message). A broken video never fails its shard; only a
failure to write the shard does (the distributor retries those).

Order of writes: the tar (atomically, temp + rename, the temp file named with the run's id;
with `shard_mb`, its parts one after the other), then the stats JSON (atomically) as the done
marker (`pipeline/shard_stats.py`, which owns that file). A shard whose videos give no clip
has no tar, only its stats (every video's status and reason; `tars` empty). Tars are
byte-for-byte deterministic (sorted members, zero mtimes, owner and mode fixed), so a rerun
or retry writes identical bytes.

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
from pipeline.shard_stats import shard_stats, write_stats
from pipeline.sharding import ShardSpec, shard_name, video_id
from typedconfig import from_dict

log = logging.getLogger(__name__)


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
    """Write part `part` of the shard (atomically) from the video in `carry` (one with clips)
    and then the ingested videos `results` until the tar holds `limit` bytes: the next video
    with clips is left in `carry`, so no part is empty. Appends status entries to `videos`;
    returns {"name", "num_samples", "bytes", "sha256"} of the tar."""
    name = shard_name(spec.index, part)
    result: dict[str, Any] = {"name": name, "num_samples": 0}

    def write(f: Any) -> None:
        out = _Counting(f)
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for entry, members in itertools.chain([carry.pop()], results):
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


def _until_clips(
    results: Iterator[tuple[dict[str, Any], Members]], videos: list[dict[str, Any]]
) -> list[tuple[dict[str, Any], Members]]:
    """Ingest `results` up to the first video that gives a clip, appending the status entries
    of those before it to `videos`: [that video, its first member put back], or [] when no
    video gives one (the shard then has no tar: an empty one would be a shard of nothing)."""
    for entry, members in results:
        first = next(members, None)  # the video up to its first clip, or its end
        if first is not None:
            return [(entry, itertools.chain([first], members))]
        videos.append(entry)
    return []


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
    """Write one shard (one tar, several parts with `shard_mb`, or none when no video gives a
    clip) and its stats file, temp files tagged with `run_id` (an argument of the task: Ray's
    retries keep it); returns the stats plus `seconds` and `cpu_seconds` (not stored: the
    stored stats are deterministic)."""
    cfg = from_dict(IngestConfig, cfg_dict)
    cv2.setNumThreads(max(1, int(cfg.task_cpus)))  # OpenCV's pool would oversubscribe the task
    reuse_freed_buffers()
    start, cpu_start = time.perf_counter(), time.process_time()
    limit = cfg.shard_mb * 1e6 if cfg.shard_mb > 0 else float("inf")
    videos: list[dict[str, Any]] = []
    results = (_ingest_video(url, cfg) for url in spec.videos)  # one video at a time
    carry = _until_clips(results, videos)
    tars: list[dict[str, Any]] = []
    while carry:
        tars.append(_write_tar(spec, len(tars), results, carry, limit, videos, run_id))
    if not tars:  # a tar left by an earlier write of this shard (older versions wrote an
        storage.remove(spec.part_url(0))  # empty one) would contradict stats that list none
    stats = shard_stats(spec, cfg, videos, tars)
    # The done marker, last. Deterministic content: no timings (those go to the driver).
    write_stats(spec, stats, run_id)
    # process_time counts every thread of this worker process (decord decodes in its own).
    cpu = time.process_time() - cpu_start
    return {**stats, "seconds": time.perf_counter() - start, "cpu_seconds": cpu}
