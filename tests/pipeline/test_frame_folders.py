"""Frame-folder inputs (folders of numbered JPEG/PNG frames, as YouTube-VOS and DAVIS ship their
videos) on a local Ray instance: real frames of bikes.mp4 written as images, listed from a root,
a glob and a list, mixed with a video file; stored values against a direct conversion of the same
images, the accounting of every kind of bad folder, byte-identical reruns and resume."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from ingest_media import sample_video_dir
from PIL import Image

from jobs.ingest import ingest
from pipeline.codec import decode_clip, frame_to_stored, resize_frame
from pipeline.config import IngestConfig
from pipeline.frame_folder import numbering_problem
from pipeline.reader import list_videos
from typedconfig import from_dict

pytestmark = pytest.mark.ray

# 3 frames 2 apart, two clips per video (frames 0, 2, 4 and n-5, n-3, n-1), stored losslessly
CFG = dict(clip_len=3, frame_step=2, clips_per_video=2, size=[64, 64], storage="png",
           videos_per_shard=3, frame_folder_fps=6.0)  # fmt: skip
FRAME_SIZE = (136, 320)  # (h, w): bikes.mp4 (272x640) at half size, to keep the test small
EXTS = IngestConfig().extensions


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _write(folder: Path, frames: list[np.ndarray], ext: str = "jpg", step: int = 1) -> Path:
    """Frames (RGB) as numbered images 00000.ext, 0000<step>.ext, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, rgb in enumerate(frames):
        path = folder / f"{i * step:05d}.{ext}"
        if ext == "png":  # Pillow: OpenCV's PNG codec breaks in a process that imported decord
            Image.fromarray(rgb).save(path)
        else:
            cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """YouTube-VOS layout (JPEGImages/<video>/...) with every kind of bad folder and a video
    file beside the folders; a DAVIS layout (JPEGImages/480p/<seq>/, masks in Annotations)."""
    bikes = sample_video_dir() / "bikes.mp4"
    with av.open(str(bikes)) as container:
        decoded = [f.to_ndarray(format="rgb24") for _, f in zip(range(24), container.decode())]
    frames = [cv2.resize(f, FRAME_SIZE[::-1], interpolation=cv2.INTER_AREA) for f in decoded]
    root = tmp_path_factory.mktemp("frames")
    ytvos = root / "ytvos" / "JPEGImages"
    _write(ytvos / "a_jpeg", frames, step=5)  # YouTube-VOS numbering: every 5th source frame
    _write(ytvos / "b_png", frames[:12], "png")
    bad = _write(ytvos / "c_unreadable", frames[:12])
    (bad / "00002.jpg").write_bytes(b"not a jpeg")
    mixed = _write(ytvos / "d_mixed", frames[:12])
    cv2.imwrite(str(mixed / "00002.jpg"), cv2.resize(frames[2], (300, 120)))
    gaps = _write(ytvos / "e_gaps", frames[:12])
    (gaps / "00004.jpg").unlink()
    (gaps / "00005.jpg").unlink()
    _write(ytvos / "f_short", frames[:3])
    (ytvos / "f_short" / "notes.txt").write_text("not a frame")  # ignored, counted in the log
    shutil.copy(bikes, ytvos / "g_bikes.mp4")
    late = _write(ytvos / "h_late", frames[:12])  # the first clip (0, 2, 4) is read, not 11
    (late / "00011.jpg").write_bytes(b"")
    davis = root / "davis"
    _write(davis / "JPEGImages" / "480p" / "bear", frames[:8])
    _write(davis / "Annotations" / "480p" / "bear", [f // 2 for f in frames[:8]], "png")
    (root / "empty").mkdir()
    return {"frames": frames, "root": root, "ytvos": ytvos, "davis": davis}


@pytest.fixture(scope="module")
def from_root(ray_local, corpus, tmp_path_factory):
    dst = tmp_path_factory.mktemp("out") / "root"
    manifest = ingest(str(corpus["ytvos"]), str(dst), from_dict(IngestConfig, CFG), progress=False)
    return dst, manifest


def _tree(dst: Path) -> dict[str, bytes]:
    """Every shard and stats file (the manifest records run times)."""
    return {p.name: p.read_bytes() for p in sorted(dst.iterdir()) if "shard-" in p.name}


def _stats(dst: Path) -> dict[str, dict]:
    videos = {}
    for p in dst.glob("*.stats.json"):
        for v in json.loads(p.read_text())["videos"]:
            videos[os.path.basename(v["path"])] = v
    return videos


def test_listing_layouts_globs_and_lists(corpus, tmp_path):
    ytvos, davis = corpus["ytvos"], corpus["davis"]
    names = ["a_jpeg", "b_png", "c_unreadable", "d_mixed", "e_gaps", "f_short", "g_bikes.mp4",
             "h_late"]  # fmt: skip
    expected = [str(ytvos / n) for n in names]
    assert list_videos(str(ytvos), EXTS) == expected
    assert list_videos(str(ytvos / "*"), EXTS) == expected
    listing = tmp_path / "list.txt"  # relative to the list, with and without trailing slashes
    rel = os.path.relpath(ytvos, tmp_path)
    listing.write_text("".join(f"{rel}/{n}{'/' if i % 2 else ''}\n" for i, n in enumerate(names)))
    assert list_videos(str(listing), EXTS) == expected
    # DAVIS: the root lists the sequences of JPEGImages, not the masks of Annotations
    assert list_videos(str(davis), EXTS) == [str(davis / "JPEGImages" / "480p" / "bear")]
    # a frame folder given as SRC is one video
    assert list_videos(str(ytvos / "a_jpeg"), EXTS) == [str(ytvos / "a_jpeg")]
    # linked folders are searched, by their link's path; a link back up is searched once
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "v").symlink_to(ytvos / "a_jpeg")
    (linked / "loop").symlink_to(".")
    assert list_videos(str(linked), EXTS) == [str(linked / "v")]


def test_numbering():
    assert numbering_problem([0, 5, 10, 15]) == ""  # YouTube-VOS: every 5th source frame
    assert numbering_problem([3]) == ""
    assert "2 missing (4, 5)" in numbering_problem([0, 1, 2, 3, 6, 7])
    assert "1 missing (10)" in numbering_problem([0, 5, 15])
    assert numbering_problem([0, 5, 7]) == "the numbering steps by 2 but 5 follows 0"
    assert numbering_problem([0, 1, 1, 2]) == "two images are numbered 1"


def test_every_folder_is_accounted_for(from_root, corpus):
    dst, manifest = from_root
    assert manifest["videos"] == {"total": 8, "ok": 4, "skipped": 1, "failed": 3}
    videos, ytvos = _stats(dst), corpus["ytvos"]
    for name, frames in (("a_jpeg", 24), ("b_png", 12)):
        v = videos[name]
        assert (v["status"], v["clips"], v["frames"]) == ("ok", 2, frames)
        assert (v["fps"], v["size"], v["decoder"]) == (6.0, list(FRAME_SIZE), "images")
    assert videos["g_bikes.mp4"]["status"] == "ok" and videos["g_bikes.mp4"]["fps"] == 25.0
    fix_image = "replace the image (copy it again from the dataset) or remove the folder from SRC"
    assert videos["c_unreadable"]["message"] == (
        f"FrameFolderError: unreadable image {ytvos}/c_unreadable/00002.jpg (10 bytes, not a "
        f"JPEG or PNG image); {fix_image}"
    )
    assert videos["d_mixed"]["message"] == (
        f"FrameFolderError: mixed image sizes: {ytvos}/d_mixed/00002.jpg is 300x120, the "
        "folder's first image 00000.jpg is 320x136 (width x height); resize the frames to one "
        "size, or remove the folder from SRC"
    )
    assert videos["e_gaps"]["message"] == (
        f"FrameFolderError: {ytvos}/e_gaps: gaps in the numbering (step 1): 2 missing (4, 5); "
        "restore the missing images, or split the folder where the numbering breaks"
    )
    for name in ("c_unreadable", "d_mixed", "e_gaps"):
        assert videos[name]["status"] == "failed" and videos[name]["clips"] == 0
    assert (videos["f_short"]["status"], videos["f_short"]["message"]) == (
        "skipped", "too short: 3 frames < clip span 5",
    )  # fmt: skip
    # an image that breaks after the first clip: its clips stay, as a video that stops partway
    assert (videos["h_late"]["status"], videos["h_late"]["clips"]) == ("ok", 1)
    assert videos["h_late"]["message"] == (
        f"stopped after 1 clips: FrameFolderError: unreadable image {ytvos}/h_late/00011.jpg "
        f"(an empty file); {fix_image}"
    )
    problems = {os.path.basename(p["path"]): p["status"] for p in manifest["problems"]}
    assert problems == {"c_unreadable": "failed", "d_mixed": "failed", "e_gaps": "failed",
                        "f_short": "skipped", "h_late": "ok"}  # fmt: skip


def test_stored_frames_equal_a_direct_conversion(from_root, corpus):
    """Every stored frame against cv2/Pillow reading the image it came from, resized by
    codec.resize_frame, converted by codec.frame_to_stored (PNG storage: lossless)."""
    dst, _ = from_root
    cfg = from_dict(IngestConfig, CFG)
    seen = set()
    for tar_path in dst.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            record = json.loads(data) if name.endswith(".json") else None
            if record is None or not os.path.isdir(record["source"]):
                continue
            folder = Path(record["source"])
            clip = decode_clip("lab.png", members[name.replace(".json", ".lab.png")], 3)
            images = sorted(os.listdir(folder))
            for t, i in enumerate(record["frame_indices"]):
                rgb = np.asarray(Image.open(folder / images[i]).convert("RGB"))
                direct = frame_to_stored(resize_frame(rgb, cfg.size, cfg.resize), cfg.lab)
                diff = np.abs(clip[t].astype(int) - direct)
                if images[i].endswith(".png"):  # decoded at full size: the same pixels
                    assert diff.max() <= 1
                else:  # libjpeg decodes at 1/2 scale (0.6x the CPU) before INTER_AREA:
                    # as close as the stored JPEG q95 planes (mean 0.7 levels, p99 3) come
                    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 8
                seen.add((folder.name, i))
            assert record["fps"] == 6.0 and record["original_size"] == list(FRAME_SIZE)
    assert {f for f, _ in seen} == {"a_jpeg", "b_png", "h_late"} and len(seen) == 15


def test_glob_list_and_rerun_write_the_same_bytes(from_root, corpus, tmp_path):
    dst, manifest = from_root
    ytvos = corpus["ytvos"]
    cfg = from_dict(IngestConfig, CFG)
    listing = tmp_path / "videos.txt"
    listing.write_text("".join(f"{p}/\n" for p in sorted(ytvos.iterdir())))
    for src in (str(ytvos / "*"), str(listing), str(ytvos)):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        assert ingest(src, str(out), cfg, progress=False)["videos"] == manifest["videos"]
        assert _tree(out) == _tree(dst)
    # resume: a shard whose stats file (the done marker) is gone is written again, the rest
    # are left alone (a folder's identity is its path: the same assignment). Shard 1's
    # folders (d_mixed, e_gaps, f_short) give no clip: it has no tar, before or after.
    before = _tree(dst)
    assert [n for n in before if n.endswith(".tar")] == ["shard-000000.tar", "shard-000002.tar"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in dst.glob("shard-*")}
    (dst / "shard-000001.stats.json").unlink()
    (dst / "shard-000002.stats.json").unlink()
    ingest(str(ytvos), str(dst), cfg, progress=False)
    assert _tree(dst) == before
    changed = {p.name for p in dst.glob("shard-*") if p.stat().st_mtime_ns != mtimes[p.name]}
    assert changed == {"shard-000001.stats.json", "shard-000002.stats.json", "shard-000002.tar"}


def test_empty_and_missing_folders_in_a_list(ray_local, corpus, tmp_path):
    root = corpus["root"]
    bear = corpus["davis"] / "JPEGImages" / "480p" / "bear"
    listing = tmp_path / "list.csv"
    listing.write_text(f"path\n{root / 'empty'}\n{bear}\n{root / 'gone'}/\n")
    manifest = ingest(str(listing), str(tmp_path / "out"), from_dict(IngestConfig, CFG),
                      progress=False)  # fmt: skip
    videos = _stats(tmp_path / "out")
    assert manifest["videos"] == {"total": 3, "ok": 1, "skipped": 0, "failed": 2}
    assert videos["bear"]["clips"] == 2 and videos["bear"]["frames"] == 8
    assert videos["empty"]["message"] == (
        f"FrameFolderError: no numbered images in the folder {root / 'empty'}; pass folders of "
        "numbered images (00000.jpg, 00001.png, ...) or video files"
    )
    assert videos["gone"]["status"] == "failed" and "no such file" in videos["gone"]["message"]
