"""The one canonical adapter model: modules, their factors, and the delta math. No I/O, no CLI.

Every reader turns its file into an :class:`Adapter`; every writer and operation works on that. The
math of a module's contribution to its base weight lives here and nowhere else:

* LoRA:  ``delta = scale * up @ down`` with ``scale = alpha / r`` (``alpha / sqrt(r)`` for rsLoRA); conv
  factors are flattened and the result reshaped; a Tucker ``mid`` core is contracted in between.
* LoHa:  ``delta = (w1a @ w1b) * (w2a @ w2b) * alpha / r`` (Hadamard product), Tucker cores optional.
* LoKr:  ``delta = kron(w1, w2) * alpha / r`` where either side may be low-rank (``a @ b``); when neither
  side is low-rank there is no rank and the scale is 1.
* full:  ``delta = diff``.

``delta()`` returns the tensor in the base weight's *stored* layout: transposed for ``fan_in_fan_out``
(GPT-2 ``Conv1D``, stored in x out) and ``vocab x hidden`` for embeddings, so ``W + delta`` is always right.
DoRA modules carry a magnitude and are applied with :meth:`Module.apply`.

Tensors are held as :class:`TensorRef` so header-only facts (shapes, dtypes, ranks) need no data and no torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .errors import LoratoolsError, ShapeError

if TYPE_CHECKING:
    import torch

Kind = Literal["lora", "loha", "lokr", "full"]
Layer = Literal["linear", "conv", "embedding"]
DoraAxis = Literal["out", "in"]

#: factor names each kind may carry; the first tuple is required, the second optional
FACTORS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "lora": (("down", "up"), ("mid",)),
    "loha": (("w1a", "w1b", "w2a", "w2b"), ("t1", "t2")),
    "lokr": ((), ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2")),
    "full": (("diff",), ()),
}

#: bytes per element of each safetensors dtype name
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip


class TensorRef:
    """A tensor known by shape and dtype, whose data is read only when asked for."""

    def __init__(
        self,
        shape: Iterable[int],
        dtype: str,
        loader: Callable[[], torch.Tensor],
        item: Callable[[], float] | None = None,
    ) -> None:
        self.shape: tuple[int, ...] = tuple(int(s) for s in shape)
        self.dtype = dtype
        self._loader = loader
        self._item = item

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorRef:
        """Wrap an in-memory tensor."""
        t = tensor.detach()
        return cls(t.shape, dtype_name(t.dtype), lambda: t)

    def load(self) -> torch.Tensor:
        return self._loader()

    def item(self) -> float:
        """The value of a one-element tensor (an alpha), read without torch where the source allows."""
        if self.numel != 1:
            raise ShapeError(f"expected a single number, found a tensor of shape {list(self.shape)}")
        if self._item is not None:
            return self._item()
        return float(self.load().float().reshape(()).item())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES.get(self.dtype, 4)

    def __repr__(self) -> str:
        return f"TensorRef({list(self.shape)}, {self.dtype})"


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> safetensors dtype name."""
    import torch

    names = {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
        torch.uint8: "U8", torch.bool: "BOOL",
        torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    }  # fmt: skip
    try:
        return names[dtype]
    except KeyError:
        raise ShapeError(f"unsupported tensor dtype {dtype}") from None


def torch_dtype(name: str) -> torch.dtype:
    """safetensors dtype name -> torch dtype."""
    import torch

    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
        "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    }  # fmt: skip
    return table[name]


