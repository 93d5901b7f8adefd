"""Compare two checkpoints, or two adapters, tensor by tensor, streaming.

Two modes:

* ``tensors``: the stored tensors of two checkpoints (a safetensors file, a model folder, single or sharded, a
  diffusers pipeline folder), matched by name. Each pair is read straight from the files in chunks of at most
  :data:`CHUNK_BYTES` of float64 work per side, so memory stays near one chunk whatever the tensor size.
* ``deltas``: two adapters in any format loratools reads, matched by module (across formats through the kohya
  spelling both sides share); per module the deltas (``Module.delta()``, float32) are compared, which makes a PEFT
  file comparable with its kohya or diffusers conversion. DoRA magnitudes, LoRA biases and extras (full
  tensors such as ``modules_to_save``) are compared as they are stored.

Per pair, in float64: max ``|a - b|``, the relative Frobenius difference ``||a - b|| / ||a||`` and the cosine
``<a, b> / (||a|| ||b||)`` (1 when both are zero). A pair *differs* when it is not allclose in the numpy/torch
sense: some element has ``|a - b| > atol + rtol * |b|`` (NaN in the same place on both sides counts as equal,
as do equal infinities).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import HeaderError, LoratoolsError
from ..formats import detect, load_adapter
from ..io.checkpoint import BaseTensor, read_checkpoint
from ..io.progress import Progress
from ..model import DTYPE_SIZES, Adapter, Module, TensorRef, torch_dtype
from . import args
from .mix import match_key

if TYPE_CHECKING:
    import torch

Mode = Literal["auto", "tensors", "deltas"]
MODES = ("auto", "tensors", "deltas")

#: bytes of float64 work per side per chunk: a pair's stats are accumulated chunk by chunk
CHUNK_BYTES = 64 << 20
#: the floor of ||a|| in the relative difference, so that a zero tensor gives 0 (equal) or a huge number
TINY = sys.float_info.min


@dataclass
class TensorDiff:
    name: str
    shape: list[int]
    dtype: str  # A's stored dtype (a module's factor dtype in deltas mode)
    max_abs: float
    rel_fro: float
    cosine: float
    differs: bool


@dataclass
class Change:
    """A pair whose shape or dtype differs (a shape change is not compared; a dtype change is)."""

    name: str
    a_shape: list[int]
    b_shape: list[int]
    a_dtype: str
    b_dtype: str


@dataclass
class DiffReport:
    a: str
    b: str
    mode: str
    atol: float
    rtol: float
    tensors: list[TensorDiff] = field(default_factory=list)
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def compared(self) -> int:
        return len(self.tensors)

    @property
    def differ(self) -> int:
        return sum(t.differs for t in self.tensors)

    @property
    def identical(self) -> bool:
        return not (self.differ or self.only_in_a or self.only_in_b or self.changed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "mode": self.mode,
            "atol": self.atol,
            "rtol": self.rtol,
            "identical": self.identical,
            "compared": self.compared,
            "differ": self.differ,
            "only_in_a": list(self.only_in_a),
            "only_in_b": list(self.only_in_b),
            "changed": [asdict(c) for c in self.changed],
            "tensors": [asdict(t) for t in self.tensors],
            "notes": list(self.notes),
        }


# ---- the statistics of one pair -----------------------------------------------------------------------------


class PairStats:
    """Sums over a pair of equally shaped tensors fed in matching chunks, in float64."""

    def __init__(self, atol: float, rtol: float) -> None:
        self.atol = atol
        self.rtol = rtol
        self.ss_a = self.ss_b = self.ss_d = self.dot = 0.0
        self.max_abs = 0.0
        self.differs = False

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        import torch

        a = a.reshape(-1).to(torch.float64)
        b = b.reshape(-1).to(torch.float64)
        if a.numel() == 0:
            return
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        d = torch.where(same, torch.zeros((), dtype=torch.float64), (a - b).abs())
        close = same | (torch.isfinite(d) & (d <= self.atol + self.rtol * b.abs()))
        self.differs = self.differs or not bool(close.all())
        m = float(d.max())  # NaN propagates: a NaN against a number
        self.max_abs = math.nan if math.isnan(m) or math.isnan(self.max_abs) else max(self.max_abs, m)
        self.ss_a += float(torch.dot(a, a))
        self.ss_b += float(torch.dot(b, b))
        self.ss_d += float(torch.dot(d, d))
        self.dot += float(torch.dot(a, b))

    def result(self, name: str, shape: tuple[int, ...], dtype: str) -> TensorDiff:
        na, nb = math.sqrt(self.ss_a), math.sqrt(self.ss_b)
        rel = math.sqrt(self.ss_d) / max(na, TINY)
        if na == 0 and nb == 0:
            cos = 1.0
        elif na == 0 or nb == 0:
            cos = 0.0
        else:
            denom = math.sqrt(self.ss_a * self.ss_b)  # exactly ss_a when both are equal, so equal tensors give 1
            if not 0 < denom < math.inf:  # the product over- or underflowed
                denom = na * nb
            cos = self.dot / denom
            if math.isfinite(cos):
                cos = min(1.0, max(-1.0, cos))
        return TensorDiff(name, list(shape), dtype, self.max_abs, rel, cos, self.differs)


def chunk_elements() -> int:
    """Elements per chunk: :data:`CHUNK_BYTES` of float64."""
    return max(1, CHUNK_BYTES // 8)


def compare_tensors(a: torch.Tensor, b: torch.Tensor, atol: float = 0.0, rtol: float = 0.0) -> PairStats:
    """The stats of two in-memory tensors of equal element count, in chunks of :func:`chunk_elements`."""
    stats = PairStats(atol, rtol)
    fa, fb = a.reshape(-1), b.reshape(-1)
    step = chunk_elements()
    for i in range(0, fa.numel(), step):
        stats.add(fa[i : i + step], fb[i : i + step])
    return stats


def _file_chunks(t: BaseTensor, step: int) -> Iterator[torch.Tensor]:
    """One stored tensor, row-major, ``step`` elements at a time, straight from its byte range in the file."""
    import torch

    info = t.info
    size = DTYPE_SIZES[info.dtype]
    dtype = torch_dtype(info.dtype)
    n = math.prod(info.shape)
    with open(t.file, "rb") as fh:
        fh.seek(info.start)
        for i in range(0, n, step):
            k = min(step, n - i)
            buf = fh.read(k * size)
            if len(buf) != k * size:
                raise HeaderError(f"{t.file.name}: tensor {info.name} is cut short", "is the file truncated?")
            yield torch.frombuffer(bytearray(buf), dtype=dtype)


def compare_stored(a: BaseTensor, b: BaseTensor, atol: float = 0.0, rtol: float = 0.0) -> PairStats:
    """The stats of two stored tensors of equal element count, never holding more than one chunk of each."""
    stats = PairStats(atol, rtol)
    step = chunk_elements()
    for ca, cb in zip(_file_chunks(a, step), _file_chunks(b, step), strict=True):
        stats.add(ca, cb)
    return stats


# ---- pairing --------------------------------------------------------------------------------------------------


@dataclass
class DiffPlan:
    """What will be compared, known from headers alone; :meth:`run` reads the data."""

    a: str
    b: str
    mode: str
    pairs: list[tuple[str, Callable[[float, float], TensorDiff]]] = field(default_factory=list)
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def run(self, atol: float = 0.0, rtol: float = 0.0, progress: Progress | None = None) -> DiffReport:
        atol = args.number(atol, "atol", minimum=0, finite=False)
        rtol = args.number(rtol, "rtol", minimum=0, finite=False)
        args.callback(progress, "progress")
        rep = DiffReport(self.a, self.b, self.mode, atol, rtol)
        tick = progress(len(self.pairs)) if progress else None
        for _, compare in self.pairs:
            rep.tensors.append(compare(atol, rtol))
            if tick:
                tick()
        rep.only_in_a = sorted(self.only_in_a)
        rep.only_in_b = sorted(self.only_in_b)
        rep.changed = sorted(self.changed, key=lambda c: c.name)
        rep.notes = list(self.notes)
        return rep


def _try_adapter(path: str | os.PathLike[str]) -> tuple[Adapter | None, str | None]:
    """The adapter at ``path``, or None and why not (None, None when it is not an adapter at all)."""
    try:
        fmt = detect(path)
    except LoratoolsError:
        return None, None
    try:
        return load_adapter(path, fmt), None
    except LoratoolsError as e:
        return None, f"looks like a {fmt} adapter but cannot be read as one ({e.message})"


def plan_diff(a: str | os.PathLike[str], b: str | os.PathLike[str], mode: Mode = "auto") -> DiffPlan:
    """Pair up the tensors (or modules) of ``a`` and ``b``, reading headers only."""
    args.path(a, "a")
    args.path(b, "b")
    args.choice(mode, "mode", MODES, optional=False)
    for p in (a, b):
        if not Path(p).exists():
            raise LoratoolsError(f"{p}: no such file or folder")
    if mode == "deltas":
        return _plan_deltas(a, b, load_adapter(a), load_adapter(b))
    if mode == "auto":
        (ad_a, why_a), (ad_b, why_b) = _try_adapter(a), _try_adapter(b)
        if ad_a is not None and ad_b is not None:
            return _plan_deltas(a, b, ad_a, ad_b)
        plan = _plan_tensors(a, b)
        for side, ad, why in (("A", ad_a, why_a), ("B", ad_b, why_b)):
            if ad is not None:
                plan.notes.append(f"{side} is a {ad.format} adapter, the other side is not: stored tensors compared")
            elif why:
                plan.notes.append(f"{side} {why}: stored tensors compared")
        return plan
    return _plan_tensors(a, b)


def _plan_tensors(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> DiffPlan:
    ta, tb = read_checkpoint(a).tensors, read_checkpoint(b).tensors
    plan = DiffPlan(str(a), str(b), "tensors")
    plan.only_in_a = [n for n in ta if n not in tb]
    plan.only_in_b = [n for n in tb if n not in ta]
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if x.info.shape != y.info.shape or x.info.dtype != y.info.dtype:
            plan.changed.append(Change(name, list(x.info.shape), list(y.info.shape), x.info.dtype, y.info.dtype))
        if x.info.shape != y.info.shape:
            continue

        def compare(atol: float, rtol: float, name: str = name, x: BaseTensor = x, y: BaseTensor = y) -> TensorDiff:
            return compare_stored(x, y, atol, rtol).result(name, x.info.shape, x.info.dtype)

        plan.pairs.append((name, compare))
    return plan


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s for s in shape if s != 1)


def _plan_deltas(a: str | os.PathLike[str], b: str | os.PathLike[str], ad_a: Adapter, ad_b: Adapter) -> DiffPlan:
    plan = DiffPlan(str(a), str(b), "deltas")
    cross = ad_a.format != ad_b.format
    if cross:
        plan.notes.append(f"A is {ad_a.format}, B is {ad_b.format}: modules matched by their kohya names")
    mods_b = {match_key(n, cross): m for n, m in ad_b.modules.items()}
    keys_a = {match_key(n, cross) for n in ad_a.modules}
    plan.only_in_b += [m.name for k, m in mods_b.items() if k not in keys_a]
    for name, ma in sorted(ad_a.modules.items()):
        mb = mods_b.get(match_key(name, cross))
        if mb is None:
            plan.only_in_a.append(name)
            continue
        _pair_modules(plan, name, ma, mb)
    extras_b = {match_key(n, cross): e.ref for n, e in ad_b.extras.items()}
    keys_a = {match_key(n, cross) for n in ad_a.extras}
    plan.only_in_b += [n for n in ad_b.extras if match_key(n, cross) not in keys_a]
    for name, extra in sorted(ad_a.extras.items()):
        ref_b = extras_b.get(match_key(name, cross))
        if ref_b is None:
            plan.only_in_a.append(name)
        else:
            _pair_refs(plan, name, extra.ref, ref_b)
    return plan


def _pair_modules(plan: DiffPlan, name: str, ma: Module, mb: Module) -> None:
    facts = []
    for what, va, vb in (
        ("kind", ma.kind, mb.kind),
        ("layer", ma.layer, mb.layer),
        ("rank", ma.rank, mb.rank),
        ("alpha", ma.alpha, mb.alpha),
        ("rslora", ma.rslora, mb.rslora),
        ("scale", ma.scale, mb.scale),
    ):
        if va != vb:
            facts.append(f"{what} {_fmt(va)} vs {_fmt(vb)}")
    if facts:
        plan.notes.append(f"{name}: " + ", ".join(facts))
    sa, sb = ma.weight_shape(), mb.weight_shape()  # the shapes of delta()
    fits = _squeezed(sa) == _squeezed(sb)  # a 1x1 conv kernel against its linear form: comparable
    if ma.dtype != mb.dtype or not fits:
        plan.changed.append(Change(name, list(sa), list(sb), ma.dtype, mb.dtype))
    if sa != sb and fits:
        plan.notes.append(f"{name}: delta shapes {list(sa)} and {list(sb)} compared element by element")
    if fits:

        def compare(atol: float, rtol: float) -> TensorDiff:
            return compare_tensors(ma.delta(), mb.delta(), atol, rtol).result(name, sa, ma.dtype)

        plan.pairs.append((name, compare))
    for role in ("magnitude", "bias"):
        ra: TensorRef | None = getattr(ma, role)
        rb: TensorRef | None = getattr(mb, role)
        if ra is None and rb is None:
            continue
        if rb is None:
            plan.only_in_a.append(f"{name}.{role}")
        elif ra is None:
            plan.only_in_b.append(f"{mb.name}.{role}")
        else:
            if role == "magnitude" and ma.dora_axis != mb.dora_axis:
                plan.notes.append(f"{name}: DoRA norm axis {ma.dora_axis} vs {mb.dora_axis}")
            _pair_refs(plan, f"{name}.{role}", ra, rb, loose_shape=True)


def _pair_refs(plan: DiffPlan, name: str, ra: TensorRef, rb: TensorRef, *, loose_shape: bool = False) -> None:
    """Two stored tensors of an adapter (a magnitude, a bias, an extra); ``loose_shape`` compares shapes that
    differ only by size-1 axes ((out,) against kohya's (out, 1)) element by element, without a change."""
    same_shape = ra.shape == rb.shape or (loose_shape and _squeezed(ra.shape) == _squeezed(rb.shape))
    if not same_shape or ra.dtype != rb.dtype:
        plan.changed.append(Change(name, list(ra.shape), list(rb.shape), ra.dtype, rb.dtype))
    if _squeezed(ra.shape) != _squeezed(rb.shape):
        return

    def compare(atol: float, rtol: float) -> TensorDiff:
        return compare_tensors(ra.load(), rb.load(), atol, rtol).result(name, ra.shape, ra.dtype)

    plan.pairs.append((name, compare))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return "none" if v is None else str(v)


def diff(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    mode: Mode = "auto",
    progress: Progress | None = None,
) -> DiffReport:
    """Compare ``a`` and ``b``: two checkpoints tensor by tensor, or (``auto`` when both are adapters, or
    ``deltas``) two adapters module by module."""
    args.number(atol, "atol", minimum=0, finite=False)  # told before anything is read
    args.number(rtol, "rtol", minimum=0, finite=False)
    args.callback(progress, "progress")
    return plan_diff(a, b, mode).run(atol, rtol, progress)
