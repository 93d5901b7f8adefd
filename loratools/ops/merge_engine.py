"""The merge's arithmetic, one base file at a time: each targeted tensor becomes ``W + sum_i w_i * delta_i`` in
float32 on the chosen device, cast once to the stored dtype, and its numbers go to the report.

Plain LoRA tensors are merged in row chunks straight from the base file's memory map, several chunks at once on
the CPU (one thread each). On the CPU, for float32/bfloat16/float16, that is the compiled loop
(``loratools/ops/_rows.c``: product, add, cast and the report's numbers in one pass per element, the GIL
released), whose blocks the writing thread writes at their place in the file while the next ones are computed;
elsewhere, or where it is not built (``LORATOOLS_KERNEL=torch`` leaves it out), the same arithmetic in torch
(``_chunk``). DoRA, LoHa, LoKr, Tucker and replaced tensors are merged whole (``Module.apply``).
Untargeted tensors are copied as they are (file to file, in the kernel) or cast. The threads, buffers and the
writing thread are :mod:`loratools.io.stream`'s; Ctrl-C is taken at :func:`~loratools.io.interrupts.checkpoint`
between chunks, and a failed tensor's chunks are cancelled or finished before the memory map they read closes.
"""

from __future__ import annotations

import math
import mmap
import os
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ShapeError
from ..io import stream
from ..io.direct import ALIGN
from ..io.interrupts import checkpoint
from ..io.progress import Tick
from ..io.safetensors import Header, TensorInfo, encode_header, read_bytes, read_into, tensor_bytes, tensor_from_bytes
from ..model import DTYPE_SIZES, Module, torch_dtype
from .linalg import one_thread
from .merge_report import MergeReport, TensorReport
from .merge_targets import Target

if TYPE_CHECKING:
    import torch

_compiled: Any
try:  # the compiled inner loop (setup.py builds it where a C compiler is found): one pass per element
    from . import _rows as _compiled
except ImportError:  # an install without a C compiler: the same arithmetic in torch
    _compiled = None

#: the compiled loop, None where it is not built (or switched off: ``LORATOOLS_KERNEL=torch``)
KERNEL: Any = None if os.environ.get("LORATOOLS_KERNEL") == "torch" else _compiled
#: dtype codes of the compiled loop
_CODES = {"F32": 0, "BF16": 1, "F16": 2}
#: bytes of float32 work per chunk of rows: small, so that the few passes over a chunk stay in the CPU's cache
CHUNK_BYTES = 2 << 20
#: bytes of output per job of a work thread (the compiled loop): a few blocks
JOB_BYTES = 4 << 20
#: tensors whose jobs may be in flight at once (the next one starts while the last rows of this one finish)
AHEAD = 2


def _lost(lost: torch.Tensor) -> tuple[float, int]:
    """|lost|^2 and the count of elements that overflowed to inf in storage (left out of the norm; ``lost`` is
    overwritten)."""
    import torch

    flat = lost.reshape(-1)
    lost_sq = float(torch.dot(flat, flat))
    if math.isfinite(lost_sq):
        return lost_sq, 0
    bad = ~torch.isfinite(lost)
    return float(torch.linalg.vector_norm(lost.masked_fill_(bad, 0))) ** 2, int(bad.sum())


