"""One DAVIS sequence: read, propagate the first mask with MAST, write the results, score.

`evaluate_sequence_files` is the unit of work of jobs.evaluate: a Ray task per sequence, or a
plain call when Ray is off (the same function, so both give identical numbers). Bad input
(missing frames or annotations, size mismatch, no objects, ids beyond the model's label
channels, more predicted objects than GT) becomes a failed `SequenceResult` naming the file
and the fix; it never stops the other sequences.

Shapes: images (T, H, W, 3) uint8 RGB; gt / pred (T, H, W) uint8 ids; frames for the model
(T, 3, H, W) stored uint8 Lab.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from davis.io import (
    DAVIS_PALETTE,
    DavisError,
    read_sequence,
    sequence_files,
    write_mask,
)
from davis.metrics import MetricError, ObjectScore, evaluate_sequence, num_objects
from jobs.eval_config import EvalConfig, PropagationConfig
from model.colour import quantise_lab, rgb_to_lab
from storage import atomic_path
from typedconfig import from_dict

log = logging.getLogger(__name__)

OVERLAY_DIR = "_overlays"  # beside the sequence folders; the official reader ignores it


@dataclasses.dataclass
class SequenceResult:
    name: str
    status: str  # "ok" or "failed"
    error: str = ""
    objects: list[ObjectScore] = dataclasses.field(default_factory=list)
    num_frames: int = 0
    height: int = 0
    width: int = 0
    seconds: float = 0.0
    overlay: str = ""  # path of the sequence picture, "" if none

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def stored_lab(images: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 RGB -> (T, 3, H, W) stored uint8 Lab (the shards' format)."""
    rgb = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return quantise_lab(rgb_to_lab(rgb))


def check_labels(name: str, first_mask: np.ndarray, cfg: PropagationConfig) -> None:
    """Reject what propagation cannot represent, before spending time on it."""
    k = num_objects(first_mask)
    if k == 0:
        raise DavisError(
            f"{name}: the first annotation has no object (ids 1..254); nothing to track"
        )
    if cfg.max_objects is not None and k >= cfg.max_objects:
        raise DavisError(
            f"{name}: object id {k} in the first annotation needs {k + 1} label channels but "
            f"propagation.max_objects={cfg.max_objects}; raise it or remap the ids"
        )


def predict(
    model: torch.nn.Module, images: np.ndarray, first_mask: np.ndarray, cfg: EvalConfig
) -> np.ndarray:
    """(T, H, W) uint8 predicted ids under cfg.protocol; frame 0 is the ground truth (as DAVIS
    results are)."""
    frames = stored_lab(images).to(cfg.device)
    protocol = cfg.protocol
    labels = model.propagate(
        frames,
        torch.from_numpy(first_mask.astype(np.int64)).to(cfg.device),
        max_objects=cfg.propagation.max_objects,
        radius=protocol.radius,
        long_term=protocol.long_term,
        short_term=protocol.short_term,
        top_k=protocol.top_k,
        temperature=protocol.temperature,
    )
    pred = labels.cpu().numpy().astype(np.uint8)
    pred[0] = first_mask
    return pred


