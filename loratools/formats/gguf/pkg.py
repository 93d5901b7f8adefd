"""The ``gguf`` package (llama.cpp's own Python library), a regular dependency: its tensor name tables, types and
writer are what loratools follows. An install where it cannot be imported is refused with one clear error."""

from __future__ import annotations

from typing import Any

from ...errors import LoratoolsError


def require() -> Any:
    """The ``gguf`` package, or an Error saying how to get it back."""
    try:
        import gguf
    except ImportError:
        raise LoratoolsError(
            "GGUF needs the gguf package, which cannot be imported in this environment",
            "reinstall it: pip install --force-reinstall 'gguf>=0.10'",
        ) from None
    return gguf
