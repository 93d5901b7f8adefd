"""Fused modules: split one LoRA over the rows of several modules (Flux's ``img_attn.qkv`` -> q, k, v), fuse several
into one (q, k, v -> one kohya module), and swap the two halves of a module's output rows.

All exact. Splitting: the up factor splits by rows, the down factor is shared (rank kept); when the up factor is
block-diagonal (kohya's split-qkv training, or a file this module fused), each part takes its own block and its own
rows of the down factor (rank / parts), as diffusers' ``_convert_kohya_flux_lora_to_diffusers`` does. A part whose
rows are all zero adds nothing and is left out. Fusing: parts sharing one down factor and one scale fuse at that
rank (what a split gave back); otherwise at rank r_q + r_k + r_v, the downs stacked and the ups block-diagonal, a
missing part's rows zero. ``rank`` / ``energy`` then re-compress the fused module (optimal SVD), and the energy kept
is reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import IncompatibleAdaptersError, ShapeError
from ..formats.families import Split
from ..model import Module, TensorRef, torch_dtype
from .linalg import lowrank_svd, rank_for_energy

if TYPE_CHECKING:
    import torch


def _check(m: Module, what: str) -> None:
    if m.kind != "lora" or "mid" in m.factors or m.layer != "linear" or m.fan_in_fan_out:
        raise IncompatibleAdaptersError(f"{m.name}: only a plain linear LoRA module can be {what} (this is {m.type})")
    if m.magnitude is not None and m.dora_axis != "out":
        raise IncompatibleAdaptersError(
            f"{m.name}: its DoRA magnitude is per input column; {what} needs it per output row"
        )


def _alpha(scale: float, rank: int, rslora: bool) -> float:
    """The alpha that gives ``scale`` at ``rank``."""
    return scale * (math.sqrt(rank) if rslora else rank)


def _module(template: Module, name: str, up: torch.Tensor, down: torch.Tensor, alpha: float | None,
            magnitude: torch.Tensor | None, bias: torch.Tensor | None, rslora: bool | None = None) -> Module:  # fmt: skip
    return Module(
        name, "lora", {"down": TensorRef.of(down.contiguous()), "up": TensorRef.of(up.contiguous())}, alpha=alpha,
        rslora=template.rslora if rslora is None else rslora, layer="linear",
        magnitude=None if magnitude is None else TensorRef.of(magnitude.contiguous()), dora_axis="out",
        bias=None if bias is None else TensorRef.of(bias.contiguous()),
    )  # fmt: skip


def swap_halves(m: Module) -> Module:
    """``m`` with the two halves of its output rows exchanged (diffusers' ``swap_scale_shift``)."""
    _check(m, "reordered")
    up = m.factors["up"].load()
    if up.shape[0] % 2:
        raise ShapeError(f"{m.name}: {up.shape[0]} output rows do not halve into shift and scale")

    def swap(t: torch.Tensor | None) -> torch.Tensor | None:
        import torch

        if t is None:
            return None
        a, b = t.chunk(2, dim=0)
        return torch.cat([b, a])

    mag = m.magnitude.load() if m.magnitude is not None else None
    bias = m.bias.load() if m.bias is not None else None
    return _module(m, m.name, swap(up), m.factors["down"].load(), m.alpha, swap(mag), swap(bias))  # type: ignore[arg-type]


def split_module(m: Module, targets: Sequence[str], split: Split) -> list[Module]:
    """``m`` as one module per target, each with its rows of the output (zero parts left out)."""
    _check(m, "split")
    up, down = m.factors["up"].load(), m.factors["down"].load()
    out, r = up.shape[0], up.shape[1]
    sizes = split.sizes(len(targets), out)
    if sizes is None:
        raise ShapeError(
            f"{m.name}: its {out} output rows do not split into {', '.join(t.rsplit('.', 1)[-1] for t in targets)}"
        )
    k = len(targets)
    starts = [sum(sizes[:i]) for i in range(k)]
    block = r // k if r % k == 0 else 0
    diagonal = bool(block) and all(
        not up[starts[i] : starts[i] + sizes[i], j * block : (j + 1) * block].any()
        for i in range(k) for j in range(k) if i != j
    )  # fmt: skip
    mag = m.magnitude.load().reshape(-1) if m.magnitude is not None else None
    bias = m.bias.load().reshape(-1) if m.bias is not None else None
    parts = []
    for i, name in enumerate(targets):
        rows = slice(starts[i], starts[i] + sizes[i])
        if diagonal:
            cols = slice(i * block, (i + 1) * block)
            u, d = up[rows, cols], down[cols]
            alpha = None if m.alpha is None else _alpha(m.scale, block, m.rslora)
        else:
            u, d, alpha = up[rows], down, m.alpha
        if not u.any() and (bias is None or not bias[rows].any()):
            continue
        parts.append(_module(m, name, u, d, alpha, None if mag is None else mag[rows],
                             None if bias is None else bias[rows]))  # fmt: skip
    return parts


def fuse_modules(
    parts: Sequence[Module | None], name: str, split: Split, rank: int | None = None, energy: float | None = None
) -> tuple[Module, float]:
    """The parts (None: absent, its rows zero) as one module over all their rows, and the energy kept."""
    import torch

    present = [(i, m) for i, m in enumerate(parts) if m is not None]
    for _, m in present:
        _check(m, "fused")
    inp = present[0][1].factors["down"].shape[1]
    found = split.full_sizes(len(parts), {i: m.factors["up"].shape[0] for i, m in present})
    sizes = found or [0] * len(parts)
    for i, m in present:
        if found is None or m.factors["down"].shape[1] != inp or m.factors["up"].shape[0] != sizes[i]:
            raise ShapeError(
                f"{m.name}: {list(m.weight_shape())} does not fit beside the other parts of {name} ({sizes[i]} x {inp})"
            )
    if any(m.magnitude is not None for _, m in present) and (
        len(present) < len(parts) or any(m.magnitude is None for _, m in present)
    ):
        raise IncompatibleAdaptersError(
            f"{name}: DoRA magnitudes of only some of its parts: the others' would need the base weight's norms"
        )
    dtype = present[0][1].factors["up"].dtype
    work = torch.float32
    ups = {i: m.factors["up"].load().to(work) for i, m in present}
    downs = {i: m.factors["down"].load().to(work) for i, m in present}
    scales = {i: m.scale for i, m in present}
    first = present[0][0]
    shared = all(torch.equal(downs[i], downs[first]) and scales[i] == scales[first] for i, _ in present)
    if shared:
        r = downs[first].shape[0]
        down = downs[first]
        up = torch.cat([ups[i] if i in ups else ups[first].new_zeros((sizes[i], r)) for i in range(len(parts))])
        template = present[0][1]
        alpha, rslora = template.alpha, template.rslora
    else:
        ranks = [downs[i].shape[0] if i in downs else 0 for i in range(len(parts))]
        total = sum(ranks)
        down = torch.cat([downs[i] for i, _ in present])
        up = torch.zeros((sum(sizes), total), dtype=work)
        row = col = 0
        for i in range(len(parts)):
            if i in ups:
                up[row : row + sizes[i], col : col + ranks[i]] = ups[i] * (scales[i] / scales[first])
            row, col = row + sizes[i], col + ranks[i]
        alpha, rslora = _alpha(scales[first], total, False), False
    mags = [m.magnitude.load().reshape(-1) for _, m in present if m.magnitude is not None]
    biases = [
        parts[i].bias.load().reshape(-1).to(work) if parts[i] is not None and parts[i].bias is not None  # type: ignore[union-attr]
        else torch.zeros(sizes[i], dtype=work) for i in range(len(parts))
    ] if any(m.bias is not None for _, m in present) else None  # fmt: skip
    kept = 1.0
    if (rank is not None and rank < down.shape[0]) or energy is not None:
        scale = alpha / (math.sqrt(down.shape[0]) if rslora else down.shape[0]) if alpha is not None else 1.0
        svd = lowrank_svd(up.double() * scale, down.double())
        k = min(rank, svd.s.shape[0]) if rank is not None else rank_for_energy(svd.s, energy or 1.0)
        kept = float(svd.energy()[k - 1])
        up, down = (t.to(work) for t in svd.truncate(k))
        alpha, rslora = float(k), False
    target = torch_dtype(dtype)
    return _module(
        present[0][1], name, up.to(target), down.to(target), alpha, torch.cat(mags) if mags else None,
        torch.cat(biases).to(target) if biases is not None else None, rslora,
    ), kept  # fmt: skip
