"""Which base tensor each adapter module changes: the targets of a merge, and what is refused before any output
exists (a module that matches no base tensor or several, a shape that does not fit, a weight, alpha or tensor
that is not finite, a DoRA module sharing its weight with another module)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import IncompatibleAdaptersError, LoratoolsError, ShapeError
from ..formats.names import kohya_index
from ..io.checkpoint import Checkpoint
from ..model import Adapter, Module, TensorRef
from ..model.components import COMPONENTS


@dataclass
class Target:
    contributions: list[tuple[float, Module]] = field(default_factory=list)
    replacement: TensorRef | None = None  # modules_to_save / saved base layer
    adapters: list[int] = field(default_factory=list)
    biases: list[tuple[float, Module]] = field(default_factory=list)  # LoRA biases (PEFT lora_bias) for a .bias


def _candidates(full: str, names: Mapping[str, object]) -> list[str]:
    """Base tensor names that an adapter's tensor name can mean: itself; without a diffusers component prefix
    (adapter ``unet.x``, base a UNet folder); or the one base name it ends (adapter trained on a sub-model)."""
    if full in names:
        return [full]
    comp, dot, rel = full.partition(".")
    if dot and comp in COMPONENTS and rel in names:
        return [rel]
    return [n for n in names if n.endswith("." + full)]


def resolve_targets(adapters: list[Adapter], weights: list[float], base: Checkpoint) -> dict[str, Target]:
    """Base tensor name -> what to do to it. Every module must map to exactly one base tensor.

    Refused here, before any output exists: weights, alphas or adapter tensors that are not finite (the merged
    weights would be NaN), and a DoRA module sharing its weight with another adapter's module (see
    :func:`_refuse_shared_dora`)."""
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise LoratoolsError(f"weight {bad[0]} is not a finite number", "give finite weights, e.g. --weights 1,0.5")
    for a in adapters:
        _refuse_nonfinite(a)
    names = base.tensors
    kohya = kohya_index(list(names))  # flattened kohya name -> dotted base module
    targets: dict[str, Target] = {}
    unresolved: list[str] = []
    ambiguous: list[str] = []

    def place(found: list[str], what: str) -> Target | None:
        if len(found) == 1:
            return targets.setdefault(found[0], Target())
        if found:
            ambiguous.append(f"{what} -> {', '.join(sorted(found)[:4])}")
        else:
            unresolved.append(what)
        return None

    for i, (a, w) in enumerate(zip(adapters, weights, strict=True)):
        for name, m in a.modules.items():
            if a.format == "kohya" and "." not in name:
                module = kohya.get(name)
                found = [module + ".weight"] if module and module + ".weight" in names else []
            else:
                found = _candidates(name + ".weight", names)
            t = place(found, name)
            if t is not None:
                t.contributions.append((w, m))
                t.adapters.append(i)
                if m.bias is not None:  # PEFT merges lora_B.bias * scaling into the base layer's bias
                    bias = found[0].removesuffix(".weight") + ".bias"
                    if bias not in names:
                        raise ShapeError(f"{name}: has a LoRA bias but the base layer {bias} has none")
                    targets.setdefault(bias, Target()).biases.append((w, m))
        for key, extra in a.extras.items():
            if extra.role == "trainable_tokens":
                raise IncompatibleAdaptersError(
                    f"{key}: trainable-token deltas cannot be merged yet", "merge the adapter with PEFT instead"
                )
            t = place(_candidates(key.replace(".base_layer.", "."), names), key)
            if t is not None:
                if t.replacement is not None:
                    raise IncompatibleAdaptersError(f"{key}: the same base tensor is replaced by two adapters")
                t.replacement = extra.ref
    if unresolved or ambiguous:
        parts = []
        if unresolved:
            parts.append(f"{len(unresolved)} module(s) match no base tensor: {', '.join(unresolved[:6])}")
        if ambiguous:
            parts.append(f"{len(ambiguous)} match several: {'; '.join(ambiguous[:4])}")
        raise ShapeError("; ".join(parts), "is the adapter made for this base model?")
    for name, t in targets.items():
        info = names[name].info
        if t.replacement is not None and tuple(t.replacement.shape) != info.shape:
            raise ShapeError(
                f"{name}: the adapter's saved tensor is {list(t.replacement.shape)}, the base's {list(info.shape)}",
                "a resized vocabulary cannot be merged into this base",
            )
        for i, (w, m) in enumerate(t.contributions):
            if not m.fits(info.shape):
                raise ShapeError(
                    f"{m.name}: delta is {list(m.weight_shape())}, base tensor {name} is {list(info.shape)}"
                )
            t.contributions[i] = (w, m.fitted(info.shape))  # a VeRA projection cut to the layer's input width
        if not info.dtype.startswith(("F", "BF")):
            raise ShapeError(f"{name}: stored as {info.dtype}; only float weights can take a delta")
        _refuse_shared_dora(name, t)
    return targets


def _refuse_shared_dora(name: str, t: Target) -> None:
    """A DoRA module on a weight that another module also changes has no order-free meaning: DoRA rescales the
    whole weight it is given, so ``W + w1 (DoRA(W) - W)`` then a LoRA on top differs from the other order, and
    PEFT's ``merge_and_unload``, ComfyUI and LyCORIS each apply them in their own order. Refused."""
    dora = [m for _, m in t.contributions if m.magnitude is not None]
    if dora and len(t.contributions) > 1:
        raise IncompatibleAdaptersError(
            f"{name}: {len(t.contributions)} adapter modules change this weight and {dora[0].name} is DoRA: "
            "the result would depend on the order they are applied in",
            "merge them one at a time (the output of one merge is the base of the next), "
            "or mix the non-DoRA adapters first (loratools mix) and merge that",
        )


def _refuse_nonfinite(a: Adapter) -> None:
    """NaN or Inf in an adapter's alphas or tensors would make the merged weights NaN: refused, naming them."""
    import torch

    where = a.source or a.format
    for m in a.modules.values():
        if m.alpha is not None and not math.isfinite(m.alpha):
            raise LoratoolsError(f"{m.name}: alpha is {m.alpha} in {where}: the merged weight would not be a number")
        for role, ref in m.tensors().items():
            t = ref.load()
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise LoratoolsError(
                    f"{m.name}: NaN or Inf in its {role} tensor ({where}): the merged weight would not be a number",
                    "`loratools validate` lists every such module",
                )
    for key, extra in a.extras.items():
        t = extra.ref.load()
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise LoratoolsError(f"{key}: NaN or Inf in this saved tensor ({where})")
