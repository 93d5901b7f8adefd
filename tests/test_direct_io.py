"""loratools.io.direct and the direct mode of stream.Writer, driven directly: pieces in adversarial orders and
sizes, failures injected at chosen points; every ``done`` called exactly once, no hang, every thread joined."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
from conftest import direct_writes_work

from loratools.io import direct as direct_io
from loratools.io import stream

ALIGN = direct_io.ALIGN


@pytest.fixture
def direct_dir(tmp_path: Path) -> Path:
    if not direct_writes_work(tmp_path):
        pytest.skip("this file system takes no direct writes")
    return tmp_path


def _cuts(rng: random.Random, size: int, sizes: list[int]) -> list[tuple[int, int]]:
    pieces, pos = [], 0
    while pos < size:
        n = min(size - pos, rng.choice(sizes))
        pieces.append((pos, n))
        pos += n
    return pieces


SIZES = [0, 1, 5, 100, 4095, 4096, 4097, 8191, 8192, 8193, 20_000]


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 17, 50_000])
@pytest.mark.parametrize("seed", range(4))
def test_pages_puts_every_byte_in_place_whatever_the_order(direct_dir: Path, size: int, seed: int) -> None:
    """Pieces of any size (many smaller than a page, several meeting in one page, some spanning a page boundary
    without a whole page, empty ones) in random order; files smaller than a page, ending on a page boundary, or
    reserved larger than they end: the file is the plan, every done called once."""
    rng = random.Random(seed * 1000 + size)
    want = rng.randbytes(size)
    pieces = _cuts(rng, size, [1, 3, 100, 2000, 4095, 4096, 4097, 9000])
    pieces += [(rng.randrange(0, size + 1), 0) for _ in range(3)]  # empty pieces anywhere inside
    rng.shuffle(pieces)
    path = direct_dir / "out.bin"
    path.write_bytes(b"")
    pages = direct_io.Pages.open(str(path), size + rng.choice([0, 0, 1, 5000]))
    assert pages is not None
    calls: list[int] = []
    try:
        for i, (pos, n) in enumerate(pieces):
            off = pos % ALIGN
            buf = direct_io.aligned_buffer(off + n + ALIGN)
            buf[off : off + n] = want[pos : pos + n]
            pages.write(buf, off, n, pos, lambda i=i: calls.append(i))
        pages.finish()
    finally:
        pages.close()
    assert sorted(calls) == list(range(len(pieces)))
    assert path.read_bytes() == want
    assert not any(t.is_alive() for t in pages.io.threads)


def _writer_plan(rng: random.Random, size: int) -> list[tuple[str, int, int]]:
    plan = []
    for pos, n in _cuts(rng, size, SIZES[1:]):
        plan.append((rng.choice(["write", "copy", "fill"]) if pos else "write", pos, n))
    return plan


def _run_writer(w: stream.Writer, plan: list[tuple[str, int, int]], src_fd: int, want: bytes, seed: int) -> None:
    fills = []
    for kind, pos, n in plan:
        if kind == "write":
            w.write(want[pos : pos + n])
        elif kind == "copy":
            w.copy(src_fd, pos, n, None)  # the source holds the plan's bytes at the same place
        else:
            fills.append((pos, n))
            w.skip_to(pos + n)
    random.Random(seed).shuffle(fills)
    for pos, n in fills:
        block, off = w.block(n), pos % ALIGN
        block[off : off + n] = want[pos : pos + n]
        w.put(block, off, n, pos)


def _threads_of(w: stream.Writer) -> list[threading.Thread]:
    return [w.thread] + (list(w.pages.io.threads) if w.pages is not None else [])


@pytest.mark.parametrize("fail_at", [0, 1, 2, 5, 20])
def test_a_failed_direct_write_surfaces_from_close_without_a_hang(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    """An OSError at the Nth direct write: close() raises it, every block and staging buffer is back in its
    pool (each done called once: no deadlock, no buffer shared), every thread joined."""
    rng = random.Random(fail_at)
    size = 300_000
    want = rng.randbytes(size)
    src = direct_dir / "src.bin"
    src.write_bytes(want)
    plan = _writer_plan(rng, size)
    count = [0]
    lock = threading.Lock()
    real = direct_io.DirectIO.write

    def failing(self: direct_io.DirectIO, fd: int, view: object, pos: int) -> None:
        with lock:
            count[0] += 1
            n = count[0]
        if n == fail_at + 1:
            raise OSError(5, "injected")
        real(self, fd, view, pos)

    monkeypatch.setattr(direct_io.DirectIO, "write", failing)
    monkeypatch.setattr(stream, "BLOCKS", 2)  # a lost block would hang the next block()
    with open(src, "rb") as sf, open(direct_dir / "out.bin", "wb") as fh:
        w = stream.Writer(fh, direct=True, size=size)
        assert w.direct
        threads = _threads_of(w)
        with pytest.raises(OSError, match="injected"):
            try:
                _run_writer(w, plan, sf.fileno(), want, fail_at)
            finally:
                w.close()
    assert not any(t.is_alive() for t in threads)
    assert w.blocks.qsize() == w.blocks_made
    assert w.stages.qsize() == w.stages_made


def test_a_failure_inside_pages_returns_each_block_once(direct_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages.write gives a block back itself when it fails; the writing thread must not give it back a second
    time (the block would then sit twice in the free ones, and two work threads would fill it at once)."""

    def broken(*_: object) -> None:
        raise MemoryError("injected")

    monkeypatch.setattr(direct_io.Pages, "_piece", broken)
    with open(direct_dir / "out.bin", "wb") as fh:
        w = stream.Writer(fh, direct=True, size=10)
        block = w.block(10)
        w.put(block, 0, 10, 0)  # less than a page: all of it goes to _piece
        with pytest.raises(MemoryError):
            w.close()
    assert w.blocks_made == 1
    assert w.blocks.qsize() == 1


