"""Low-rank linear algebra on factors, never on the dense delta.

A sum of LoRA products ``sum_i U_i @ V_i`` is itself one product ``U @ V`` of the stacked factors
(``U = [U_1 .. U_n]``, ``V = [V_1; ..; V_n]``, inner size R = sum of ranks). Its SVD follows from two thin QRs and
one R x R SVD: ``U = Qu Ru``, ``V^T = Qv Rv``, ``Ru Rv^T = X S Y^T``, so ``U V = (Qu X) S (Qv Y)^T``. The cost is
O(R^2 (out + in) + R^3) instead of O(out * in * min(out, in)) for a dense SVD.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


#: slack on a cumulative energy computed in float64 from the singular values themselves (their squares summed, then
#: divided by their sum): what is left is that sum's rounding, a few ulps of float64
ENERGY_RTOL = 1e-12
#: slack on a cumulative energy measured against a total computed apart from the values (extract: ``||D||²`` of the
#: float32 difference, where the sketch holds only the leading values): the two agree to float32's rounding, about
#: 1e-7 of the total, so a request of 1.0 must be met by 1 - 1e-6
MEASURED_ENERGY_RTOL = 1e-6


def rank_for_energy(s: torch.Tensor, energy: float, total: float | None = None) -> int:
    """The smallest k whose leading singular values ``s`` (descending) keep ``energy`` (a fraction) of the
    Frobenius energy: ``sum(s[:k]²) >= energy * total``, up to the rounding of the sums (:data:`ENERGY_RTOL`).

    ``total`` defaults to ``sum(s²)``: the whole spectrum is at hand, and the answer is at most ``len(s)`` (a zero
    matrix needs rank 1). Given (``||D||²`` when ``s`` holds only the leading values of a sketch), it is compared with
    the slack of a total computed apart (:data:`MEASURED_ENERGY_RTOL`), and ``len(s) + 1`` says that the values given
    do not reach it."""
    sq = s.detach().double() ** 2
    if total is not None:
        if total <= 0:
            return 1
        return int((sq.cumsum(0) / total < energy - MEASURED_ENERGY_RTOL).sum()) + 1
    whole = sq.sum()
    k = 1 if whole == 0 else int((sq.cumsum(0) / whole < energy - ENERGY_RTOL).sum()) + 1
    return min(k, sq.numel())


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


def randomized_svd(
    a: torch.Tensor,
    k: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> LowRankSVD:
    """The leading singular triplets of a dense ``m x n`` matrix at O(mn(k + p)) cost (Halko, Martinsson and
    Tropp 2011, algorithms 4.4 and 5.1): a Gaussian sketch ``a @ G`` with ``l = k + oversample`` columns, ``q``
    power iterations ``(a aᵀ)^q a G`` re-orthonormalised after every product (:func:`_orthonormal`), then the SVD
    of the small ``l x n`` matrix ``Qᵀ a``.

    Returns up to ``l`` components (fewer when ``a``'s numerical rank is lower: directions at rounding level are
    dropped): ``left`` is ``Q X`` (orthonormal columns) and ``s_i right_i = (Q X)_iᵀ a`` exactly, so every
    leading block is an orthogonal projection of ``a`` and ``||a - a_j||² = ||a||² - sum(s[:j]²)`` holds for
    each j (the rows of ``right`` are orthonormal up to rounding relative to their singular value). The sketch
    spans the range of ``a`` exactly (to rounding) when ``rank(a) <= l``; the leading k are then exact. When
    ``l >= min(m, n)`` the sketch would cost more than it saves, and an exact SVD is returned instead.
    ``generator`` (on ``a``'s device) makes the sketch, and so the result, deterministic.
    """
    import torch

    m, n = a.shape
    small = min(m, n)
    width = min(k + oversample, small)
    if width >= small or k < 1:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return LowRankSVD(u, s, vh)
    sketch = torch.randn(n, width, generator=generator, device=a.device, dtype=a.dtype)
    q = _orthonormal(a @ sketch)  # m x l
    for _ in range(power_iters):
        q = _orthonormal(a @ _orthonormal(a.T @ q))
    # the SVD of the small l x n matrix B = Qᵀa from its l x l Gram matrix B Bᵀ = X S² Xᵀ: left = Q X, and
    # s_i right_i = x_iᵀ B exactly, so every truncation is the orthogonal projection Q X_k X_kᵀ Qᵀ a
    bt = _work(a.T @ q)  # n x l = Bᵀ
    if not bt.shape[1]:  # a is zero
        return LowRankSVD(q, a.new_zeros(0), a.new_zeros(0, n))
    with one_thread(bt):
        ev, x = torch.linalg.eigh(bt.T @ bt)
        keep = torch.flip(torch.nonzero(ev > ev[-1].clamp_min(0) * GRAM_RTOL).flatten(), (0,))  # descending
        x, s = x[:, keep], ev[keep].sqrt()
    right = (bt @ x / s).T
    return LowRankSVD(q @ x.to(a.dtype), s.to(a.dtype), right.to(a.dtype))


#: eigenvalues of a Gram matrix below this fraction of the largest are rounding (singular values below about
#: 3e-7 of the largest, the float32 level of the data)
GRAM_RTOL = 1e-13


def _work(y: torch.Tensor) -> torch.Tensor:
    import torch

    out: torch.Tensor = y.double() if y.dtype == torch.float32 else y
    return out


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (columns) of the range of a tall ``m x l`` matrix.

    On the CPU from the float64 Gram matrix, twice (CholeskyQR2, with an eigendecomposition so that a
    rank-deficient ``y`` loses its null directions instead of failing): two small products and an l x l eigh, where
    LAPACK's Householder QR of a tall-skinny matrix takes tens of milliseconds, hundreds when the cores are busy
    (its many thread barriers). On a GPU, a QR."""
    import torch

    if y.device.type != "cpu":
        q: torch.Tensor = torch.linalg.qr(y)[0]
        return q
    w = _work(y)
    with one_thread(w):
        for _ in range(2):
            if not w.shape[1]:
                break
            ev, v = torch.linalg.eigh(w.T @ w)
            keep = ev > ev[-1].clamp_min(0) * GRAM_RTOL
            w = w @ (v[:, keep] / ev[keep].sqrt())
    return w.to(y.dtype)


@contextlib.contextmanager
def one_thread(t: torch.Tensor | str) -> Iterator[None]:
    """One CPU thread for work on m x l matrices (a few MFLOP), or on cache-sized slices of a big one: there a
    parallel region costs more than it saves, and on a machine whose cores are busy each of its barriers can wait
    a scheduler slice (measured: 15 ms per 26 x 26 eigh with two threads on two busy cores, against well under
    1 ms; TIES' elementwise passes over a 4096 x 4096 delta in 2^18-element slices: 0.10 s with one thread, 0.15
    to 0.30 s with two; merge's small work on the main thread while its work threads and writer hold the cores:
    0.5 s against 0.04 s for a 1 GB merge). ``t``: a tensor, or the name of the device the work runs on."""
    import torch

    if (t if isinstance(t, str) else t.device.type).split(":")[0] != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
