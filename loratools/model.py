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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .errors import ShapeError

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
        """Shape problems of the factors, as messages (empty when they fit)."""
        required, optional = FACTORS[self.kind]
        missing = [n for n in required if n not in self.factors]
        if self.kind == "lokr":
            if not ({"w1"} <= self.factors.keys() or {"w1a", "w1b"} <= self.factors.keys()):
                missing.append("w1 (or w1a+w1b)")
            if not ({"w2"} <= self.factors.keys() or {"w2a", "w2b"} <= self.factors.keys()):
                missing.append("w2 (or w2a+w2b)")
        if missing:
            return [f"missing factor(s) {', '.join(missing)}"]
        unknown = set(self.factors) - set(required) - set(optional)
        if unknown:
            return [f"unexpected factor(s) {', '.join(sorted(unknown))}"]
        f = {k: v.shape for k, v in self.factors.items()}
        problems: list[str] = []
        if self.kind == "lora":
            down, up = f["down"], f["up"]
            if len(up) < 2 or len(down) < 2:
                return [f"factors must be at least 2-D (down {list(down)}, up {list(up)})"]
            if "mid" in f:
                mid = f["mid"]
                if mid[0] != up[1] or mid[1] != down[0]:
                    problems.append(f"Tucker core {list(mid)} does not fit up {list(up)} and down {list(down)}")
            elif up[1] != down[0]:
                problems.append(f"rank mismatch: down has rank {down[0]}, up has rank {up[1]}")
            if any(s != 1 for s in up[2:]):
                problems.append(f"up factor {list(up)} must be 1x1 in its kernel dims")
        elif self.kind == "loha":
            for i in ("1", "2"):
                a, b = f[f"w{i}a"], f[f"w{i}b"]
                t = f.get(f"t{i}")
                if t is not None:
                    if not (a[0] == t[0] and b[0] == t[1]):
                        problems.append(f"Tucker core t{i} {list(t)} does not fit w{i}a {list(a)}, w{i}b {list(b)}")
                elif a[1] != b[0]:
                    problems.append(f"rank mismatch: w{i}a {list(a)} and w{i}b {list(b)}")
            if not problems and self._loha_shape(1) != self._loha_shape(2):
                problems.append("the two Hadamard halves have different shapes")
        elif self.kind == "lokr":
            for i in ("1", "2"):
                if f"w{i}a" in f and f"t{i}" not in f and f[f"w{i}a"][1] != f[f"w{i}b"][0]:
                    problems.append(f"rank mismatch: w{i}a {list(f[f'w{i}a'])} and w{i}b {list(f[f'w{i}b'])}")
        if not problems and self.magnitude is not None:
            out, inn = self.weight_shape()[:2] if len(self.weight_shape()) >= 2 else (0, 0)
            n = self.magnitude.numel
            if self.dora_axis == "out" and n != out or self.dora_axis == "in" and n != inn:
                problems.append(
                    f"DoRA magnitude {list(self.magnitude.shape)} does not fit the weight {list(self.weight_shape())}"
                )
        return problems

    def _loha_shape(self, i: int) -> tuple[int, int]:
        f = self.factors
        a, b = f[f"w{i}a"].shape, f[f"w{i}b"].shape
        if f"t{i}" in f:  # Tucker: a is r x out, b is r x in
            return a[1], b[1]
        return a[0], math.prod(b[1:])

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
    def delta(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> torch.Tensor:
        """The module's contribution to its base weight, scale included, in the weight's stored layout.

        Computed in float32 (or ``dtype``) whatever the stored dtype.
        """
        d = self.delta_matrix(dtype, device).reshape(self.delta_shape())
        if self.layer == "embedding" or self.fan_in_fan_out:
            d = d.transpose(0, 1)
        return d

    def delta_matrix(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> torch.Tensor:
        """The delta as an ``out x in*kh*kw`` matrix, scale included, before any layout transpose: the
        orientation of ``up @ down``, in which factors are mixed and re-compressed."""
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
            w1 = f["w1"] if "w1" in f else f["w1a"] @ f["w1b"]
            if "w2" in f:
                w2 = f["w2"]
            elif "t2" in f:
                w2 = torch.einsum("ij...,ip,jq->pq...", f["t2"], f["w2a"], f["w2b"])
            else:
                b = f["w2b"]
                w2 = (f["w2a"] @ b.reshape(b.shape[0], -1)).reshape(-1, *b.shape[1:])
            while w1.dim() < w2.dim():
                w1 = w1.unsqueeze(-1)
            d = torch.kron(w1, w2)
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
        """The merged weight ``W + multiplier * delta`` (DoRA: rescaled to the magnitude), computed in fp32.

        ``weight`` is in its stored layout; a delta of the same number of elements in another shape (a 1x1
        conv LoRA on a linear weight) is reshaped to it.
        """
        import torch

        work = dtype or torch.float32
        w = weight.to(work)
        d = self.delta(dtype=work, device=weight.device)
        if d.shape != w.shape:
            if d.numel() != w.numel():
                raise ShapeError(
                    f"{self.name}: delta {list(d.shape)} does not fit weight {list(w.shape)}",
                    "is the adapter made for this base model?",
                )
            d = d.reshape(w.shape)
        merged = w + multiplier * d
        if self.magnitude is None:
            return merged
        # DoRA: norm of the merged weight per output row (or input column), in (out, in, ...) orientation
        m = self.magnitude.load().to(device=weight.device, dtype=work).reshape(-1)
        oriented = merged.transpose(0, 1) if self.fan_in_fan_out else merged
        if self.dora_axis == "out":
            norm = oriented.reshape(oriented.shape[0], -1).norm(dim=1)
            factor = (m / norm).reshape(-1, *([1] * (oriented.dim() - 1)))
        else:
            norm = oriented.transpose(0, 1).reshape(oriented.shape[1], -1).norm(dim=1)
            factor = (m / norm).reshape(1, -1, *([1] * (oriented.dim() - 2)))
        if multiplier != 1.0:
            factor = multiplier * (factor - 1) + 1
        out: torch.Tensor = oriented * factor
        return out.transpose(0, 1) if self.fan_in_fan_out else out

    def delta_norm(self) -> float:
        """Frobenius norm of the delta; for plain LoRA from the r x r Gram matrices, never the dense delta."""
        import torch

        if self.kind == "lora" and "mid" not in self.factors and not self.check():
            a = self.factors["down"].load().to(torch.float64)
            b = self.factors["up"].load().to(torch.float64)
            a, b = rows(a), rows(b)
            sq = torch.sum((a @ a.T) * (b.T @ b)).clamp_min(0).item()
            return math.sqrt(sq) * abs(self.scale)
        return float(self.delta(dtype=torch.float64).norm().item())


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
