"""Merge adapters into a base checkpoint, streaming: read a tensor (in row chunks), add its delta, write it.

The output keeps the base's layout: tensor names, order, dtypes, shard split, a correct index, and the other
files of the folder (config, tokenizer, ...). Per targeted weight: ``W + sum_i w_i * delta_i`` in float32 on the
chosen device, cast once to the stored dtype; DoRA, LoHa and LoKr modules are applied in turn on the whole tensor
(``Module.apply``). ``modules_to_save`` tensors replace the base's. Memory stays near one tensor (of the base's
memory map, or in float32 for the whole-tensor kinds) plus a few chunk buffers, never a shard.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import re
import shutil
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from queue import Queue
from typing import TYPE_CHECKING, Any

from ..errors import FileFormatError, IncompatibleAdaptersError, LoratoolsError, OutputError, ShapeError
from ..formats import input_files, load_adapter
from ..io import jsonfile
from ..io.atomic import check_output, stage
from ..io.checkpoint import COMPONENTS, INDEX_SUFFIX, base_tensors, kohya_index, read_index
from ..io.interrupts import checkpoint, critical
from ..io.progress import Progress, Tick
from ..io.safetensors import Header, TensorInfo, read_bytes, read_header, read_into, tensor_bytes, tensor_from_bytes
from ..model import DTYPE_SIZES, Adapter, Module, TensorRef, torch_dtype
from . import provenance
from .lowrank import DTYPES, pick_device

if TYPE_CHECKING:
    import torch

#: bytes of float32 work per chunk of rows: small, so that the few passes over a chunk stay in the CPU's cache
CHUNK_BYTES = 2 << 20
#: bytes of output handed to the writing thread at a time
IO_BYTES = 16 << 20
#: output buffers in flight between the reading thread, the compute and the writing thread
DEPTH = 3
#: files in a model folder that hold weights in another form: copying them would ship the unmerged model
STALE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".gguf")


# ---- the base's layout ----------------------------------------------------------------------------------


@dataclass
class WeightFile:
    rel: Path  # relative to the base root (the file name itself for a single-file base)
    prefix: str  # name prefix of its tensors for resolution ("unet." in a pipeline)
    header: Header


@dataclass
class Layout:
    root: Path  # the base folder, or the single file
    single_file: bool
    files: list[WeightFile]
    indexes: list[Path]  # index files to regenerate, relative to root

    def names(self) -> dict[str, tuple[int, str]]:
        """Full tensor name (with prefix) -> (file number, key in that file)."""
        out: dict[str, tuple[int, str]] = {}
        for i, wf in enumerate(self.files):
            for key in wf.header.tensors:
                out[wf.prefix + key] = (i, key)
        return out

    @property
    def total_bytes(self) -> int:
        return sum(wf.header.file_size for wf in self.files)


def layout_of(base: str | os.PathLike[str]) -> Layout:
    p = Path(base)
    if not p.exists():
        raise FileFormatError(f"{p}: no such file or folder")
    if p.is_file():
        if p.name.endswith(INDEX_SUFFIX):
            p = p.parent
        else:
            return Layout(p, True, [WeightFile(Path(p.name), "", read_header(p))], [])
    comps = [c for c in COMPONENTS if (p / c).is_dir()]
    files: list[WeightFile] = []
    indexes: list[Path] = []
    if comps and ((p / "model_index.json").is_file() or not _folder_weights(p, Path("."))[0]):
        for comp in comps:
            found, idx = _folder_weights(p, Path(comp))
            files += [WeightFile(rel, f"{comp}.", read_header(p / rel)) for rel in found]
            indexes += idx
    else:
        found, idx = _folder_weights(p, Path("."))
        files = [WeightFile(rel, "", read_header(p / rel)) for rel in found]
        indexes = idx
    if not files:
        raise FileFormatError(f"{p}: no .safetensors weights found", "loratools merges into safetensors checkpoints")
    return Layout(p, False, files, indexes)


def _folder_weights(root: Path, sub: Path) -> tuple[list[Path], list[Path]]:
    folder = root / sub
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
    if indexes:
        if len(indexes) > 1:
            raise FileFormatError(f"{folder}: several safetensors index files", "keep one")
        shards = sorted(set(read_index(indexes[0]).values()))  # checked: types, depth, shards inside the folder
        missing = [s for s in shards if not (folder / s).exists()]  # a folder or FIFO: refused when read
        if missing:
            raise FileFormatError(f"{indexes[0].name} names shard(s) that are missing: {', '.join(missing)}")
        base_tensors(indexes[0])  # the index and its shards agree (its weight_map is copied into the output)
        return [sub / s for s in shards], [sub / indexes[0].name]
    found = sorted(folder.glob("*.safetensors"))
    if len(found) > 1:
        raise FileFormatError(f"{folder}: several .safetensors files and no index", "name the file to merge into")
    return [sub / f.name for f in found], []


# ---- which module goes where ------------------------------------------------------------------------------


@dataclass
class Target:
    contributions: list[tuple[float, Module]] = field(default_factory=list)
    replacement: TensorRef | None = None  # modules_to_save / saved base layer
    adapters: list[int] = field(default_factory=list)
    biases: list[tuple[float, Module]] = field(default_factory=list)  # LoRA biases (PEFT lora_bias) for a .bias


def _candidates(full: str, names: dict[str, tuple[int, str]]) -> list[str]:
    """Base tensor names that an adapter's tensor name can mean: itself; without a diffusers component prefix
    (adapter ``unet.x``, base a UNet folder); or the one base name it ends (adapter trained on a sub-model)."""
    if full in names:
        return [full]
    comp, dot, rel = full.partition(".")
    if dot and comp in COMPONENTS and rel in names:
        return [rel]
    return [n for n in names if n.endswith("." + full)]


def resolve(adapters: list[Adapter], weights: list[float], layout: Layout) -> dict[str, Target]:
    """Base tensor name -> what to do to it. Every module must map to exactly one base tensor.

    Refused here, before any output exists: weights, alphas or adapter tensors that are not finite (the merged
    weights would be NaN), and a DoRA module sharing its weight with another adapter's module (see
    :func:`_refuse_shared_dora`)."""
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise LoratoolsError(f"weight {bad[0]} is not a finite number", "give finite weights, e.g. --weights 1,0.5")
    for a in adapters:
        _refuse_nonfinite(a)
    names = layout.names()
    kohya = kohya_index(list(names))  # flattened kohya name -> dotted base module
    targets: dict[str, Target] = {}
    unresolved: list[str] = []
    ambiguous: list[str] = []

    def place(found: list[str], what: str) -> Target | None:
        if len(found) == 1:
            return targets.setdefault(found[0], Target())
        if found:
            ambiguous.append(f"{what} -> {', '.join(sorted(found)[:4])}")
        else:
            unresolved.append(what)
        return None

    for i, (a, w) in enumerate(zip(adapters, weights, strict=True)):
        for name, m in a.modules.items():
            if a.format == "kohya" and "." not in name:
                module = kohya.get(name)
                found = [module + ".weight"] if module and module + ".weight" in names else []
            else:
                found = _candidates(name + ".weight", names)
            t = place(found, name)
            if t is not None:
                t.contributions.append((w, m))
                t.adapters.append(i)
                if m.bias is not None:  # PEFT merges lora_B.bias * scaling into the base layer's bias
                    bias = found[0].removesuffix(".weight") + ".bias"
                    if bias not in names:
                        raise ShapeError(f"{name}: has a LoRA bias but the base layer {bias} has none")
                    targets.setdefault(bias, Target()).biases.append((w, m))
        for key, extra in a.extras.items():
            if extra.role == "trainable_tokens":
                raise IncompatibleAdaptersError(
                    f"{key}: trainable-token deltas cannot be merged yet", "merge the adapter with PEFT instead"
                )
            t = place(_candidates(key.replace(".base_layer.", "."), names), key)
            if t is not None:
                if t.replacement is not None:
                    raise IncompatibleAdaptersError(f"{key}: the same base tensor is replaced by two adapters")
                t.replacement = extra.ref
    if unresolved or ambiguous:
        parts = []
        if unresolved:
            parts.append(f"{len(unresolved)} module(s) match no base tensor: {', '.join(unresolved[:6])}")
        if ambiguous:
            parts.append(f"{len(ambiguous)} match several: {'; '.join(ambiguous[:4])}")
        raise ShapeError("; ".join(parts), "is the adapter made for this base model?")
    for name, t in targets.items():
        i, key = names[name]
        info = layout.files[i].header.tensors[key]
        if t.replacement is not None and tuple(t.replacement.shape) != info.shape:
            raise ShapeError(
                f"{name}: the adapter's saved tensor is {list(t.replacement.shape)}, the base's {list(info.shape)}",
                "a resized vocabulary cannot be merged into this base",
            )
        for _, m in t.contributions:
            ws = m.weight_shape()
            if tuple(ws) != info.shape and not (ws[0] == info.shape[0] and math.prod(ws) == math.prod(info.shape)):
                raise ShapeError(f"{m.name}: delta is {list(ws)}, base tensor {name} is {list(info.shape)}")
        if not info.dtype.startswith(("F", "BF")):
            raise ShapeError(f"{name}: stored as {info.dtype}; only float weights can take a delta")
        _refuse_shared_dora(name, t)
    return targets


def _refuse_shared_dora(name: str, t: Target) -> None:
    """A DoRA module on a weight that another module also changes has no order-free meaning: DoRA rescales the
    whole weight it is given, so ``W + w1 (DoRA(W) - W)`` then a LoRA on top differs from the other order, and
    PEFT's ``merge_and_unload``, ComfyUI and LyCORIS each apply them in their own order. Refused."""
    dora = [m for _, m in t.contributions if m.magnitude is not None]
    if dora and len(t.contributions) > 1:
        raise IncompatibleAdaptersError(
            f"{name}: {len(t.contributions)} adapter modules change this weight and {dora[0].name} is DoRA: "
            "the result would depend on the order they are applied in",
            "merge them one at a time (the output of one merge is the base of the next), "
            "or mix the non-DoRA adapters first (loratools mix) and merge that",
        )