def test_a_failed_direct_write_item_calls_its_done_once(direct_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write() that fails in the writing thread: its done (the caller's buffer given back, a slot freed) once."""
    calls = []

    def broken(*_: object) -> None:
        raise MemoryError("injected")

    with open(direct_dir / "out.bin", "wb") as fh:
        w = stream.Writer(fh, direct=True, size=10)
        monkeypatch.setattr(w, "_stage", broken)
        w.write(b"0123456789", done=lambda: calls.append(1))
        with pytest.raises(MemoryError):
            w.close()
    assert calls == [1]
    assert w.slots._value == stream.DEPTH  # type: ignore[attr-defined]


def test_a_source_cut_short_surfaces_from_close(direct_dir: Path) -> None:
    src = direct_dir / "src.bin"
    src.write_bytes(b"x" * 5000)
    with open(src, "rb") as sf, open(direct_dir / "out.bin", "wb") as fh:
        w = stream.Writer(fh, direct=True, size=10_000)
        threads = _threads_of(w)
        w.write(b"head")
        w.copy(sf.fileno(), 0, 10_000, None)
        w.write(b"tail")
        with pytest.raises(Exception, match="cut short"):
            w.close()
    assert not any(t.is_alive() for t in threads)
    assert w.stages.qsize() == w.stages_made


@pytest.mark.parametrize("seed", range(3))
def test_the_writer_with_tiny_pieces_meeting_in_pages(direct_dir: Path, seed: int) -> None:
    """Writes, copies and filled blocks of a few bytes each, many meeting inside every page, a last page that is
    complete: the bytes of the plan."""
    rng = random.Random(seed)
    size = 4 * ALIGN
    want = rng.randbytes(size)
    src = direct_dir / "src.bin"
    src.write_bytes(want)
    plan = [
        (rng.choice(["write", "copy", "fill"]) if pos else "write", pos, n) for pos, n in _cuts(rng, size, [1, 7, 300])
    ]
    with open(src, "rb") as sf, open(direct_dir / "out.bin", "wb") as fh:
        w = stream.Writer(fh, direct=True, size=size)
        assert w.direct
        _run_writer(w, plan, sf.fileno(), want, seed)
        w.close()
    assert (direct_dir / "out.bin").read_bytes() == want


# ---- the merge over these: tiny blocks and jobs, failures and interruptions at chosen points ----------------


def _small_merge_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    import torch
    from test_rows_kernel import _adapter, _checkpoint

    from loratools.ops import merge_engine

    if merge_engine.KERNEL is None:
        pytest.skip("the compiled loop is not built")
    _checkpoint(tmp_path / "base", torch.bfloat16)
    _adapter(tmp_path / "ad")
    # many jobs per tensor, blocks smaller than a page (rows of 106 bytes: blocks meet inside pages), few blocks
    monkeypatch.setattr(merge_engine, "JOB_BYTES", 1000)
    monkeypatch.setattr(stream, "BLOCK_BYTES", 500)
    monkeypatch.setattr(stream, "BLOCKS", 2)
    return tmp_path / "base", tmp_path / "ad"


def test_a_merge_of_tiny_blocks_is_the_same_in_both_modes(direct_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loratools.ops.merge import merge

    base, ad = _small_merge_world(direct_dir, monkeypatch)
    merge(base, [ad], direct_dir / "direct")
    monkeypatch.setattr(direct_io, "DIRECT", False)
    merge(base, [ad], direct_dir / "cached")
    a = (direct_dir / "direct" / "model.safetensors").read_bytes()
    assert a == (direct_dir / "cached" / "model.safetensors").read_bytes()


def _alive() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive()}


@pytest.mark.parametrize("where", ["stats", "worker", "disk"])
def test_a_merge_stopped_mid_way_joins_every_thread(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A KeyboardInterrupt while the main thread waits for jobs in flight, a work thread's error, a failed direct
    write: merge raises it, leaves no output, the base untouched, and no thread of its own running."""
    from loratools.ops import merge_engine
    from loratools.ops.merge import merge

    base, ad = _small_merge_world(direct_dir, monkeypatch)
    before = (base / "model.safetensors").read_bytes()
    calls = [0]
    lock = threading.Lock()

    def nth(n: int) -> bool:
        with lock:
            calls[0] += 1
            return calls[0] == n

    if where == "stats":
        real_finish = merge_engine._Stats.finish

        def finish(self: merge_engine._Stats, tick: object) -> None:
            if self.jobs and nth(2):  # jobs still running: as if Ctrl-C landed in job.result()
                raise KeyboardInterrupt
            real_finish(self, tick)  # type: ignore[arg-type]

        monkeypatch.setattr(merge_engine._Stats, "finish", finish)
        expected: type[BaseException] = KeyboardInterrupt
    elif where == "worker":
        real_job = merge_engine._rows_job

        def job(*args: object) -> object:
            if nth(5):
                raise RuntimeError("injected")
            return real_job(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(merge_engine, "_rows_job", job)
        expected = RuntimeError
    else:
        real_write = direct_io.DirectIO.write

        def write(self: direct_io.DirectIO, fd: int, view: object, pos: int) -> None:
            if nth(7):
                raise OSError(5, "injected")
            real_write(self, fd, view, pos)

        monkeypatch.setattr(direct_io.DirectIO, "write", write)
        from loratools.errors import OutputError

        expected = OutputError  # merge says what the disk said
    old = _alive()
    with pytest.raises(expected):
        merge(base, [ad], direct_dir / "out")
    assert calls[0] >= 2
    assert _alive() <= old
    assert not (direct_dir / "out").exists()
    assert sorted(p.name for p in direct_dir.iterdir()) == ["ad", "base"]
    assert (base / "model.safetensors").read_bytes() == before


def test_a_put_after_close_gives_its_block_back_and_writes_nothing(tmp_path: Path) -> None:
    """A job still running after a failure closed the writer: its block comes back to the pool, nothing is
    written, and it learns why (instead of waiting forever for a block that never returns)."""
    from loratools.io import stream

    out = tmp_path / "out.bin"
    with open(out, "wb") as fh:
        w = stream.Writer(fh, direct=True, size=8192)
        block = w.block()
        w.close()
        with pytest.raises(OSError, match="after it was closed"):
            w.put(block, 0, 4096, 0)
    assert w.blocks.qsize() == 1
    assert out.stat().st_size == 0  # (its last write set the size: none)


def test_the_output_is_reopened_through_its_descriptor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer opens the file it has open (``/proc/self/fd/N``), never its path again: a file swapped in at that
    path meanwhile is not written."""
    from loratools.io import stream

    seen: list[str] = []
    real = direct_io.open_direct
    monkeypatch.setattr(direct_io, "open_direct", lambda path: seen.append(path) or real(path))
    out = tmp_path / "out.bin"
    with open(out, "wb") as fh:
        out.rename(tmp_path / "moved.bin")
        out.write_bytes(b"someone else's")
        w = stream.Writer(fh, direct=True, size=5)
        w.write(b"ours!")
        w.close()
    assert seen and all(p.startswith("/proc/self/fd/") for p in seen)
    assert out.read_bytes() == b"someone else's"
    assert (tmp_path / "moved.bin").read_bytes() == b"ours!"
