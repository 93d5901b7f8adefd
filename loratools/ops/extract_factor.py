"""Factoring one weight difference: a randomized SVD (:func:`loratools.ops.linalg.randomized_svd`: O(mn k), exact
when the difference's rank is at most the sketch's width), truncated to a fixed rank or to the smallest rank that
keeps a fraction of its Frobenius energy, and the error of the stored (rounded) factors."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..model import Layer, Module, TensorRef, torch_dtype
from .extract_report import ExtractedModule
from .linalg import LowRankSVD, randomized_svd, rank_for_energy

if TYPE_CHECKING:
    import torch

OVERSAMPLE = 10  # extra sketch columns (Halko et al.'s p)
POWER_ITERS = 2  # power iterations (q)
START_RANK = 16  # first sketch width with --energy; doubled until the energy is reached
SEED = 0  # every module's sketch starts from this seed: the result does not depend on the order
RESIDUAL_BYTES = 32 << 20  # float32 work per chunk of rows when measuring the error


def _numerical_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    """Singular values above ``s_max * eps * max(m, n)`` (float32): the rest is rounding."""
    import torch

    if not s.numel() or float(s[0]) <= 0:
        return 0
    tol = float(s[0]) * torch.finfo(torch.float32).eps * max(shape)
    return int((s > tol).sum())


def choose_rank(
    mat: torch.Tensor,
    total: float,
    rank: int | None,
    energy: float | None,
    max_rank: int | None = None,
    *,
    seed: int = SEED,
) -> tuple[LowRankSVD, int]:
    """The SVD (leading part) of ``mat`` and the rank to keep: ``rank``, or the smallest k whose
    ``sum(s[:k]²)`` reaches ``energy * total`` (``total = ||mat||²``), at most ``max_rank``. With ``energy`` the
    sketch starts at :data:`START_RANK` and doubles until the energy is reached, the sketch holds the whole
    numerical range, or the cap is hit. Never more than the numerical rank (at least 1)."""
    import torch

    m, n = mat.shape
    full = min(m, n)
    gen = torch.Generator(device=mat.device).manual_seed(seed)

    def sketch(k: int) -> LowRankSVD:
        return randomized_svd(mat, k, oversample=OVERSAMPLE, power_iters=POWER_ITERS, generator=gen)

    if rank is not None:
        k = min(rank, full)
        svd = sketch(k)
    else:
        assert energy is not None
        cap = min(max_rank or full, full)
        width = min(START_RANK, cap)
        while True:
            svd = sketch(width)
            s = svd.s
            k = rank_for_energy(s, energy, total)
            if k <= s.numel():
                break
            whole = s.numel() < min(width + OVERSAMPLE, full) or _numerical_rank(s, (m, n)) < s.numel()
            if width >= cap or s.numel() >= full or whole:  # whole: the sketch holds the numerical range
                k = s.numel()
                break
            width = min(2 * width, cap)
        k = min(k, cap)
    return svd, max(1, min(k, _numerical_rank(svd.s, (m, n))))


def _residual(mat: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """``||mat - up @ down||`` in row chunks: never a second dense matrix of the whole size."""
    import torch

    rows, cols = mat.shape
    step = max(1, RESIDUAL_BYTES // max(1, cols * 4))
    sq = 0.0
    for r0 in range(0, rows, step):
        chunk = torch.addmm(mat[r0 : r0 + step], up[r0 : r0 + step], down, alpha=-1)
        sq += float(torch.linalg.vector_norm(chunk)) ** 2
    return math.sqrt(sq)


def factor(
    name: str,
    diff: torch.Tensor,
    layer: Layer,
    rank: int | None,
    energy: float | None,
    max_rank: int | None,
    dtype: str,
) -> tuple[Module, ExtractedModule]:
    """One LoRA module (scale 1: alpha = rank) for the float32 difference ``diff`` of a weight, stored as
    ``dtype``, and its report row. ``up @ down`` is ``U_k sqrt(S_k) · sqrt(S_k) V_kᵀ``, the rank-k truncation of
    the SVD; the error is measured on the stored factors, their rounding included."""
    import torch

    # the orientation of up @ down: out x in*kh*kw; an embedding's delta is hidden x vocab (PEFT's B @ A)
    mat = diff.T if layer == "embedding" else diff.reshape(diff.shape[0], -1)
    norm = float(torch.linalg.vector_norm(mat))
    svd, k = choose_rank(mat, norm * norm, rank, energy, max_rank)
    root = svd.s[:k].sqrt()
    store = torch_dtype(dtype)
    up = (svd.left[:, :k] * root).to(store)
    down = (root[:, None] * svd.right[:k]).to(store)
    error = _residual(mat, up.float(), down.float()) / norm
    kept = min(1.0, float((svd.s[:k].double() ** 2).sum()) / (norm * norm))
    if layer == "conv":
        kernel = tuple(diff.shape[2:])
        up = up.reshape(up.shape[0], k, *([1] * len(kernel)))
        down = down.reshape(k, diff.shape[1], *kernel)
    module = Module(
        name=name,
        kind="lora",
        factors={"down": TensorRef.of(down.cpu().contiguous()), "up": TensorRef.of(up.cpu().contiguous())},
        alpha=float(k),
        layer=layer,
    )
    return module, ExtractedModule(name, list(diff.shape), layer, k, kept, error, norm)
