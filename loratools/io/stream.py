"""Streaming big files through threads: the I/O under merge's engine, which knows nothing of what the bytes mean.

* :class:`Writer`: writes an output file in its own thread, so that reading and computing the next chunk overlap
  with the disk; byte ranges copied as they are go file to file inside the kernel (``copy_file_range``).
* :class:`Pool`: threads that run small jobs side by side, one core each; :func:`threads` makes one per run and
  joins it at the end, :func:`settle` cancels or waits for the jobs of a failed step.
* :class:`WorkBuffers`: work tensors reused from job to job, one set per thread.
* :func:`mapped` and :func:`advise`: a file's bytes in place through a copy-on-write memory map, with hints to
  the kernel about the range about to be read or done with.

Hand-offs between threads happen inside the caller's :func:`loratools.io.interrupts.critical` block: a Ctrl-C
waits for the caller's next checkpoint, never lands inside a queue's own code.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from queue import Queue
from typing import TYPE_CHECKING, Any

from ..errors import FileFormatError
from .atomic import start_writeback
from .progress import Tick

if TYPE_CHECKING:
    import torch

#: bytes of output handed to the writing thread at a time
IO_BYTES = 16 << 20
#: output buffers in flight between the reading thread, the compute and the writing thread
DEPTH = 3


# ---- the writing thread --------------------------------------------------------------------------------------


class Writer:
    """Writes in a thread so that reading and computing the next chunk overlap with the disk. Byte ranges copied
    as they are go file to file in the same thread, in order, so they overlap with the compute too."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.q: Queue[Any] = Queue(maxsize=DEPTH)
        self.free: Queue[torch.Tensor] = Queue()
        self.size, self.made, self.pinned = 0, 0, False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            try:
                if item is None:
                    return
                if item[0] == "copy":
                    if self.error is None:
                        self._copy(*item[1:])
                        start_writeback(self.fh.fileno())
                    continue
                _, data, done = item
                try:
                    if self.error is None:
                        self.fh.write(data)
                        start_writeback(self.fh.fileno())  # the disk works while we compute: fsync waits less
                finally:
                    if done is not None:
                        done()
            except BaseException as e:  # surfaced in write()/copy()/close()
                self.error = e
            finally:
                self.q.task_done()

    def _copy(self, fd: int, pos: int, n: int, tick: Tick | None) -> None:
        if kernel_copy(fd, self.fh, pos, n, tick):
            return
        while n:
            k = min(n, IO_BYTES)
            data = os.pread(fd, k, pos)
            if len(data) != k:
                raise FileFormatError(f"{self.fh.name}: its base file was cut short while reading")
            self.fh.write(data)
            pos, n = pos + k, n - k
            if tick:
                tick(k, 0)

    def buffer(self, nbytes: int, pinned: bool = False) -> torch.Tensor:
        """A byte buffer of at least ``nbytes`` to fill and :meth:`write` with ``done=give_back(it)``: at most
        DEPTH of them, allocated once and going round (fresh pages for every 16 MB cost more than the
        arithmetic)."""
        import torch

        if nbytes > self.size or pinned != self.pinned:  # larger ones: wait for the old ones, then drop them
            for _ in range(self.made):
                self.free.get()
            self.size, self.pinned, self.made = max(nbytes, IO_BYTES), pinned, 0
        if self.made < DEPTH and self.free.empty():
            self.made += 1
            return torch.empty(self.size, dtype=torch.uint8, pin_memory=pinned)
        return self.free.get()

    def give_back(self, buf: torch.Tensor) -> None:
        self.free.put(buf)

    def write(self, data: Any, done: Callable[[], None] | None = None) -> None:
        """Queue ``data``; ``done()`` is called once it is written (or dropped after an error)."""
        if self.error is not None:
            raise self.error
        self.q.put(("write", data, done))

    def copy(self, fd: int, pos: int, n: int, tick: Tick | None) -> None:
        """Queue a copy of ``n`` bytes of file ``fd`` from ``pos`` (advancing ``tick`` as it goes)."""
        if self.error is not None:
            raise self.error
        self.q.put(("copy", fd, pos, n, tick))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def kernel_copy(fd: int, out: Any, pos: int, n: int, tick: Tick | None) -> bool:
    """Copy ``n`` bytes of ``fd`` from ``pos`` to the end of ``out`` inside the kernel (copy_file_range);
    False, with nothing written, where that is not supported."""
    copy = getattr(os, "copy_file_range", None)
    if copy is None or not n:
        return False
    out.flush()
    left = n
    try:
        while left:
            k = copy(fd, out.fileno(), min(left, 1 << 30), pos)
            if k <= 0:
                raise FileFormatError(f"{out.name}: its base file was cut short while copying")
            pos += k
            left -= k
            if tick:
                tick(k, 0)
    except OSError:
        if left != n:  # part of it went out: not a missing feature but a failure
            raise
        return False
    finally:
        out.seek(0, os.SEEK_END)  # copy_file_range moved the descriptor's position, not the buffered file's
    return True