def _refuse_nonfinite(a: Adapter) -> None:
    """NaN or Inf in an adapter's alphas or tensors would make the merged weights NaN: refused, naming them."""
    import torch

    where = a.source or a.format
    for m in a.modules.values():
        if m.alpha is not None and not math.isfinite(m.alpha):
            raise LoratoolsError(f"{m.name}: alpha is {m.alpha} in {where}: the merged weight would not be a number")
        for role, ref in m.tensors().items():
            t = ref.load()
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise LoratoolsError(
                    f"{m.name}: NaN or Inf in its {role} tensor ({where}): the merged weight would not be a number",
                    "`loratools validate` lists every such module",
                )
    for key, extra in a.extras.items():
        t = extra.ref.load()
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise LoratoolsError(f"{key}: NaN or Inf in this saved tensor ({where})")


# ---- the report -------------------------------------------------------------------------------------------


@dataclass
class TensorReport:
    name: str
    shape: list[int]
    dtype: str
    adapters: int
    delta_norm: float  # ||intended delta||, float32 arithmetic
    base_norm: float
    relative_change: float  # delta_norm / base_norm
    max_abs_delta: float
    retained: float  # 1 - ||(stored - base) - delta|| / ||delta||: how much of the delta survived storage
    overflow: int  # elements that became inf in storage
    replaced: bool = False