class _Stats:
    """Norms accumulated chunk by chunk (float64 sums of float32 norms: a few fused passes per chunk); ``jobs``:
    the compiled loop's jobs still in flight (bytes of the base each, and its future), taken in by :meth:`finish`."""

    def __init__(self) -> None:
        self.delta_sq = self.base_sq = self.lost_sq = self.max_abs = 0.0
        self.overflow = 0
        self.jobs: list[tuple[int, Future[Any]]] = []

    def take(self, chunk: tuple[float, float, float, int]) -> None:
        """A chunk's (max |delta|, |base|^2, |lost|^2, overflows)."""
        mx, base_sq, lost_sq, overflow = chunk
        self.max_abs = max(self.max_abs, mx)
        self.base_sq += base_sq
        self.lost_sq += lost_sq
        self.overflow += overflow

    def finish(self, tick: Tick | None) -> None:
        for nbytes, job in self.jobs:
            checkpoint()  # a Ctrl-C while they run: write_file settles the jobs left
            self.take(job.result())
            if tick:
                tick(nbytes, 0)
        self.jobs = []

    def add(self, base: torch.Tensor, delta: torch.Tensor, stored: torch.Tensor) -> None:
        """``delta`` is what was meant (merged - base, float32); ``stored`` what the file now holds."""
        import torch

        norm = torch.linalg.vector_norm
        self.delta_sq += float(norm(delta)) ** 2
        self.base_sq += float(norm(base)) ** 2
        if delta.numel():
            self.max_abs = max(self.max_abs, float(norm(delta, float("inf"))))
        self.add_lost((stored.float() - base).sub_(delta))  # out of place first: stored may be float32 already

    def add_lost(self, lost: torch.Tensor) -> None:
        """``lost`` = stored - (base + delta): the part of the delta that storage rounded away (may be reused)."""
        lost_sq, overflow = _lost(lost)
        self.lost_sq += lost_sq
        self.overflow += overflow

    def report(self, name: str, info: TensorInfo, dtype: str, adapters: int, replaced: bool) -> TensorReport:
        dn, bn = math.sqrt(self.delta_sq), math.sqrt(self.base_sq)
        return TensorReport(
            name=name, shape=list(info.shape), dtype=dtype, adapters=adapters, delta_norm=dn, base_norm=bn,
            relative_change=dn / bn if bn else math.inf if dn else 0.0, max_abs_delta=self.max_abs,
            retained=1.0 - math.sqrt(self.lost_sq) / dn if dn else 1.0, overflow=self.overflow, replaced=replaced,
        )  # fmt: skip


def _plain(parts: list[tuple[float, Module]]) -> bool:
    return all(m.magnitude is None and m.is_two_factor() for _, m in parts)


_BUFFERS = stream.WorkBuffers()


def _chunk(
    src: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, device: str, store: torch.dtype
) -> tuple[float, float, float, int]:  # fmt: skip
    """One chunk of rows: ``out = cast(src + a @ b)``; returns (max |delta|, |base|^2, |lost|^2, overflows),
    where lost = stored - (base + delta). Work tensors are the calling thread's own."""
    import torch

    shape = (src.shape[0], src.shape[1])
    merged = _BUFFERS.get("merged", shape, device)
    torch.matmul(a, b, out=merged)  # the delta, for now
    lo, hi = torch.aminmax(merged)  # one pass; vector_norm(inf) is ten times slower on CPU
    base = _BUFFERS.get("base", shape, device)
    base.copy_(src)
    merged.add_(base)
    flat = base.view(-1)
    base_sq = float(torch.dot(flat, flat))
    if out.device == merged.device:
        out.copy_(merged)
        lost = base.copy_(out).sub_(merged)  # base's buffer, free now: two plain passes beat one mixed-dtype one
    else:
        stored = _BUFFERS.get("stored", shape, device, store).copy_(merged)
        out.copy_(stored)
        lost = torch.sub(stored, merged, out=_BUFFERS.get("lost", shape, device))
    lost_sq, overflow = _lost(lost)
    return max(-float(lo), float(hi)), base_sq, lost_sq, overflow


