"""loratools: inspect, validate, convert, mix and merge LoRA adapters, in one canonical model."""

from __future__ import annotations

from .errors import LoratoolsError
from .formats import detect, load_adapter, save_adapter
from .model import Adapter, Extra, Module, TensorRef
from .version import __version__

#: LoraModule is the name most users look for
LoraModule = Module

__all__ = [
    "Adapter",
    "Extra",
    "LoraModule",
    "LoratoolsError",
    "Module",
    "TensorRef",
    "__version__",
    "detect",
    "load_adapter",
    "save_adapter",
]
