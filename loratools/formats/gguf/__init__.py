"""GGUF LoRA adapters for llama.cpp and Ollama, both ways.

:mod:`.header` parses the container with bounds, :mod:`.surgery` holds what llama.cpp's converter does to each
architecture (names from the ``gguf`` package), :mod:`.writer` writes a file as ``convert_lora_to_gguf.py`` does,
:mod:`.reader` reads one back into the canonical model with every rule undone.
"""

from __future__ import annotations

from .header import MAGIC, is_gguf, read_header
from .pkg import require
from .reader import NAME, SUFFIX, read
from .surgery import SURGERY
from .writer import PROVENANCE_KEY, blocks_of, make_plan, permute, plan, unpermute, write

__all__ = [
    "MAGIC",
    "NAME",
    "PROVENANCE_KEY",
    "SUFFIX",
    "SURGERY",
    "blocks_of",
    "is_gguf",
    "make_plan",
    "permute",
    "plan",
    "read",
    "read_header",
    "require",
    "unpermute",
    "write",
]
