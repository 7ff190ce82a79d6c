"""MAST in pure PyTorch: no Ray, no MLflow, no file I/O, no prints."""

from . import colour, correlation, memory
from .mast import MAST, MASTOutput

__all__ = ["MAST", "MASTOutput", "colour", "correlation", "memory"]
