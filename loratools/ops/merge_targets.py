"""Which base tensor each adapter module changes: the targets of a merge, and what is refused before any output
exists (a module that matches no base tensor or several, or that an image model's name tables cannot place
(:mod:`.merge_places`), a shape that does not fit, a weight, alpha or tensor
that is not finite, a DoRA module sharing its weight with another module)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import IncompatibleAdaptersError, LoratoolsError, ShapeError
from ..formats.names import kohya_index
from ..io.checkpoint import BaseTensor, Checkpoint
from ..model import Adapter, Module, TensorRef
from ..model.components import COMPONENTS
from .merge_places import Placer


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
    refuse_quantized_base(base)
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
    missing: list[str] = []  # what the image tables say is missing, module by module
    placer: Placer | None = None

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
            if not found:  # not under its own name: an image model's tables may place it (single files, SGM, BFL)
                placer = placer or Placer(base)
                placed = placer.place(a, name, m)
                if placed is None:
                    unresolved.append(name)
                    continue
                if isinstance(placed, str):
                    missing.append(placed)
                    continue
                for p in placed:
                    _add(targets, names, p.key, w, p.module, i)
                continue
            t = place(found, name)
            if t is not None:
                _add(targets, names, found[0], w, m, i)
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
    if unresolved or ambiguous or missing:
        parts = []
        if unresolved:
            parts.append(f"{len(unresolved)} module(s) match no base tensor: {', '.join(unresolved[:6])}")
        if missing:
            parts.append(f"{len(missing)} module(s) have no place in the base: {'; '.join(missing[:4])}"
                         + (" ..." if len(missing) > 4 else ""))  # fmt: skip
        if ambiguous:
            parts.append(f"{len(ambiguous)} match several: {'; '.join(ambiguous[:4])}")
        seen = placer.describe() if placer is not None else ""
        raise ShapeError("; ".join(parts), (f"{seen}. " if seen else "") + "is the adapter made for this base model?")
    for name, t in targets.items():
        info = names[name].info
        if t.replacement is not None and tuple(t.replacement.shape) != info.shape:
            raise ShapeError(
                f"{name}: the adapter's saved tensor is {list(t.replacement.shape)}, the base's {list(info.shape)}",
                "a resized vocabulary cannot be merged into this base",
            )
        for _, m in t.contributions:
            ws = m.weight_shape()
            if tuple(ws) != info.shape and not (
                info.shape[:1] == tuple(ws[:1]) and math.prod(ws) == math.prod(info.shape)
            ):
                raise ShapeError(f"{m.name}: delta is {list(ws)}, base tensor {name} is {list(info.shape)}")
        if not info.dtype.startswith(("F", "BF")):
            raise ShapeError(f"{name}: stored as {info.dtype}; only float weights can take a delta")
        _refuse_shared_dora(name, t)
    return targets


#: tensor name endings that only a quantized checkpoint holds, and the method they tell
QUANT_TENSORS = (
    ((".absmax", ".quant_map", ".nested_absmax", ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4",
      ".SCB"), "bitsandbytes"),
    ((".g_idx",), "GPTQ"),
    ((".qweight", ".qzeros"), "AWQ or GPTQ"),
    ((".weight_scale_inv", ".weight_scale"), "FP8"),
    ((".weight_packed",), "compressed-tensors"),
)  # fmt: skip
MAX_CARD_BYTES = 1 << 20


def refuse_quantized_base(base: Checkpoint) -> None:
    """A quantized base (a bitsandbytes 4-bit folder, which is what QLoRA and unsloth adapters name as their base;
    GPTQ, AWQ, FP8, ...) stores its weights packed: a delta cannot be added to them. Refused before anything else,
    with the method (``quantization_config`` in config.json, or the tensors' telltale names and dtypes) and the
    unquantized base when the model card (``base_model``) or the config (``_name_or_path``) names one."""
    from ..io.checkpoint import read_config

    try:
        config = read_config(base.root) or {}
    except LoratoolsError:
        config = {}  # a config that is not one says nothing: the tensors still do
    method = _quant_config(config.get("quantization_config")) or _quant_tensors(base)
    if method is None:
        return
    origin = _card_base(base) or config.get("_name_or_path")
    named = f" ({origin})" if isinstance(origin, str) and origin else ""
    raise IncompatibleAdaptersError(
        f"{base.root.name}: the base is quantized ({method}): its weights are stored packed and a LoRA delta cannot "
        "be added to them",
        f"merge into the unquantized base{named}, then quantize the merged model if you need to",
    )


def _quant_config(qc: object) -> str | None:
    if not isinstance(qc, dict):
        return None
    method = qc.get("quant_method")
    if not isinstance(method, str):
        return "quantization_config" if qc else None
    if method == "bitsandbytes":
        if qc.get("load_in_4bit"):
            return f"bitsandbytes 4-bit {qc.get('bnb_4bit_quant_type') or ''}".strip()
        return "bitsandbytes 8-bit" if qc.get("load_in_8bit") else "bitsandbytes"
    bits = qc.get("bits") or qc.get("w_bit")
    name = {"gptq": "GPTQ", "awq": "AWQ", "fp8": "FP8"}.get(method, method)
    return f"{name} {bits}-bit" if isinstance(bits, int) and not isinstance(bits, bool) else name[:40]


def _quant_tensors(base: Checkpoint) -> str | None:
    for name, t in base.tensors.items():
        for ends, method in QUANT_TENSORS:
            if name.endswith(ends):
                return method
        if t.info.dtype.startswith("F8"):
            return "FP8"
    return None


def _card_base(base: Checkpoint) -> str | None:
    """``base_model`` from the model card's front matter (README.md beside the weights), when it names one."""
    import yaml

    from ..io.jsonfile import read_bytes

    card = (base.root if base.root.is_dir() else base.root.parent) / "README.md"
    if not card.is_file():
        return None
    try:
        text = read_bytes(card, limit=MAX_CARD_BYTES, what="model card").decode("utf-8", errors="replace")
        if not text.startswith("---"):
            return None
        front = yaml.safe_load(text[3:].split("\n---", 1)[0])
    except (LoratoolsError, yaml.YAMLError, RecursionError):
        return None
    value = front.get("base_model") if isinstance(front, dict) else None
    if isinstance(value, list) and value:
        value = value[0]
    return value[:200] if isinstance(value, str) else None


def _add(targets: dict[str, Target], names: Mapping[str, BaseTensor], key: str, w: float, m: Module, i: int) -> None:
    """Module ``m`` of adapter ``i`` (weight ``w``) changes base tensor ``key`` (and its bias, for a LoRA bias)."""
    t = targets.setdefault(key, Target())
    t.contributions.append((w, m))
    t.adapters.append(i)
    if m.bias is not None:  # PEFT merges lora_B.bias * scaling into the base layer's bias
        bias = key.removesuffix(".weight") + ".bias"
        if bias not in names:
            raise ShapeError(f"{m.name}: has a LoRA bias but the base layer {bias} has none")
        targets.setdefault(bias, Target()).biases.append((w, m))


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


def contribution_norms(targets: Mapping[str, Target], count: int) -> dict[str, list[float]]:
    """Per targeted base tensor, each of the ``count`` adapters' share: ``||weight * delta||`` of its module there
    (0 where it has none), for the report's per-adapter view. From the factors, without the dense delta."""
    out: dict[str, list[float]] = {}
    for name, t in targets.items():
        norms = [0.0] * count
        for (w, m), i in zip(t.contributions, t.adapters, strict=True):
            norms[i] = math.hypot(norms[i], abs(w) * m.delta_norm())
        out[name] = norms
    return out
