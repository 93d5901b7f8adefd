"""Task-vector merges on each module's dense delta: TIES, DARE and magnitude pruning, with PEFT's names and math.

PEFT's ``add_weighted_adapter`` offers these two ways: without ``_svd`` it prunes the A and B factors separately
(which is not TIES on the delta: the product of two pruned factors is not the pruned product), and with ``_svd``
it forms every dense delta, merges them, and takes a full SVD of the result (O(out * in * min(out, in)) per module).
loratools does what the ``_svd`` variants mean, one module at a time, and re-compresses with a randomized SVD
(O(out * in * K), :func:`.linalg.randomized_svd`).

For one module, ``t_i = s_i * B_i @ A_i`` is input i's dense delta (a missing module counts as zero) and ``w_i``
its weight. With ``density`` d and ``k = int(d * out * in)``:

* ``magnitude_prune``: ``sum_i w_i * keep_k(t_i)``, ``keep_k`` keeping the k entries of largest magnitude.
* ``ties``: ``p_i = keep_k(t_i)``; the elected sign per entry is ``sign(sum_i p_i)`` (``total``) or
  ``sign(sum_i sign(p_i))`` (``frequency``), +1 on a tie; the result is
  ``sum_i w_i p_i [sign(p_i) = elected] / max(1, #{i: sign(p_i) = elected})``.
* ``dare_linear``: ``sum_i w_i * t_i * M_i / d``, ``M_i`` each entry kept with probability d (Bernoulli).
* ``dare_ties``: ``p_i = t_i * M_i / d``, then TIES' election and disjoint mean.

The elections use the pruned deltas before the weights, as PEFT's ``calculate_majority_sign_mask`` does. DARE's
masks come from a generator seeded by the seed, the input's position and the module's name, so a mix is
reproducible and does not depend on the order modules are visited in. ``d >= 1`` prunes nothing.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from ..model import Module
from .linalg import randomized_svd
from .lowrank import factors, refuse_nonfinite

if TYPE_CHECKING:
    import torch

DenseMethod = Literal["ties", "dare_linear", "dare_ties", "magnitude_prune"]
DENSE_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")
#: the randomized SVD's sketch: at least K + OVERSAMPLE columns, and at least the inputs' summed rank R plus
#: COVER, with POWER_ITERS power iterations. A pruned delta is its inputs' low-rank sum (rank <= R) plus pruning
#: noise spread over every direction: a sketch that covers the R leading directions converges at the rate of that
#: noise floor. Measured on a 4096 x 4096 TIES merge of three rank-16 adapters at density 0.2, K = 16: with 48
#: columns and 4 iterations the result is PEFT's exact truncation to 1.6e-6 (relative, Frobenius: float32's SVD
#: precision there), its error the optimal one to 1e-7; with 32 columns and 6 iterations 2.8e-4 apart
OVERSAMPLE = 16
COVER = 8
POWER_ITERS = 4


def keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its ``int(density * numel)`` entries of largest magnitude set to zero (PEFT's
    ``magnitude_based_pruning``; entries equal to the threshold are all kept)."""
    import torch

    if density >= 1:
        return t
    k = int(density * t.numel())
    if k <= 0:
        return torch.zeros_like(t)
    mags = t.abs()
    return t.masked_fill(mags < kth_largest(mags.flatten(), k), 0.0)


#: entries sampled to bracket the k-th largest magnitude
SAMPLE = 1 << 16


