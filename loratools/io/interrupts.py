"""Stopping work at safe points. The CLI's handlers for SIGINT, SIGTERM and SIGHUP call :func:`interrupt`: the
exception it is given is raised at once, unless the main thread is inside a :func:`critical` block, where it waits
until the block ends or the work reaches a :func:`checkpoint`.

Why: an exception raised at an arbitrary bytecode can land inside threading's and queue's own code (between a
lock's release and the bookkeeping that follows it) and lose a wake-up, leaving a worker thread waiting forever and
the process hanging on join. Work that hands items between threads (merge's chunk threads and writer) runs inside
a critical block and calls checkpoint() between chunks, so Ctrl-C stops it within milliseconds, always between
two hand-offs. Renames and temp creation run inside one too, so they are never cut in half. Only the main thread's
blocks count (a signal handler runs in the main thread).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class _State:
    depth = 0
    pending: BaseException | None = None


_STATE = _State()


def _main() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """A block that :func:`interrupt` does not cut short; a pending interruption is raised as it ends."""
    if not _main():
        yield
        return
    _STATE.depth += 1
    try:
        yield
    finally:
        _STATE.depth -= 1
        if _STATE.depth == 0:
            checkpoint()


def checkpoint() -> None:
    """A safe point: raise the pending interruption, if any."""
    if _STATE.pending is not None and _main():
        pending, _STATE.pending = _STATE.pending, None
        raise pending


def interrupt(e: BaseException) -> None:
    """Raise ``e`` now or, inside a :func:`critical` block, at its next checkpoint or as it ends."""
    if _STATE.depth:
        _STATE.pending = _STATE.pending or e
        return
    raise e


def reset() -> None:
    """Forget a pending interruption (a new CLI invocation in the same process: tests)."""
    _STATE.pending = None
