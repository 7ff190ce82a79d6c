"""Video -> clips of stored Lab frames, streamed: the decoding half of an ingest task.

Decoding: decord, with the reader opened inside the task (`decoder_threads` threads) and
freed after each video. When the output is half the source width or less, FFmpeg scales
while it converts YUV to RGB (`open_reader`): 2.4x less CPU than converting 1280x720 frames
and resizing them with OpenCV. decord mishandles display rotation (it swaps the output size but not
the pixels, and copies fail or return garbage), so every video is probed with PyAV first; a
video with a display-rotation matrix is decoded with PyAV instead and rotated upright
(np.rot90 by the matrix angle, counter-clockwise as FFmpeg's `av_display_rotation_get`).
So is a video that decord cannot open although PyAV decoded its first frame: codecs that
decord 0.6's own FFmpeg lacks, AV1 above all (the stats entry says `"decoder": "pyav"`).
Either way frames stream through `_clips`: a long video never sits in memory decoded.
Anamorphic videos (non-square pixels: a sample aspect ratio other than 1, as DV, DVD and
some broadcast sources have) are scaled by FFmpeg to square pixels while decoding, so stored
frames show the picture as a player does (decord alone would keep the coded aspect).
Grayscale videos decode to RGB with R = G = B, i.e. a = b = 128 in stored Lab.
A frame folder (numbered images, pipeline/frame_folder.py) needs no probe and no decord: its
images are decoded by a thread pool and cut into clips by the same `_clips`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Generator, Iterator
from typing import Any, NamedTuple

import numpy as np

from pipeline.codec import decoder_scales, frame_to_stored, resize_frame, scaled_size
from pipeline.config import MIN_RUN_LEN, IngestConfig
from pipeline.frame_folder import FrameFolder, is_frame_folder


class SkipVideo(Exception):
    """The video is readable but yields no clip (the message says why)."""


@dataclasses.dataclass
class VideoInfo:
    num_frames: int
    fps: float
    height: int  # as displayed (after rotation)
    width: int
    rotation: int  # degrees, 0/90/180/270
    decoder: str = "decord"  # or "pyav": rotated videos, codecs decord's FFmpeg lacks (AV1)
    anamorphic: bool = False  # non-square pixels: FFmpeg scales every frame to square ones


class Probe(NamedTuple):
    rotation: int  # degrees, 0/90/180/270 (the display matrix)
    height: int  # the frame as shown before the rotation: the coded height,
    width: int  # and the coded width times the sample aspect ratio
    info: VideoInfo | None  # when PyAV has to decode the video (rotated)
    anamorphic: bool  # the sample aspect ratio is not 1


def run_bounds(num_frames: int, run_len: int) -> list[tuple[int, int]]:
    """[start, end) of the runs a video of `num_frames` frames is cut into: ceil(n / run_len)
    runs of consecutive frames, none overlapping, lengths differing by at most one, so every
    frame is stored once and no run is a short leftover (a video of run_len + 1 frames gives
    two runs of about run_len / 2 frames, each still long enough for the dynamic stage when
    run_len is at least twice its span: configs/ingest/default.yaml)."""
    if num_frames <= 0:
        return []
    count = -(-num_frames // run_len)
    cuts = [round(i * num_frames / count) for i in range(count + 1)]
    return list(zip(cuts, cuts[1:]))


def clip_frames(num_frames: int, cfg: IngestConfig) -> list[list[int]]:
    """Source-frame indices of every stored clip (or run, with `run_len`) of a video."""
    if cfg.run_len:
        return [list(range(s, e)) for s, e in run_bounds(num_frames, cfg.run_len)]
    return [[s + o for o in cfg.offsets] for s in clip_starts(num_frames, cfg)]


def folder_probe(folder: FrameFolder, fps: float) -> Probe:
    """What `probe_video` says of a video, for a frame folder: its images are its frames, at
    the declared `fps` (IngestConfig.frame_folder_fps), decoded by `FrameFolder.frames`."""
    info = VideoInfo(folder.num_frames, fps, folder.height, folder.width, 0, "images")
    return Probe(0, folder.height, folder.width, info, False)


def clip_starts(num_frames: int, cfg: IngestConfig) -> list[int]:
    """First source frame of every clip of a video (deterministic)."""
    last = num_frames - cfg.span
    if last < 0:
        return []
    if cfg.clips_per_video > 0:
        count = min(cfg.clips_per_video, last + 1)
        return sorted({round(x) for x in np.linspace(0, last, count)})
    return list(range(0, last + 1, cfg.clip_stride or cfg.span))


# Container probing reads no packets beyond the header (probesize is FFmpeg's minimum), and
# the decoder FFmpeg opens while probing decodes nothing (skip_frame; it would decode the
# first frame, and an H.264 stream with B-frames is decoded there whatever the probesize):
# the probe only needs the first frame that it decodes itself, whose size and display matrix
# do not depend on either. At 720p this halves the probe (20 -> 10 ms per video); at 1080p
# H.264 High with B-frames it takes 28 ms instead of 48. A file this fast probe cannot read
# (no stream or no frame found) is probed again with FFmpeg's defaults, as is every rotated
# video (it needs frame count and fps).
_FAST_PROBE = {"probesize": "32", "analyzeduration": "0", "skip_frame": "all"}


def probe_video(path: str) -> Probe:
    """PyAV probe of the first frame; `info` only if PyAV has to decode the video."""
    import av

    try:
        probe = _probe_with(path, _FAST_PROBE, with_info=False)
    except (av.FFmpegError, ValueError):
        probe = _probe_with(path, {}, with_info=False)
    return _probe_with(path, {}, with_info=True) if probe.rotation else probe


def _probe_with(path: str, options: dict[str, str], with_info: bool) -> Probe:
    """Probe with these container options; `with_info`, also the info for decoding with
    PyAV (frame count, fps: maybe a decode of every frame)."""
    import av

    with av.open(path, options=options) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "NONE"  # one frame: thread start-up would cost more than it saves
        first = next(container.decode(stream), None)
        if first is None:
            raise ValueError("video stream has no decodable frame")
        rotation = int(round(getattr(first, "rotation", 0) or 0)) % 360
        # FFmpeg's guess from the container and codec parameters, else what the decoder read
        # from the bitstream (an H.264 SPS) while decoding the first frame; None: square.
        # Real pixel shapes lie within 1:4..4:1; beyond, the header is wrong: kept as coded.
        sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
        width = max(1, round(first.width * sar)) if sar and 0.25 <= sar <= 4 else first.width
        anamorphic = width != first.width
        if not with_info:
            return Probe(rotation, first.height, width, None, anamorphic)
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        count = stream.frames or sum(1 for _ in container.decode(stream)) + 1
        h, w = (first.height, width) if rotation % 180 == 0 else (width, first.height)
        info = VideoInfo(int(count), fps, h, w, rotation, "pyav", anamorphic)
        return Probe(rotation, first.height, width, info, anamorphic)


def open_reader(
    path: str, height: int, width: int, cfg: IngestConfig, anamorphic: bool = False
) -> Any:
    """decord reader of a video shown (height, width); when the output is half the source
    width or less, or the video is `anamorphic`, FFmpeg scales while decoding
    (`_decoder_size`) and frames only need the centre crop of `resize_frame`."""
    import decord

    size = _decoder_size(height, width, cfg, anamorphic)
    kwargs = {} if size is None else {"width": size[0], "height": size[1]}
    return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=cfg.decoder_threads, **kwargs)


def _decoder_size(
    height: int, width: int, cfg: IngestConfig, anamorphic: bool = False
) -> tuple[int, int] | None:
    """(width, height) FFmpeg scales a frame shown (height, width) to while decoding, or
    None when the shrink is milder than 2x (`codec.decoder_scales`) and the pixels are square:
    anamorphic frames are always scaled, to square pixels."""
    if not anamorphic and not decoder_scales(height, width, cfg.size, cfg.resize):
        return None
    return scaled_size(height, width, cfg.size, cfg.resize)


def _stored(frame: np.ndarray, cfg: IngestConfig, out: np.ndarray | None = None) -> np.ndarray:
    """Decoded (h, w, 3) RGB frame -> (3, H, W) stored Lab (uint8 or float16), written
    into `out` when given."""
    return frame_to_stored(resize_frame(frame, cfg.size, cfg.resize), cfg.lab, cfg.dtype, out)


def _pyav_frames(
    path: str, wanted: list[int], info: VideoInfo, cfg: IngestConfig
) -> Generator[tuple[int, np.ndarray], None, None]:
    """Like `read_frames`, decoded with PyAV (every frame up to the last wanted one) and
    rotated upright (np.rot90 by the display-matrix angle). Shrinks of 2x or more are
    scaled by FFmpeg while converting to RGB, averaging areas as OpenCV's INTER_AREA would
    (2.0 ms per 720p AV1 frame, against 3.6 for full-size RGB + OpenCV)."""
    import av

    size = _decoder_size(info.height, info.width, cfg, info.anamorphic)  # after rotation
    if size is not None and info.rotation % 180:
        size = size[::-1]  # as coded, before rotation
    targets = set(wanted)
    last = max(wanted)
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_count = cfg.decoder_threads  # as decord's reader (0: FFmpeg's choice)
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in targets:
                if size is None:
                    rgb = frame.to_ndarray(format="rgb24")
                else:
                    rgb = frame.to_ndarray(
                        format="rgb24", width=size[0], height=size[1], interpolation="AREA"
                    )
                yield i, np.rot90(rgb, k=info.rotation // 90)
            if i >= last:
                break


def video_clips(
    path: str, cfg: IngestConfig
) -> tuple[VideoInfo, Iterator[tuple[int, list[int], np.ndarray]]]:
    """(info, iterator of (clip index, source frame indices, (T, 3, H, W) stored Lab)).

    decord decodes, but for rotated videos and codecs that decord's own FFmpeg build lacks
    (AV1 in decord 0.6's wheels): PyAV decodes those, frames streamed the same way."""
    import decord

    folder = FrameFolder.open(path) if is_frame_folder(path) else None
    probe = folder_probe(folder, cfg.frame_folder_fps) if folder else probe_video(path)
    info, reader = probe.info, None
    if info is None:
        try:
            reader = open_reader(path, probe.height, probe.width, cfg, probe.anamorphic)
        except (decord.DECORDError, RuntimeError, UnicodeEncodeError):
            # PyAV decoded a frame, it can go on (decord cannot even take a non-UTF-8 path)
            info = _probe_with(path, {}, with_info=True).info
    if reader is not None:
        fps = float(reader.get_avg_fps())
        info = VideoInfo(len(reader), fps, probe.height, probe.width, 0, "decord", probe.anamorphic)
    assert info is not None
    clips = clip_frames(info.num_frames, cfg)
    if cfg.run_len and info.num_frames < MIN_RUN_LEN:
        clips = []  # serves no stage: not even a pretrain pair 2 apart
    if not clips:
        del reader
        need = f"run of {MIN_RUN_LEN}" if cfg.run_len else f"clip span {cfg.span}"
        raise SkipVideo(f"too short: {info.num_frames} frames < {need}")
    wanted = sorted({i for idx in clips for i in idx})
    if folder is not None:  # images decoded by a thread pool: decoder_threads (0: a core each)
        threads = cfg.decoder_threads or os.cpu_count() or 1
        frames = folder.frames(wanted, cfg.size, cfg.resize, threads)
    elif reader is None:
        frames = _pyav_frames(path, wanted, info, cfg)
    else:
        frames = read_frames(reader, wanted)  # holds the reader until it is closed
        del reader
    return info, _clips(frames, clips, cfg)


def _clips(
    frames: Generator[tuple[int, np.ndarray], None, None],
    clips: list[list[int]] | list[int],
    cfg: IngestConfig,
) -> Iterator[tuple[int, list[int], np.ndarray]]:
    """Clips (or runs) of the source frames `clips` (index lists, or the clips' first frames:
    then `cfg.offsets` after each) from decoded frames (index, RGB), streamed in index order.

    Each frame is converted once, straight into the clip array that first needs it; `cache`
    keeps (views of) frames a later, overlapping clip needs too. The decoder is closed (and
    its threads freed) when the clips end, also early."""
    cache: dict[int, np.ndarray] = {}
    clips = [c if isinstance(c, list) else [c + o for o in cfg.offsets] for c in clips]
    try:
        for ci, idx in enumerate(clips):
            clip = np.empty((len(idx), 3, *cfg.size), cfg.dtype)
            for t, i in enumerate(idx):
                if i in cache:
                    clip[t] = cache[i]
                    continue
                while True:
                    j, frame = next(frames, (None, None))  # (h, w, 3) uint8 RGB, in order
                    if j is None:
                        raise ValueError(f"the video ends before frame {i} (clip {ci})")
                    if j == i:
                        break
                    cache[j] = _stored(frame, cfg)  # a frame only a later clip needs
                cache[i] = _stored(frame, cfg, clip[t])
            yield ci, idx, clip
            nxt = clips[ci + 1][0] if ci + 1 < len(clips) else None
            for i in [i for i in cache if nxt is None or i < nxt]:
                del cache[i]  # frames no later clip needs
    finally:
        frames.close()


SEEK_GAP = 48  # frames: decode through shorter gaps, seek over longer ones


def read_frames(reader: Any, indices: list[int]) -> Generator[tuple[int, np.ndarray], None, None]:
    """Sorted frame indices -> (index, (h, w, 3) uint8 RGB), reading the stream in order.

    Sequential `next()` with `skip_frames` (decode without colour conversion) over short gaps
    is 2-3x faster than `get_batch` for the dense clips of training data; long gaps seek.
    """
    pos = 0
    for i in indices:
        if i - pos > SEEK_GAP:
            reader.seek_accurate(i)
        elif i > pos:
            reader.skip_frames(i - pos)
        try:
            frame = reader.next()
        except StopIteration:  # fewer frames than the container said: the clips say which
            return
        yield i, _rgb(frame.asnumpy())
        pos = i + 1


def _rgb(frame: np.ndarray) -> np.ndarray:
    """decord 0.6 derives a frame's channel count from FFmpeg's padded row size (the width
    rounded up to 32 pixels, times 3) whenever the width divides it: frames 1-4, 6, 8, 12,
    16, 24, 48 or 72 pixels wide (decoded at that size or scaled to it) come out as
    (h, w, 4..96) arrays of padded RGB rows. Undone here: the rows, as RGB pixels, cut to
    the width (exactly PyAV's decode of the same frames)."""
    h, w, c = frame.shape
    return frame if c == 3 else frame.reshape(h, w * c // 3, 3)[:, :w]