def _rows_job(
    mapped: mmap.mmap, start: int, sdt: str, a: Any, b: Any, r0: int, r1: int, cols: int, rank: int, odt: str,
    writer: stream.Writer, pos: int,
) -> tuple[float, float, float, int]:  # fmt: skip
    """Rows ``r0:r1`` of a tensor stored at ``start`` of the map by the compiled loop, in blocks handed to the
    writing thread for their place in the output (the tensor's starts at ``pos``); that part of the map is
    unmapped again after. Returns (max |delta|, |base|^2, |lost|^2, overflows)."""
    src_row, out_row = cols * DTYPE_SIZES[sdt], cols * DTYPE_SIZES[odt]
    block = max(1, stream.BLOCK_BYTES // max(1, out_row))
    if block >= 4:
        block -= block % 4  # the loop takes rows four at a time
    acc = _Stats()
    for i in range(r0, r1, block):
        n = min(block, r1 - i)
        at = pos + i * out_row
        buf, off = writer.block(n * out_row), at % ALIGN
        acc.take(KERNEL.merge_rows(
            mapped, start + i * src_row, _CODES[sdt], a, i * rank * 4, b, n, cols, rank, buf, off, _CODES[odt]
        ))  # fmt: skip
        writer.put(buf, off, n * out_row, at)
    stream.advise(mapped, start + r0 * src_row, (r1 - r0) * src_row, stream.DONTNEED)
    return acc.max_abs, acc.base_sq, acc.lost_sq, acc.overflow


def _merge_rows(
    fh: Any, mapped: mmap.mmap | None, info: TensorInfo, store: torch.dtype, target: Target, device: str,
    writer: stream.Writer, tick: Tick | None, stats: _Stats, pool: stream.Pool | None, out_dtype: str, pos: int,
) -> None:  # fmt: skip
    """Plain LoRA in row chunks: ``W[r0:r1] + U[r0:r1] @ D`` (or ``D[:, r0:r1]^T @ U^T`` for weights stored
    transposed), the factors of all adapters stacked, never the whole tensor in float32.

    The base is viewed through the file's memory map (no copy out of the page cache); the chunks are small
    enough that the passes over one stay in the CPU's cache, and on the CPU several are merged at once, one
    thread each; they are handed to the writing thread in groups. ``|delta|`` comes from the factors' Gram
    matrices (``sum((U^T U) * (D D^T))``); the chunk passes are: one matmul, max |delta|, cast in, add, cast
    out, the stored-minus-meant difference, and two norms."""
    import torch

    shape = info.shape
    rows = shape[0]
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    ups, downs, flags = [], [], set()
    for w, m in target.contributions:
        up, down = m.lora_factors(dtype=torch.float32, device=device)  # type: ignore[misc]
        transposed = m.layer == "embedding" or m.fan_in_fan_out
        flags.add(transposed)
        ups.append(up)
        downs.append(down * w)
    if len(flags) > 1:
        raise ShapeError(f"{info.name}: adapters disagree on whether this weight is stored transposed")
    transposed = flags.pop()
    u, d = torch.cat(ups, 1), torch.cat(downs, 0)  # out x R, R x in
    # delta (out x in) = u @ d; stored rows are delta rows, or delta columns when transposed
    a, b = (d.T, u.T) if transposed else (u, d)  # stored rows = a[rows] @ b
    a = a.contiguous()
    if b.numel():  # |u @ d|^2 = sum((u^T u) * (d d^T)), in float64, without the dense delta
        ad, bd = a.double(), b.double()
        stats.delta_sq += float(((ad.T @ ad) * (bd @ bd.T)).sum().clamp_min(0))
    if rows * per_row == 0:
        return
    row_bytes = per_row * DTYPE_SIZES[info.dtype]
    if (
        KERNEL is not None and device == "cpu" and mapped is not None and info.dtype in _CODES
        and out_dtype in _CODES and info.start % DTYPE_SIZES[info.dtype] == 0
    ):  # fmt: skip
        # the compiled loop: jobs of rows, each written in place by its work thread; the writing thread goes on
        # after this tensor's bytes, and write_file takes the jobs' numbers in as they finish
        an, bn = a.contiguous().numpy(), b.contiguous().numpy()
        rank, job_rows = an.shape[1], max(4, JOB_BYTES // (per_row * DTYPE_SIZES[out_dtype]) // 4 * 4)
        try:
            for r0 in range(0, rows, job_rows):
                r1 = min(rows, r0 + job_rows)
                part = (mapped, info.start, info.dtype, an, bn, r0, r1, per_row, rank, out_dtype, writer, pos)
                job = pool.submit(_rows_job, *part) if pool else stream.done(_rows_job(*part))
                stats.jobs.append(((r1 - r0) * row_bytes, job))
            writer.skip_to(pos + rows * per_row * DTYPE_SIZES[out_dtype])
        except BaseException:
            stream.settle(stats.jobs)
            raise
        return
    step = max(1, CHUNK_BYTES // (per_row * 4))
    # output buffers of several chunks (the writer's, going round): one is filled while it writes the others
    group = step * max(1, stream.IO_BYTES // (step * per_row * store.itemsize))
    dt = torch_dtype(info.dtype)
    if info.start % DTYPE_SIZES[info.dtype]:  # a file whose data is not aligned: read it instead
        mapped = None
    if mapped is None:
        pool = None
    if mapped is not None:
        stream.advise(mapped, info.start, info.nbytes, stream.POPULATE_READ)  # map it in one call, not page by page
    raw = bytearray(0 if mapped is not None else min(rows, step) * row_bytes)
    jobs: list[tuple[int, Future[Any]]] = []
    try:
        for g0 in range(0, rows, group):
            checkpoint()
            g1 = min(rows, g0 + group)
            full = writer.buffer((g1 - g0) * per_row * store.itemsize, pinned=device.startswith("cuda"))
            buf = full[: (g1 - g0) * per_row * store.itemsize].view(store)
            jobs = []
            for r0 in range(g0, g1, step):
                n = min(g1, r0 + step) - r0
                if mapped is not None:
                    src = torch.frombuffer(mapped, dtype=dt, count=n * per_row, offset=info.start + r0 * row_bytes)
                else:
                    read_into(fh, info.start + r0 * row_bytes, memoryview(raw)[: n * row_bytes])
                    src = torch.frombuffer(raw, dtype=dt, count=n * per_row)
                args = (
                    src.view(n, per_row),
                    a[r0 : r0 + n],
                    b,
                    buf[(r0 - g0) * per_row : (r0 - g0 + n) * per_row].view(n, per_row),
                    device,
                    store,
                )
                jobs.append((n, pool.submit(_chunk, *args) if pool else stream.done(_chunk(*args))))
            for n, job in jobs:
                stats.take(job.result())
                if tick:
                    tick(n * row_bytes, 0)
            writer.write(tensor_bytes(buf), done=lambda full=full: writer.give_back(full))  # type: ignore[misc]
    except BaseException:
        stream.settle(jobs)
        raise
    if mapped is not None:  # unmapped again (it stays in the page cache): the process holds one tensor at most
        stream.advise(mapped, info.start, info.nbytes, stream.DONTNEED)


def _merge_tensor(
    fh: Any,
    mapped: mmap.mmap | None,
    info: TensorInfo,
    out_dtype: str,
    target: Target,
    device: str,
    writer: stream.Writer,
    tick: Tick | None,
    pool: stream.Pool | None,
    pos: int,
) -> _Stats:
    """One targeted tensor, at ``pos`` of the output; the compiled loop's jobs may still run on return (``jobs``)."""
    import torch

    stats = _Stats()
    shape = info.shape
    store = torch_dtype(out_dtype)
    if target.biases and not target.contributions and target.replacement is None:
        base_b = tensor_from_bytes(read_bytes(fh, info.start, info.nbytes), info.dtype, shape).to(device, torch.float32)
        delta = torch.zeros_like(base_b)
        for w, m in target.biases:
            assert m.bias is not None
            delta += w * m.scale * m.bias.load().to(device, torch.float32).reshape(shape)
        stored = (base_b + delta).to(store)
        stats.add(base_b, delta, stored)
        writer.write(tensor_bytes(stored))
        if tick:
            tick(info.nbytes, 0)
        return stats
    if target.replacement is not None:
        base_full = tensor_from_bytes(read_bytes(fh, info.start, info.nbytes), info.dtype, shape).to(
            device, torch.float32
        )
        start = target.replacement.load().to(device, torch.float32).reshape(shape)
    else:
        base_full, start = None, None
    if _plain(target.contributions) and start is None:
        with one_thread(device):  # the chunks run in the pool; this thread's own ops are small
            _merge_rows(fh, mapped, info, store, target, device, writer, tick, stats, pool, out_dtype, pos)
        return stats
    # whole tensor: DoRA (needs whole-row norms of the merged weight), LoHa, LoKr, Tucker, replacements
    if base_full is None:
        base_full = tensor_from_bytes(read_bytes(fh, info.start, info.nbytes), info.dtype, shape).to(
            device, torch.float32
        )
    merged = base_full.clone() if start is None else start
    for w, m in target.contributions:
        merged = m.apply(merged, multiplier=w).reshape(shape)
    stored = merged.to(store)
    stats.add(base_full, merged - base_full, stored)
    writer.write(tensor_bytes(stored))
    if tick:
        tick(info.nbytes, 0)
    return stats


def _copy_tensor(fh: Any, info: TensorInfo, out_dtype: str, writer: stream.Writer, tick: Tick | None) -> None:
    if out_dtype == info.dtype:
        writer.copy(fh.fileno(), info.start, info.nbytes, tick)
        return
    t = tensor_from_bytes(read_bytes(fh, info.start, info.nbytes), info.dtype, info.shape)
    writer.write(tensor_bytes(t.to(torch_dtype(out_dtype))))
    if tick:
        tick(info.nbytes, 0)


def _out_dtype(info: TensorInfo, dtype: str | None) -> str:
    if dtype and info.dtype.startswith(("F", "BF")):
        return dtype
    return info.dtype


def write_file(
    src: Path, header: Header, dest: Path, prefix: str, targets: dict[str, Target], dtype: str | None,
    device: str, report: MergeReport, tick: Tick | None, pool: stream.Pool | None,
) -> int:  # fmt: skip
    """One safetensors file: same tensors in the same order, merged where targeted. Returns bytes of data."""
    order = sorted(header.tensors.values(), key=lambda t: (t.start, t.name))
    head, size = encode_header(((t.name, _out_dtype(t, dtype), t.shape) for t in order), header.metadata)
    # the base's bytes are used in place, from the page cache, through the memory map
    with open(src, "rb") as fh, open(dest, "wb") as out, stream.mapped(fh, header.file_size) as mapped:
        writer = stream.Writer(out, direct=True, size=len(head) + size)
        pos = len(head)
        pending: list[tuple[TensorInfo, str, Target, _Stats]] = []

        def finish() -> None:  # the oldest merged tensor's numbers, into the report in the file's order
            info, dt, target, stats = pending[0]
            stats.finish(tick)  # (still pending while it waits: a failure settles its jobs too)
            pending.pop(0)
            report.tensors.append(
                stats.report(prefix + info.name, info, dt, len(set(target.adapters)), target.replacement is not None)
            )

        try:
            writer.write(head)
            for info in order:
                checkpoint()
                dt = _out_dtype(info, dtype)
                target = targets.get(prefix + info.name)
                if target is None:
                    _copy_tensor(fh, info, dt, writer, tick)
                    report.copied += 1
                else:
                    pending.append((info, dt, target, _merge_tensor(fh, mapped, info, dt, target, device, writer,
                                                                   tick, pool, pos)))  # fmt: skip
                    while len(pending) > AHEAD:
                        finish()
                pos += math.prod(info.shape) * DTYPE_SIZES[dt]
                if tick:
                    tick(0, 1)
            while pending:
                finish()
        except BaseException:  # no job may still read the map or write the file once this returns
            for *_, stats in pending:
                stream.settle(stats.jobs)
            raise
        finally:
            writer.close()
    return size
