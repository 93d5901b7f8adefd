"""The sha256 of a file, the one way loratools computes it (provenance records, extract's inputs, kohya's
``sshs_model_hash`` of a data section)."""

from __future__ import annotations

import hashlib
import os
import threading

#: bytes read per step (hashlib and file reads release the GIL: a thread can hash beside other work)
CHUNK = 1 << 22


def file_sha256(path: str | os.PathLike[str], *, start: int = 0, stop: threading.Event | None = None) -> str:
    """The hex sha256 of the bytes of ``path`` from offset ``start`` to its end.

    ``stop`` (set from another thread) ends the reading between two chunks; the result is then ``""``: no digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if start:
            fh.seek(start)
        while True:
            if stop is not None and stop.is_set():
                return ""
            chunk = fh.read(CHUNK)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)
