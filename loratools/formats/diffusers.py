"""diffusers LoRA files (``pytorch_lora_weights.safetensors``).

Current form: PEFT keys under a component prefix, ``unet.<module>.lora_A.weight``, ``text_encoder.``,
``text_encoder_2.``, ``transformer.``; the LoRA config of each component is JSON in the header under
``lora_adapter_metadata`` (keys prefixed by component: ``unet.lora_alpha``). Without it, alpha = rank.
Older form: ``unet.<module>.lora.down.weight`` / ``.lora.up.weight``, text encoders
``...lora_linear_layer.down.weight``, and attention processors ``...processor.to_q_lora.down.weight`` (UNet) and
``...self_attn.to_q_lora.down.weight`` (text encoders: ``q_proj``; diffusers' ``DIFFUSERS_OLD_TO_PEFT``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..errors import FileFormatError, IncompatibleAdaptersError
from ..io import jsonfile
from ..io.safetensors import write_safetensors
from ..model import Adapter, TensorRef
from ..model.components import COMPONENT_RE
from . import peft
from .common import KeyTable, Rule, build_module, carried_metadata, check_leftovers, group_keys, open_raw, scalar

NAME = "diffusers"
FILENAME = "pytorch_lora_weights.safetensors"
META_KEY = "lora_adapter_metadata"

TABLE = KeyTable(
    [
        Rule(".lora_A.weight", "down"),
        Rule(".lora_B.weight", "up"),
        Rule(".lora_B.bias", "bias"),
        Rule(".lora_magnitude_vector", "magnitude"),
        Rule(".lora_embedding_A", "down", layer="embedding"),
        Rule(".lora_embedding_B", "up", layer="embedding"),
        # the older layouts
        Rule(".lora.down.weight", "down"),
        Rule(".lora.up.weight", "up"),
        Rule(".lora_linear_layer.down.weight", "down"),
        Rule(".lora_linear_layer.up.weight", "up"),
        Rule(".alpha", "alpha"),
    ]
)

#: attention-processor names of the oldest layout -> module path
PROCESSOR_RE = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")
#: the same layout in a text encoder's attention (``self_attn.to_q_lora``): transformers' CLIP names
TEXT_PROCESSOR_RE = re.compile(r"\.self_attn\.(to_q|to_k|to_v|to_out)_lora$")
TEXT_PROCESSOR = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def looks_like(keys: list[str]) -> bool:
    return any(COMPONENT_RE.match(k) for k in keys) and any(TABLE.split(k) for k in keys)


def component_configs(meta: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``{"unet.r": 4, "unet.lora_alpha": 2}`` in the header -> ``{"unet": {"r": 4, "lora_alpha": 2}}``."""
    raw = meta.get(META_KEY)
    if not raw:
        return {}
    flat = jsonfile.loads(raw, where=f"header {META_KEY}")
    if not isinstance(flat, dict):
        raise FileFormatError(f"header {META_KEY} must be a JSON object, this is {jsonfile.kind(flat)}")
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        comp, _, field = key.partition(".")
        out.setdefault(comp, {})[field] = value
    for comp, cfg in out.items():
        peft.check_config(cfg, f"header {META_KEY} ({comp})")
    return out


def _module_name(name: str) -> str:
    m = PROCESSOR_RE.search(name)
    if m:
        target = m.group(1)
        return name[: m.start()] + "." + ("to_out.0" if target == "to_out" else target)
    m = TEXT_PROCESSOR_RE.search(name)
    if m:
        return name[: m.start()] + ".self_attn." + TEXT_PROCESSOR[m.group(1)]
    return name


def read(path: str | os.PathLike[str], *, problems: list[str] | None = None) -> Adapter:
    p = Path(path)
    if p.is_dir():
        p = p / FILENAME
    raw = open_raw(p, lenient=problems is not None)
    if problems is not None:
        problems.extend(raw.problems)
    ours = {k: v for k, v in raw.tensors.items() if COMPONENT_RE.match(k)}
    groups, leftovers, conflicts = group_keys(ours, TABLE)
    leftovers += [k for k in raw.tensors if k not in ours]
    check_leftovers(leftovers, conflicts, NAME, problems)
    meta = dict(raw.metadata)
    configs = component_configs(meta)
    adapter = Adapter(format=NAME, metadata=meta, config=configs, source=str(p))
    for key, g in sorted(groups.items()):
        name = _module_name(key)
        comp, _, rel = name.partition(".")
        cfg = configs.get(comp, {})
        if "alpha" in g.parts:
            alpha: float | None = scalar(g.parts["alpha"])
        else:
            alpha = peft.rank_alpha_for(cfg, rel, f"header {META_KEY} ({comp})")[1] if cfg else None
        adapter.modules[name] = build_module(
            name, g, alpha=alpha, rslora=bool(cfg.get("use_rslora", False)),
            fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
        )  # fmt: skip
    return adapter


def tensors_for(adapter: Adapter) -> tuple[dict[str, TensorRef], dict[str, str]]:
    comps: dict[str, Adapter] = {}
    for name, m in adapter.modules.items():
        comp, dot, rel = name.partition(".")
        if not dot or not COMPONENT_RE.match(name):
            raise IncompatibleAdaptersError(
                f"{name}: diffusers names start with a component (unet., text_encoder., transformer.)",
                "kohya names must be resolved against the base model first",
            )
        sub = comps.setdefault(comp, Adapter(format=peft.NAME if adapter.format == NAME else adapter.format))
        sub.modules[rel] = m
    tensors: dict[str, TensorRef] = {}
    flat: dict[str, Any] = {}
    for comp, sub in sorted(comps.items()):
        if adapter.format == NAME:
            sub.config = dict(adapter.config.get(comp, {}))
        cfg = peft.make_config(sub)
        if not sub.config:
            # no config of its own (converted from kohya, XLabs, ...): name each module, as diffusers' get_peft_kwargs
            # does for the files it converts; a list of kinds would target the blocks the file leaves out too. PEFT
            # matches an entry against the end of a path: without transformers 4's `text_model.`, a text encoder's
            # entry matches under transformers 4 and 5 alike
            cfg["target_modules"] = sorted({n.removeprefix("text_model.") for n in sub.modules})
        for key, value in cfg.items():
            flat[f"{comp}.{key}"] = value
        for key, ref in peft.tensors_for(sub).items():
            tensors[f"{comp}.{key[len(peft.PREFIX) :]}"] = ref
    for key, extra in adapter.extras.items():
        tensors[key] = extra.ref
    meta = carried_metadata(adapter, NAME)
    if component_configs(meta) != {c: {k[len(c) + 1 :]: v for k, v in flat.items() if k.startswith(c + ".")}
                                   for c in comps}:  # fmt: skip
        # the top level sorted; a pattern's own order is PEFT's precedence (first key that matches wins): kept
        meta[META_KEY] = json.dumps(dict(sorted(flat.items())))
    meta.setdefault("format", "pt")
    return tensors, meta


def write(adapter: Adapter, out: str | os.PathLike[str], *, force: bool = False) -> Path:
    target = Path(out)
    if target.is_dir():
        target = target / FILENAME
    tensors, meta = tensors_for(adapter)
    write_safetensors(target, tensors, meta, force=force)
    return target
