"""GGUF LoRA adapters for llama.cpp and Ollama: the writer, following llama.cpp's own ``convert_lora_to_gguf.py``.

* KV: ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha`` (one f32 for the file),
  ``general.architecture`` (the base's GGUF architecture), ``general.base_model.count = 1`` with
  ``general.base_model.0.*`` (the writer's base-model helpers, named as gguf's ``Metadata`` names a Hub id), and for
  architectures whose q/k rows are permuted, ``{arch}.attention.head_count(_kv)``: llama.cpp ignores them in an
  adapter, and they let the file be read back without the base's config.json.
* Tensors ``<gguf name>.lora_a`` (numpy r x in) and ``.lora_b`` (numpy out x r), named by gguf's tensor name map,
  with the architecture's surgery (:mod:`.surgery`) applied to the factors: q/k rows of B permuted, experts stacked
  (``n_expert x r x in`` / ``n_expert x out x r``), fused tensors kept.
* Token embeddings: ``token_embd.weight.lora_a`` is stored transposed (vocab x r; ``convert_lora_to_gguf.py``,
  ``llm_build_inp_embd``).
* The loader scales every module by ``alpha / rank`` with rank the r of that module's B (``llama-adapter.cpp``):
  per-module alphas and rsLoRA are baked into B so that this one rule gives each module its own scale.
* It cannot load DoRA magnitudes, LoRA biases or full tensors (``modules_to_save``): those are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import IncompatibleAdaptersError, LoratoolsError
from ...io.atomic import atomic_write
from ...model import Adapter, Module
from . import surgery as sg
from .pkg import require

PROVENANCE_KEY = "loratools.provenance"
#: a Hub model id, as gguf's Metadata turns one into base_model name / organization / repo_url
HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
HUB_URL = "https://huggingface.co/"


def permute(rows: Any, n_head: int, n_head_kv: int | None) -> Any:
    """llama.cpp's ``LlamaModel.permute``, on the rows (output dim) of a tensor (the caller checks that
    ``2 * heads`` divides the rows)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute(rows: Any, heads: int) -> Any:
    """The inverse of :func:`permute` with ``heads`` heads (q: n_head; k: n_kv_head)."""
    shape = rows.shape
    return rows.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


@dataclass
class Plan:
    arch: str  # the GGUF architecture name
    alpha: float  # the file's adapter.lora.alpha (a float32 value)
    tensors: list[tuple[str, Any, Any]] = field(default_factory=list)  # (gguf base name, lora_a, lora_b), numpy layout
    heads: tuple[int, int] | None = None  # (n_head, n_head_kv) the q/k permutation used


def plan(
    adapter: Adapter,
    hparams: dict[str, Any],
    *,
    base_blocks: int | None = None,
    base_names: Iterable[str] | None = None,
) -> tuple[str, float, list[tuple[str, Any, Any]]]:
    """(GGUF architecture, file alpha, [(gguf tensor base name, lora_a, lora_b)]) with every rule applied;
    a and b are float32 torch tensors in numpy layout. See :func:`make_plan`."""
    p = make_plan(adapter, hparams, base_blocks=base_blocks, base_names=base_names)
    return p.arch, p.alpha, p.tensors


