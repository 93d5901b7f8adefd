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
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Literal, TypeVar

from ..io import stream
from ..io.interrupts import critical
from ..model import Module
from .linalg import one_thread, randomized_svd
from .lowrank import factors, refuse_nonfinite

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

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


def side_by_side(calls: Sequence[Callable[[], T]], device: str) -> list[T]:
    """Run independent jobs on the work threads (:func:`loratools.io.stream.threads`: one core each, no OpenMP
    barriers between them) where there are several CPU cores, else one after the other; their results in order.
    A Ctrl-C waits for the jobs (a fraction of a second) inside :func:`~loratools.io.interrupts.critical`."""
    with critical(), stream.threads(device, "mix") as pool:
        if pool is None or len(calls) < 2:
            return [c() for c in calls]
        jobs = [(0, pool.submit(c)) for c in calls]
        try:
            return [job.result() for _, job in jobs]
        except BaseException:
            stream.settle(jobs)
            raise


def keep_largest(t: torch.Tensor, density: float, *, inplace: bool = False) -> torch.Tensor:
    """``t`` with all but its ``int(density * numel)`` entries of largest magnitude set to zero (PEFT's
    ``magnitude_based_pruning``; entries equal to the threshold are all kept); ``inplace``: in ``t`` itself."""
    import torch

    if density >= 1:
        return t
    k = int(density * t.numel())
    if k <= 0:
        return torch.zeros_like(t)
    flat = t.reshape(-1)
    threshold = kth_largest_magnitude(flat, k)
    out = flat if inplace and flat.data_ptr() == t.data_ptr() else flat.clone()
    with one_thread(out):
        for part in _chunks(out):
            part.masked_fill_(part.abs() < threshold, 0.0)
    return out.view(t.shape)


#: entries sampled to bracket the k-th largest magnitude
SAMPLE = 1 << 16
#: elements per slice of the elementwise passes: a slice and its temporaries stay in the CPU's cache, where a
#: pass over a whole 4096 x 4096 delta (64 MiB, and a fresh allocation for each temporary) is memory-bound.
#: The slices run on one OpenMP thread (:func:`.linalg.one_thread`): two are 1.3x faster on two idle cores, but
#: each of their barriers (hundreds per delta) can wait a scheduler slice when the cores are busy, which was
#: measured to turn 0.6 s into 21 s. Cores are used instead by running whole inputs (or parts of the election)
#: side by side on the work threads (:func:`side_by_side`), which share no barrier
CHUNK = 1 << 18


def _chunks(flat: torch.Tensor) -> Iterator[torch.Tensor]:
    """Consecutive views of a 1-D tensor, CHUNK elements each (the whole tensor on a GPU)."""
    step = flat.numel() if flat.device.type != "cpu" else CHUNK
    for i in range(0, flat.numel(), step):
        yield flat[i : i + step]


def kth_largest_magnitude(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest ``|x|`` of a 1-D tensor (1 <= k <= numel), exactly. A full selection over a 4096 x 4096
    delta takes about a second; here a sample brackets the value (six standard deviations of the sample's rank
    either side), one pass counts what lies above the bracket and gathers what lies inside (a few hundred thousand
    entries), and only those are selected from. When the bracket misses (a sample can), the full selection
    decides."""
    import torch

    n = flat.numel()
    if n <= 4 * SAMPLE:
        return torch.kthvalue(flat.abs(), n - k + 1).values
    gen = torch.Generator(device=flat.device).manual_seed(n * 31 + k)
    sample = flat[torch.randint(n, (SAMPLE,), generator=gen, device=flat.device)].abs().sort().values
    q = 1 - k / n  # the quantile of the k-th largest
    spread = 6 * (q * (1 - q) * SAMPLE) ** 0.5 + 2
    lo = sample[max(0, int(q * SAMPLE - spread))]
    hi = sample[min(SAMPLE - 1, int(q * SAMPLE + spread))]
    above, inside = 0, []
    with one_thread(flat):
        for part in _chunks(flat):
            mags = part.abs()
            above += int(torch.count_nonzero(mags > hi))
            inside.append(mags[(mags >= lo) & (mags <= hi)])  # exact compares: lo and hi are entries themselves
    between = torch.cat(inside)
    if above < k <= above + between.numel():
        return torch.kthvalue(between, between.numel() - (k - above) + 1).values
    return torch.kthvalue(flat.abs(), n - k + 1).values


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
    slice by slice (:data:`CHUNK`) so that the temporaries stay small; no stack of n dense deltas is formed.

    With ``e`` the elected sign (+1 on a tie), ``relu(p * e)`` is ``|p|`` where ``p`` agrees with it and 0
    elsewhere (a pruned entry, 0, agrees with no sign): the disjoint mean is
    ``e * sum_i w_i relu(p_i e) / max(1, sum_i sign(relu(p_i e)))``."""
    import torch

    flats = [p.reshape(-1) for p in pruned]
    out = torch.empty_like(flats[0])
    n = out.numel()
    span = max(CHUNK, -(-n // (PARTS * CHUNK)) * CHUNK)  # whole slices in each part
    calls = [partial(_elect_on_one_thread, [f[a : a + span] for f in flats], weights, sign, out[a : a + span])
             for a in range(0, n, span)]  # fmt: skip
    side_by_side(calls, out.device.type)
    return out.view(pruned[0].shape)


#: parts of a delta elected side by side (each a run of whole slices, on one work thread)
PARTS = 4


def _elect_on_one_thread(
    flats: Sequence[torch.Tensor], weights: Sequence[float], sign: str, out: torch.Tensor
) -> None:  # fmt: skip
    with one_thread(out):
        _elect_and_merge(flats, weights, sign, out)


def _elect_and_merge(flats: Sequence[torch.Tensor], weights: Sequence[float], sign: str, out: torch.Tensor) -> None:
    import torch

    for dst, *views in zip(_chunks(out), *map(_chunks, flats), strict=True):
        total = torch.zeros_like(dst)
        for v in views:
            total += v if sign == "total" else v.sign()
        elected = torch.where(total >= 0, 1.0, -1.0).to(dst.dtype)
        merged = torch.zeros_like(dst)
        count = torch.zeros_like(dst)
        for v, w in zip(views, weights, strict=True):
            agree = torch.mul(v, elected, out=total).relu_()  # total is no longer needed: its memory is reused
            merged.add_(agree, alpha=w)
            count.add_(agree.sign_())
        torch.mul(merged, elected, out=dst).div_(count.clamp_min_(1.0))


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

    deltas, weights, ranks = [], [], 0
    for _, w, m in parts:
        up, down = factors(m, dev, work)
        ranks += up.shape[1]
        deltas.append(up.to(torch.float32) @ down.to(torch.float32))
        weights.append(w)
    if method in ("ties", "magnitude_prune"):  # each input's threshold and pruning side by side, one core each
        pruned = side_by_side([partial(keep_largest, t, density, inplace=True) for t in deltas], dev)
    else:
        pruned = [
            drop_random(t, density, module_seed(seed, index, m.name))
            for (index, _, m), t in zip(parts, deltas, strict=True)
        ]
    if method in ("ties", "dare_ties"):
        out = elect_and_merge(pruned, weights, sign)
    else:
        out = pruned[0].mul_(weights[0])  # the pruned deltas are this function's own
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
