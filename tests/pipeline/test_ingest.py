"""Ingest on a local Ray instance: real sample videos plus PyAV edge cases, accounting,
Lab values against the independent conversion in model.colour, metadata, resume and append."""

from __future__ import annotations

import json
import logging
import os
import tarfile
from pathlib import Path

import av
import decord
import numpy as np
import pytest
import torch
from ingest_media import edge_case_dir

from jobs.ingest import ingest
from model.colour import quantise_lab, rgb_to_lab
from pipeline.codec import decode_clip, decoder_scales, resize_frame, scaled_size
from pipeline.config import IngestConfig
from pipeline.decode import clip_starts
from pipeline.manifest import read_manifest
from storage import TMP_MARK
from typedconfig import from_dict

pytestmark = pytest.mark.ray

CFG = dict(clip_len=3, frame_step=2, clips_per_video=2, size=[64, 64], storage="png",
           videos_per_shard=3)  # fmt: skip


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    videos = edge_case_dir(root / "in")
    listing = root / "list.txt"
    names = [p.name for p in videos.values()] + ["missing.mp4"]
    listing.write_text("# every edge case, plus a path that does not exist\n" + "\n".join(
        f"in/{n}" for n in names) + "\n")  # fmt: skip
    return videos, listing


@pytest.fixture(scope="module")
def ingested(ray_local, edge, tmp_path_factory):
    videos, listing = edge
    dst = tmp_path_factory.mktemp("out") / "shards"
    manifest = ingest(str(listing), str(dst), from_dict(IngestConfig, CFG), progress=False)
    return videos, dst, manifest


