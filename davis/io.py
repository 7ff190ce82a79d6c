"""Reading a DAVIS root and writing results in the official layout.

Layout (MAST_NOTES "Official DAVIS-2017 semi-supervised evaluation"):
    <root>/JPEGImages/480p/<seq>/00000.jpg ...
    <root>/Annotations/480p/<seq>/00000.png ...   indexed PNGs, 0 background, 255 void
    <root>/ImageSets/2017/<split>.txt              one sequence name per line
Results: <out>/<seq>/00000.png ... (indexed, DAVIS palette), then
    <out>/global_results-<split>.csv        J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay
    <out>/per-sequence_results-<split>.csv  Sequence,J-Mean,F-Mean (one row per <seq>_<k>)
both with 3 decimals, exactly as the official tool writes them (pandas, float_format %.3f).

Every file is written atomically (temp file + rename). Shapes: images (H, W, 3) uint8 RGB,
masks (H, W) uint8 ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from davis.metrics import MEASURES, ObjectScore, global_scores
from storage import atomic_path

RESOLUTION = "480p"
YEAR = "2017"


class DavisError(ValueError):
    """A DAVIS root or sequence is missing files or inconsistent; the message names the file."""


def davis_palette() -> list[int]:
    """The DAVIS (PASCAL VOC) palette: id bits spread over the high bits of R, G, B; 768 ints.
    0 black, 1 (128, 0, 0), 2 (0, 128, 0), 3 (128, 128, 0), ..., 255 (224, 224, 192)."""
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


DAVIS_PALETTE = davis_palette()


# ---------------------------------------------------------------------------------------------
# Reading


def read_split(root: str | Path, split: str) -> list[str]:
    """Sequence names of ImageSets/2017/<split>.txt, in file order."""
    path = Path(root) / "ImageSets" / YEAR / f"{split}.txt"
    if not path.is_file():
        raise DavisError(
            f"{path} does not exist: --davis-root must hold ImageSets/{YEAR}/{split}.txt "
            "(a DAVIS-2017 trainval root or `python -m davis.sample --output DIR`)"
        )
    names = [line.strip() for line in path.read_text().splitlines()]
    return [n for n in names if n]


@dataclasses.dataclass(frozen=True)
class SequenceFiles:
    """The image and annotation files of one sequence, sorted by frame id."""

    name: str
    images: tuple[Path, ...]
    masks: tuple[Path, ...]

    @property
    def frame_ids(self) -> tuple[str, ...]:
        return tuple(p.stem for p in self.images)


def check_sequence_name(name: str) -> None:
    """A sequence name is one folder name: it becomes a path under the DAVIS root and under the
    results folder, so a split file naming `../x` or `a/b` must not reach outside them."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise DavisError(
            f"sequence name {name!r} is not a folder name (no '/', '\\', NUL, '.' or '..'); "
            "fix the split file or --sequences"
        )


def sequence_files(root: str | Path, name: str, resolution: str = RESOLUTION) -> SequenceFiles:
    """List a sequence's files and check that every frame has an image and an annotation."""
    check_sequence_name(name)
    image_dir = Path(root) / "JPEGImages" / resolution / name
    mask_dir = Path(root) / "Annotations" / resolution / name
    images = tuple(sorted(image_dir.glob("*.jpg")))
    masks = tuple(sorted(mask_dir.glob("*.png")))
    if not images:
        raise DavisError(f"{name}: no frames in {image_dir} (expected 00000.jpg, 00001.jpg, ...)")
    if not masks:
        raise DavisError(f"{name}: no annotations in {mask_dir} (expected 00000.png, ...)")
    image_ids = [p.stem for p in images]
    mask_ids = [p.stem for p in masks]
    if image_ids != mask_ids:
        missing = sorted(set(image_ids) - set(mask_ids))
        extra = sorted(set(mask_ids) - set(image_ids))
        what = f"annotations missing for frames {missing[:5]}" if missing else ""
        what += f"{'; ' if what else ''}annotations without frames {extra[:5]}" if extra else ""
        raise DavisError(
            f"{name}: frames and annotations differ ({what}) in {image_dir} and {mask_dir}; "
            "scoring needs a ground-truth PNG for every JPEG"
        )
    return SequenceFiles(name, images, masks)


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise DavisError(f"{path}: unreadable image ({e})") from None


def read_mask(path: str | Path) -> np.ndarray:
    """(H, W) uint8 ids of an indexed (palette) or greyscale PNG."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DavisError(
                    f"{path}: mode {im.mode} is not an indexed PNG; DAVIS masks store object "
                    "ids as palette indices (write them with davis.io.write_mask)"
                )
            return np.asarray(im, dtype=np.uint8).copy()
    except OSError as e:
        raise DavisError(f"{path}: unreadable mask ({e})") from None


def read_sequence(files: SequenceFiles) -> tuple[np.ndarray, np.ndarray]:
    """Images (T, H, W, 3) uint8 RGB and annotations (T, H, W) uint8, same size checked."""
    images = np.stack([read_image(p) for p in files.images])
    masks = []
    for p in files.masks:
        mask = read_mask(p)
        if mask.shape != images.shape[1:3]:
            raise DavisError(
                f"{p}: annotation is {mask.shape[1]}x{mask.shape[0]} but the frames of "
                f"{files.name} are {images.shape[2]}x{images.shape[1]} (width x height)"
            )
        masks.append(mask)
    return images, np.stack(masks)


def read_result_masks(results_dir: str | Path, name: str, frame_ids: Sequence[str]) -> np.ndarray:
    """(T, H, W) predicted ids from <results_dir>/<name>/<frame_id>.png."""
    masks = []
    for frame_id in frame_ids:
        path = Path(results_dir) / name / f"{frame_id}.png"
        if not path.is_file():
            raise DavisError(f"{name}: result {path} is missing (one PNG per frame)")
        masks.append(read_mask(path))
    return np.stack(masks)


# ---------------------------------------------------------------------------------------------
# Writing


def write_mask(path: str | Path, labels: np.ndarray) -> None:
    """An indexed PNG with the DAVIS palette, written atomically. labels: (H, W) ids 0..255."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise ValueError(f"{path}: labels must be (H, W) ids in 0..255, got {labels.shape}")
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(DAVIS_PALETTE)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_image(path: str | Path, rgb: np.ndarray, quality: int = 95) -> None:
    """A JPEG frame, written atomically. rgb: (H, W, 3) uint8."""
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="JPEG", quality=quality)


def global_table(objects: Sequence[ObjectScore]) -> pd.DataFrame:
    """One row, the seven official global measures."""
    scores = global_scores(objects)
    return pd.DataFrame([[scores[m] for m in MEASURES]], columns=list(MEASURES))


def per_sequence_table(objects: Sequence[ObjectScore]) -> pd.DataFrame:
    """One row per object: Sequence (<seq>_<k>), J-Mean, F-Mean."""
    rows = [(o.name, o.j[0], o.f[0]) for o in objects]
    return pd.DataFrame(rows, columns=["Sequence", "J-Mean", "F-Mean"])


def write_results_csvs(
    out_dir: str | Path, split: str, objects: Sequence[ObjectScore]
) -> tuple[Path, Path]:
    """Write global_results-<split>.csv and per-sequence_results-<split>.csv (always
    overwritten, never reused) in the official tool's format; returns both paths."""
    out_dir = Path(out_dir)
    paths = (
        out_dir / f"global_results-{split}.csv",
        out_dir / f"per-sequence_results-{split}.csv",
    )
    for table, path in zip((global_table(objects), per_sequence_table(objects)), paths):
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False, float_format="%.3f")
    return paths