@dataclass
class MergeReport:
    base: str
    output: str | None
    adapters: list[str]
    weights: list[float]
    device: str
    dtype: str | None
    tensors: list[TensorReport] = field(default_factory=list)
    copied: int = 0  # tensors copied unchanged
    files_copied: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, Any]:
        merged = [t for t in self.tensors if t.delta_norm > 0]
        kept = sorted(t.retained for t in merged)
        return {
            "merged": len(self.tensors),
            "copied": self.copied,
            "overflow": sum(t.overflow for t in self.tensors),
            "retained_min": kept[0] if kept else None,
            "retained_median": kept[len(kept) // 2] if kept else None,
            "relative_change_max": max((t.relative_change for t in merged), default=None),
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["summary"] = self.summary
        return d


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
    """Norms accumulated chunk by chunk (float64 sums of float32 norms: a few fused passes per chunk)."""

    def __init__(self) -> None:
        self.delta_sq = self.base_sq = self.lost_sq = self.max_abs = 0.0
        self.overflow = 0

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


# ---- streaming --------------------------------------------------------------------------------------------


class _Writer:
    """Writes in a thread so that reading and computing the next chunk overlap with the disk. Tensors copied as
    they are go file to file in the same thread, in order, so they overlap with the compute too."""

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
                    continue
                _, data, done = item
                try:
                    if self.error is None:
                        self.fh.write(data)
                finally:
                    if done is not None:
                        done()
            except BaseException as e:  # surfaced in write()/copy()/close()
                self.error = e
            finally:
                self.q.task_done()

    def _copy(self, fd: int, pos: int, n: int, tick: Tick | None) -> None:
        if _kernel_copy(fd, self.fh, pos, n, tick):
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


def _plain(parts: list[tuple[float, Module]]) -> bool:
    return all(m.magnitude is None and m.is_two_factor() for _, m in parts)


class _Buffers(threading.local):
    """Work tensors reused from chunk to chunk (same shapes recur): no allocation, no fresh pages per chunk.
    Each thread has its own."""

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


_BUFFERS = _Buffers()


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
        stored = out.copy_(merged)
    else:
        stored = _BUFFERS.get("stored", shape, device, store).copy_(merged)
        out.copy_(stored)
    lost = torch.sub(stored, merged, out=_BUFFERS.get("lost", shape, device))  # one mixed-dtype pass
    lost_sq, overflow = _lost(lost)
    return max(-float(lo), float(hi)), base_sq, lost_sq, overflow


def _merge_rows(
    fh: Any, mapped: mmap.mmap | None, info: TensorInfo, store: torch.dtype, target: Target, device: str,
    writer: _Writer, tick: Tick | None, stats: _Stats, pool: _Pool | None,
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
    step = max(1, CHUNK_BYTES // (per_row * 4))
    row_bytes = per_row * DTYPE_SIZES[info.dtype]
    # output buffers of several chunks (the writer's, going round): one is filled while it writes the others
    group = step * max(1, IO_BYTES // (step * per_row * store.itemsize))
    dt = torch_dtype(info.dtype)
    if info.start % DTYPE_SIZES[info.dtype]:  # a file whose data is not aligned: read it instead
        mapped = None
    if mapped is None:
        pool = None
    if mapped is not None:
        _advise(mapped, info.start, info.nbytes, _POPULATE_READ)  # map it in one call, not page by page
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
                jobs.append((n, pool.submit(_chunk, *args) if pool else _done(_chunk(*args))))
            for n, job in jobs:
                mx, base_sq, lost_sq, overflow = job.result()
                stats.max_abs = max(stats.max_abs, mx)
                stats.base_sq += base_sq
                stats.lost_sq += lost_sq
                stats.overflow += overflow
                if tick:
                    tick(n * row_bytes, 0)
            writer.write(tensor_bytes(buf), done=lambda full=full: writer.give_back(full))  # type: ignore[misc]
    except BaseException:
        _settle(jobs)
        raise
    if mapped is not None:  # unmapped again (it stays in the page cache): the process holds one tensor at most
        _advise(mapped, info.start, info.nbytes, getattr(mmap, "MADV_DONTNEED", None))


#: madvise(MADV_POPULATE_READ), Linux 5.14 and later
_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)


def _advise(mapped: mmap.mmap, start: int, n: int, advice: int | None) -> None:
    """A hint about a range of the map; where the system does not take it, nothing changes but speed."""
    if advice is None or not n or not hasattr(mapped, "madvise"):
        return
    a0 = start - start % mmap.PAGESIZE
    with contextlib.suppress(OSError, ValueError):
        mapped.madvise(advice, a0, start + n - a0)


class _Pool:
    """Threads that merge chunks side by side, each running torch on one core (small chunks split across cores
    would spend more on hand-offs than on work). One pool per merge, closed by :meth:`close`: what has not
    started is cancelled, what runs is finished, and every thread is joined before the memory map they read is
    closed, so an error or a Ctrl-C never leaves a thread inside torch while the interpreter exits."""

    def __init__(self, workers: int) -> None:
        self.q: Queue[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]] | None] = Queue()
        self.threads = [threading.Thread(target=self._run, name=f"merge-{i}", daemon=True) for i in range(workers)]
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


def _done(result: Any) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_result(result)
    return future


def _settle(jobs: list[tuple[int, Future[Any]]]) -> None:
    """After a failure: cancel the jobs not started, wait for the running ones (a chunk takes milliseconds)."""
    for _, job in jobs:
        if not job.cancel():
            with contextlib.suppress(BaseException):
                job.exception()


@contextlib.contextmanager
def _threads(device: str) -> Iterator[_Pool | None]:
    """The chunk threads of one merge on the CPU (None on a single core or another device)."""
    workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    pool = _Pool(workers) if device == "cpu" and workers > 1 else None
    try:
        yield pool
    finally:
        if pool is not None:
            pool.close()


def _merge_tensor(
    fh: Any,
    mapped: mmap.mmap | None,
    info: TensorInfo,
    out_dtype: str,
    target: Target,
    device: str,
    writer: _Writer,
    tick: Tick | None,
    pool: _Pool | None,
) -> _Stats:
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
        _merge_rows(fh, mapped, info, store, target, device, writer, tick, stats, pool)
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


def _copy_tensor(fh: Any, info: TensorInfo, out_dtype: str, writer: _Writer, tick: Tick | None) -> None:
    if out_dtype == info.dtype:
        writer.copy(fh.fileno(), info.start, info.nbytes, tick)
        return
    t = tensor_from_bytes(read_bytes(fh, info.start, info.nbytes), info.dtype, info.shape)
    writer.write(tensor_bytes(t.to(torch_dtype(out_dtype))))
    if tick:
        tick(info.nbytes, 0)


def _kernel_copy(fd: int, out: Any, pos: int, n: int, tick: Tick | None) -> bool:
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


def _out_dtype(info: TensorInfo, dtype: str | None) -> str:
    if dtype and info.dtype.startswith(("F", "BF")):
        return dtype
    return info.dtype


def _write_file(
    src: Path, header: Header, dest: Path, prefix: str, targets: dict[str, Target], dtype: str | None,
    device: str, report: MergeReport, tick: Tick | None, pool: _Pool | None,
) -> int:  # fmt: skip
    """One safetensors file: same tensors in the same order, merged where targeted. Returns bytes of data."""
    order = sorted(header.tensors.values(), key=lambda t: (t.start, t.name))
    entries: dict[str, Any] = {}
    if header.metadata:
        entries["__metadata__"] = header.metadata
    offset = 0
    for info in order:
        dt = _out_dtype(info, dtype)
        n = math.prod(info.shape) * DTYPE_SIZES[dt]
        entries[info.name] = {"dtype": dt, "shape": list(info.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(src, "rb") as fh, open(dest, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        # the base's bytes are used in place, from the page cache (copy-on-write: the mapping is never written)
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if header.file_size else None
        writer = _Writer(out)
        try:
            for info in order:
                checkpoint()
                dt = _out_dtype(info, dtype)
                target = targets.get(prefix + info.name)
                if target is None:
                    _copy_tensor(fh, info, dt, writer, tick)
                    report.copied += 1
                else:
                    stats = _merge_tensor(fh, mapped, info, dt, target, device, writer, tick, pool)
                    report.tensors.append(
                        stats.report(prefix + info.name, info, dt, len(target.contributions),
                                     target.replacement is not None)
                    )  # fmt: skip
                if tick:
                    tick(0, 1)
        finally:
            writer.close()
            if mapped is not None:
                with contextlib.suppress(BufferError):  # a tensor over it still referenced (an error): the GC closes it
                    mapped.close()
    return offset


def _copy_other_files(layout: Layout, tmp: Path, report: MergeReport) -> None:
    skip = {wf.rel for wf in layout.files} | set(layout.indexes)
    for path in sorted(layout.root.rglob("*")):
        checkpoint()
        rel = path.relative_to(layout.root)
        if any(part in (".git", ".cache") for part in rel.parts) or rel in skip:
            continue
        if not (path.is_dir() or path.is_file()):  # a FIFO or a device is not part of a model
            report.warnings.append(f"not copied: {rel} (not a regular file)")
            continue
        if path.is_dir():
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            continue
        if path.suffix.lower() in STALE_WEIGHTS:
            report.warnings.append(f"not copied: {rel} (weights in another format would be the unmerged model)")
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, tmp / rel)  # a new file: the umask's mode, as cp gives
        report.files_copied.append(str(rel))


def _write_index(layout: Layout, index: Path, tmp: Path, sizes: dict[Path, int]) -> None:
    src = jsonfile.load_object(layout.root / index, what="safetensors index")
    folder = index.parent
    total = sum(size for rel, size in sizes.items() if rel.parent == folder)
    src.setdefault("metadata", {})["total_size"] = total
    (tmp / index).write_text(json.dumps(src, indent=2) + "\n", encoding="utf-8")


REPORT_SUFFIXES = (".json", ".html", ".htm")


def merge(
    base: str | os.PathLike[str],
    adapters: list[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    weights: list[float] | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    report_path: str | os.PathLike[str] | None = None,
    origins: Mapping[str, str] | None = None,
) -> MergeReport:
    """Merge ``adapters`` into ``base``, writing ``out`` atomically in the base's layout, and the numerical
    report to ``report_path`` (``.json`` or ``.html``) if given: both appear, or neither does. ``origins``: the
    names the provenance record gives adapters fetched from the Hub (see ``provenance.record``).

    ``progress`` is told the total bytes and tensors; its tick is advanced by (bytes, tensors).
    """
    import torch

    if not adapters:
        raise LoratoolsError("merge needs at least one adapter")
    origins = provenance.check_origins(origins)
    weights = weights if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise LoratoolsError(f"{len(weights)} weight(s) for {len(adapters)} adapter(s)", "give one weight per adapter")
    if dtype is not None and dtype not in DTYPES:
        raise LoratoolsError(f"unknown dtype {dtype!r}", "use fp32, fp16 or bf16")
    out_dtype = DTYPES[dtype] if dtype else None
    inputs = [p for src in [base, *adapters] for p in input_files(src)]
    check_output(out, force=force, inputs=inputs)
    if report_path is not None:
        check_output(report_path, force=force, inputs=inputs)
        r, o = Path(os.path.realpath(report_path)), Path(os.path.realpath(out))
        if r == o or r.is_relative_to(o) or o.is_relative_to(r):
            raise OutputError(f"the report {report_path} and the output {out} overlap", "write the report beside it")
        if Path(report_path).suffix.lower() not in REPORT_SUFFIXES:
            raise OutputError(
                f"report {report_path}: the report is written as .json or .html", "name it report.json or report.html"
            )
    dev = pick_device(device, allow_auto=True)
    layout = layout_of(base)
    loaded = [load_adapter(a) for a in adapters]
    targets = resolve(loaded, weights, layout)
    report = MergeReport(str(base), None, [str(a) for a in adapters], weights, dev, dtype)
    total_tensors = sum(len(wf.header.tensors) for wf in layout.files)
    tick = progress(layout.total_bytes, "bytes", total_tensors) if progress else None
    record = provenance.record(
        "merge",
        [(str(a), ad.format) for a, ad in zip(adapters, loaded, strict=True)],
        origins=origins,
        weights=weights,
        dtype=dtype,
    )
    # from here on threads hand work to each other: a Ctrl-C waits for the next checkpoint (between chunks)
    with torch.no_grad(), critical(), stage(force=force, inputs=inputs) as outputs, _threads(dev) as pool:
        if layout.single_file:
            wf = layout.files[0]
            header = _with_record(wf.header, record)
            tmp = outputs.file(out)
            _write_file(layout.root, header, tmp, wf.prefix, targets, out_dtype, dev, report, tick, pool)
        else:
            tmp = outputs.folder(out)
            _copy_other_files(layout, tmp, report)
            sizes: dict[Path, int] = {}
            for wf in layout.files:
                (tmp / wf.rel).parent.mkdir(parents=True, exist_ok=True)
                header = _with_record(wf.header, record)
                sizes[wf.rel] = _write_file(
                    layout.root / wf.rel, header, tmp / wf.rel, wf.prefix, targets, out_dtype, dev, report, tick, pool
                )
            for index in layout.indexes:
                _write_index(layout, index, tmp, sizes)
        report.output = str(out)
        if report_path is not None:
            outputs.file(report_path).write_text(render_report(report, report_path), encoding="utf-8")
    return report


def render_report(report: MergeReport, path: str | os.PathLike[str]) -> str:
    """The report as the file ``path`` names it: a self-contained HTML page, or JSON."""
    if Path(path).suffix.lower() in (".html", ".htm"):
        from .merge_html import render

        return render(report)
    return json.dumps(report.to_dict(), indent=2, default=str) + "\n"


def _with_record(header: Header, record: str) -> Header:
    meta = dict(header.metadata)
    meta[provenance.KEY] = record
    return Header(header.path, header.tensors, meta, header.header_len, header.file_size)


def layer_of(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def iter_layers(report: MergeReport) -> Iterator[tuple[str, float, float]]:
    """(layer label, max relative change, min retained) per layer, in layer order, for the HTML chart."""
    groups: dict[str, list[TensorReport]] = {}
    for t in report.tensors:
        n = layer_of(t.name)
        groups.setdefault("other" if n is None else str(n), []).append(t)
    for key in sorted(groups, key=lambda k: (k == "other", int(k) if k.isdigit() else 0)):
        ts = [t for t in groups[key] if t.delta_norm > 0]
        if ts:
            yield key, max(t.relative_change for t in ts), min(t.retained for t in ts)
