"""Typed configuration of `jobs.evaluate` (DAVIS-2017 semi-supervised evaluation).

    cfg = load_config(EvalConfig, "configs/eval/default.yaml", ["ray.max_in_flight=4"])

The command-line flags of jobs.evaluate (--split, --sequences, --output) override these keys.
The `protocol` section is the test protocol every result records (jobs/eval_protocol.py).
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Literal

from model.propagate import check_protocol
from typedconfig import ConfigError, positive

SPLITS = ("train", "val", "test-dev", "test-challenge")  # the official ones; others allowed
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
    """The test protocol, recorded with every result: which frames are read and how affinities
    weigh (MAST_NOTES "Test-time memory", "Other test-time protocols"); defaults are MAST's."""

    top_k: int | None = None  # weigh each query's k largest affinities (CRW: 10); None = all
    long_term: tuple[int, ...] = (0, 5)  # absolute frames always in memory (MAST: 0 and 5)
    short_term: tuple[int, ...] = (1, 3, 5)  # offsets back from the current frame (MAST: 1, 3, 5)
    radius: int | None = None  # window radius; None = the model's test_radius (12)
    # Affinities are divided by it before the softmax (CRW: 0.05); None = the model's own.
    temperature: float | None = None

    def validate(self) -> None:
        if self.top_k is not None:
            positive(self.top_k, "protocol.top_k")
        for i, t in enumerate(self.long_term):
            positive(t, f"protocol.long_term[{i}]", allow_zero=True)
        for i, s in enumerate(self.short_term):
            positive(s, f"protocol.short_term[{i}]")
        if self.radius is not None:
            positive(self.radius, "protocol.radius")
        if self.temperature is not None:
            positive(self.temperature, "protocol.temperature")
        try:  # what propagate itself refuses (e.g. frame 1 without a reference)
            check_protocol(self.long_term, self.short_term, self.top_k, self.temperature)
        except ValueError as e:
            raise ConfigError(f"protocol: {e}") from None


@dataclasses.dataclass(frozen=True)
class PropagationConfig:
    """How each sequence task runs propagation, beside the protocol."""

    # The protocol's keys were here before it had its own section (issue 19).
    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "radius": "protocol.radius",
        "long_term": "protocol.long_term",
        "short_term": "protocol.short_term",
    }

    max_objects: int | None = None  # label channels; None = largest first-frame id + 1
    torch_threads: int = 1  # intra-op threads per task (same in Ray and local runs)

    def validate(self) -> None:
        if self.max_objects is not None:
            positive(self.max_objects - 1, "propagation.max_objects - 1")
        positive(self.torch_threads, "propagation.torch_threads")


@dataclasses.dataclass(frozen=True)
class RayEvalConfig:
    """One Ray task per sequence, at most `max_in_flight` at once."""

    enabled: bool = True  # false: the same per-sequence function runs in this process
    address: str | None = None  # None: join a running cluster or start a local one
    max_in_flight: int = 2  # sequence tasks running at once
    num_cpus: float = 1.0  # per task
    num_gpus: float = 0.0  # per task
    memory_gb: float = 0.0  # per task, reserved in Ray's scheduler; 0 = no reservation
    max_retries: int = 2  # retries after a worker crash (system failures, not bad input)

    def validate(self) -> None:
        positive(self.max_in_flight, "ray.max_in_flight")
        positive(self.num_cpus, "ray.num_cpus", allow_zero=True)
        positive(self.num_gpus, "ray.num_gpus", allow_zero=True)
        positive(self.memory_gb, "ray.memory_gb", allow_zero=True)
        positive(self.max_retries, "ray.max_retries", allow_zero=True)


@dataclasses.dataclass(frozen=True)
class EvalMlflowConfig:
    """Where the evaluation is logged, and where models:/ URIs are read from."""

    enabled: bool = True  # false: no evaluation run, tags or promotion (models:/ still read)
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI or the embedded SQLite store
    experiment: str = "mast-eval"  # MLflow experiment of the evaluation runs


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How jobs.evaluate scores a model on DAVIS-2017."""

    split: str = "val"  # ImageSets/2017/<split>.txt names the sequences
    sequences: tuple[str, ...] = ()  # empty = every sequence of ImageSets/2017/<split>.txt
    output: str = "runs/eval"  # results root: <output>/<seq>/00000.png + the two CSVs
    resolution: str = "480p"  # JPEGImages/<resolution> and Annotations/<resolution>
    device: Literal["cpu", "cuda"] = "cpu"  # where each task runs the model
    ignore_void: bool = False  # false = the official tool's numbers (void counts as background)
    bound_th: float = 0.008  # F tolerance: fraction of the diagonal (>= 1: pixels)
    # Picture per sequence (logged to MLflow): an animated GIF, one strip image, or none.
    overlay: Literal["gif", "strip", "none"] = "gif"
    overlay_frames: int = 8  # frames shown per sequence picture
    overlay_width: int = 320  # picture width per frame, pixels
    # baseline:colour's own cosine temperature (CRW's 0.05); protocol.temperature overrides it.
    colour_temperature: float = 0.05
    # Also score baseline:colour on the same set, protocol and options (reused once scored)
    # and report the model's J&F beside it, with the difference: did it learn more than colour?
    compare_colour: bool = True
    protocol: ProtocolConfig = dataclasses.field(default_factory=ProtocolConfig)
    propagation: PropagationConfig = dataclasses.field(default_factory=PropagationConfig)
    ray: RayEvalConfig = dataclasses.field(default_factory=RayEvalConfig)
    mlflow: EvalMlflowConfig = dataclasses.field(default_factory=EvalMlflowConfig)

    def validate(self) -> None:
        if not _SPLIT_NAME.match(self.split):
            raise ConfigError(
                f"split={self.split!r} must name ImageSets/2017/<split>.txt, e.g. one of {SPLITS}"
            )
        positive(self.bound_th, "bound_th")
        positive(self.overlay_frames, "overlay_frames")
        positive(self.overlay_width, "overlay_width")
        positive(self.colour_temperature, "colour_temperature")
        if len(set(self.sequences)) != len(self.sequences):
            raise ConfigError(f"sequences={list(self.sequences)} names a sequence twice")