# ---- the work threads ------------------------------------------------------------------------------------------


class Pool:
    """Threads that run jobs side by side, each running torch on one core (small jobs split across cores would
    spend more on hand-offs than on work). One pool per run, closed by :meth:`close`: what has not started is
    cancelled, what runs is finished, and every thread is joined before the memory map they read is closed, so an
    error or a Ctrl-C never leaves a thread inside torch while the interpreter exits."""

    def __init__(self, workers: int, name: str = "work") -> None:
        self.q: Queue[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]] | None] = Queue()
        self.threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        import torch

        torch.set_num_threads(1)  # this thread's own setting (OpenMP's is per thread)
        while True:
            item = self.q.get()
            if item is None:
                return
            fn, args, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # handed to whoever waits on the result
                future.set_exception(e)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self.q.put((fn, args, future))
        return future

    def close(self) -> None:
        for _ in self.threads:
            self.q.put(None)
        for t in self.threads:
            t.join()


def done(result: Any) -> Future[Any]:
    """A job already run (no pool): its result as a future."""
    future: Future[Any] = Future()
    future.set_result(result)
    return future


def settle(jobs: list[tuple[int, Future[Any]]]) -> None:
    """After a failure: cancel the jobs not started, wait for the running ones (a chunk takes milliseconds)."""
    for _, job in jobs:
        if not job.cancel():
            with contextlib.suppress(BaseException):
                job.exception()


@contextlib.contextmanager
def threads(device: str, name: str = "work") -> Iterator[Pool | None]:
    """The work threads of one run on the CPU (None on a single core or another device), named ``name-N``."""
    workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    pool = Pool(workers, name) if device == "cpu" and workers > 1 else None
    try:
        yield pool
    finally:
        if pool is not None:
            pool.close()


class WorkBuffers(threading.local):
    """Work tensors reused from job to job (same shapes recur): no allocation, no fresh pages per job. Each
    thread has its own."""

    def __init__(self) -> None:
        self.cache: dict[tuple[str, tuple[int, ...], str, Any], torch.Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], device: str, dtype: Any = None) -> torch.Tensor:
        import torch

        key = (role, shape, device, dtype)
        t = self.cache.get(key)
        if t is None:
            if len(self.cache) > 16:
                self.cache.clear()
            t = self.cache[key] = torch.empty(shape, dtype=dtype or torch.float32, device=device)
        return t


# ---- a file's bytes in place ------------------------------------------------------------------------------------

#: madvise(MADV_POPULATE_READ), Linux 5.14 and later: map a range in one call, not page by page
POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)
#: madvise(MADV_DONTNEED): unmap a range again (it stays in the page cache)
DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


@contextlib.contextmanager
def mapped(fh: Any, size: int) -> Iterator[mmap.mmap | None]:
    """The open file's bytes, used in place from the page cache (copy-on-write: the mapping is never written);
    None for an empty file. Closed at the end, unless a tensor over it is still referenced (after an error:
    the GC closes it then)."""
    view = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    try:
        yield view
    finally:
        if view is not None:
            with contextlib.suppress(BufferError):
                view.close()


def advise(view: mmap.mmap, start: int, n: int, advice: int | None) -> None:
    """A hint about a range of the map; where the system does not take it, nothing changes but speed."""
    if advice is None or not n or not hasattr(view, "madvise"):
        return
    a0 = start - start % mmap.PAGESIZE
    with contextlib.suppress(OSError, ValueError):
        view.madvise(advice, a0, start + n - a0)
