"""One adapted module of a base model: its factors, alpha and layout, and what they add to the base weight.

The math of each kind is :mod:`.delta`'s, the shape rules :mod:`.shapes`'; here they meet the scale (``alpha / r``,
or ``alpha / sqrt(r)`` for rsLoRA; LoKr with no low-rank side has no rank and scale 1), the base weight's stored
layout (transposed for ``fan_in_fan_out`` and embeddings) and DoRA's rescale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from ..errors import LoratoolsError, ShapeError
from .delta import MAX_DELTA_ENV, dense, lokr_norm, max_delta, product_norm, rows
from .shapes import ModuleKind, delta_shape, factor_problems
from .tensors import TensorRef

if TYPE_CHECKING:
    import torch

Layer = Literal["linear", "conv", "embedding"]
DoraAxis = Literal["out", "in"]


@dataclass
class Module:
    """One adapted module of the base model.

    ``factors`` holds the kind's tensors under canonical names (see :data:`.shapes.FACTORS`); ``alpha`` is None when
    the file stores none, which every consumer reads as ``alpha = rank`` (scale 1). ``origin`` names the PEFT type
    a lora module was read from when that is not LoRA (``adalora``, ``vera``): inspect shows it as the type, and a
    ``vera`` module's down factor is VeRA's shared projection, as wide as the widest layer it was trained on (the
    file does not record each layer's input width): :meth:`apply` takes its first columns for a narrower layer,
    as PEFT does.
    """

    name: str
    kind: ModuleKind
    factors: dict[str, TensorRef]
    alpha: float | None = None
    rslora: bool = False
    layer: Layer = "linear"
    fan_in_fan_out: bool = False
    magnitude: TensorRef | None = None
    dora_axis: DoraAxis = "out"
    bias: TensorRef | None = None
    origin: str | None = None

    # ---- header-only facts -------------------------------------------------------------------------
    @property
    def type(self) -> str:
        """What inspect shows: the kind (or the PEFT type it was read from), with ``dora`` for weight-decomposed
        modules."""
        if self.magnitude is None:
            return self.origin or self.kind
        return "dora" if self.kind == "lora" else f"{self.kind}+dora"

    @property
    def flattened(self) -> bool:
        """True when the factors do not tell the layer's kernel: a LoHa (without Tucker cores) or a LoKr whose
        second factor is a low-rank pair stores a conv layer's factors flattened to (out, in*kh*kw), exactly as it
        stores a linear layer's (out, in). Only the base model (or another adapter of the same layer) can say
        which it is."""
        f = self.factors
        if self.kind == "loha":
            return "t1" not in f
        if self.kind == "lokr":
            return "w2" not in f and "t2" not in f and len(f["w2b"].shape) == 2
        return False

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
        problems = factor_problems(self.kind, {k: v.shape for k, v in self.factors.items()})
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
        return delta_shape(self.kind, {k: v.shape for k, v in self.factors.items()})

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
        d = dense(self.kind, f)
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
        if self._narrower(tuple(w.shape)) is not None:
            return self.fitted(tuple(w.shape)).apply(weight, multiplier, dtype)
        if math.prod(shape) != w.numel():  # fits() holds the same rule
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

    def fits(self, weight_shape: tuple[int, ...]) -> bool:
        """Whether the delta can be added to a base weight of ``weight_shape`` (stored layout): the same shape, the
        same elements with the same rows (a 1x1 conv LoRA on a linear weight), or a ``vera`` module on a layer
        narrower than its shared projection."""
        ws = self.weight_shape()
        same = tuple(ws) == tuple(weight_shape)
        alike = (
            bool(ws) and bool(weight_shape) and ws[0] == weight_shape[0] and math.prod(ws) == math.prod(weight_shape)
        )
        return same or alike or self._narrower(tuple(weight_shape)) is not None

    def fitted(self, weight_shape: tuple[int, ...]) -> Module:
        """This module for a base weight of ``weight_shape``: itself, or for a ``vera`` module on a narrower layer
        a copy whose down factor is the first columns of the shared projection (PEFT's ``vera_A[:, :in]``)."""
        width = self._narrower(tuple(weight_shape))
        if width is None:
            return self
        down = self.factors["down"]
        sliced = TensorRef((down.shape[0], width), down.dtype, lambda: down.load()[:, :width].contiguous())
        return replace(self, factors={**self.factors, "down": sliced})

    def _narrower(self, weight_shape: tuple[int, ...]) -> int | None:
        """The input width of the layer a ``vera`` module is applied to, when narrower than its down factor (the
        shared projection); None otherwise."""
        if self.origin != "vera" or len(weight_shape) != 2 or self.check():
            return None
        out, width = (weight_shape[1], weight_shape[0]) if self.fan_in_fan_out else weight_shape
        d_out, d_in = self.delta_shape()[:2]
        return width if out == d_out and 0 < width < d_in else None

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
            return product_norm(self.factors["up"].load().to(f64), self.factors["down"].load().to(f64)) * abs(
                self.scale
            )
        if self.kind == "lokr":
            return lokr_norm(self.name, self.factors, "1") * lokr_norm(self.name, self.factors, "2") * abs(self.scale)
        if self.kind == "full":
            return float(self.factors["diff"].load().to(f64).norm()) * abs(self.scale)
        return float(self.delta_matrix(dtype=f64).norm().item())
