"""MASTConfig: the one definition of the model's settings.

The training config embeds it (`model:` section), `MAST(config)` is built from it, and every
checkpoint stores it as the plain dict `model_args`. `from_args` reads such a dict back:
keys a checkpoint predates take their defaults here, so checkpoints written before a setting
existed keep loading and resuming (a key this version does not know is refused by name).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from typedconfig.errors import ConfigError, choice, positive

from .colour import DROPOUT_POLICIES


@dataclasses.dataclass(frozen=True)
class MASTConfig:
    """Constructor settings of `model.MAST` (see model/mast.py)."""

    width: int = 64  # ResNet-18 base width: 64 gives the paper's 5,291,648 parameters
    feat_dim: int = 64  # key/query dimension
    train_radius: int = 6  # short-term window radius in training (13x13)
    test_radius: int = 12  # short-term window radius at test time (25x25)
    scale: float | None = None  # affinity scale; None = 1/sqrt(feat_dim) (defect 3); 1.0 = ref code
    # Which Lab channels a training clip loses: "reference" (one of a/b, kept ones x 1.5, as
    # the reference code), "paper" (one of a/b, the other with p = 0.5) or "none".
    channel_dropout: Literal["reference", "paper", "none"] = "reference"
    long_term_gap: int = 15  # references more than this many frames back use ROI localisation
    coarse_radius: int = 12  # coarse ROI search window radius (25x25)
    max_dilation: int = 4  # coarse window dilation = min(max_dilation, gap // 15 + 1)
    loss_weight: float = 20.0  # smooth-L1 on (output x 20, target x 20), as the reference code
    chunk_size: int = 0  # query positions per memory-read chunk; 0 = automatic

    def validate(self) -> None:
        for key in ("width", "feat_dim", "train_radius", "test_radius", "coarse_radius"):
            positive(getattr(self, key), f"model.{key}")
        positive(self.long_term_gap, "model.long_term_gap", allow_zero=True)
        positive(self.max_dilation, "model.max_dilation")
        positive(self.chunk_size, "model.chunk_size", allow_zero=True)
        if self.scale is not None:
            positive(self.scale, "model.scale")
        choice(self.channel_dropout, DROPOUT_POLICIES, "model.channel_dropout")

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> MASTConfig:
        """A checkpoint's `model_args` dict as a config; missing keys take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - names)
        if unknown:
            raise ConfigError(
                f"model_args {unknown} are not settings of this version's MAST "
                f"({sorted(names)}); was the checkpoint written by a newer version?"
            )
        config = cls(**dict(args))
        config.validate()
        return config

    def as_args(self) -> dict[str, Any]:
        """The plain dict checkpoints store as `model_args`."""
        return dataclasses.asdict(self)
