"""What made a file: every file loratools writes records the command, its parameters and each input's sha256
under one header metadata key, and ``inspect`` shows it."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import LoratoolsError, UsageError
from ..io import jsonfile
from ..io.digest import file_sha256 as sha256
from ..model import PROVENANCE_KEY
from ..version import __version__

#: the header metadata key of the record (the data model names it: a writer carries it across formats)
KEY = PROVENANCE_KEY


def weights_file(source: str | os.PathLike[str]) -> Path:
    """The file whose bytes stand for an adapter (a folder's weights file)."""
    from ..formats import adapter_file, diffusers, peft

    p = adapter_file(source)
    if p.is_dir():
        if peft.is_peft_folder(p):
            return peft.find_weights(p)
        return p / diffusers.FILENAME
    return p


def record(
    command: str, inputs: list[tuple[str, str]], *, origins: Mapping[str, str] | None = None, **params: Any
) -> str:
    """JSON for the header: ``inputs`` are (source, format) pairs; ``origins`` names the inputs that are not what
    their local path says (a Hub repo id fetched into a cache path: ``{path: "owner/name@rev"}``), as the CLI
    resolved them."""
    entry: dict[str, Any] = {"tool": "loratools", "version": __version__, "command": command}
    entry.update({k: v for k, v in params.items() if v is not None})
    names = origins or {}
    # a Hub input is recorded by its repo id, not by the cache path it was downloaded to
    entry["inputs"] = [
        {"source": names.get(str(src)) or str(src), "format": fmt, "sha256": sha256(weights_file(src))}
        for src, fmt in inputs
    ]
    return json.dumps(entry, sort_keys=True)


def check_origins(value: Any) -> Mapping[str, str] | None:
    """The ``origins`` argument of an operation (see :func:`record`), checked before any work: None, or a mapping of
    local path to the name it is recorded under."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise UsageError(
            f"origins must map local paths (str) to the names they are recorded under (str), not {value!r:.80}"
        )
    return value


def parse(metadata: dict[str, str]) -> dict[str, Any] | None:
    raw = metadata.get(KEY)
    if not raw:
        return None
    try:  # header metadata is the file's word: the one JSON reader, and a record of the shape loratools writes
        value = jsonfile.loads(raw, where=KEY)
    except LoratoolsError:
        return None
    return value if _well_formed(value) else None


def _well_formed(value: Any) -> bool:
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not isinstance(value, dict):
        return False
    inputs = value.get("inputs", [])
    if not isinstance(inputs, list) or not all(
        isinstance(i, dict) and isinstance(i.get("source"), str) and isinstance(i.get("sha256"), str) for i in inputs
    ):
        return False
    weights = value.get("weights")
    if weights is not None and not (isinstance(weights, list) and all(number(w) for w in weights)):
        return False
    if any(value.get(k) is not None and not number(value[k]) for k in ("energy", "rank")):
        return False
    return all(value.get(k) is None or isinstance(value[k], str) for k in ("command", "version", "method", "dtype"))


def describe(entry: dict[str, Any]) -> str:
    """One line for people: ``loratools 0.1.0 mix (svd, rank 16, weights 0.7,0.3) of a (sha256 1a2b..), b (..)``."""
    params = []
    for key in ("method", "rank", "energy", "weights", "dtype"):
        if key in entry:
            value = entry[key]
            if isinstance(value, list):
                value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
            params.append(f"{key} {value}")
    inputs = ", ".join(f"{Path(i['source']).name} (sha256 {i['sha256'][:12]})" for i in entry.get("inputs", []))
    return f"loratools {entry.get('version', '?')} {entry.get('command', '?')} ({', '.join(params)}) of {inputs}"
