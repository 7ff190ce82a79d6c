"""The test protocol a DAVIS result was measured under: its canonical id and its record.

The protocol moves J&F by points for the same features (MAST_NOTES "Other test-time
protocols"), so a number is comparable only with one measured under the same protocol.
`Protocol` is the config's `protocol` section resolved against the model (radius None -> the
model's test_radius; frame lists sorted, each frame once), so the record says what ran and two
spellings of one protocol get one id. The id is short, gives back every field, and is valid
inside MLflow tag keys (letters, digits, `_ - .`):

    mast                              MAST's: top-k all, long-term 0,5, short-term 1,3,5,
                                      radius 12, the model's own temperature
    topk10-lt0-st1to20-r12-t0.05      any other: every field; list items joined by "_",
    topkall-lt0_5-st1_3_5-r6-tmodel   runs of 3 or more as "AtoB"; "all" = no top-k,
                                      "model" = the model's own temperature, "none" = no frame

Recorded in (each by one writer): `<output>/protocol-<split>.json` beside the official CSVs
(`write_protocol_file`; the CSVs keep the official tool's exact columns) and `summary.json`
(jobs.evaluate); the evaluation run's tags `davis.protocol` and `davis.protocol.spec` and the
model version's tags (jobs.eval_mlflow); the evaluation key (jobs.eval_reuse, through the
resolved config).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jobs.eval_config import ProtocolConfig
from storage import atomic_path

MAST_ID = "mast"
MAST_RADIUS = 12  # MAST_NOTES "Test-time memory": R = 12 at test


@dataclasses.dataclass(frozen=True)
class Protocol:
    """A protocol as run: every field explicit except the temperature (None = the model's)."""

    top_k: int | None
    long_term: tuple[int, ...]
    short_term: tuple[int, ...]
    radius: int
    temperature: float | None

    @classmethod
    def resolve(cls, cfg: ProtocolConfig, test_radius: int) -> Protocol:
        """The config's protocol for a model whose own window radius is `test_radius`."""
        return cls(
            top_k=cfg.top_k,
            long_term=tuple(sorted(set(cfg.long_term))),
            short_term=tuple(sorted(set(cfg.short_term))),
            radius=test_radius if cfg.radius is None else cfg.radius,
            temperature=cfg.temperature,
        )

    @property
    def id(self) -> str:
        if self == MAST_PROTOCOL:
            return MAST_ID
        return "-".join(
            [
                f"topk{'all' if self.top_k is None else self.top_k}",
                f"lt{_frames(self.long_term)}",
                f"st{_frames(self.short_term)}",
                f"r{self.radius}",
                # repr: the shortest text that reads back as the same float (0.05, 1e-05)
                f"t{'model' if self.temperature is None else repr(float(self.temperature))}",
            ]
        )

    def spec(self) -> dict[str, Any]:
        """{"id": ..., "top_k": ..., ...}: the plain record (JSON, tags, summary.json)."""
        return {"id": self.id, **dataclasses.asdict(self)} | {
            "long_term": list(self.long_term),
            "short_term": list(self.short_term),
        }

    def config(self) -> ProtocolConfig:
        """The config section that runs exactly this protocol (radius explicit)."""
        return ProtocolConfig(**dataclasses.asdict(self))

    def overrides(self) -> list[str]:
        """`protocol.key=value` arguments that select this protocol for any model: the fields
        that differ from the config's defaults, and the radius always (left open, it would be
        the model's own)."""
        out, defaults = [], ProtocolConfig()
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value != getattr(defaults, field.name):
                text = f"[{','.join(map(str, value))}]" if isinstance(value, tuple) else value
                out.append(f"protocol.{field.name}={text}")
        return out


MAST_PROTOCOL = Protocol(top_k=None, long_term=(0, 5), short_term=(1, 3, 5), radius=MAST_RADIUS,
                temperature=None)  # fmt: skip


def _frames(values: tuple[int, ...]) -> str:
    """(0, 5) -> "0_5"; (1, ..., 20) -> "1to20"; (0, 1, 2, 5) -> "0to2_5"; () -> "none"."""
    parts, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{values[i]}to{values[j]}")
        else:
            parts += [str(v) for v in values[i : j + 1]]
        i = j + 1
    return "_".join(parts) or "none"


def protocol_file(split: str) -> str:
    """The protocol record's name beside global_results-<split>.csv."""
    return f"protocol-{split}.json"


def is_protocol_file(name: str) -> bool:
    return name.startswith("protocol-") and name.endswith(".json")


def write_protocol_file(output: Path, split: str, protocol: Protocol) -> Path:
    """<output>/protocol-<split>.json: the protocol of the CSVs beside it (atomic)."""
    path = output / protocol_file(split)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(protocol.spec(), indent=2) + "\n")
    return path
