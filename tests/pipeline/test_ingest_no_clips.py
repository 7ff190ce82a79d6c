"""Shards and runs without clips, on a local Ray instance with real videos: a shard whose videos
give no clip writes no tar (its stats alone mark it done and account for its videos), a run
where no video gives a clip writes no manifest and exits 1 with one `error:` line, a rerun
that adds a good video writes the manifest, and shard sets written with empty tars by
earlier versions (tests/fixtures/empty_shard_cb08598) still read, as they are."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from ingest_media import sample_video_dir, write_video
from test_ingest import file_tree

from jobs.ingest import ingest, main, parse_args
from pipeline.config import IngestConfig
from pipeline.manifest import MANIFEST, build_manifest, read_manifest
from pipeline.shard_stats import read_done, shard_tars
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


def test_no_clip_at_all_writes_no_manifest_and_adding_a_video_does(ray_local, tmp_path, capsys):
    src, dst = tmp_path / "in", tmp_path / "out"
    notes, short = bad_videos(src, short_frames=1)
    # The default config (runs of up to 48 frames) as a user runs it, at a small size.
    args = ["--input", str(src), "--output", str(dst), "--no-progress", "size=[32,32]",
            "videos_per_shard=2"]  # fmt: skip
    assert main(parse_args(args)) == 1
    out, err = capsys.readouterr()
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: no video in {src} gave a clip (1 skipped, 1 failed; the summary above gives "
        "each one's reason), so no manifest was written: add videos that give clips and rerun, "
        "or fix these and rerun with --overwrite (shards already done are not read again)"
    ]
    assert "  clips                0   frames 0" in out and "per frame -" in out
    assert "  bytes                0" in out and "manifest:" not in out
    assert "too short: 1 frames < run of 3" in out and "InvalidDataError" in out
    # No manifest, no tar: the shard's stats hold the videos and their reasons.
    assert sorted(os.listdir(dst)) == ["assignment.json", "shard-000000.stats.json"]
    empty = (dst / "shard-000000.stats.json").read_bytes()
    assert [(v["path"], v["status"]) for v in json.loads(empty)["videos"]] == [
        (notes, "failed"), (short, "skipped")]  # fmt: skip
    mtime = os.stat(dst / "shard-000000.stats.json").st_mtime_ns
    # A good video sorts first but becomes a new shard: the done shard keeps its videos.
    good = good_video(src / "0_good.mp4")
    assert main(parse_args(args)) == 0
    out, err = capsys.readouterr()
    assert f"manifest: {dst / MANIFEST}" in out and "error:" not in err
    assert load_assignment(str(dst)) == [[notes, short], [good]]
    assert (dst / "shard-000000.stats.json").read_bytes() == empty
    assert os.stat(dst / "shard-000000.stats.json").st_mtime_ns == mtime
    assert not (dst / "shard-000000.tar").exists()
    manifest = read_manifest(str(dst / MANIFEST))
    assert manifest.shards == ("shard-000001.tar",) and manifest.samples_per_shard == (3,)
    assert (manifest.num_samples, manifest.num_frames, manifest.num_source_frames) == (3, 120, 120)
    assert manifest.bytes == os.path.getsize(dst / "shard-000001.tar")
    assert manifest.videos == {"total": 3, "ok": 1, "skipped": 1, "failed": 1}
    problems = [(p.path, p.status) for p in manifest.problems]
    assert problems == [(notes, "failed"), (short, "skipped")]


def legacy_copy(tmp_path):
    """The cb08598 shard set of no clips, its config, and the videos it was given."""
    dst = shutil.copytree(os.path.join(LEGACY, "shards"), tmp_path / "shards")
    cfg = from_dict(IngestConfig, json.loads((dst / MANIFEST).read_text())["config"])
    (videos,) = load_assignment(str(dst))
    return dst, cfg, videos


def test_shard_sets_with_empty_tars_still_read(tmp_path):
    # Stats that list cb08598's empty tar are done and give back the manifest it wrote, byte
    # for byte (the empty tar listed, as training read it then). No Ray: nothing is written.
    dst, cfg, videos = legacy_copy(tmp_path)
    old = file_tree(dst)
    spec = ShardSpec(0, tuple(videos), str(dst))
    done = read_done([spec], cfg)
    assert done == {0: json.loads(old["shard-000000.stats.json"])}
    assert shard_tars(spec, done[0]) == [{"name": "shard-000000.tar", "num_samples": 0,
        "bytes": 10240, "sha256": hashlib.sha256(bytes(10240)).hexdigest()}]  # fmt: skip
    rebuilt = build_manifest([spec], done, {}, cfg).write(str(tmp_path))
    assert open(rebuilt, "rb").read() == old[MANIFEST]
    # A rerun over the same videos: done, nothing to write, and the manifest of 0 samples
    # that version left is removed (this one writes none); the shard's files stay.
    again = ingest("", str(dst), cfg, progress=False, videos=videos)
    assert again["_manifest_url"] == "" and again["num_samples"] == 0
    assert again["shards"] == ["shard-000000.tar"] and again["bytes"] == 10240
    assert file_tree(dst) == {n: b for n, b in old.items() if n != MANIFEST}


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