def make_plan(
    adapter: Adapter,
    hparams: dict[str, Any],
    *,
    base_blocks: int | None = None,
    base_names: Iterable[str] | None = None,
) -> Plan:
    """Everything the file will hold. ``base_blocks``: the blocks the base's weights hold, which
    ``num_hidden_layers`` must then equal; ``base_names``: the base's tensor names (an lm_head LoRA needs the
    base's own lm_head).

    The work is bounded by the adapter: no count from the config is looped over (the name map is looked up per
    module, for block 0, whatever ``num_hidden_layers`` says); the counts are only checked against the modules.
    """
    require()
    hp = text_hparams(hparams)
    arch_name = architecture(hp)
    rules = sg.SURGERY.get(arch_name)
    if rules is None:
        raise IncompatibleAdaptersError(
            f"GGUF export knows no rules for architecture {json.dumps(arch_name)[:80]} (llama.cpp's converter rules "
            "loratools follows are kept per architecture)",
            "supported (docs/convert.md): " + sg.supported(),
        )
    arch = sg.gguf_arch(rules)
    n_blocks = count(hp, "num_hidden_layers")
    if base_blocks is not None and n_blocks != base_blocks:
        raise LoratoolsError(
            f"the base config says num_hidden_layers {n_blocks}, its weights hold {base_blocks} blocks",
            "is config.json the one of these weights?",
        )
    _refuse(adapter)
    mods = list(adapter.modules.values())
    heads = _heads(hp, mods) if rules.permute_qk else None
    alpha = _file_alpha(mods)
    out = Plan(arch, alpha, heads=heads)
    missing: list[str] = []
    beyond: list[str] = []
    stacks: dict[tuple[int, str], dict[int, Module]] = {}
    for m in mods:
        expert = sg.expert_of(rules, m.name)
        block = expert[0] if expert else _block(m.name)
        if block is not None and block >= n_blocks:
            beyond.append(m.name)
            continue
        if expert is not None:
            bid, xid, w = expert
            if sg.expert_stack_name(rules, bid, w) is None:
                missing.append(m.name)
                continue
            if (bid, w) not in stacks:
                stacks[(bid, w)] = {}
                out.tensors.append((f"stack:{bid}:{w}", None, None))  # placeholder: keeps the module order
            stacks[(bid, w)][xid] = m
            continue
        name = sg.to_gguf(rules, m.name)
        if name is None:
            missing.append(m.name)
            continue
        if name == "output.weight":
            _check_head(m.name, hp, base_names)
        a, b = _factors(m, alpha)
        leaf = sg.strip_prefix(m.name).rsplit(".", 1)[-1]
        if heads is not None and leaf in ("q_proj", "k_proj"):
            b = permute(b, heads[0], heads[0] if leaf == "q_proj" else heads[1])
        if name == "token_embd.weight":
            a = a.T.contiguous()  # PEFT's lora_embedding_A is r x vocab; llama.cpp reads vocab x r
        out.tensors.append((name, a, b))
    if missing:
        raise IncompatibleAdaptersError(
            f"{len(missing)} module(s) have no {arch} GGUF tensor: {', '.join(missing[:5])}",
            "llama.cpp's converter maps the same names (gguf's tensor name map); is --base the model this adapter "
            "was trained on?",
        )
    if beyond:
        raise IncompatibleAdaptersError(
            f"{len(beyond)} module(s) are in blocks the base does not have (num_hidden_layers is {n_blocks}): "
            + ", ".join(beyond[:5]),
            "is --base the model this adapter was trained on?",
        )
    if stacks:
        n_experts = _expert_count(hp)
        out.tensors = [_stack(t, stacks, rules, n_experts, alpha) if t[1] is None else t for t in out.tensors]
    return out


def _refuse(adapter: Adapter) -> None:
    if adapter.extras:
        raise IncompatibleAdaptersError(
            f"llama.cpp cannot load full tensors ({', '.join(sorted(adapter.extras)[:3])})",
            "merge the adapter into the base instead (loratools merge), then convert the model",
        )
    for m in adapter.modules.values():
        if m.magnitude is not None:
            raise IncompatibleAdaptersError(f"{m.name}: llama.cpp cannot load DoRA magnitudes", "merge it instead")
        if m.bias is not None:
            raise IncompatibleAdaptersError(f"{m.name}: llama.cpp cannot load LoRA bias tensors")
        if m.kind != "lora" or "mid" in m.factors:
            raise IncompatibleAdaptersError(f"{m.name}: only plain LoRA goes to GGUF (found {m.type})")
        if m.fan_in_fan_out:
            raise IncompatibleAdaptersError(f"{m.name}: fan_in_fan_out modules are not supported in GGUF export")
        if not m.rank:
            raise IncompatibleAdaptersError(
                f"{m.name}: rank 0 (it adds nothing), and llama.cpp divides by the rank",
                "leave the module out of the adapter",
            )
        if m.alpha is not None and not math.isfinite(m.alpha):
            raise LoratoolsError(f"{m.name}: alpha is {m.alpha}: not a number llama.cpp can scale by")


def _factors(m: Module, alpha: float) -> tuple[Any, Any]:
    """(A, B) in float32, B carrying whatever this module's scale is beyond llama.cpp's ``alpha / r``."""
    import torch

    r = int(m.rank or 1)
    a = m.factors["down"].load().to(torch.float32).reshape(r, -1)
    b = m.factors["up"].load().to(torch.float32).reshape(-1, r)
    want = m.scale
    if want != alpha / r:
        b = b * (want / (alpha / r))
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise LoratoolsError(
            f"{m.name}: NaN or Inf in its factors (or its scale {want:g} overflows float32 once baked in)",
            "`loratools validate` lists every such module",
        )
    return a, b


