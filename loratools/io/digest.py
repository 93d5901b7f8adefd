"""The sha256 of a file, the one way loratools computes it (provenance records, extract's inputs, kohya's
``sshs_model_hash`` of a data section)."""

from __future__ import annotations

import hashlib
import os
import threading

#: bytes read per step (hashlib and file reads release the GIL: a thread can hash beside other work)
CHUNK = 1 << 22


def _new() -> hashlib._Hash:
    return hashlib.sha256()


def file_sha256(path: str | os.PathLike[str], *, start: int = 0, stop: threading.Event | None = None) -> str:
    """The hex sha256 of the bytes of ``path`` from offset ``start`` to its end.

    ``stop`` (set from another thread) ends the reading between two chunks; the result is then ``""``: no digest.
    """
    h = _new()
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


class StreamDigest:
    """The hex sha256 of bytes fed in order (a data section as it is written), and of those in ``window``
    (``(start, end)`` offsets in the stream; None: no window)."""

    def __init__(self, window: tuple[int, int] | None = None) -> None:
        self.window = window
        self.whole, self.part = _new(), _new()
        self.at = 0

    def update(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk).cast("B")
        self.whole.update(view)
        if self.window is not None:
            lo, hi = max(self.window[0], self.at), min(self.window[1], self.at + len(view))
            if lo < hi:
                self.part.update(view[lo - self.at : hi - self.at])
        self.at += len(view)
