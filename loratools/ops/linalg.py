"""Low-rank linear algebra on factors, never on the dense delta.

A sum of LoRA products ``sum_i U_i @ V_i`` is itself one product ``U @ V`` of the stacked factors
(``U = [U_1 .. U_n]``, ``V = [V_1; ..; V_n]``, inner size R = sum of ranks). Its SVD follows from two thin QRs and
one R x R SVD: ``U = Qu Ru``, ``V^T = Qv Rv``, ``Ru Rv^T = X S Y^T``, so ``U V = (Qu X) S (Qv Y)^T``. The cost is
O(R^2 (out + in) + R^3) instead of O(out * in * min(out, in)) for a dense SVD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class LowRankSVD:
    """``U @ V == left @ diag(s) @ right`` with orthonormal columns of ``left`` and rows of ``right``."""

    left: torch.Tensor  # out x k
    s: torch.Tensor  # k, descending
    right: torch.Tensor  # k x in

    def truncate(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Optimal rank-k factors ``(up, down)`` (Eckart-Young), the singular values split evenly between them."""
        root = self.s[:k].sqrt()
        return self.left[:, :k] * root, root[:, None] * self.right[:k]

    def energy(self) -> torch.Tensor:
        """Cumulative fraction of the Frobenius energy (sum of squared singular values) kept by rank 1, 2, ..."""
        sq = self.s.double() ** 2
        total = sq.sum()
        if total == 0:
            return sq.new_ones(sq.shape)
        return sq.cumsum(0) / total


def lowrank_svd(up: torch.Tensor, down: torch.Tensor) -> LowRankSVD:
    """SVD of ``up @ down`` (out x R times R x in) from its factors."""
    import torch

    qu, ru = torch.linalg.qr(up)  # out x m, m x R
    qv, rv = torch.linalg.qr(down.T)  # in x n, n x R
    x, s, yh = torch.linalg.svd(ru @ rv.T)  # m x n
    k = s.shape[0]
    return LowRankSVD(qu @ x[:, :k], s, yh[:k] @ qv.T)


def dense_factors(delta: torch.Tensor, rtol: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of a dense ``out x in`` matrix (LoHa, LoKr, Tucker, full diffs), dropping only singular
    values below ``rtol * max`` (default: the dtype's rounding level times the size)."""
    import torch

    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    if rtol is None:
        rtol = torch.finfo(delta.dtype).eps * max(delta.shape)
    keep = int((s > s.max() * rtol).sum()) if s.numel() and s.max() > 0 else 0
    keep = max(keep, 1)
    root = s[:keep].sqrt()
    return u[:, :keep] * root, root[:, None] * vh[:keep]


def effective_rank(s: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank: exp of the entropy of the normalised singular values."""
    import torch

    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))
