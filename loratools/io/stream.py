"""Streaming big files through threads: the I/O under merge's engine, which knows nothing of what the bytes mean.

* :class:`Writer`: writes an output file in its own thread, so that reading and computing the next chunk overlap
  with the disk; byte ranges copied as they are go file to file inside the kernel (``copy_file_range``); blocks
  filled by work threads are written at their place in the file (:meth:`Writer.put`).
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
import errno
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
from .direct import ALIGN, Pages, aligned_buffer
from .progress import Tick

if TYPE_CHECKING:
    import torch

#: bytes of output handed to the writing thread at a time
IO_BYTES = 16 << 20
#: output buffers in flight between the reading thread, the compute and the writing thread
DEPTH = 3
#: bytes of a block that a work thread fills and the writing thread writes where it belongs (:meth:`Writer.put`)
BLOCK_BYTES = 2 << 20
#: blocks in flight: the work threads wait for one to come back when the writing thread is behind
BLOCKS = 8
#: the writing thread starts the disk's work after every so many bytes (sync_file_range: the fsync before the
#: rename then has little left to wait for)
WRITEBACK_BYTES = 32 << 20
# ---- the writing thread --------------------------------------------------------------------------------------


class Writer:
    """Writes in a thread so that reading and computing the next chunk overlap with the disk. Byte ranges copied
    as they are go file to file in the same thread, in order, so they overlap with the compute too.

    All of the output goes through this one thread: the file system lets one write into a file at a time, and a
    work thread that waited for that would not be computing. Work threads fill blocks (:meth:`block`) and hand
    them over with their place in the file (:meth:`put`); the main thread's writes (:meth:`write`, :meth:`copy`)
    go on in order from the file's position, which :meth:`skip_to` moves past a range the blocks fill.

    ``direct``: where the file system allows it, the bytes go to the disk around the page cache (O_DIRECT,
    :mod:`loratools.io.direct`; ``size``: the file's, reserved first); blocks are then filled at the offset of
    their place within a page."""

    def __init__(self, fh: Any, direct: bool = False, size: int = 0) -> None:
        self.fh = fh
        # the file this object has open, through its descriptor (never its path again: nothing can be swapped in
        # between); where /proc is not there, through the page cache
        proc = f"/proc/self/fd/{fh.fileno()}" if direct and os.path.isdir("/proc/self/fd") else None
        self.pages = Pages.open(proc, size, name=str(fh.name)) if proc else None
        self.closed = False
        self.pos = 0  # direct: where write()/copy() go on
        self.stages: Queue[mmap.mmap] = Queue()  # direct: buffers for write()/copy(), going round
        self.stages_made = 0
        self.q: Queue[Any] = Queue()
        self.slots = threading.Semaphore(DEPTH)  # write() items in the queue: their data is held until written
        self.free: Queue[torch.Tensor] = Queue()
        self.size, self.made, self.pinned = 0, 0, False
        self.blocks: Queue[mmap.mmap] = Queue()
        self.blocks_made = 0
        self.blocks_lock = threading.Lock()
        self.unsynced = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def direct(self) -> bool:
        return self.pages is not None

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            kind, done = item[0], item[-1]
            try:
                if self.error is not None:
                    continue
                if self.pages is not None:
                    self.pages.check()
                    # _run_direct calls it (once its bytes are on the disk, or as it fails): never here as well,
                    # or a failure would give a buffer back twice and two users would then fill it at once
                    mine, done = done, None
                    self._run_direct(item, mine)
                    continue
                if kind == "copy":
                    self._copy(*item[1:-1])
                    self.unsynced += item[3]
                elif kind == "seek":
                    self.fh.seek(item[1])
                elif kind == "put":
                    _, block, off, n, pos, _ = item
                    put(self.fh.fileno(), memoryview(block)[off : off + n], pos)
                    self.unsynced += n
                else:
                    self.fh.write(item[1])
                    self.unsynced += len(item[1])
                if self.unsynced >= WRITEBACK_BYTES:
                    self.fh.flush()
                    start_writeback(self.fh.fileno())
                    self.unsynced = 0
            except BaseException as e:  # surfaced in write()/copy()/put()/close()
                self.error = e
            finally:
                if done is not None:
                    done()

    # -- direct writes (this thread only) --

    def _run_direct(self, item: tuple[Any, ...], done: Callable[[], None] | None) -> None:
        assert self.pages is not None
        kind = item[0]
        if kind == "put":
            _, block, off, n, pos, _ = item
            self.pages.write(block, off, n, pos, done)
            return
        try:
            if kind == "seek":
                self.pos = item[1]
            elif kind == "copy":
                _, fd, src, n, tick, _ = item
                while n:
                    k, off, stage = min(n, IO_BYTES), self.pos % ALIGN, self._stage()
                    try:
                        if os.preadv(fd, [memoryview(stage)[off : off + k]], src) != k:
                            raise FileFormatError(f"{self.fh.name}: its base file was cut short while reading")
                    except BaseException:
                        self.stages.put(stage)
                        raise
                    self.pages.write(stage, off, k, self.pos, lambda stage=stage: self.stages.put(stage))  # type: ignore[misc]
                    self.pos, src, n = self.pos + k, src + k, n - k
                    if tick:
                        tick(k, 0)
            else:
                view = memoryview(item[1]).cast("B")
                for i in range(0, len(view), IO_BYTES):
                    part, stage = view[i : i + IO_BYTES], self._stage()
                    off = self.pos % ALIGN
                    stage[off : off + len(part)] = part
                    self.pages.write(stage, off, len(part), self.pos, lambda stage=stage: self.stages.put(stage))  # type: ignore[misc]
                    self.pos += len(part)
        finally:
            if done is not None:
                done()

    def _stage(self) -> mmap.mmap:
        """A buffer for write()/copy(): two of them going round (one fills while the other is written)."""
        if self.stages_made < 2 and self.stages.empty():
            self.stages_made += 1
            return aligned_buffer(IO_BYTES + ALIGN)
        return self.stages.get()

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

    def block(self, nbytes: int = BLOCK_BYTES) -> mmap.mmap:
        """A page-aligned block for :meth:`put` of ``nbytes`` placed at any offset within a page (from any
        thread): those of BLOCK_BYTES, at most BLOCKS of them, go round (it waits for one to come back when all
        are in flight); a larger one is made for the occasion."""
        if nbytes > BLOCK_BYTES:
            return aligned_buffer(nbytes + ALIGN)
        with self.blocks_lock:
            if self.blocks_made < BLOCKS and self.blocks.empty():
                self.blocks_made += 1
                return aligned_buffer(BLOCK_BYTES + ALIGN)
        return self.blocks.get()

    def put(self, block: mmap.mmap, off: int, nbytes: int, pos: int) -> None:
        """Queue ``block[off:off + nbytes]`` (a :meth:`block`) to be written at ``pos``, where ``off`` must be
        ``pos % ALIGN``; the block goes back to the free ones once written (from any thread)."""

        def back() -> None:
            if len(block) == BLOCK_BYTES + ALIGN:  # one of ours (a larger one, for a single long row, is dropped)
                self.blocks.put(block)

        if off != pos % ALIGN or off + nbytes > len(block):
            back()
            raise ValueError("a block's bytes must sit at their place's offset within a page")
        if self.closed:  # (a job still running after a failure: its block comes back, nothing more is written)
            back()
            raise OSError(errno.EBADF, f"{self.fh.name}: written after it was closed")
        if self.error is not None:
            back()
            raise self.error
        self.q.put(("put", block, off, nbytes, pos, back))

    def write(self, data: Any, done: Callable[[], None] | None = None) -> None:
        """Queue ``data``; ``done()`` is called once it is written (or dropped after an error)."""
        if self.error is not None:
            raise self.error
        self.slots.acquire()

        def written() -> None:
            self.slots.release()
            if done is not None:
                done()

        self.q.put(("write", data, written))

    def copy(self, fd: int, pos: int, n: int, tick: Tick | None) -> None:
        """Queue a copy of ``n`` bytes of file ``fd`` from ``pos`` (advancing ``tick`` as it goes)."""
        if self.error is not None:
            raise self.error
        self.q.put(("copy", fd, pos, n, tick, None))

    def skip_to(self, pos: int) -> None:
        """Go on writing at ``pos``: the bytes before it, from the last queued write on, are written by others
        (:meth:`put`, from the work threads) while this thread writes what comes after."""
        if self.error is not None:
            raise self.error
        self.q.put(("seek", pos, None))

    def close(self) -> None:
        """Wait for the queued writes; then (direct) the last page and the file's size, or (through the page
        cache) the start of its writeback. Raises the first error of the writing thread."""
        self.closed = True
        try:
            self.q.put(None)
            self.thread.join()
            if self.error is not None:
                raise self.error
            if self.pages is None:
                self.fh.flush()
                start_writeback(self.fh.fileno())
                return
            self.pages.finish()
        finally:
            if self.pages is not None:
                self.pages.close()  # its threads joined: nothing writes once this returns
                self.pages = None


def kernel_copy(fd: int, out: Any, pos: int, n: int, tick: Tick | None) -> bool:
    """Copy ``n`` bytes of ``fd`` from ``pos`` to the end of ``out`` inside the kernel (copy_file_range);
    False, with nothing written, where that is not supported."""
    copy = getattr(os, "copy_file_range", None)
    if copy is None or not n:
        return False
    out.flush()
    dest = out.tell()  # at this position, not the end: work threads may be writing further on (put)
    left = n
    try:
        while left:
            k = copy(fd, out.fileno(), min(left, 1 << 30), pos, dest + n - left)
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
        out.seek(dest + n - left)
    return True


def put(fd: int, data: Any, pos: int) -> None:
    """All of ``data`` into file ``fd`` at ``pos`` (the file's position is not moved)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        k = os.pwrite(fd, view[done:], pos + done)
        if k <= 0:
            raise OSError(errno.EIO, f"short write at byte {pos + done}")
        done += k


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
