"""The delta math of every module kind, on factor tensors (the one place it is defined; :class:`~.module.Module`
calls it):

* LoRA:  ``up @ down``, conv factors flattened; a Tucker ``mid`` core contracted in between.
* LoHa:  ``(w1a @ w1b) * (w2a @ w2b)`` (Hadamard product), Tucker cores optional.
* LoKr:  ``kron(w1, w2)``, either side possibly low-rank (``a @ b``) or a Tucker rebuild.
* full:  ``diff``.

The scale (``alpha / r``) and the layout of the base weight are the module's business. Norms are computed without
the dense delta where the factors allow it; a dense delta where no base weight bounds it is limited by
:func:`max_delta`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..errors import LoratoolsError

if TYPE_CHECKING:
    import torch

    from .tensors import TensorRef

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


def rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a matrix of its first dim by all the others (also when a dim is 0: a rank-0 module)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def dense(kind: str, f: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The unscaled delta of a ``kind`` module from its loaded factors (shapes checked by the caller), in the
    orientation of ``up @ down``; the caller reshapes it to the delta's shape."""
    import torch

    if kind == "lora":
        up, down = rows(f["up"]), rows(f["down"])
        return torch.einsum("pi,ijhw,jq->pqhw", up, f["mid"], down) if "mid" in f else up @ down
    if kind == "loha":
        return _loha_half(f, "1") * _loha_half(f, "2")
    if kind == "lokr":
        w1, w2 = _lokr_half(f, "1"), _lokr_half(f, "2")
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        return torch.kron(w1.contiguous(), w2.contiguous())  # a Tucker rebuild is a permuted view: kron needs it dense
    return f["diff"]


def product_norm(up: torch.Tensor, down: torch.Tensor) -> float:
    """``||up @ down||`` (Frobenius) from the r x r Gram matrices, without forming the product."""
    import torch

    a, b = rows(down), rows(up)
    return math.sqrt(torch.sum((a @ a.T) * (b.T @ b)).clamp_min(0).item())


def lokr_norm(name: str, f: Mapping[str, TensorRef], i: str) -> float:
    """``||w_i||`` of one side of the LoKr product of module ``name``, never forming a low-rank side (the norm of
    a Kronecker product is the product of the norms)."""
    import torch

    f64 = torch.float64
    if f"w{i}" in f:
        return float(f[f"w{i}"].load().to(f64).norm())
    if f"t{i}" not in f:
        return product_norm(f[f"w{i}a"].load().to(f64), f[f"w{i}b"].load().to(f64))
    # a Tucker half is dense (out2 x in2 x kh x kw), and bounded like a delta
    n = math.prod(f[f"w{i}a"].shape[1:]) * math.prod(f[f"w{i}b"].shape[1:]) * math.prod(f[f"t{i}"].shape[2:])
    limit = max_delta()
    if n > limit:
        raise LoratoolsError(
            f"{name}: its Tucker w{i} would have {n:,} elements, more than the limit of {limit:,}",
            f"set {MAX_DELTA_ENV} to a larger number of elements to allow it",
        )
    t = {k: f[k].load().to(f64) for k in (f"t{i}", f"w{i}a", f"w{i}b")}
    return float(_lokr_half(t, i).norm())


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
