"""kohya / sd-scripts / LyCORIS single files.

Keys: ``lora_unet_<path with underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (0-d; absent
means alpha = rank), text encoders ``lora_te_``, ``lora_te1_``, ``lora_te2_``, ``lora_te3_``; LyCORIS factor
suffixes ``hada_*`` (LoHa), ``lokr_*`` (LoKr), ``lora_mid`` (Tucker LoCon), ``diff`` (full), ``dora_scale``.
Generic LyCORIS networks use the ``lycoris_`` prefix. The flattened names are kept as they are: the family's
name tables (:mod:`.families`) or the base model's module list put the dots back.

XLabs' Flux LoRAs (``double_blocks.0.processor.qkv_lora1.down.weight``) are read as the kohya modules they add to
(``lora_unet_double_blocks_0_img_attn_qkv``); a single block's ``qkv_lora`` covers only linear1's q, k, v rows,
so its up factor gets zero rows for the MLP's (an exact, larger spelling of the same delta).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..errors import IncompatibleAdaptersError
from ..io.safetensors import shown
from ..model import Adapter, TensorRef
from . import kohya_meta
from .common import (
    LYCORIS_RULES,
    KeyTable,
    Rule,
    build_module,
    carried_metadata,
    check_leftovers,
    group_keys,
    open_raw,
    scalar,
)
from .families import MLP_RATIO, xlabs_name
from .names import to_kohya

NAME = "kohya"
PREFIX_RE = re.compile(r"^(lora_(unet|te\d?|transformer|prior|text_encoder\w*)|lycoris)_")

TABLE = KeyTable(
    [
        Rule(".lora_down.weight", "down"),
        Rule(".lora_up.weight", "up"),
        Rule(".lora_mid.weight", "mid"),
        Rule(".alpha", "alpha"),
        Rule(".dora_scale", "magnitude"),
        Rule(".bias", "bias"),
        *LYCORIS_RULES,
        Rule(".diff", "diff", "full"),
        Rule(".diff_b", "bias", "full"),
    ]
)


#: an XLabs Flux LoRA key
XLABS_KEY = re.compile(r"^(?P<module>.+\.processor\.(qkv|proj)_lora[12]?)\.(?P<role>down|up)\.weight$")


def looks_like(keys: list[str]) -> bool:
    if keys and all(XLABS_KEY.match(k) for k in keys):
        return True
    return any(PREFIX_RE.match(k) for k in keys) and any(TABLE.split(k) for k in keys)


def _padded(ref: TensorRef, rows: int) -> TensorRef:
    """``ref`` (out x r) with ``rows`` zero rows below it."""

    def load() -> Any:
        import torch

        t = ref.load()
        return torch.cat([t, t.new_zeros((rows, *t.shape[1:]))])

    return TensorRef((ref.shape[0] + rows, *ref.shape[1:]), ref.dtype, load)


def from_xlabs(tensors: dict[str, TensorRef]) -> dict[str, TensorRef] | None:
    """An XLabs Flux LoRA's tensors under kohya keys; None unless every key is XLabs'."""
    if not tensors or not all(XLABS_KEY.match(k) for k in tensors):
        return None
    out: dict[str, TensorRef] = {}
    for key, ref in tensors.items():
        m = XLABS_KEY.match(key)
        assert m is not None
        hit = xlabs_name(m["module"])
        if hit is None:
            return None
        name, qkv_only = hit
        if qkv_only and m["role"] == "up" and len(ref.shape) == 2 and ref.shape[0] % 3 == 0:
            ref = _padded(ref, MLP_RATIO * ref.shape[0] // 3)  # linear1 = q, k, v (hidden each) + 4 x hidden
        out[f"{name}.lora_{m['role']}.weight"] = ref
    return out


def dora_axis(shape: tuple[int, ...]) -> str:
    """kohya/LyCORIS ``dora_scale`` is (out, 1, ...) for a norm per output row, (1, in, ...) per input column."""
    return "in" if len(shape) >= 2 and shape[0] == 1 and shape[1] != 1 else "out"


def read(path: str | os.PathLike[str], *, problems: list[str] | None = None) -> Adapter:
    raw = open_raw(path, lenient=problems is not None)
    if problems is not None:
        problems.extend(raw.problems)
    groups, leftovers, conflicts = group_keys(from_xlabs(raw.tensors) or raw.tensors, TABLE)
    check_leftovers(leftovers, conflicts, NAME, problems)
    meta = dict(raw.metadata)
    adapter = Adapter(format=NAME, metadata=meta, base_model=base_model_of(meta), source=str(path))
    for name, g in sorted(groups.items()):
        if g.kind is None:  # only alpha / dora_scale / bias: nothing to add it to
            check_leftovers([], [f"{shown(name)}: has {', '.join(sorted(g.parts))} but no factors"], NAME, problems)
            continue
        alpha = scalar(g.parts["alpha"]) if "alpha" in g.parts else None
        axis = dora_axis(g.parts["magnitude"].shape) if "magnitude" in g.parts else "out"
        m = build_module(name, g, alpha=alpha, dora_axis=axis)
        adapter.modules[name] = m
    return adapter


def base_model_of(meta: dict[str, str]) -> str | None:
    for key in ("ss_sd_model_name", "modelspec.architecture", "ss_base_model_version"):
        if meta.get(key):
            return meta[key]
    return None


def kohya_name(name: str) -> str:
    """A dotted name in kohya form (``unet.x.y`` -> ``lora_unet_x_y``; a whole model's ``model.x`` ->
    ``lycoris_model_x``, LyCORIS' prefix for networks on any model); kohya names pass through."""
    if "." not in name:
        return name
    return to_kohya(name)


def tensors_for(adapter: Adapter) -> dict[str, TensorRef]:
    out: dict[str, TensorRef] = {}
    for name, m in adapter.modules.items():
        if m.layer == "embedding" or m.fan_in_fan_out:
            raise IncompatibleAdaptersError(f"{name}: kohya files hold no embedding or fan_in_fan_out modules")
        k = kohya_name(name)
        for role, ref in m.tensors().items():
            if role == "magnitude" and len(ref.shape) == 1:  # PEFT's (out,): kohya/LyCORIS store (out, 1, ...)
                shape = m.weight_shape()
                ref = _reshaped(ref, (shape[0], *([1] * (len(shape) - 1))))
            out[k + TABLE.suffix_for(m.kind, role)] = ref
        alpha = kohya_meta.stored_alpha(m)
        if alpha is not None:
            out[k + ".alpha"] = alpha
    if adapter.extras:
        raise IncompatibleAdaptersError(
            f"kohya files cannot hold full tensors ({', '.join(sorted(adapter.extras)[:3])}): "
            "modules_to_save and saved embeddings would be lost",
            "convert to peft, which keeps them",
        )
    return out


def _reshaped(ref: TensorRef, shape: tuple[int, ...]) -> TensorRef:
    return TensorRef(shape, ref.dtype, lambda: ref.load().reshape(shape))


def write(adapter: Adapter, out: str | os.PathLike[str], *, force: bool = False) -> Path:
    """The file, with its header metadata made true of what is written (:mod:`.kohya_meta`): the network keys
    derived from the modules, the data hashes computed from the bytes."""
    tensors = tensors_for(adapter)
    metadata = kohya_meta.network_metadata(adapter.modules.values(), carried_metadata(adapter, NAME))
    spec_hash = adapter.format == NAME and "modelspec.hash_sha256" in adapter.metadata
    kohya_meta.write(out, tensors, metadata, spec_hash=spec_hash, force=force)
    return Path(out)
