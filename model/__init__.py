"""MAST in pure PyTorch: no Ray, no MLflow, no file I/O, no prints."""

from . import colour, correlation, memory
from .baselines import BASELINES, ColourMatch, CopyFirst, build_baseline
from .config import MASTConfig
from .mast import MAST, MASTOutput

__all__ = [
    "BASELINES",
    "MAST",
    "ColourMatch",
    "CopyFirst",
    "MASTConfig",
    "MASTOutput",
    "build_baseline",
    "colour",
    "correlation",
    "memory",
]