def kth_largest(mags: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of ``mags`` (1 <= k <= numel), exactly. A full selection over a 4096 x 4096 delta takes
    about a second; here a sample brackets the value (a few standard deviations of the sample's rank either side),
    one pass counts what lies above and inside the bracket, and only the entries inside (a few thousand) are
    selected from. When the bracket misses (a sample can), the full selection decides."""
    import torch

    n = mags.numel()
    if n <= 4 * SAMPLE:
        return torch.kthvalue(mags, n - k + 1).values
    gen = torch.Generator(device=mags.device).manual_seed(n * 31 + k)
    sample = mags[torch.randint(n, (SAMPLE,), generator=gen, device=mags.device)].sort().values
    q = 1 - k / n  # the quantile of the k-th largest
    spread = 6 * (q * (1 - q) * SAMPLE) ** 0.5 + 2
    lo = sample[max(0, int(q * SAMPLE - spread))]
    hi = sample[min(SAMPLE - 1, int(q * SAMPLE + spread))]
    above = int(torch.count_nonzero(mags > hi))
    inside = mags[(mags >= lo) & (mags <= hi)]
    if above < k <= above + inside.numel():
        return torch.kthvalue(inside, inside.numel() - (k - above) + 1).values
    return torch.kthvalue(mags, n - k + 1).values


def module_seed(seed: int, index: int, name: str) -> int:
    """The seed of input ``index``'s mask for module ``name``: stable across runs, platforms and visit orders."""
    digest = hashlib.sha256(f"{seed}\0{index}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def drop_random(t: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """DARE: each entry kept with probability ``density`` and rescaled by ``1 / density`` (PEFT's
    ``random_pruning(rescale=True)``), the mask drawn from a generator seeded with ``seed``."""
    import torch

    if density >= 1:
        return t
    gen = torch.Generator(device=t.device).manual_seed(seed)
    keep = torch.rand(t.shape, generator=gen, device=t.device, dtype=torch.float32) < density
    return (t / density).masked_fill_(~keep, 0.0)


def elect_and_merge(pruned: Sequence[torch.Tensor], weights: Sequence[float], sign: str) -> torch.Tensor:
    """TIES' sign election and disjoint mean (PEFT's ``calculate_majority_sign_mask`` and ``disjoint_merge``),
    one input at a time so that no stack of n dense deltas is formed."""
    import torch

    total = torch.zeros_like(pruned[0])
    for p in pruned:
        total += p if sign == "total" else p.sign()
    elected = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)  # +1 on a tie
    merged = torch.zeros_like(total)
    count = torch.zeros_like(total)
    for p, w in zip(pruned, weights, strict=True):
        agree = (p * elected > 0).to(total.dtype)  # a pruned (zero) entry agrees with no sign
        merged.addcmul_(p, agree, value=w)
        count += agree
    return merged.div_(count.clamp_min_(1.0))


def dense_mix(
    parts: Sequence[tuple[int, float, Module]],
    method: DenseMethod,
    density: float,
    sign: str,
    seed: int,
    dev: str,
    work: torch.dtype,
) -> tuple[torch.Tensor, int]:
    """The merged dense delta matrix (out x in, conv kernels flattened) of one module and the summed rank of its
    inputs; ``parts`` holds (input position, weight, module) for each input that has it. The factors are taken in ``work`` (float64 on a CPU);
    the dense deltas are float32, as PEFT's are: they are out x in, and the pruning is elementwise."""
    import torch

    pruned, weights, ranks = [], [], 0
    for index, w, m in parts:
        up, down = factors(m, dev, work)
        ranks += up.shape[1]
        t = up.to(torch.float32) @ down.to(torch.float32)
        if method in ("ties", "magnitude_prune"):
            t = keep_largest(t, density)
        else:
            t = drop_random(t, density, module_seed(seed, index, m.name))
        pruned.append(t)
        weights.append(w)
    if method in ("ties", "dare_ties"):
        out = elect_and_merge(pruned, weights, sign)
    else:
        out = pruned[0] * weights[0]
        for p, w in zip(pruned[1:], weights[1:], strict=True):
            out.add_(p, alpha=w)
    norm = float(torch.linalg.vector_norm(out))  # one pass: inf when an entry is, or when only the norm overflows
    if not math.isfinite(norm) and not bool(torch.isfinite(out).all()):  # the float32 product overflowed
        refuse_nonfinite(parts[0][2], out, what=f"the {method} merge")
    return out, ranks


def compress(
    delta: torch.Tensor, rank: int | None, seed: int, ranks: int = 0
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """``(up, down, energy kept)`` for a merged dense delta whose inputs' ranks sum to ``ranks``: its rank-K
    randomized SVD, or without a rank the exact factored form ``delta @ I`` (or ``I @ delta``), rank
    min(out, in): no SVD, nothing lost."""
    import torch

    out_f, in_f = delta.shape
    if rank is None:
        if in_f <= out_f:
            return delta, torch.eye(in_f, dtype=delta.dtype, device=delta.device), None
        return torch.eye(out_f, dtype=delta.dtype, device=delta.device), delta, None
    gen = torch.Generator(device=delta.device).manual_seed(seed)
    oversample = max(OVERSAMPLE, ranks + COVER - rank)
    svd = randomized_svd(delta, rank, oversample=oversample, power_iters=POWER_ITERS, generator=gen)
    k = min(rank, svd.s.shape[0])
    whole = float(torch.linalg.vector_norm(delta)) ** 2
    if not math.isfinite(whole):  # float32's sum of squares overflowed: the entries are finite
        whole = float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
    kept = float(svd.s[:k].double().square().sum())
    energy = 1.0 if whole == 0 else min(1.0, kept / whole)
    if k == 0:  # the merge is zero: one zero component keeps the module
        return delta.new_zeros(out_f, 1), delta.new_zeros(1, in_f), energy
    up, down = svd.truncate(k)
    return up, down, energy
