"""Per-run accounting: shard stats -> DST/manifest.json and the final summary table.

manifest.json (deterministic: the same inputs and config give the same bytes):
    shards             tar file names, relative to the manifest, in shard index order (a
                       shard split by `shard_mb` lists its parts in order)
    samples_per_shard  clips in each tar
    num_samples, num_frames, num_shards (tars), bytes
    videos             {"total", "ok", "skipped", "failed"} over every input video
    problems           [{"path", "status", "message"}] for every skipped or failed video,
                       and every "ok" one that stopped early (its message says where)
    incomplete_shards  {name: error} for shards that failed twice (absent from `shards`)
    clip_frames, frame_offsets, size, storage, dtype: what a sample holds (for readers of
                       the data; the loader needs only shards and samples_per_shard)
    config
    config_hash        the hash the shard set was written with (its first shard's: a set
                       an earlier version wrote keeps its hash, worker.accepted_hashes)
    content_hash       sha256 over config_hash and every tar's name and sha256: the data
                       lineage training logs
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

import storage
from pipeline.config import IngestConfig
from pipeline.sharding import ShardSpec
from pipeline.worker import config_hash, shard_tars
from typedconfig import to_dict

MANIFEST = "manifest.json"


def build_manifest(
    shards: list[ShardSpec],
    stats: dict[int, dict[str, Any]],
    errors: dict[int, str],
    cfg: IngestConfig,
) -> dict[str, Any]:
    complete = [s for s in shards if s.index in stats]
    tars = [t for s in complete for t in shard_tars(s, stats[s.index])]
    per_shard = [t["num_samples"] for t in tars]
    videos = [v for s in complete for v in stats[s.index]["videos"]]
    status = Counter(v["status"] for v in videos)
    lost = sum(len(s.videos) for s in shards if s.index not in stats)
    chash = stats[complete[0].index]["config_hash"] if complete else config_hash(cfg)
    content = hashlib.sha256(chash.encode())
    for t in tars:
        content.update(f"{t['name']}:{t['sha256']}\n".encode())
    return {
        "version": 1,
        "shards": [t["name"] for t in tars],
        "samples_per_shard": per_shard,
        "num_samples": sum(per_shard),
        "num_frames": sum(stats[s.index]["num_frames"] for s in complete),
        "num_shards": len(tars),
        "bytes": sum(stats[s.index]["bytes"] for s in complete),
        "videos": {
            "total": len(videos) + lost,
            "ok": status["ok"],
            "skipped": status["skipped"],
            "failed": status["failed"] + lost,
        },
        "problems": [
            {"path": v["path"], "status": v["status"], "message": v["message"]}
            for v in videos
            if v["status"] != "ok" or v["message"]
        ]
        + [
            {
                "path": v,
                "status": "failed",
                "message": f"{s.name} incomplete: {errors.get(s.index, '')}",
            }
            for s in shards
            if s.index not in stats
            for v in s.videos
        ],
        "incomplete_shards": {shards[i].name: e for i, e in sorted(errors.items())},
        "clip_frames": len(cfg.offsets),
        "frame_offsets": list(cfg.offsets),
        "size": list(cfg.size),
        "storage": cfg.storage,
        "dtype": cfg.dtype,
        "config": to_dict(cfg),
        "config_hash": chash,
        "content_hash": content.hexdigest(),
    }


def write_manifest(dst: str, manifest: dict[str, Any]) -> str:
    url = storage.join(dst, MANIFEST)
    body = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    storage.atomic_write_bytes(url, body.encode("utf-8"))
    return url


def summary_table(
    manifest: dict[str, Any], seconds: float | None = None, max_rows: int = 20
) -> str:
    v = manifest["videos"]
    stopped = sum(p["status"] == "ok" for p in manifest["problems"])
    early = f" ({stopped} stopped early)" if stopped else ""
    lines = [
        "ingest summary",
        f"  shards      {manifest['num_shards']:>10}   incomplete {len(manifest['incomplete_shards'])}",
        f"  videos      {v['total']:>10}   ok {v['ok']}{early}  skipped {v['skipped']}  "
        f"failed {v['failed']}",
        f"  clips       {manifest['num_samples']:>10}   frames {manifest['num_frames']}",
        f"  bytes       {manifest['bytes']:>10}   "
        f"per frame {manifest['bytes'] / max(manifest['num_frames'], 1):.0f}",
        f"  content     {manifest['content_hash'][:16]}",
    ]
    if seconds:
        lines.append(f"  this run    {seconds:>9.1f}s")
    problems = manifest["problems"]
    if problems:
        lines.append(f"  {'status':<8} {'video':<50} message")
        for p in problems[:max_rows]:
            path = p["path"].encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            lines.append(f"  {p['status']:<8} {path[-50:]:<50} {p['message'][:100]}")
        if len(problems) > max_rows:
            lines.append(f"  ... {len(problems) - max_rows} more in manifest.json 'problems'")
    for name, err in manifest["incomplete_shards"].items():
        lines.append(f"  INCOMPLETE {name}: {err}")
    return "\n".join(lines)
