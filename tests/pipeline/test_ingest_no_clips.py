"""Shards without clips, on a local Ray instance with real videos: a shard whose videos give no
clip writes no tar (its stats alone mark it done and account for its videos), and shard sets
written with empty tars by earlier versions (tests/fixtures/empty_shard_cb08598) still read,
as they are."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from ingest_media import sample_video_dir, write_video
from test_ingest import file_tree

from jobs.ingest import ingest
from pipeline.config import IngestConfig
from pipeline.manifest import MANIFEST, read_manifest
from pipeline.shard_stats import shard_tars
from pipeline.sharding import ShardSpec, load_assignment
from typedconfig import from_dict

pytestmark = pytest.mark.ray

# test_ingest.py's clips (2 per video, 3 frames 2 apart: a span of 5), two videos a shard.
CFG = dict(clip_len=3, frame_step=2, clips_per_video=2, size=[64, 64], storage="png",
           videos_per_shard=2)  # fmt: skip
LEGACY = os.path.join(os.path.dirname(__file__), "..", "fixtures", "empty_shard_cb08598")
NOT_A_VIDEO = "the file is not a readable video: download it again or re-encode it"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def bad_videos(src, short_frames: int = 3) -> list[str]:
    """A text file named .mp4 (failed) and a video too short for one clip (skipped)."""
    src.mkdir(exist_ok=True)
    (src / "a_notes.mp4").write_text("this is not a video\n")
    write_video(src / "b_short.mp4", short_frames, 48, 64)
    return [str(src / "a_notes.mp4"), str(src / "b_short.mp4")]


def good_video(path) -> str:
    """The real carphone sample (120 frames, 176x144)."""
    shutil.copy(sample_video_dir() / "carphone_pristine.mp4", path)
    return str(path)


def stats(dst, index: int) -> dict:
    return json.loads((dst / f"shard-{index:06d}.stats.json").read_text())


def test_a_shard_without_clips_writes_no_tar_and_stays_done(ray_local, tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    bad_videos(src)  # shard 0: no clip
    good_video(src / "c_good.mp4")  # shard 1: clips, beside a truncated copy
    (src / "d_corrupt.mp4").write_bytes((src / "c_good.mp4").read_bytes()[:3000])
    cfg = from_dict(IngestConfig, CFG)
    got = ingest(str(src), str(dst), cfg, progress=False)
    assert sorted(os.listdir(dst)) == ["assignment.json", MANIFEST, "shard-000000.stats.json",
                                       "shard-000001.stats.json", "shard-000001.tar"]  # fmt: skip
    # The empty shard: done, every video with its reason, no tar and nothing counted.
    empty = stats(dst, 0)
    assert empty["tars"] == [] and shard_tars(ShardSpec(0, (), str(dst)), empty) == []
    assert (empty["num_samples"], empty["num_frames"], empty["bytes"]) == (0, 0, 0)
    assert empty["sha256"] == hashlib.sha256(b"").hexdigest()  # over no "name:sha256" line
    assert [(os.path.basename(v["path"]), v["status"], v["clips"]) for v in empty["videos"]] == [
        ("a_notes.mp4", "failed", 0), ("b_short.mp4", "skipped", 0)]  # fmt: skip
    assert empty["videos"][0]["message"].endswith(NOT_A_VIDEO)
    assert empty["videos"][1]["message"] == "too short: 3 frames < clip span 5"
    assert not any("tar" in v for v in empty["videos"])
    # The manifest: only the shard with samples, totals over what was stored.
    (tar,) = stats(dst, 1)["tars"]
    assert got["shards"] == ["shard-000001.tar"] and got["samples_per_shard"] == [2]
    assert (got["num_shards"], got["num_samples"], got["num_frames"]) == (1, 2, 6)
    assert got["bytes"] == tar["bytes"] == os.path.getsize(dst / "shard-000001.tar")
    assert got["videos"] == {"total": 4, "ok": 1, "skipped": 1, "failed": 2}
    assert [(os.path.basename(p["path"]), p["status"]) for p in got["problems"]] == [
        ("a_notes.mp4", "failed"), ("b_short.mp4", "skipped"), ("d_corrupt.mp4", "failed")]  # fmt: skip
    lineage = f"{got['config_hash']}shard-000001.tar:{tar['sha256']}\n"
    assert got["content_hash"] == hashlib.sha256(lineage.encode()).hexdigest()
    assert read_manifest(str(dst / MANIFEST)).to_json() == {
        k: v for k, v in got.items() if not k.startswith("_")}  # fmt: skip
    # Rerun: both shards done, no task runs, nothing is rewritten.
    before = file_tree(dst)
    mtimes = {n: os.stat(dst / n).st_mtime_ns for n in before}
    again = ingest(str(src), str(dst), cfg, progress=False)
    assert again["_task_cpu_seconds"] == 0 and again["content_hash"] == got["content_hash"]
    assert file_tree(dst) == before
    assert {n: os.stat(dst / n).st_mtime_ns for n in before if n != MANIFEST} == {
        n: t for n, t in mtimes.items() if n != MANIFEST}  # fmt: skip
    # A missing tar is still seen: its shard alone is written again, the same bytes.
    (dst / "shard-000001.tar").unlink()
    healed = ingest(str(src), str(dst), cfg, progress=False)
    assert file_tree(dst) == before and healed["_frames_written"] == 6
    assert os.stat(dst / "shard-000000.stats.json").st_mtime_ns == mtimes["shard-000000.stats.json"]


def legacy_copy(tmp_path):
    """The cb08598 shard set of no clips, its config, and the videos it was given."""
    dst = shutil.copytree(os.path.join(LEGACY, "shards"), tmp_path / "shards")
    cfg = from_dict(IngestConfig, json.loads((dst / MANIFEST).read_text())["config"])
    (videos,) = load_assignment(str(dst))
    return dst, cfg, videos


def test_shard_sets_with_empty_tars_grow_and_heal(ray_local, tmp_path):
    dst, cfg, videos = legacy_copy(tmp_path)
    old = file_tree(dst)
    # A good video appended: a new shard; the old one's empty tar stays listed, as it was.
    good = good_video(tmp_path / "good.mp4")
    grown = ingest("", str(dst), cfg, progress=False, videos=[*videos, good])
    assert grown["shards"] == ["shard-000000.tar", "shard-000001.tar"]
    assert grown["samples_per_shard"] == [0, 3] and grown["num_frames"] == 120
    assert grown["bytes"] == 10240 + os.path.getsize(dst / "shard-000001.tar")
    assert grown["videos"] == {"total": 3, "ok": 1, "skipped": 1, "failed": 1}
    assert {n: (dst / n).read_bytes() for n in ("shard-000000.tar", "shard-000000.stats.json")} \
        == {n: old[n] for n in ("shard-000000.tar", "shard-000000.stats.json")}  # fmt: skip
    # Its stats torn: the shard is written again by this version, with no tar; the empty one
    # is removed. (Its videos are gone since: now failed, no such file.)
    (dst / "shard-000000.stats.json").write_bytes(old["shard-000000.stats.json"][:100])
    healed = ingest("", str(dst), cfg, progress=False, videos=[*videos, good])
    assert not (dst / "shard-000000.tar").exists() and stats(dst, 0)["tars"] == []
    assert [v["status"] for v in stats(dst, 0)["videos"]] == ["failed", "failed"]
    assert healed["shards"] == ["shard-000001.tar"] and healed["num_samples"] == 3
    assert healed["bytes"] == os.path.getsize(dst / "shard-000001.tar")
