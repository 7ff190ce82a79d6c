"""MAST in pure PyTorch: no Ray, no MLflow, no file I/O, no prints."""

from . import colour, correlation, memory
from .config import MASTConfig
from .mast import MAST, MASTOutput

__all__ = ["MAST", "MASTConfig", "MASTOutput", "colour", "correlation", "memory"]