def _stack(
    slot: tuple[str, Any, Any],
    stacks: dict[tuple[int, str], dict[int, Module]],
    rules: sg.Surgery,
    n: int,
    alpha: float,
) -> tuple[str, Any, Any]:
    """One layer's experts of one projection, stacked as the converter stacks them (``torch.stack`` of the A's and
    of the B's): every expert must be there (its ``Unprocessed experts`` check); ranks that differ are padded with
    zero rows of A and zero columns of B (exact: they add nothing), each B baked for the stack's one rank."""
    import torch

    _, bid_s, w = slot[0].split(":")
    bid = int(bid_s)
    experts = stacks[(bid, w)]
    absent = [x for x in range(n) if x not in experts]
    extra = [x for x in experts if x >= n]
    if absent or extra:
        some = next(iter(experts.values())).name
        raise IncompatibleAdaptersError(
            f"block {bid}, {w}: llama.cpp stacks all {n} experts of a projection into one tensor, this adapter has "
            + (f"no LoRA for expert(s) {absent[:8]}" if absent else f"expert(s) {extra[:8]} beyond the {n} of the base")
            + f" (e.g. {some})",
            "train (or extract) the LoRA on every expert, or merge the adapter instead",
        )
    r = max(int(experts[x].rank or 1) for x in range(n))
    a_all, b_all = [], []
    for x in range(n):
        m = experts[x]
        a, b = _factors(m, alpha)
        k = a.shape[0]
        b = b * (r / k)  # baked for alpha / k; the stack is scaled by alpha / r
        a_all.append(torch.cat([a, a.new_zeros(r - k, a.shape[1])]))
        b_all.append(torch.cat([b, b.new_zeros(b.shape[0], r - k)], dim=1))
    name = sg.expert_stack_name(rules, bid, w)
    assert name is not None
    return name, torch.stack(a_all), torch.stack(b_all)


def _expert_count(hp: dict[str, Any]) -> int:
    for key in ("num_local_experts", "num_experts"):  # the converter's find_hparam order
        if key in hp:
            return count(hp, key)
    raise LoratoolsError("the base config has no num_local_experts / num_experts", "is --base a MoE model folder?")


def _check_head(name: str, hp: dict[str, Any], base_names: Iterable[str] | None) -> None:
    """An lm_head LoRA on a base whose head is its token embedding: llama.cpp's GGUF of that base has no
    ``output.weight`` (the loader says "does not exist in base model"; convert_lora_to_gguf.py refuses a head
    its model class ignores)."""
    names = set(base_names) if base_names is not None else None
    tied = ("lm_head.weight" not in names) if names is not None else hp.get("tie_word_embeddings") is True
    if tied:
        raise IncompatibleAdaptersError(
            f"{name}: the base ties lm_head to embed_tokens, so llama.cpp's model has no output.weight for this LoRA",
            "drop lm_head from the adapter, or merge the adapter instead",
        )


def text_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """A vision-language config's text model settings at the root, as ``TextModel.__init__`` moves them."""
    text = hparams.get("text_config")
    return {**hparams, **text} if isinstance(text, dict) else hparams


def architecture(hparams: dict[str, Any]) -> str:
    archs = hparams.get("architectures")
    if archs is None or archs == []:
        name = hparams.get("model_type")
        if not isinstance(name, str):
            raise LoratoolsError("the base config names no architecture (no architectures, no model_type)")
        return name
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise LoratoolsError(f"the base config's architectures must be a list of names, not {json.dumps(archs)[:60]}")
    first: str = archs[0]
    return first


def _block(name: str) -> int | None:
    m = sg.BLOCK_RE.fullmatch(sg.strip_prefix(name))
    return int(m.group(1)) if m else None


def blocks_of(names: Iterable[str]) -> int | None:
    """How many transformer blocks a checkpoint's tensor names hold (``model.layers.N.*``); None for none."""
    found = {_block(n.rsplit(".", 1)[0]) for n in names if ".layers." in n}
    found.discard(None)
    return len(found) or None


