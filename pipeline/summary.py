"""The final summary table of an ingest run, from its manifest (pipeline/manifest.py owns the
format and builds it from the shard stats)."""

from __future__ import annotations

from pipeline.manifest import MANIFEST, Manifest


def summary_table(manifest: Manifest, seconds: float | None = None, max_rows: int = 20) -> str:
    v = manifest.videos
    stopped = sum(p.status == "ok" for p in manifest.problems)
    early = f" ({stopped} stopped early)" if stopped else ""
    lines = [
        "ingest summary",
        f"  shards      {manifest.num_shards:>10}   incomplete {len(manifest.incomplete_shards)}",
        f"  videos      {v.get('total', 0):>10}   ok {v.get('ok', 0)}{early}  "
        f"skipped {v.get('skipped', 0)}  failed {v.get('failed', 0)}",
        f"  clips       {manifest.num_samples:>10}   frames {manifest.num_frames}",
        f"  bytes       {manifest.bytes:>10}   per frame {per_frame(manifest)}",
        f"  content     {manifest.content_hash[:16]}",
    ]
    if seconds:
        lines.append(f"  this run    {seconds:>9.1f}s")
    problems = manifest.problems
    if problems:
        lines.append(f"  {'status':<8} {'video':<50} message")
        for p in problems[:max_rows]:
            path = p.path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            lines.append(f"  {p.status:<8} {path[-50:]:<50} {p.message[:100]}")
        if len(problems) > max_rows:
            lines.append(f"  ... {len(problems) - max_rows} more in {MANIFEST} 'problems'")
    for name, err in manifest.incomplete_shards.items():
        lines.append(f"  INCOMPLETE {name}: {err}")
    return "\n".join(lines)


def per_frame(manifest: Manifest) -> str:
    """Bytes per stored frame; "-" when nothing was stored (not the empty tar's 10240)."""
    return f"{manifest.bytes / manifest.num_frames:.0f}" if manifest.num_frames else "-"