def blend(image: np.ndarray, labels: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Object ids painted in DAVIS colours over an RGB frame; background and void untouched."""
    palette = np.array(DAVIS_PALETTE, np.float32).reshape(256, 3)
    paint = (labels > 0) & (labels != 255)
    out = image.astype(np.float32)
    out[paint] = (1 - alpha) * out[paint] + alpha * palette[labels[paint]]
    return out.round().astype(np.uint8)


def write_overlay(
    path: Path, images: np.ndarray, gt: np.ndarray, pred: np.ndarray, cfg: EvalConfig
) -> Path:
    """Ground truth (top) over prediction (bottom) for a few frames, each half labelled
    ("ground truth" / "prediction") and each frame numbered: a GIF or a PNG strip."""
    t = images.shape[0]
    picks = np.unique(np.linspace(0, t - 1, min(t, cfg.overlay_frames)).round().astype(int))
    h, w = images.shape[1:3]
    size = (cfg.overlay_width, max(1, round(h * cfg.overlay_width / w)))
    panels = []
    for i in picks:
        halves = [
            label(
                np.asarray(
                    Image.fromarray(blend(images[i], masks[i])).resize(size, Image.BILINEAR)
                ),
                text,
            )
            for masks, text in ((gt, f"ground truth, frame {i}"), (pred, f"prediction, frame {i}"))
        ]
        panels.append(Image.fromarray(np.concatenate(halves, axis=0)))
    path = path.with_suffix(".gif" if cfg.overlay == "gif" else ".png")
    with atomic_path(path) as tmp:
        if cfg.overlay == "gif":
            panels[0].save(
                tmp, format="GIF", save_all=True, append_images=panels[1:], duration=250, loop=0
            )
        else:
            strip = np.concatenate([np.asarray(p) for p in panels], axis=1)
            Image.fromarray(strip).save(tmp, format="PNG")
    return path


LABEL_HEIGHT = 14  # pixels of the black band a label is written on


def label(rgb: np.ndarray, text: str) -> np.ndarray:
    """`text` in white on a black band across the top of an RGB picture (drawn over it, so
    the picture keeps its size)."""
    import cv2

    out = rgb.copy()
    out[:LABEL_HEIGHT] = 0
    cv2.putText(out, text, (3, 10), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1,
                cv2.LINE_AA)  # fmt: skip
    return out


def evaluate_sequence_files(
    model: torch.nn.Module, root: str | Path, name: str, output: str | Path, cfg: EvalConfig
) -> SequenceResult:
    """Read, predict, write <output>/<name>/<frame>.png, score; bad input -> failed result."""
    start = time.perf_counter()
    result = SequenceResult(name, "ok")
    try:
        files = sequence_files(root, name, cfg.resolution)
        images, gt = read_sequence(files)
        result.num_frames, result.height, result.width = gt.shape
        if len(files.images) < 3:
            raise DavisError(f"{name}: {len(files.images)} frames; DAVIS scoring needs >= 3")
        check_labels(name, gt[0], cfg.propagation)
        pred = predict(model, images, gt[0], cfg)
        out_dir = Path(output) / name
        for frame_id, labels in zip(files.frame_ids, pred):
            write_mask(out_dir / f"{frame_id}.png", labels)
        stale = {p for p in out_dir.glob("*.png")} - {out_dir / f"{i}.png" for i in files.frame_ids}
        for p in stale:  # results of an earlier, longer sequence of the same name
            p.unlink()
        result.objects = evaluate_sequence(
            name, gt, pred, ignore_void=cfg.ignore_void, bound_th=cfg.bound_th
        )
        if cfg.overlay != "none":
            path = write_overlay(Path(output) / OVERLAY_DIR / name, images, gt, pred, cfg)
            result.overlay = str(path)
    except (DavisError, MetricError, ValueError) as e:
        result.status, result.error = "failed", str(e)
        log.warning("sequence %s failed: %s", name, e)
    result.seconds = time.perf_counter() - start
    return result


BASELINE_KEY = "baseline"  # in the state of a baseline (jobs.evaluate: --model baseline:NAME)


def baseline_state(name: str, temperature: float) -> dict[str, Any]:
    """What stands for a model's checkpoint dict when a baseline is evaluated."""
    return {BASELINE_KEY: name, "temperature": temperature}


def model_test_radius(state: dict[str, Any]) -> int:
    """The window radius the model of `state` reads with when the protocol leaves it open:
    its test_radius (a baseline's config is MASTConfig()'s, model/baselines.py)."""
    from model import MASTConfig

    return MASTConfig.from_args(state.get("model_args", {})).test_radius


def build_model(state: dict[str, Any]) -> torch.nn.Module:
    """The MAST of a checkpoint dict, or the baseline a `baseline_state` names."""
    from model import MAST, build_baseline

    if BASELINE_KEY in state:
        return build_baseline(state[BASELINE_KEY], state["temperature"])
    return MAST.from_state(state)


def run_sequence_task(
    state: dict[str, Any], root: str, name: str, output: str, cfg_dict: dict[str, Any]
) -> SequenceResult:
    """Task boundary (Ray or local): build the model from its checkpoint dict and evaluate one
    sequence. Any unexpected error is recorded in the result, never raised."""
    cfg = from_dict(EvalConfig, cfg_dict)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.propagation.torch_threads)
    try:
        model = build_model(state).eval().to(cfg.device)
        return evaluate_sequence_files(model, root, name, output, cfg)
    except Exception as e:  # noqa: BLE001 - task boundary: record, let other sequences run
        log.error("sequence %s crashed:\n%s", name, traceback.format_exc())
        return SequenceResult(name, "failed", error=f"{type(e).__name__}: {e}")
    finally:
        torch.set_num_threads(threads)