def _heads(hparams: dict[str, Any], mods: list[Module]) -> tuple[int, int] | None:
    """(heads, kv heads) for llama.cpp's q/k row permutation, checked against every q/k module's rows."""
    qk = [m for m in mods if m.name.rsplit(".", 1)[-1] in ("q_proj", "k_proj")]
    if not qk:
        return None
    n_head = count(hparams, "num_attention_heads")
    n_kv = n_head if hparams.get("num_key_value_heads") is None else count(hparams, "num_key_value_heads")
    check_heads(n_head, n_kv)
    sizes: dict[int, str] = {}
    for m in qk:
        heads = n_head if m.name.endswith("q_proj") else n_kv
        rows = m.delta_shape()[0]
        if rows % (2 * heads):
            which = "num_attention_heads" if m.name.endswith("q_proj") else "num_key_value_heads"
            raise IncompatibleAdaptersError(
                f"{m.name}: its {rows} output rows do not split into {heads} heads of an even size "
                f"({which} in the base config): llama.cpp's rotary permutation cannot apply",
                "is --base the model this adapter was trained on?",
            )
        sizes.setdefault(rows // heads, m.name)
    if len(sizes) > 1:
        (a, ma), (b, mb) = list(sizes.items())[:2]
        raise IncompatibleAdaptersError(
            f"the base config's head counts give {ma} heads of {a} rows and {mb} heads of {b}: "
            "query and key heads must have one size",
            "is --base the model this adapter was trained on?",
        )
    return n_head, n_kv


def check_heads(n_head: int, n_kv: int) -> None:
    if n_kv > n_head or n_head % n_kv:
        raise LoratoolsError(
            f"the base config's num_key_value_heads ({n_kv}) must divide num_attention_heads ({n_head})"
        )


def _file_alpha(mods: list[Module]) -> float:
    """The one ``adapter.lora.alpha`` of the file: the most common module alpha that is not 0 and fits float32
    (the others are baked into their up factors); the value stored is float32, and baking uses that value."""
    import numpy as np

    alphas = [m.alpha if m.alpha is not None else float(m.rank or 1) for m in mods]
    usable = [a for a in alphas if a != 0 and abs(a) <= float(np.finfo(np.float32).max) / 2]
    if not usable:
        return 1.0
    alpha = float(np.float32(Counter(usable).most_common(1)[0][0]))
    return alpha if alpha != 0 else 1.0


def count(hparams: dict[str, Any], key: str, default: int | None = None) -> int:
    if key not in hparams and default is None:
        raise LoratoolsError(f"the base config has no {key}", "is --base a transformers model folder?")
    value = hparams.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LoratoolsError(f"the base config's {key} must be a positive integer, not {json.dumps(value)[:40]}")
    return value


def write(
    adapter: Adapter,
    out: str | os.PathLike[str],
    *,
    hparams: dict[str, Any] | None,
    base_blocks: int | None = None,
    base_names: Iterable[str] | None = None,
    force: bool = False,
) -> Path:
    import numpy as np

    gguf = require()
    if hparams is None:
        raise LoratoolsError(
            "GGUF export needs the base model's config.json (architecture, head counts)",
            "pass --base with the base model folder (only config.json is read)",
        )
    p = make_plan(adapter, hparams, base_blocks=base_blocks, base_names=base_names)
    dtype = {m.factors["down"].dtype for m in adapter.modules.values()}
    qtype = {"F16": gguf.GGMLQuantizationType.F16, "BF16": gguf.GGMLQuantizationType.BF16}.get(
        dtype.pop() if len(dtype) == 1 else "F32", gguf.GGMLQuantizationType.F32
    )
    target = Path(out)
    with atomic_write(target, force=force) as tmp:
        w = gguf.GGUFWriter(tmp, p.arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, p.alpha)
        if adapter.base_model:
            _base_model(w, str(adapter.base_model))
        if p.heads is not None:
            w.add_head_count(p.heads[0])
            w.add_head_count_kv(p.heads[1])
        record = adapter.metadata.get("loratools")
        if record:
            w.add_string(PROVENANCE_KEY, record)
        for name, a, b in p.tensors:
            for suffix, t in ((".lora_a", a), (".lora_b", b)):
                arr = t.numpy().astype(np.float32)
                if qtype == gguf.GGMLQuantizationType.F32:
                    w.add_tensor(name + suffix, arr)
                else:
                    w.add_tensor(name + suffix, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return target


def _base_model(w: Any, base: str) -> None:
    """``general.base_model.count = 1`` and ``general.base_model.0.*``, as gguf's ``Metadata`` writes a Hub id
    (name and organization as titles, version, repo_url); anything else (a local path) as its name alone."""
    gguf = require()
    w.add_base_model_count(1)
    if HUB_ID_RE.fullmatch(base) and ".." not in base:
        name, org, _, _, version, _ = gguf.Metadata.get_model_id_components(base)
        w.add_base_model_name(0, gguf.Metadata.id_to_title(name) if name else base)
        if org:
            w.add_base_model_organization(0, gguf.Metadata.id_to_title(org))
        if version:
            w.add_base_model_version(0, version)
        w.add_base_model_repo_url(0, HUB_URL + base)
    else:
        w.add_base_model_name(0, base)
