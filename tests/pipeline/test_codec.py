"""Stored-Lab conversion against model.colour (the independent conversion) and the clip
codecs: exact for png/raw, bounded error for jpeg, corrupt data raises ClipDecodeError."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from model.colour import quantise_lab, rgb_to_lab
from pipeline.codec import (
    MAX_CLIP_PIXELS,
    ClipDecodeError,
    ClipSizeError,
    check_clip_size,
    clip_header,
    decode_clip,
    decoder_scales,
    encode_clip,
    resize_frame,
    rgb_to_stored_lab,
    scaled_size,
)


@pytest.fixture(scope="module")
def rgb():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    y, x = np.mgrid[0:40, 0:48]
    smooth = np.stack([x * 5, y * 6, (x + y) * 3], -1).astype(np.uint8)
    # Extremes: black, white, pure primaries (the a/b range limits).
    corners = np.array(
        [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8
    )
    noise[0, 0, :5] = corners
    return np.concatenate([noise, smooth[None]], 0)  # (4, 40, 48, 3)


def test_stored_lab_matches_model_colour_within_one_level(rgb):
    ours = rgb_to_stored_lab(rgb)  # (T, 3, H, W)
    ref = quantise_lab(rgb_to_lab(torch.from_numpy(rgb).permute(0, 3, 1, 2))).numpy()
    assert ours.shape == (4, 3, 40, 48) and ours.dtype == np.uint8
    diff = np.abs(ours.astype(int) - ref.astype(int))
    # OpenCV approximates the sRGB curve and cube root in float mode: rounding may differ by 1.
    assert diff.max() <= 1 and diff.mean() < 0.2
    # Known values: black L=0 a=b=128; white L=255 a=b=128; pure red a8 = 128 + 80 = 208.
    assert ours[0, :, 0, 0].tolist() == [0, 128, 128]
    assert ours[0, :, 0, 1].tolist() == [255, 128, 128]
    assert ours[0, 1, 0, 2] == pytest.approx(208, abs=1)


def test_uint8_lab_method_within_two_levels(rgb):
    fast = rgb_to_stored_lab(rgb, "uint8")
    ref = quantise_lab(rgb_to_lab(torch.from_numpy(rgb).permute(0, 3, 1, 2))).numpy()
    diff = np.abs(fast.astype(int) - ref.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.3
    with pytest.raises(ValueError, match="float"):
        rgb_to_stored_lab(rgb, "half")


def test_float16_lab_matches_model_colour_unquantised(rgb):
    ours = rgb_to_stored_lab(rgb, dtype="float16")
    ref = rgb_to_lab(torch.from_numpy(rgb).permute(0, 3, 1, 2)).numpy()  # float Lab units
    assert ours.shape == (4, 3, 40, 48) and ours.dtype == np.float16
    diff = np.abs(ours.astype(np.float32) - ref)
    # float16 rounding alone (half of 0.0625 at |x| >= 64): far below uint8's step (0.39 L
    # units, 1 a/b unit) and OpenCV's float approximations (up to 0.4).
    assert diff.max() <= 0.0313 and diff.mean() < 0.01
    assert ours[0, :, 0, 0].tolist() == [0, 0, 0] and ours[0, 0, 0, 1] == pytest.approx(100, 0.01)
    assert ours[0, 1, 0, 2] == pytest.approx(80.1, abs=0.1)  # pure red: a = 80.1
    ext, data = encode_clip(ours, "raw")  # raw keeps float16 exactly
    back = decode_clip(ext, data, 4)
    assert back.dtype == np.float16 and np.array_equal(back, ours)
    for storage in ("jpeg", "png"):
        with pytest.raises(ValueError, match="only be stored raw"):
            encode_clip(ours, storage)
    with pytest.raises(ValueError, match="float16"):
        rgb_to_stored_lab(rgb, dtype="float32")


@pytest.mark.parametrize("storage", ["png", "raw"])
def test_lossless_codecs_roundtrip_exactly(rgb, storage):
    lab = rgb_to_stored_lab(rgb)
    ext, data = encode_clip(lab, storage)
    assert "." not in ext.split(".")[-1] and ext.startswith("lab.")
    assert np.array_equal(decode_clip(ext, data, 4), lab)


def test_jpeg_keeps_planes_separate_with_small_error(rgb):
    lab = rgb_to_stored_lab(rgb[3:])  # the smooth frame: what video looks like
    lab = np.repeat(lab, 3, axis=0)
    ext, data = encode_clip(lab, "jpeg", quality=95)
    out = decode_clip(ext, data, 3)
    err = np.abs(out.astype(int) - lab.astype(int))
    assert out.shape == lab.shape and err.mean() < 1.0 and err.max() <= 8
    assert len(data) < lab.nbytes / 3  # compresses
    # Deterministic bytes (shards are byte-for-byte reproducible).
    assert encode_clip(lab, "jpeg", quality=95)[1] == data


def test_corrupt_clip_raises():
    with pytest.raises(ClipDecodeError):
        decode_clip("lab.jpg", b"\xff\xd8 not really a jpeg", 2)
    with pytest.raises(ClipDecodeError):
        decode_clip("lab.npy", b"garbage", 2)
    lab = np.zeros((2, 3, 8, 8), np.uint8)
    ext, data = encode_clip(lab, "png")
    with pytest.raises(ClipDecodeError):
        decode_clip(ext, data, 3)  # 6 planes of 8 rows do not split into 3 frames x 3 planes


@pytest.mark.parametrize("storage", ["jpeg", "png", "raw"])
def test_clip_size_is_read_from_the_header_before_decoding(storage):
    lab = np.random.default_rng(0).integers(0, 256, (4, 3, 16, 24), dtype=np.uint8)
    ext, data = encode_clip(lab, storage)
    image = (4, 3, 16, 24) if storage == "raw" else (4 * 3 * 16, 24)
    assert clip_header(ext, data) == (image, np.dtype(np.uint8))
    assert check_clip_size(ext, data, 4, (16, 24)) == check_clip_size(ext, data, 4) == image
    assert decode_clip(ext, data, 4, (16, 24)).shape == (4, 3, 16, 24)
    with pytest.raises(ClipSizeError, match=r"the manifest's layout \(4 frames of 16x16\)"):
        decode_clip(ext, data, 4, (16, 16))
    with pytest.raises(ClipSizeError, match="not 3 frames of 3 planes"):
        check_clip_size(ext, data, 3)


def test_headers_of_other_writers_and_huge_clips_are_refused():
    from PIL import Image

    # A progressive JPEG (SOF2, after APP and DQT segments) reads as libjpeg would decode it.
    buf = io.BytesIO()
    Image.fromarray(np.zeros((24, 40), np.uint8)).save(buf, format="JPEG", progressive=True)
    assert clip_header("lab.jpg", buf.getvalue())[0] == (24, 40)
    rgb = io.BytesIO()
    Image.fromarray(np.zeros((24, 40, 3), np.uint8)).save(rgb, format="JPEG")
    with pytest.raises(ClipSizeError, match="3 components; ingest writes grayscale"):
        clip_header("lab.jpg", rgb.getvalue())
    rgb.seek(0)
    Image.fromarray(np.zeros((24, 40, 3), np.uint8)).save(rgb, format="PNG")
    with pytest.raises(ClipSizeError, match="colour type 2"):
        clip_header("lab.png", rgb.getvalue())
    with pytest.raises(ClipSizeError, match="dtype float32"):
        clip_header("lab.npy", encode_clip(np.zeros((1, 3, 2, 2), np.float16), "raw")[1]
                    .replace(b"<f2", b"<f4"))  # fmt: skip
    _, data = encode_clip(np.zeros((2, 3, 8, 8), np.uint8), "raw")
    with pytest.raises(ClipSizeError, match="the member holds 383"):
        clip_header("lab.npy", data[:-1])  # truncated: np.load would allocate first
    # Unknown layout: at most MAX_CLIP_PIXELS values (here a 3-row image 22,369,622 wide).
    wide = np.zeros((1, 3, 1, 2), np.uint8)
    ext, data = encode_clip(wide, "png")
    big = bytearray(data)
    big[16:24] = (MAX_CLIP_PIXELS // 3 + 1).to_bytes(4, "big") + (3).to_bytes(4, "big")
    with pytest.raises(ClipSizeError, match="over the 67,108,864 a clip may hold"):
        check_clip_size(ext, bytes(big), 1)
    with pytest.raises(ClipDecodeError, match="no SOI"):
        clip_header("lab.jpg", b"GIF89a")


def test_resize_policies():
    frame = np.zeros((30, 90, 3), np.uint8)
    frame[:, 30:60] = 255  # white centre third
    crop = resize_frame(frame, (16, 16), "crop")  # scale to 16x48, centre crop 16x16
    assert crop.shape == (16, 16, 3) and crop.min() == 255
    stretch = resize_frame(frame, (16, 16), "stretch")
    assert stretch.shape == (16, 16, 3) and stretch[:, 0].max() == 0 and stretch[:, 8].min() == 255
    tall = resize_frame(np.zeros((35, 63, 3), np.uint8), (64, 64), "crop")  # upscale odd size
    assert tall.shape == (64, 64, 3)


def test_decoder_scales_only_large_shrinks():
    # FFmpeg scales during decode when the output is half the source width or less.
    assert scaled_size(720, 1280, (256, 256), "crop") == (455, 256)
    assert decoder_scales(720, 1280, (256, 256), "crop")
    assert not decoder_scales(272, 640, (256, 256), "crop")  # 602x256: mild, OpenCV
    assert not decoder_scales(35, 63, (64, 64), "crop")  # upscale
    assert decoder_scales(1440, 2560, (64, 64), "stretch")
    # A frame already at the scaled size is only cropped.
    frame = np.arange(256 * 455 * 3, dtype=np.uint32).astype(np.uint8).reshape(256, 455, 3)
    np.testing.assert_array_equal(resize_frame(frame, (256, 256), "crop"), frame[:, 99:355])


@pytest.mark.parametrize(
    "name, codec",
    [("a.mp4", "libx264"), ("b.mkv", "libx264"), ("c.ts", "libx264"), ("d.webm", "libvpx-vp9"),
     ("e.avi", "mpeg4"), ("f.mpg", "mpeg2video"), ("r.mkv", "libx264"), ("g.mp4", "libx264")],
)  # fmt: skip
def test_probe_and_clips_in_every_container(tmp_path, name, codec):
    # The worker's probe reads no packets beyond the container header (`_FAST_PROBE`) and
    # falls back to FFmpeg's default probing when that finds no stream or frame; either way
    # it must give decord's frame size, and the video must ingest, in every common container.
    from ingest_media import write_video

    from pipeline.config import IngestConfig
    from pipeline.decode import _FAST_PROBE, _probe_with, probe_video, video_clips

    rotation = 180 if name.startswith("r") else 0
    preset = "medium" if name.startswith("g") else "ultrafast"  # g: B-frames, High profile
    path = str(
        write_video(tmp_path / name, 9, 48, 64, codec=codec, rotation=rotation, preset=preset)
    )
    rot, h, w, info, anamorphic = probe_video(path)
    assert (rot, h, w, anamorphic) == (rotation, 48, 64, False)
    assert _probe_with(path, _FAST_PROBE, with_info=False)[:3] == (rot, h, w)
    assert (info is None) == (rotation == 0)  # rotated videos get full info from PyAV
    cfg = IngestConfig(clip_len=3, frame_step=2, size=(32, 32), storage="png")
    info, clips = video_clips(path, cfg)
    assert (info.num_frames, info.height, info.width) == (9, 48, 64)
    got = list(clips)
    assert [ci for ci, _, _ in got] == [0] and got[0][1] == [0, 2, 4]
    assert got[0][2].shape == (3, 3, 32, 32) and got[0][2].dtype == np.uint8


@pytest.mark.parametrize(
    "geometry",
    [dict(clip_len=3, frame_step=2, clip_stride=2),  # overlapping clips share frames
     dict(frame_offsets=[0, 1, 5, 6], clip_stride=3),  # sparse: later clips' frames in gaps
     dict(clip_len=2, frame_step=3, dtype="float16", storage="raw", lab="float")],
)  # fmt: skip
def test_clips_equal_an_independent_decode_of_their_frames(geometry):
    # video_clips converts each decoded frame once, into the first clip that needs it, and
    # copies it into later overlapping clips: every clip must equal its frames decoded anew.
    from ingest_media import sample_video_dir

    from pipeline.codec import frame_to_float16_lab, frame_to_stored_lab
    from pipeline.config import IngestConfig
    from pipeline.decode import open_reader, probe_video, read_frames, video_clips

    path = str(sample_video_dir() / "carphone_pristine.mp4")
    cfg = IngestConfig(clips_per_video=0, size=(32, 40), **geometry)
    _, clips = video_clips(path, cfg)
    got = list(clips)
    assert len(got) > 3
    for ci, idx, lab in got:
        assert idx == [ci * (cfg.clip_stride or cfg.span) + o for o in cfg.offsets]
        probe = probe_video(path)  # carphone's pixels are 128:117: scaled to square ones
        reader = open_reader(path, probe.height, probe.width, cfg, probe.anamorphic)
        rgb = [resize_frame(f, cfg.size, "crop") for _, f in read_frames(reader, idx)]
        del reader
        if cfg.dtype == "float16":
            want = np.stack([frame_to_float16_lab(f) for f in rgb])
        else:
            want = np.stack([frame_to_stored_lab(f, cfg.lab) for f in rgb])
        assert lab.dtype == want.dtype
        np.testing.assert_array_equal(lab, want)


def _ingest_one(path, cfg):
    """(stats entry, members) of one video, as the worker writes them (the entry is
    complete once its members are consumed)."""
    from pipeline.worker import _ingest_video

    entry, members = _ingest_video(path, cfg)
    members = list(members)
    return entry, members


@pytest.mark.parametrize("width", [16, 24, 48, 72, 96])
def test_narrow_frames_decode_as_pyav_does(tmp_path, width):
    # decord 0.6 returns frames 16, 24, 48 or 72 pixels wide as (h, w, 6 or 4) arrays of
    # padded rows (the worker's `_rgb` undoes it), whether the video is that narrow or scaled
    # to that width: the frames must equal PyAV's decode (same decoder, bit-exact).
    import av
    import decord
    from ingest_media import sample_video_dir, write_video

    from pipeline.decode import read_frames

    path = str(write_video(tmp_path / "narrow.mp4", 4, 32, width))
    reader = decord.VideoReader(path, num_threads=1)
    got = np.stack([f for _, f in read_frames(reader, [0, 1, 3])])
    del reader
    with av.open(path) as container:
        want = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    np.testing.assert_array_equal(got, np.stack([want[i] for i in (0, 1, 3)]))
    # Scaled to that width while decoding (the worker's large shrinks): swscale's output, up
    # to the scalers' rounding (PyAV's FFmpeg is another build): nowhere near padding bytes.
    bikes = str(sample_video_dir() / "bikes.mp4")
    reader = decord.VideoReader(bikes, width=width, height=40, num_threads=1)
    ((_, frame),) = read_frames(reader, [0])
    del reader
    with av.open(bikes) as container:
        first = next(container.decode(video=0))
    ref = first.reformat(width=width, height=40, format="rgb24", interpolation="BICUBIC")
    assert frame.shape == (40, width, 3)
    assert np.abs(frame.astype(int) - ref.to_ndarray()).mean() < 4


def test_av1_falls_back_to_pyav(tmp_path):
    # decord 0.6's own FFmpeg has no AV1 decoder; PyAV's has: such videos are decoded with
    # PyAV (and say so in their stats entry) instead of failing.
    import av
    from ingest_media import write_video

    from pipeline.codec import frame_to_stored_lab
    from pipeline.config import IngestConfig
    from pipeline.decode import video_clips

    path = str(write_video(tmp_path / "av1.mp4", 10, 48, 64, codec="libsvtav1"))
    cfg = IngestConfig(clip_len=3, frame_step=2, clips_per_video=2, size=(32, 32), storage="png")
    entry, members = _ingest_one(path, cfg)
    assert (entry["status"], entry["clips"], entry["decoder"]) == ("ok", 2, "pyav")
    assert entry["frames"] == 10 and len(members) == 4
    _, clips = video_clips(path, cfg)
    with av.open(path) as container:
        rgb = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    for _, idx, lab in clips:
        want = [frame_to_stored_lab(resize_frame(rgb[i], (32, 32), "crop"), cfg.lab) for i in idx]
        np.testing.assert_array_equal(lab, np.stack(want))


def test_pyav_decoded_video_streams_its_frames(tmp_path, monkeypatch):
    # A rotated video is decoded with PyAV: frame by frame into the clips, never every
    # wanted frame of the video at once (a phone video of minutes would not fit in memory).
    import av
    from ingest_media import write_video

    from pipeline import decode
    from pipeline.codec import frame_to_stored_lab
    from pipeline.config import IngestConfig

    decoded = []
    pyav_frames = decode._pyav_frames

    def counted(*args):
        for i, frame in pyav_frames(*args):
            decoded.append(i)
            yield i, frame

    monkeypatch.setattr(decode, "_pyav_frames", counted)
    path = str(write_video(tmp_path / "rotated.mp4", 40, 72, 128, rotation=90))
    info, clips = decode.video_clips(path, IngestConfig(clip_len=4, size=(32, 32)))
    assert (info.decoder, info.height, info.width) == ("pyav", 128, 72)
    ci, idx, _ = next(clips)
    assert (ci, idx, decoded) == (0, [0, 1, 2, 3], [0, 1, 2, 3])  # no frame beyond the clip
    rest = [lab for _, _, lab in clips]
    assert len(rest) == 9 and decoded == list(range(40))
    # 2.25x shrink: FFmpeg scaled the coded 128x72 frames to 57x32 before the rotation; the
    # same as rotating full-size frames and shrinking them with OpenCV, but for rounding
    # (an upside-down frame would be off by about 60 levels on average).
    with av.open(path) as container:
        rgb = [np.rot90(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    want = [frame_to_stored_lab(resize_frame(f, (32, 32), "crop"), "float") for f in rgb[4:]]
    diff = np.abs(np.concatenate(rest).astype(int) - np.stack(want))
    assert diff.mean() < 4


@pytest.mark.parametrize("rotation", [0, 90])
def test_anamorphic_video_is_stored_as_shown(tmp_path, rotation):
    # Pixels twice as wide as tall (SAR 2:1, as DV or DVD sources have): a player shows the
    # coded 96x64 as 192x64, and so must the clips, decoded by decord (or, rotated, by PyAV):
    # FFmpeg scales to square pixels while decoding. Kept at the coded aspect, the 32x32
    # centre crop would hold twice the width of the picture (about 10 levels off on average).
    import av
    import cv2
    from ingest_media import write_video

    from pipeline.codec import frame_to_stored_lab
    from pipeline.config import IngestConfig
    from pipeline.decode import probe_video

    path = str(write_video(tmp_path / "sar.mp4", 12, 64, 96, sar=(2, 1), rotation=rotation))
    cfg = IngestConfig(clip_len=3, frame_step=2, clips_per_video=2, size=(32, 32), storage="raw")
    entry, members = _ingest_one(path, cfg)
    shown = [64, 192] if rotation == 0 else [192, 64]
    assert (entry["status"], entry["size"], entry["anamorphic"]) == ("ok", shown, True)
    assert entry.get("decoder", "decord") == ("decord" if rotation == 0 else "pyav")
    got = np.stack([np.load(io.BytesIO(d)) for name, d in members if name.endswith(".npy")])
    with av.open(path) as container:
        rgb = [cv2.resize(f.to_ndarray(format="rgb24"), (192, 64), interpolation=cv2.INTER_CUBIC)
               for f in container.decode(video=0)]  # fmt: skip
    rgb = [np.rot90(f, k=rotation // 90) for f in rgb]
    starts = [json.loads(d)["frame_indices"] for name, d in members if name.endswith(".json")]
    want = np.stack([[frame_to_stored_lab(resize_frame(rgb[i], (32, 32), "crop"), cfg.lab)
                      for i in idx] for idx in starts])  # fmt: skip
    assert got.shape == want.shape == (2, 3, 3, 32, 32)
    assert np.abs(got.astype(int) - want).mean() < 3
    # A pixel shape beyond 1:4..4:1 is a wrong header, not a picture: kept as coded.
    bogus = write_video(tmp_path / "bogus.mp4", 3, 64, 96, sar=(9, 1), rotation=rotation)
    assert (probe_video(str(bogus)).width, probe_video(str(bogus)).anamorphic) == (96, False)


def test_truncated_video_keeps_the_clips_before_the_cut(tmp_path):
    # A download cut short: the header (moov first) promises 120 frames, the data stops
    # halfway. decord refuses the file, PyAV decodes up to the cut: the clips before it are
    # kept and the entry says where it stopped.
    import av
    from ingest_media import sample_video_dir

    from pipeline.config import IngestConfig

    whole = tmp_path / "faststart.mp4"
    with av.open(str(sample_video_dir() / "carphone_pristine.mp4")) as src:
        with av.open(str(whole), "w", options={"movflags": "faststart"}) as out:
            stream = out.add_stream_from_template(src.streams.video[0])
            for packet in src.demux(src.streams.video[0]):
                if packet.dts is not None:
                    packet.stream = stream
                    out.mux(packet)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    cfg = IngestConfig(clip_len=8, clips_per_video=0, size=(32, 32), storage="png")
    entry, members = _ingest_one(str(whole), cfg)
    assert (entry["status"], entry["clips"], entry["message"]) == ("ok", 15, "")
    entry, members = _ingest_one(str(cut), cfg)
    assert entry["status"] == "ok" and entry["frames"] == 120 and 3 <= entry["clips"] < 15
    assert entry["message"].startswith(f"stopped after {entry['clips']} clips: ")
    assert len(members) == 2 * entry["clips"]


def test_members_of_a_video_are_produced_clip_by_clip():
    # The worker writes a video's samples to the tar as they are made: a long video never
    # sits in memory as encoded clips (the tar bytes are unchanged by this).
    from ingest_media import sample_video_dir

    from pipeline.config import IngestConfig
    from pipeline.worker import _ingest_video

    cfg = IngestConfig(clip_len=8, clips_per_video=0, size=(32, 32))
    entry, members = _ingest_video(str(sample_video_dir() / "carphone_pristine.mp4"), cfg)
    assert entry["clips"] == 0  # nothing decoded yet
    first = [next(members), next(members)]
    assert [name.split(".", 1)[1] for name, _ in first] == ["json", "lab.jpg"]
    assert entry["clips"] == 1 and entry["frames"] == 120
    assert len(list(members)) == 2 * 14 and entry["clips"] == 15


def test_clips_stop_with_a_clear_error_where_the_frames_end():
    # A stream with fewer frames than its container promised: the clips made so far come
    # out, then an error that says which frame was missing (the worker keeps those clips).
    from pipeline.config import IngestConfig
    from pipeline.decode import _clips

    frame = np.full((8, 8, 3), 128, np.uint8)
    cfg = IngestConfig(clip_len=2, size=(8, 8), storage="png")
    clips = _clips(((i, frame) for i in range(3)), [0, 2], cfg)
    assert next(clips)[:2] == (0, [0, 1])
    with pytest.raises(ValueError, match=r"the video ends before frame 3 \(clip 1\)"):
        next(clips)