def _samples(dst):
    out = {}
    for name in sorted(os.listdir(dst)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(dst / name) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for mname, data in members.items():
            if mname.endswith(".json"):
                key = mname.split(".")[0]
                record = json.loads(data)
                lab = decode_clip("lab.png", members[f"{key}.lab.png"], 3)
                out[key] = (record, lab, name)
    return out


def test_every_video_is_accounted_for(ingested):
    videos, dst, manifest = ingested
    assert manifest["videos"] == {"total": 11, "ok": 6, "skipped": 1, "failed": 4}
    assert manifest["num_samples"] == 12 and manifest["num_frames"] == 36
    assert manifest["num_shards"] == 4 and manifest["incomplete_shards"] == {}
    assert sum(manifest["samples_per_shard"]) == 12
    problems = {
        os.path.basename(p["path"]): (p["status"], p["message"]) for p in manifest["problems"]
    }
    assert (
        problems["short.mp4"][0] == "skipped"
        and "3 frames < clip span 5" in problems["short.mp4"][1]
    )
    # Each message names what happened and the fix.
    not_video = "the file is not a readable video: download it again or re-encode it"
    assert problems["empty.mp4"] == ("failed", f"ValueError: empty file (0 bytes); {not_video}")
    assert problems["missing.mp4"][0] == "failed"
    assert (
        "no such file" in problems["missing.mp4"][1]
        and "; check the path" in problems["missing.mp4"][1]
    )
    for name in ("corrupt.mp4", "notes.mp4"):
        assert problems[name][0] == "failed" and problems[name][1].endswith(not_video)
    # The stats files say the same, video by video.
    statuses = {}
    for name in os.listdir(dst):
        if name.endswith(".stats.json"):
            for v in json.loads((dst / name).read_text())["videos"]:
                statuses[os.path.basename(v["path"])] = (v["status"], v["clips"])
    assert statuses["bikes.mp4"] == ("ok", 2) and statuses["large.mp4"] == ("ok", 2)
    assert len(statuses) == 11
    assert (dst / "manifest.json").is_file() and len(manifest["content_hash"]) == 64
    # What was written reads back through the validator training uses, as the same JSON.
    written = read_manifest(str(dst / "manifest.json"))
    assert written.to_json() == {k: v for k, v in manifest.items() if not k.startswith("_")}
    assert written.num_samples == 12 and written.problems[0].status in ("skipped", "failed")


def test_lab_matches_independent_conversion_and_metadata(ingested):
    videos, dst, _ = ingested
    samples = _samples(dst)
    assert len(samples) == 12 and all("." not in k for k in samples)
    by_source = {}
    for key, (record, lab, _) in samples.items():
        by_source.setdefault(os.path.basename(record["source"]), []).append((key, record, lab))
    cfg = from_dict(IngestConfig, CFG)
    for name, path in [("carphone.mp4", videos["carphone"]), ("odd.mp4", videos["odd"]),
                       ("large.mp4", videos["large"])]:  # fmt: skip
        reader = decord.VideoReader(str(path))
        n = len(reader)
        for key, record, lab in sorted(by_source[name], key=lambda x: x[1]["clip_index"]):
            ci = record["clip_index"]
            start = clip_starts(n, cfg)[ci]
            assert key.endswith(f"_c{ci:04d}")
            assert record["frame_indices"] == [start, start + 2, start + 4]
            with av.open(str(path)) as container:  # pixel shape: a player shows h x w * sar
                sar = container.streams.video[0].sample_aspect_ratio or 1
            h0, w0 = reader[0].shape[:2]
            assert record["original_size"] == [h0, round(w0 * sar)]
            assert record["fps"] == pytest.approx(reader.get_avg_fps())
            assert lab.shape == (3, 3, 64, 64) and lab.dtype == np.uint8
            h, w = record["original_size"]
            if decoder_scales(h, w, (64, 64), "crop"):  # FFmpeg scales, the worker crops
                sw, sh = scaled_size(h, w, (64, 64), "crop")
                scaled = decord.VideoReader(str(path), width=sw, height=sh)
                rgb = scaled.get_batch(record["frame_indices"]).asnumpy()
                del scaled
            else:
                rgb = reader.get_batch(record["frame_indices"]).asnumpy()
            rgb = np.stack([resize_frame(f, (64, 64), "crop") for f in rgb])
            ref = quantise_lab(rgb_to_lab(torch.from_numpy(rgb).permute(0, 3, 1, 2))).numpy()
            diff = np.abs(ref.astype(int) - lab.astype(int))
            assert diff.max() <= 1, (name, diff.max())  # png: quantisation rounding only
        del reader
    # carphone is QCIF, coded 176x144 with pixels 128:117 (as FFmpeg reads its H.264 header):
    # shown 193x144, about 4:3, by players and in the clips.
    assert by_source["carphone.mp4"][0][1]["original_size"] == [144, 193]
    assert by_source["large.mp4"][0][1]["original_size"] == [1440, 2560]
    # Grayscale: R = G = B -> a = b = 128 (neutral), L varies.
    for _, _, lab in by_source["gray.mp4"]:
        assert np.abs(lab[:, 1:].astype(int) - 128).max() <= 1
        assert lab[:, 0].std() > 5
    # Rotated (display matrix 90 deg counter-clockwise): stored upright, 64 tall x 48 wide
    # source; the red left half of the coded frame ends up at the bottom.
    for _, record, lab in by_source["rotated.mp4"]:
        assert record["rotation"] == 90 and record["original_size"] == [64, 48]
        a = lab[:, 1].astype(float)  # red has a >> 0: a8 well above 128
        assert a[:, -12:].mean() > 180 and abs(a[:, :12].mean() - 128) < 4


def test_shards_are_webdataset_readable(ingested):
    import webdataset as wds

    _, dst, manifest = ingested
    url = str(dst / manifest["shards"][0])
    samples = list(wds.WebDataset(url, shardshuffle=False))
    assert len(samples) == manifest["samples_per_shard"][0]
    assert {"__key__", "json", "lab.png"} <= set(samples[0])


def test_rerun_skips_done_shards_and_appends_new_videos(ingested, edge, tmp_path):
    videos, dst, manifest = ingested
    _, listing = edge
    before = {n: (dst / n).read_bytes() for n in os.listdir(dst)}
    mtimes = {n: os.stat(dst / n).st_mtime_ns for n in os.listdir(dst) if n.endswith(".tar")}
    again = ingest(str(listing), str(dst), from_dict(IngestConfig, CFG), progress=False)
    assert {n: (dst / n).read_bytes() for n in os.listdir(dst)} == before
    assert {n: os.stat(dst / n).st_mtime_ns for n in mtimes} == mtimes  # nothing rewritten
    assert again["content_hash"] == manifest["content_hash"]
    # Append: a new video becomes a new shard; old shards keep their bytes.
    extra = listing.parent / "in" / "aaa_new.mp4"
    extra.write_bytes(videos["carphone"].read_bytes())
    listing.write_text(listing.read_text() + "in/aaa_new.mp4\n")
    try:
        grown = ingest(str(listing), str(dst), from_dict(IngestConfig, CFG), progress=False)
        assert grown["num_shards"] == manifest["num_shards"] + 1
        assert grown["shards"][:-1] == manifest["shards"]
        assert grown["samples_per_shard"][-1] == 2 and grown["num_samples"] == 14
        for name in manifest["shards"]:
            assert (dst / name).read_bytes() == before[name]
        assert grown["content_hash"] != manifest["content_hash"]
        # A different content config is refused rather than mixed into the same DST.
        from typedconfig import ConfigError

        with pytest.raises(ConfigError, match="--overwrite"):
            ingest(str(listing), str(dst), from_dict(IngestConfig, {**CFG, "quality": 50,
                   "storage": "jpeg"}), progress=False)  # fmt: skip
    finally:
        listing.write_text(listing.read_text().replace("in/aaa_new.mp4\n", ""))
        extra.unlink()


def _members(root, names) -> dict[str, bytes]:
    out = {}
    for name in names:
        with tarfile.open(root / name) as tar:
            for m in tar.getmembers():
                out[m.name] = tar.extractfile(m).read()
    return out


def test_shard_mb_splits_tars_and_keeps_every_sample(ingested, edge, tmp_path):
    # With a tiny target every tar closes after the first video that adds clips: shards are
    # split into parts, and the samples are exactly those of the unsplit run.
    _, dst, manifest = ingested
    _, listing = edge
    split = tmp_path / "split"
    cfg = from_dict(IngestConfig, {**CFG, "shard_mb": 0.001})
    got = ingest(str(listing), str(split), cfg, progress=False)
    assert got["num_samples"] == manifest["num_samples"] and got["videos"] == manifest["videos"]
    assert got["num_shards"] > manifest["num_shards"]
    assert "shard-000000_001.tar" in got["shards"] and 0 not in got["samples_per_shard"][:-1]
    assert _members(split, got["shards"]) == _members(dst, manifest["shards"])
    import webdataset as wds

    counts = [len(list(wds.WebDataset(str(split / n), shardshuffle=False))) for n in got["shards"]]
    assert counts == got["samples_per_shard"]
    stats = json.loads((split / "shard-000000.stats.json").read_text())
    assert [t["name"] for t in stats["tars"]] == [n for n in got["shards"] if "000000" in n]
    assert all(v["tar"] in got["shards"] for v in stats["videos"] if v["clips"])
    # Rerun: nothing rewritten; a deleted part makes its shard be written again, identically.
    before = file_tree(split)
    again = ingest(str(listing), str(split), cfg, progress=False)
    assert file_tree(split) == before and again["content_hash"] == got["content_hash"]
    (split / "shard-000000_001.tar").unlink()
    again = ingest(str(listing), str(split), cfg, progress=False)
    assert file_tree(split) == before and again["content_hash"] == got["content_hash"]


def test_overwrite_starts_over(ray_local, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    from ingest_media import write_video

    write_video(src / "a.mp4", 8, 32, 32)
    dst = tmp_path / "out"
    first = ingest(str(src), str(dst), from_dict(IngestConfig, CFG), progress=False)
    (dst / "shard-000000.tar.tmp-dead").write_bytes(b"left over by a killed run")
    cfg2 = from_dict(IngestConfig, {**CFG, "size": [32, 32]})
    second = ingest(str(src), str(dst), cfg2, overwrite=True, progress=False)
    assert second["config"]["size"] == [32, 32] and first["config"]["size"] == [64, 64]
    assert second["num_samples"] == 2
    assert sorted(os.listdir(dst)) == [
        "assignment.json", "manifest.json", "shard-000000.stats.json", "shard-000000.tar",
    ]  # fmt: skip


def file_tree(root) -> dict[str, bytes]:
    """{name: bytes} of every file in `root` (also used by test_ingest_lock.py)."""
    return {n: (root / n).read_bytes() for n in sorted(os.listdir(root))}


@pytest.mark.slow
def test_killed_driver_rerun_equals_uninterrupted_run(ray_local, tmp_path):
    """SIGKILL the ingest CLI after some shards are done, rerun: byte-for-byte equal output.
    SIGKILL a Ray worker in the middle of writing a shard (a system failure, as an OOM kill):
    Ray retries the task and the run alone gives the same output, with no leftovers."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from ingest_media import sample_video_dir

    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):  # six shards of real video, written one at a time
        shutil.copy(sample_video_dir() / "bikes.mp4", src / f"v{i}.mp4")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    args = ["--input", str(src), "--config", "configs/ingest/pretrain.yaml", "--no-progress", "videos_per_shard=1",
            "size=[64,64]", "clips_per_video=0", "clip_len=2", "max_in_flight=1"]  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def cli(dst, **kw):
        cmd = [sys.executable, "-m", "jobs.ingest", "--output", str(dst), *args]
        return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, **kw)  # fmt: skip

    full = tmp_path / "full"
    assert cli(full).wait(timeout=300) == 0
    killed = tmp_path / "killed"
    proc = cli(killed)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        done = (
            [n for n in os.listdir(killed) if n.endswith(".stats.json")] if killed.exists() else []
        )
        if len(done) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    partial = [n for n in os.listdir(killed) if n.endswith(".stats.json")]
    assert 2 <= len(partial) < 6 and not (killed / "manifest.json").exists()
    time.sleep(1.0)  # let Ray reap the dead driver's task before the rerun
    assert cli(killed).wait(timeout=300) == 0
    assert file_tree(killed) == file_tree(full)
    manifest = json.loads((full / "manifest.json").read_text())
    assert manifest["num_shards"] == 6 and manifest["num_samples"] == 6 * 125
    keys = []
    for name in manifest["shards"]:
        with tarfile.open(killed / name) as tar:
            keys += [m.name for m in tar.getmembers() if m.name.endswith(".json")]
    assert len(keys) == len(set(keys)) == 6 * 125  # nothing duplicated or missing

    def shard_workers():  # Ray titles a worker process by the task it runs
        pids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::process_shard"):
                        pids.append(int(pid))
            except OSError:
                continue
        return pids

    worker_killed = tmp_path / "worker_killed"
    proc, killed_pid = cli(worker_killed), None
    deadline = time.monotonic() + 120
    while killed_pid is None and time.monotonic() < deadline and proc.poll() is None:
        names = os.listdir(worker_killed) if worker_killed.exists() else []
        writing = [n for n in names if ".tar" in n and TMP_MARK in n]  # a tar half-written
        if sum(n.endswith(".stats.json") for n in names) >= 2 and writing and shard_workers():
            killed_pid = shard_workers()[0]
            os.kill(killed_pid, signal.SIGKILL)
        time.sleep(0.01)
    assert killed_pid is not None, "no worker was caught writing a shard"
    assert proc.wait(timeout=300) == 0
    assert file_tree(worker_killed) == file_tree(full)  # no half-written tar of the killed attempt


def test_shard_that_cannot_be_written_is_retried_once_then_reported(ray_local, tmp_path, caplog):
    from ingest_media import write_video

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b"):
        write_video(src / f"{name}.mp4", 8, 32, 32)
    dst = tmp_path / "out"
    (dst / "shard-000001.tar").mkdir(parents=True)  # a directory where the tar must go
    cfg = from_dict(IngestConfig, {**CFG, "videos_per_shard": 1})
    with caplog.at_level("WARNING", logger="pipeline.distributor"):
        manifest = ingest(str(src), str(dst), cfg, progress=False)
    assert manifest["shards"] == ["shard-000000.tar"] and manifest["num_samples"] == 2
    assert list(manifest["incomplete_shards"]) == ["shard-000001.tar"]
    assert "IsADirectoryError" in manifest["incomplete_shards"]["shard-000001.tar"]
    assert manifest["videos"] == {"total": 2, "ok": 1, "skipped": 0, "failed": 1}
    assert sum("retrying 1 failed shards once" in r.message for r in caplog.records) == 1
    # Fixed destination: the rerun writes only the missing shard.
    (dst / "shard-000001.tar").rmdir()
    fixed = ingest(str(src), str(dst), cfg, progress=False)
    assert fixed["incomplete_shards"] == {} and fixed["num_samples"] == 4


def test_task_over_its_timeout_is_cancelled_retried_and_reported(ray_local, tmp_path):
    """A task stuck past task_timeout_s (here: simply a slow one) does not hang the run."""
    import shutil
    import time

    from ingest_media import sample_video_dir

    src = tmp_path / "in"
    src.mkdir()
    # 720p, every frame decoded: well over 0.1 s on any CPU (decode alone is >= 0.3 s).
    shutil.copy(sample_video_dir() / "bigbuckbunny.mp4", src / "slow.mp4")
    cfg = from_dict(IngestConfig, {**CFG, "clips_per_video": 0, "clip_stride": 1,
                                   "task_timeout_s": 0.1})  # fmt: skip
    start = time.monotonic()
    manifest = ingest(str(src), str(tmp_path / "out"), cfg, progress=False)
    assert time.monotonic() - start < 30
    assert manifest["shards"] == [] and manifest["videos"]["failed"] == 1
    assert manifest["incomplete_shards"] == {"shard-000000.tar": "timed out after 0.1s"}
    assert manifest["problems"] == [{"path": str(src / "slow.mp4"), "status": "failed",
                                     "message": "shard-000000.tar incomplete: timed out after 0.1s"}]  # fmt: skip


def test_odd_names_damaged_tars_and_output_inside_the_input(ray_local, tmp_path, caplog):
    # A file name that is not UTF-8 is one video like any other (it used to fail its whole
    # shard, good videos with it); a glob over a directory holding DST does not take this
    # job's tars for videos on the rerun; a tar truncated after its shard was done is
    # written again, byte for byte, instead of counting as done.
    from ingest_media import write_video

    src = tmp_path / "in"
    src.mkdir()
    write_video(src / "a.mp4", 8, 32, 32)
    odd = os.fsdecode(bytes(src) + b"/caf\xe9 [1].mp4")  # latin-1 name, glob characters
    write_video(Path(odd), 8, 32, 32)
    cfg = from_dict(IngestConfig, {**CFG, "videos_per_shard": 2})
    dst = src / "out"
    first = ingest(f"{src}/**", str(dst), cfg, progress=False)
    assert first["videos"] == {"total": 2, "ok": 2, "skipped": 0, "failed": 0}
    assert first["num_shards"] == 1 and first["num_samples"] == 4
    before = file_tree(dst)
    with open(dst / "shard-000000.tar", "r+b") as f:
        f.truncate(5000)
    with caplog.at_level(logging.WARNING):
        again = ingest(f"{src}/**", str(dst), cfg, progress=False)
    assert "ignored 4 input files under the output" in caplog.text
    assert "shard-000000.tar is 5000 bytes, its stats say" in caplog.text
    assert again["num_shards"] == 1 and file_tree(dst) == before
