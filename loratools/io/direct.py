"""Writing a file around the page cache (O_DIRECT), from pieces that arrive in any order: merge's output.

Why: a merge writes as many bytes as it reads. Through the page cache each of them costs a fresh page of memory,
a copy into it, and later its writeback; on a machine with little memory to spare (or a VM that hands freed memory
back to its host) that costs more than the merge's arithmetic. Direct writes go from the merge's own buffers to
the disk, and the data is on the disk when the last one returns.

The rules of direct writes: file offsets, lengths and buffer addresses aligned (:data:`ALIGN`, a page, which every
block size divides). :class:`Pages` takes pieces of any length at any offset, provided each buffer holds its bytes
at the same offset within a page as their place in the file: the whole pages of a piece go to the disk as they
are (by :data:`IO_THREADS` threads, several in flight), the partial pages at its ends are gathered in page
buffers, each written once whole. The last page is written whole and the file cut to its size.

Where the system or the file system refuses direct writes (:func:`open_direct` tries one), the caller writes
through the page cache instead.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Callable
from queue import Queue
from typing import Any

from .atomic import reserve

#: what direct writes are aligned to: file offsets, lengths and buffer addresses
ALIGN = 4096
#: write outputs around the page cache where the system and the file system allow it
DIRECT = hasattr(os, "O_DIRECT")
#: direct writes in flight at once (each waits for the disk: several keep it busy while the next ones are prepared)
IO_THREADS = 3


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """A writable buffer whose first byte is page-aligned (anonymous memory, zeroed)."""
    return mmap.mmap(-1, max(nbytes, 1))


def open_direct(path: str) -> int | None:
    """A second descriptor on a file being written, O_DIRECT, once a first aligned write through it has worked
    (the page it writes is written again later); None where the system or the file system refuses it."""
    if not DIRECT:
        return None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return None
    try:
        if os.pwrite(fd, aligned_buffer(ALIGN), 0) == ALIGN:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


class DirectIO:
    """Threads that write page-aligned pieces to an O_DIRECT descriptor, several at once; ``done`` is called once
    a piece is on the disk (its buffer may then be reused). The first error is kept in ``error``."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd, self.name = fd, name
        self.q: Queue[Any] = Queue()
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(IO_THREADS)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            try:
                if item is None:
                    return
                view, pos, done = item
                try:
                    if self.error is None:
                        self.write(self.fd, view, pos)
                except BaseException as e:  # surfaced by Pages
                    self.error = self.error or e
                finally:
                    if done is not None:
                        done()
            finally:
                self.q.task_done()

    def write(self, fd: int, view: Any, pos: int) -> None:
        if os.pwrite(fd, view, pos) != len(view):
            raise OSError(errno.EIO, f"{self.name}: a write to the disk was cut short")

    def submit(self, view: Any, pos: int, done: Callable[[], None] | None) -> None:
        self.q.put((view, pos, done))

    def drain(self) -> None:
        """Wait until every piece submitted so far is written."""
        self.q.join()

    def close(self) -> None:
        for _ in self.threads:
            self.q.put(None)
        for t in self.threads:
            t.join()


class Pages:
    """A file written around the page cache from pieces (one thread calls :meth:`write`; the writes themselves run
    in :class:`DirectIO`'s threads). Make one with :meth:`open`."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd, self.name = fd, name
        self.io = DirectIO(fd, name)
        self.partial: dict[int, list[Any]] = {}  # page -> [its buffer, bytes of it filled]
        self.end = 0  # the file's size

    @classmethod
    def open(cls, path: str, size: int = 0, name: str | None = None) -> Pages | None:
        """Direct writes into the file at ``path`` (being written; ``/proc/self/fd/N`` for one already open), its
        ``size`` bytes reserved first (a disk too small says so now; direct writes then fill reserved blocks side
        by side instead of each growing the file in turn); None where direct writes are refused. ``name``: the
        file's, for messages."""
        fd = open_direct(path)
        if fd is None:
            return None
        try:
            if size:
                reserve(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, name or path)

    def check(self) -> None:
        if self.io.error is not None:
            raise self.io.error

    def write(self, buf: Any, off: int, n: int, pos: int, done: Callable[[], None] | None = None) -> None:
        """``buf[off:off + n]`` to the file at ``pos``, where ``off`` and ``pos`` are the same distance into a page
        (and ``buf`` page-aligned). Its whole pages are handed to the writing threads as they are (``done`` is
        called once they are on the disk: ``buf`` may not change until then), the pieces at its ends copied into
        page buffers (``done`` at once if that is all of it)."""
        try:
            end = pos + n
            self.end = max(self.end, end)
            a0, a1 = -(-pos // ALIGN) * ALIGN, end // ALIGN * ALIGN
            if a0 >= a1:  # no whole page: all of it copied
                self._piece(buf, off, n, pos)
                if done is not None:
                    done()
                return
            if pos < a0:
                self._piece(buf, off, a0 - pos, pos)
            if a1 < end:
                self._piece(buf, off + a1 - pos, end - a1, a1)
        except BaseException:
            if done is not None:
                done()
            raise
        self.io.submit(memoryview(buf)[off + a0 - pos : off + a1 - pos], a0, done)

    def _piece(self, buf: Any, off: int, n: int, pos: int) -> None:
        while n:
            page, at = divmod(pos, ALIGN)
            k = min(n, ALIGN - at)
            entry = self.partial.setdefault(page, [aligned_buffer(ALIGN), 0])
            entry[0][at : at + k] = memoryview(buf)[off : off + k]
            entry[1] += k
            if entry[1] == ALIGN:  # whole: each byte of the file is written once
                del self.partial[page]
                self.io.submit(entry[0], page * ALIGN, None)
            pos, off, n = pos + k, off + k, n - k

    def finish(self) -> None:
        """After the last piece: the last page (zeros past the end, then cut off), every write waited for, the
        file cut to its size. Raises the first error of the writing threads."""
        for page, (buf, _) in sorted(self.partial.items()):
            self.io.submit(buf, page * ALIGN, None)
        self.partial.clear()
        self.io.drain()
        self.check()
        os.ftruncate(self.fd, self.end)

    def close(self) -> None:
        """The threads joined (after their last write, or a failure) and the descriptor closed."""
        self.io.close()
        os.close(self.fd)