@dataclass
class Module:
    """One adapted module of the base model.

    ``factors`` holds the kind's tensors under canonical names (see :data:`FACTORS`); ``alpha`` is None when
    the file stores none, which every consumer reads as ``alpha = rank`` (scale 1).
    """

    name: str
    kind: Kind
    factors: dict[str, TensorRef]
    alpha: float | None = None
    rslora: bool = False
    layer: Layer = "linear"
    fan_in_fan_out: bool = False
    magnitude: TensorRef | None = None
    dora_axis: DoraAxis = "out"
    bias: TensorRef | None = None

    # ---- header-only facts -------------------------------------------------------------------------
    @property
    def type(self) -> str:
        """What inspect shows: the kind, with ``dora`` for weight-decomposed modules."""
        if self.magnitude is None:
            return self.kind
        return "dora" if self.kind == "lora" else f"{self.kind}+dora"

    @property
    def rank(self) -> int | None:
        """The rank the scale divides by; None for full-matrix LoKr, full diffs, and incomplete modules."""
        f = self.factors
        lead = {"lora": ("down",), "loha": ("w1b",), "lokr": ("w1b", "w2b")}.get(self.kind, ())
        for name in lead:
            if name in f:
                return f[name].shape[0]
        return None

    @property
    def scale(self) -> float:
        r = self.rank
        if r is None or self.alpha is None or r == 0:  # rank 0 adds nothing, whatever its scale
            return 1.0
        return self.alpha / (math.sqrt(r) if self.rslora else r)

    @property
    def dtype(self) -> str:
        dtypes = sorted({t.dtype for t in self.factors.values()})
        return "/".join(dtypes)

    def tensors(self) -> dict[str, TensorRef]:
        """Every tensor of the module, factors first, under canonical names."""
        out = dict(self.factors)
        if self.magnitude is not None:
            out["magnitude"] = self.magnitude
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def check(self) -> list[str]:
        """Shape problems of the factors, as messages (empty when they fit).

        The rules are those of LyCORIS' own rebuild (``lycoris.functional``), held as strictly as ComfyUI's loader
        (the strictest consumer): Tucker cores are ``rank x rank x kh x kw``; a factor has at most 5 dims; only a
        rank may be 0 (the module then adds nothing); a DoRA magnitude has one entry per output row (or input
        column); a LoRA bias one per output row. Every shape :meth:`delta_matrix` and :meth:`apply` rely on is
        checked here, so that no tensor operation ever meets a shape it cannot take.
        """
        have = self.factors.keys()
        required, optional = FACTORS[self.kind]
        missing = [n for n in required if n not in have]
        if self.kind == "lokr":
            for i in ("1", "2"):
                full, a, b = f"w{i}", f"w{i}a", f"w{i}b"
                if full in have and (a in have or b in have):
                    both = ", ".join(LOKR_KEYS[n] for n in (full, a, b) if n in have)
                    return [f"both a full and a low-rank w{i} ({both}): LoKr takes one or the other"]
                if full not in have and not {a, b} <= have:
                    missing.append(f"{LOKR_KEYS[full]} (or {LOKR_KEYS[a]} + {LOKR_KEYS[b]})")
        if missing:
            return [f"missing factor(s) {', '.join(missing)}"]
        unknown = set(have) - set(required) - set(optional)
        if unknown:
            return [f"unexpected factor(s) {', '.join(sorted(unknown))}"]
        f = {k: v.shape for k, v in self.factors.items()}
        deep = [f"{k} {list(s)}" for k, s in f.items() if len(s) > 5]
        if deep:
            return [f"factor(s) with more than 5 dims: {', '.join(deep)}"]
        problems = {"lora": _check_lora, "loha": _check_loha, "lokr": _check_lokr, "full": _check_full}[self.kind](f)
        if problems:
            return problems
        shape = self.delta_shape()
        if 0 in shape:
            return [f"the delta would be {list(shape)}: only a rank may be 0"]
        if len(shape) < 2 and (self.layer == "embedding" or self.fan_in_fan_out):
            return [f"a {len(shape)}-D delta {list(shape)} on a layer stored transposed (embedding, fan_in_fan_out)"]
        if self.magnitude is not None:
            problems += self._check_magnitude(self.magnitude.shape)
        if self.bias is not None:
            bias = self.bias.shape
            if math.prod(bias) != shape[0] or sum(n != 1 for n in bias) > 1:
                problems.append(f"bias {list(bias)} does not fit the delta {list(shape)}: one value per output row")
        return problems

    def _check_magnitude(self, mag: tuple[int, ...]) -> list[str]:
        ws = self.weight_shape()
        if len(ws) < 2:
            return [f"DoRA magnitude on a {len(ws)}-D weight {list(ws)}: DoRA needs a matrix or a conv kernel"]
        # stored layout -> (out, in) orientation (fan_in_fan_out weights are stored in x out)
        out, inn = (ws[1], ws[0]) if self.fan_in_fan_out else (ws[0], ws[1])
        want = out if self.dora_axis == "out" else inn
        if len(mag) > 5 or math.prod(mag) != want or sum(s != 1 for s in mag) > 1:
            per = "output row" if self.dora_axis == "out" else "input column"
            return [f"DoRA magnitude {list(mag)} does not fit the weight {list(ws)}: one value per {per} ({want})"]
        return []

    def delta_shape(self) -> tuple[int, ...]:
        """Shape of the delta in (out, in[, kh, kw]) orientation, before any fan_in_fan_out/embedding transpose."""
        f = self.factors
        if self.kind == "lora":
            up, down = f["up"].shape, f["down"].shape
            k = f["mid"].shape[2:] if "mid" in f else down[2:]
            return (up[0], down[1], *k)
        if self.kind == "loha":
            if "t1" in f:
                return (f["w1a"].shape[1], f["w1b"].shape[1], *f["t1"].shape[2:])
            return (f["w1a"].shape[0], math.prod(f["w1b"].shape[1:]))
        if self.kind == "lokr":
            a1, b1 = (f["w1"].shape if "w1" in f else (f["w1a"].shape[0], f["w1b"].shape[1]))[:2]
            if "w2" in f:
                w2 = f["w2"].shape
            elif "t2" in f:
                w2 = (f["w2a"].shape[1], f["w2b"].shape[1], *f["t2"].shape[2:])
            else:
                w2 = (f["w2a"].shape[0], *f["w2b"].shape[1:])
            return (a1 * w2[0], b1 * w2[1], *w2[2:])
        return f["diff"].shape

    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this module's delta adds to, in its stored layout."""
        shape = self.delta_shape()
        if self.layer == "embedding" or self.fan_in_fan_out:
            return (shape[1], shape[0], *shape[2:])
        return shape

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors().values())

    # ---- the math ----------------------------------------------------------------------------------
    def dense_numel(self) -> int:
        """Elements of the dense delta this module's math forms (header-only)."""
        return math.prod(self.delta_shape())

    def check_dense(self) -> None:
        """Refuse, before any work, a dense delta larger than :func:`max_delta` elements.

        Only modules that must be densified (LoHa, LoKr, Tucker, full diffs) are bounded: plain LoRA is mixed,
        re-compressed and merged through its factors. Where a base weight is at hand (:meth:`apply`), the delta
        is bounded by that weight instead, which the base file holds.
        """
        problems = self.check()
        if problems:
            raise ShapeError(f"{self.name}: {problems[0]}")
        if self.is_two_factor():
            return
        n, limit = self.dense_numel(), max_delta()
        if n > limit:
            raise LoratoolsError(
                f"{self.name}: its {self.type} delta would be {'x'.join(map(str, self.delta_shape()))} = {n:,} "
                f"elements, more than the limit of {limit:,} for a dense delta",
                f"set {MAX_DELTA_ENV} to a larger number of elements to allow it "
                f"(about {n * 8 * 3 / 2**30:.1f} GiB of float64 work)",
            )

    def delta(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> torch.Tensor:
        """The module's contribution to its base weight, scale included, in the weight's stored layout.

        Computed in float32 (or ``dtype``) whatever the stored dtype; bounded as :meth:`delta_matrix` is.
        """
        d = self.delta_matrix(dtype, device).reshape(self.delta_shape())
        return self._stored(d)

    def _stored(self, d: torch.Tensor) -> torch.Tensor:
        if self.layer == "embedding" or self.fan_in_fan_out:
            d = d.transpose(0, 1)
        return d

    def delta_matrix(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> torch.Tensor:
        """The delta as an ``out x in*kh*kw`` matrix, scale included, before any layout transpose: the
        orientation of ``up @ down``, in which factors are mixed and re-compressed.

        LoHa, LoKr, Tucker and full modules larger than :func:`max_delta` elements are refused
        (:meth:`check_dense`): their files are small, the delta they claim need not be."""
        self.check_dense()
        return self._dense(dtype, device)

    def _dense(self, dtype: torch.dtype | None, device: str | torch.device | None) -> torch.Tensor:
        """:meth:`delta_matrix` with no size bound: the caller has bounded it (the shapes are checked)."""
        import torch

        problems = self.check()
        if problems:
            raise ShapeError(f"{self.name}: {problems[0]}")
        work = dtype or torch.float32
        f = {k: v.load().to(device=device, dtype=work) for k, v in self.factors.items()}
        if self.kind == "lora":
            up, down = rows(f["up"]), rows(f["down"])
            d = torch.einsum("pi,ijhw,jq->pqhw", up, f["mid"], down) if "mid" in f else up @ down
        elif self.kind == "loha":
            d = _loha_half(f, "1") * _loha_half(f, "2")
        elif self.kind == "lokr":
            w1, w2 = _lokr_half(f, "1"), _lokr_half(f, "2")
            while w1.dim() < w2.dim():
                w1 = w1.unsqueeze(-1)
            d = torch.kron(w1.contiguous(), w2.contiguous())  # a Tucker rebuild is a permuted view: kron needs it dense
        else:
            d = f["diff"]
        d = d.reshape(self.delta_shape())
        return rows(d) * self.scale

    def is_two_factor(self) -> bool:
        """Whether :meth:`lora_factors` gives ``(up, down)`` (checked without loading them)."""
        return self.kind == "lora" and "mid" not in self.factors and not self.check()

    def lora_factors(
        self, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(up, down)`` as ``out x r`` and ``r x in*kh*kw`` with ``up @ down == delta_matrix()``, the scale
        folded into ``down``; None for modules that are not a plain product of two factors."""
        import torch

        if not self.is_two_factor():
            return None
        work = dtype or torch.float32
        up = self.factors["up"].load().to(device=device, dtype=work)
        down = self.factors["down"].load().to(device=device, dtype=work)
        return rows(up), rows(down) * self.scale

    def apply(self, weight: torch.Tensor, multiplier: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The merged weight, computed in fp32 (or ``dtype``).

        Without DoRA: ``W + multiplier * delta``. With DoRA, ComfyUI's rule (``weight_decompose``; LyCORIS'
        ``apply_dora_scale`` is the same): ``W' = W + multiplier * (W_dora - W)``, where
        ``W_dora = m * (W + delta) / ||W + delta||`` (the norm per output row, or per input column) is the DoRA
        merge at multiplier 1, PEFT's ``merge_and_unload``. Multiplier 1 gives ``W_dora``, 0 gives ``W``, 0.5 the
        weight halfway between.

        ``weight`` is in its stored layout; a delta of the same number of elements in another shape (a 1x1
        conv LoRA on a linear weight) is reshaped to it. The delta is bounded by the weight, not by
        :func:`max_delta`: it is checked to fit before it is formed.
        """
        import torch

        work = dtype or torch.float32
        w = weight.to(work)
        shape = self.weight_shape()
        if math.prod(shape) != w.numel():
            raise ShapeError(
                f"{self.name}: delta {list(shape)} does not fit weight {list(w.shape)}",
                "is the adapter made for this base model?",
            )
        d = self._stored(self._dense(work, weight.device).reshape(self.delta_shape())).reshape(w.shape)
        if self.magnitude is None:
            return w + multiplier * d
        dora = self._dora(w + d, work)
        if multiplier == 1.0:
            return dora
        return w + multiplier * (dora - w)

    def _dora(self, merged: torch.Tensor, work: torch.dtype) -> torch.Tensor:
        """``m * merged / ||merged||``, the norm per output row (or input column) in (out, in, ...) orientation."""

        assert self.magnitude is not None
        m = self.magnitude.load().to(device=merged.device, dtype=work).reshape(-1)
        oriented = merged.transpose(0, 1) if self.fan_in_fan_out else merged
        if self.dora_axis == "out":
            norm = oriented.reshape(oriented.shape[0], -1).norm(dim=1)
            shape = (-1, *([1] * (oriented.dim() - 1)))
        else:
            norm = oriented.transpose(0, 1).reshape(oriented.shape[1], -1).norm(dim=1)
            shape = (1, -1, *([1] * (oriented.dim() - 2)))
        zero = norm == 0
        if bool(zero.any()):
            where = "row" if self.dora_axis == "out" else "column"
            raise ShapeError(
                f"{self.name}: W + delta has an all-zero {where} ({int(zero.nonzero()[0])}): "
                "DoRA's rescale m / ||W + delta|| is undefined there"
            )
        out: torch.Tensor = oriented * (m / norm).reshape(shape)
        return out.transpose(0, 1) if self.fan_in_fan_out else out

    def delta_norm(self) -> float:
        """Frobenius norm of the delta, never from a dense delta that the factors need not form: plain LoRA from
        the r x r Gram matrices, LoKr as ``||w1|| * ||w2||`` (the norm of a Kronecker product), full diffs from
        the stored diff; LoHa and Tucker modules from their dense delta, bounded by :meth:`check_dense`."""
        import torch

        problems = self.check()
        if problems:
            raise ShapeError(f"{self.name}: {problems[0]}")
        f64 = torch.float64
        if self.kind == "lora" and "mid" not in self.factors:
            return _product_norm(self.factors["up"].load().to(f64), self.factors["down"].load().to(f64)) * abs(
                self.scale
            )
        if self.kind == "lokr":
            return _lokr_norm(self, "1") * _lokr_norm(self, "2") * abs(self.scale)
        if self.kind == "full":
            return float(self.factors["diff"].load().to(f64).norm()) * abs(self.scale)
        return float(self.delta_matrix(dtype=f64).norm().item())


#: the most elements a dense delta may have where no base weight bounds it; LORATOOLS_MAX_DELTA overrides it
MAX_DELTA = 2**26
MAX_DELTA_ENV = "LORATOOLS_MAX_DELTA"


def max_delta() -> int:
    """The limit on a dense delta's elements: :data:`MAX_DELTA` (64 Mi elements, 512 MiB in float64; the largest
    weights of SDXL, Flux and 8B LLMs fit), or the environment's ``LORATOOLS_MAX_DELTA``."""
    raw = os.environ.get(MAX_DELTA_ENV, "").strip()
    if not raw:
        return MAX_DELTA
    try:
        n = int(raw.replace("_", ""))
    except ValueError:
        n = 0
    if n < 1:
        raise LoratoolsError(f"{MAX_DELTA_ENV}={raw[:40]!r} is not a positive whole number of elements")
    return n


def _product_norm(up: torch.Tensor, down: torch.Tensor) -> float:
    """``||up @ down||`` (Frobenius) from the r x r Gram matrices, without forming the product."""
    import torch

    a, b = rows(down), rows(up)
    return math.sqrt(torch.sum((a @ a.T) * (b.T @ b)).clamp_min(0).item())


def _lokr_norm(m: Module, i: str) -> float:
    """``||w_i||`` of one side of a LoKr product, never forming a low-rank side."""
    import torch

    f64 = torch.float64
    f = m.factors
    if f"w{i}" in f:
        return float(f[f"w{i}"].load().to(f64).norm())
    if f"t{i}" not in f:
        return _product_norm(f[f"w{i}a"].load().to(f64), f[f"w{i}b"].load().to(f64))
    # a Tucker half is dense (out2 x in2 x kh x kw), and bounded like a delta
    n = math.prod(f[f"w{i}a"].shape[1:]) * math.prod(f[f"w{i}b"].shape[1:]) * math.prod(f[f"t{i}"].shape[2:])
    limit = max_delta()
    if n > limit:
        raise LoratoolsError(
            f"{m.name}: its Tucker w{i} would have {n:,} elements, more than the limit of {limit:,}",
            f"set {MAX_DELTA_ENV} to a larger number of elements to allow it",
        )
    t = {k: f[k].load().to(f64) for k in (f"t{i}", f"w{i}a", f"w{i}b")}
    return float(_lokr_half(t, i).norm())


Shape = tuple[int, ...]

#: canonical LoKr factor names -> their LyCORIS key suffixes, for messages
LOKR_KEYS = {
    "w1": "lokr_w1", "w1a": "lokr_w1_a", "w1b": "lokr_w1_b",
    "w2": "lokr_w2", "w2a": "lokr_w2_a", "w2b": "lokr_w2_b", "t2": "lokr_t2",
}  # fmt: skip


def _ones(shape: Shape) -> bool:
    return all(s == 1 for s in shape)


def _dims(name: str, shape: Shape, allowed: tuple[int, ...]) -> list[str]:
    if len(shape) in allowed:
        return []
    want = " or ".join(f"{n}-D" for n in allowed)
    return [f"{name} {list(shape)} must be {want}"]


def _tucker(name: str, t: Shape, a_name: str, a: Shape, b_name: str, b: Shape) -> list[str]:
    """A Tucker core ``rank x rank x kh x kw`` between ``a`` (rank x out) and ``b`` (rank x in)."""
    problems = _dims(name, t, (4,)) + _dims(a_name, a, (2,)) + _dims(b_name, b, (2,))
    if not problems and not (t[0] == a[0] == t[1] == b[0]):
        problems.append(
            f"Tucker core {name} {list(t)} does not fit {a_name} {list(a)} and {b_name} {list(b)}: "
            "it must be rank x rank x kh x kw"
        )
    return problems


def _check_lora(f: Mapping[str, Shape]) -> list[str]:
    down, up = f["down"], f["up"]
    if len(up) < 2 or len(down) < 2:
        return [f"factors must be at least 2-D (down {list(down)}, up {list(up)})"]
    if not _ones(up[2:]):
        return [f"up factor {list(up)} must be 1x1 in its kernel dims"]
    if "mid" not in f:
        if up[1] != down[0]:
            return [f"rank mismatch: down has rank {down[0]}, up has rank {up[1]}"]
        return []
    mid = f["mid"]
    if len(mid) != 4:
        return [f"Tucker core (lora_mid) {list(mid)} must be 4-D: rank x rank x kh x kw"]
    if not _ones(down[2:]):
        return [f"with a Tucker core the kernel is the core's: down {list(down)} must be 1x1 in its kernel dims"]
    if not (mid[0] == mid[1] == down[0] == up[1]):
        return [
            f"Tucker core {list(mid)} does not fit up {list(up)} and down {list(down)}: "
            "it must be rank x rank x kh x kw, with the rank of both"
        ]
    return []


def _check_loha(f: Mapping[str, Shape]) -> list[str]:
    if ("t1" in f) != ("t2" in f):
        return ["one Tucker core (hada_t1 / hada_t2) without the other: both halves are Tucker or neither"]
    problems: list[str] = []
    halves: list[Shape] = []
    for i in ("1", "2"):
        a, b = f[f"w{i}a"], f[f"w{i}b"]
        if f"t{i}" in f:
            found = _tucker(f"hada_t{i}", f[f"t{i}"], f"hada_w{i}_a", a, f"hada_w{i}_b", b)
            halves.append((a[1], b[1], *f[f"t{i}"][2:]) if not found else ())
        else:
            found = _dims(f"hada_w{i}_a", a, (2,)) + _dims(f"hada_w{i}_b", b, (2, 4))
            if not found and a[1] != b[0]:
                found.append(f"rank mismatch: hada_w{i}_a {list(a)} and hada_w{i}_b {list(b)}")
            halves.append((a[0], *b[1:]) if not found else ())
        problems += found
    if not problems and halves[0] != halves[1]:
        problems.append(f"the two Hadamard halves have different shapes ({list(halves[0])} and {list(halves[1])})")
    return problems


def _check_lokr(f: Mapping[str, Shape]) -> list[str]:
    problems: list[str] = []
    if "w1" in f:
        problems += _dims("lokr_w1", f["w1"], (2,))
    else:
        a, b = f["w1a"], f["w1b"]
        problems += _dims("lokr_w1_a", a, (2,)) + _dims("lokr_w1_b", b, (2,))
        if not problems and a[1] != b[0]:
            problems.append(f"rank mismatch: lokr_w1_a {list(a)} and lokr_w1_b {list(b)}")
    if "t2" in f and "w2" in f:
        return ["lokr_t2 goes with lokr_w2_a + lokr_w2_b, not with a full lokr_w2"]
    if "w2" in f:
        problems += _dims("lokr_w2", f["w2"], (2, 4))
    elif "t2" in f:
        problems += _tucker("lokr_t2", f["t2"], "lokr_w2_a", f["w2a"], "lokr_w2_b", f["w2b"])
    else:
        a, b = f["w2a"], f["w2b"]
        found = _dims("lokr_w2_a", a, (2,)) + _dims("lokr_w2_b", b, (2, 4))
        if not found and a[1] != b[0]:
            found.append(f"rank mismatch: lokr_w2_a {list(a)} and lokr_w2_b {list(b)}")
        problems += found
    if not problems and "w1b" in f and "w2b" in f and f["w1b"][0] != f["w2b"][0]:
        problems.append(
            f"w1 and w2 are both low-rank with different ranks ({f['w1b'][0]} and {f['w2b'][0]}): "
            "which one alpha divides by is ambiguous (LyCORIS gives both the same)"
        )
    return problems


def _check_full(f: Mapping[str, Shape]) -> list[str]:
    diff = f["diff"]
    return [] if diff else ["a full diff must be at least 1-D, found a scalar"]


def rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a matrix of its first dim by all the others (also when a dim is 0: a rank-0 module)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def _loha_half(f: Mapping[str, torch.Tensor], i: str) -> torch.Tensor:
    import torch

    a, b = f[f"w{i}a"], f[f"w{i}b"]
    t = f.get(f"t{i}")
    if t is not None:  # Tucker: a is r x out, b is r x in, t is r x r x kh x kw
        return torch.einsum("ij...,ip,jq->pq...", t, a, b)
    return a @ rows(b)


def _lokr_half(f: Mapping[str, torch.Tensor], i: str) -> torch.Tensor:
    """One side of the Kronecker product: ``w`` itself, ``a @ b`` (conv kernels kept), or a Tucker rebuild."""
    import torch

    if f"w{i}" in f:
        return f[f"w{i}"]
    a, b = f[f"w{i}a"], f[f"w{i}b"]
    if f"t{i}" in f:
        return torch.einsum("ij...,ip,jq->pq...", f[f"t{i}"], a, b)
    return (a @ rows(b)).reshape(-1, *b.shape[1:])


ExtraRole = Literal["modules_to_save", "base_layer", "trainable_tokens", "other"]


@dataclass
class Extra:
    """A tensor that is not a LoRA factor (a full weight that replaces the base's), carried through untouched."""

    ref: TensorRef
    role: ExtraRole = "other"


@dataclass
class Adapter:
    """An adapter in canonical form, whatever file it came from.

    ``modules`` are keyed by the base model's module path (``model.layers.0.self_attn.q_proj``); diffusers
    files keep their component prefix (``unet.down_blocks.0...``) and kohya/LyCORIS files their flattened
    names (``lora_unet_down_blocks_0_...``), which only a base model's module list can turn back into dots.
    ``extras`` are keyed by the full tensor name in the same scheme (``lm_head.weight``).
    """

    format: str
    modules: dict[str, Module] = field(default_factory=dict)
    extras: dict[str, Extra] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None
    source: str | None = None

    @property
    def num_params(self) -> int:
        return sum(m.num_params for m in self.modules.values()) + sum(e.ref.numel for e in self.extras.values())

    @property
    def nbytes(self) -> int:
        refs = [t for m in self.modules.values() for t in m.tensors().values()]
        refs += [e.ref for e in self.extras.values()]
        return sum(t.nbytes for t in refs)

    def dtypes(self) -> dict[str, int]:
        """Tensor count per dtype."""
        counts: dict[str, int] = {}
        for m in self.modules.values():
            for t in m.tensors().values():
                counts[t.dtype] = counts.get(t.dtype, 0) + 1
        for e in self.extras.values():
            counts[e.ref.dtype] = counts.get(e.ref.dtype, 0) + 1
        return dict(sorted(counts.items()))

    def target_kinds(self) -> dict[str, int]:
        """Module count per target kind: the last part of the module path (``q_proj``, ``to_k``)."""
        counts: dict[str, int] = {}
        for name in self.modules:
            kind = target_kind(name)
            counts[kind] = counts.get(kind, 0) + 1
        return dict(sorted(counts.items()))


def target_kind(name: str) -> str:
    """``model.layers.0.self_attn.q_proj`` -> ``q_proj``; ``...to_out.0`` -> ``to_out.0``."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1].isdigit():
        return ".".join(parts[-2:])
    return parts[-1]
