"""GGUF LoRA adapters for llama.cpp and Ollama (write only; needs the optional ``gguf`` package).

What llama.cpp's own ``convert_lora_to_gguf.py`` writes, and what its loader reads:

* KV: ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha`` (one f32 for the file),
  ``general.architecture`` equal to the base's GGUF architecture.
* Tensors ``<gguf name>.lora_a`` (numpy r x in) and ``.lora_b`` (numpy out x r), names from gguf's tensor name map
  (``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q.weight``).
* The per-architecture surgery its converter applies to base weights is applied to the factors: for Llama-family
  models the q_proj / k_proj output rows are permuted for its rotary layout (``LlamaModel.permute`` in
  ``convert_hf_to_gguf.py``), which for ``B @ A`` means permuting the rows of B.
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
from pathlib import Path
from typing import Any

from ..errors import IncompatibleAdaptersError, LoratoolsError
from ..io.atomic import atomic_write
from ..model import Adapter

#: transformers architecture -> (GGUF architecture, whether q/k rows are permuted as llama.cpp's LlamaModel does)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
    "GemmaForCausalLM": ("gemma", False),
    "Gemma2ForCausalLM": ("gemma2", False),
}
PROVENANCE_KEY = "loratools.provenance"


#: a transformer block's module path in the supported architectures' HF names (``model.layers.N.<rest>``)
BLOCK_RE = re.compile(r"model\.layers\.(0|[1-9][0-9]{0,8})\.(.+)")


def require() -> Any:
    """The optional ``gguf`` package, or an Error saying how to get it."""
    try:
        import gguf
    except ImportError:
        raise LoratoolsError("writing GGUF needs the gguf package", "pip install 'loratools[gguf]'") from None
    return gguf


def permute(rows: Any, n_head: int, n_head_kv: int | None) -> Any:
    """llama.cpp's ``LlamaModel.permute``, on the rows (output dim) of a tensor (the caller checks that
    ``2 * heads`` divides the rows)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def plan(
    adapter: Adapter, hparams: dict[str, Any], *, base_blocks: int | None = None
) -> tuple[str, float, list[tuple[str, Any, Any]]]:
    """(GGUF architecture, file alpha, [(gguf tensor base name, lora_a, lora_b)]) with every rule applied;
    a and b are float32 torch tensors in numpy layout. ``base_blocks``: the blocks the base's weights hold,
    which ``num_hidden_layers`` must then equal.

    The work is bounded by the adapter: no count from the config is looped over (the name map is looked up per
    module, for block 0, whatever ``num_hidden_layers`` says); the counts are only checked against the modules.
    """
    import numpy as np
    import torch

    gguf = require()
    arch_name = _architecture(hparams)
    if arch_name not in ARCHITECTURES:
        raise IncompatibleAdaptersError(
            f"GGUF export knows no rules for architecture {json.dumps(arch_name)[:80]} yet",
            "supported: " + ", ".join(sorted(ARCHITECTURES)),
        )
    arch, permutes = ARCHITECTURES[arch_name]
    n_blocks = _count(hparams, "num_hidden_layers")
    if base_blocks is not None and n_blocks != base_blocks:
        raise LoratoolsError(
            f"the base config says num_hidden_layers {n_blocks}, its weights hold {base_blocks} blocks",
            "is config.json the one of these weights?",
        )
    if adapter.extras:
        raise IncompatibleAdaptersError(
            f"llama.cpp cannot load full tensors ({', '.join(sorted(adapter.extras)[:3])})",
            "merge the adapter into the base instead (loratools merge), then convert the model",
        )
    mods = list(adapter.modules.values())
    for m in mods:
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
    heads = _heads(hparams, mods) if permutes else None
    alpha = _file_alpha(mods)
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    tmap = gguf.get_tensor_name_map(arch_enum, 1)  # block 0 only: each module's block is put back below
    out: list[tuple[str, Any, Any]] = []
    missing: list[str] = []
    beyond: list[str] = []
    for m in mods:
        name = _gguf_name(tmap, m.name)
        if name is None:
            missing.append(m.name)
            continue
        block = _block(m.name)
        if block is not None and block >= n_blocks:
            beyond.append(m.name)
            continue
        r = int(m.rank or 1)
        a = m.factors["down"].load().to(torch.float32).reshape(r, -1)
        b = m.factors["up"].load().to(torch.float32).reshape(-1, r)
        # llama.cpp applies alpha / r to every module: bake whatever else this module's scale is into B
        want = m.scale
        if want != alpha / r:
            b = b * (want / (alpha / r))
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise LoratoolsError(
                f"{m.name}: NaN or Inf in its factors (or its scale {want:g} overflows float32 once baked in)",
                "`loratools validate` lists every such module",
            )
        leaf = m.name.rsplit(".", 1)[-1]
        if heads is not None and leaf in ("q_proj", "k_proj"):
            b = permute(b, heads[0], heads[0] if leaf == "q_proj" else heads[1])
        if name == "token_embd.weight":
            a = a.T.contiguous()  # PEFT's lora_embedding_A is r x vocab; llama.cpp reads vocab x r
        out.append((name, a, b))
    if missing:
        raise IncompatibleAdaptersError(
            f"{len(missing)} module(s) have no {arch} GGUF tensor: {', '.join(missing[:5])}",
            "is --base the model this adapter was trained on?",
        )
    if beyond:
        raise IncompatibleAdaptersError(
            f"{len(beyond)} module(s) are in blocks the base does not have (num_hidden_layers is {n_blocks}): "
            + ", ".join(beyond[:5]),
            "is --base the model this adapter was trained on?",
        )
    return arch, float(np.float32(alpha)), out


def _architecture(hparams: dict[str, Any]) -> str:
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
    m = BLOCK_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def blocks_of(names: Iterable[str]) -> int | None:
    """How many transformer blocks a checkpoint's tensor names hold (``model.layers.N.*``); None for none."""
    found = {_block(n.rsplit(".", 1)[0]) for n in names if n.startswith("model.layers.")}
    found.discard(None)
    return len(found) or None


def _gguf_name(tmap: Any, name: str) -> str | None:
    """The GGUF tensor name of a module's weight, from a name map made for block 0 alone: a block module is
    looked up as block 0 and its block number put back, so no map of every block is ever built."""
    m = BLOCK_RE.fullmatch(name)
    if m is None:
        found: str | None = tmap.get_name(name + ".weight", try_suffixes=(".weight",))
        return None if found is None or found.startswith("blk.") else found
    found = tmap.get_name(f"model.layers.0.{m.group(2)}.weight", try_suffixes=(".weight",))
    if found is None or not found.startswith("blk.0."):
        return None
    return f"blk.{m.group(1)}.{found.removeprefix('blk.0.')}"


def _heads(hparams: dict[str, Any], mods: list[Any]) -> tuple[int, int] | None:
    """(heads, kv heads) for llama.cpp's q/k row permutation, checked against every q/k module's rows."""
    qk = [m for m in mods if m.name.rsplit(".", 1)[-1] in ("q_proj", "k_proj")]
    if not qk:
        return None
    n_head = _count(hparams, "num_attention_heads")
    n_kv = n_head if hparams.get("num_key_value_heads") is None else _count(hparams, "num_key_value_heads")
    if n_kv > n_head or n_head % n_kv:
        raise LoratoolsError(
            f"the base config's num_key_value_heads ({n_kv}) must divide num_attention_heads ({n_head})"
        )
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


def _file_alpha(mods: list[Any]) -> float:
    """The one ``adapter.lora.alpha`` of the file: the most common module alpha that is not 0 and fits float32
    (the others are baked into their up factors); the value stored is float32, and baking uses that value."""
    import numpy as np

    alphas = [m.alpha if m.alpha is not None else float(m.rank or 1) for m in mods]
    usable = [a for a in alphas if a != 0 and abs(a) <= float(np.finfo(np.float32).max) / 2]
    if not usable:
        return 1.0
    alpha = float(np.float32(Counter(usable).most_common(1)[0][0]))
    return alpha if alpha != 0 else 1.0


def _count(hparams: dict[str, Any], key: str, default: int | None = None) -> int:
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
    force: bool = False,
) -> Path:
    import numpy as np

    gguf = require()
    if hparams is None:
        raise LoratoolsError(
            "GGUF export needs the base model's config.json (architecture, head counts)",
            "pass --base with the base model folder (only config.json is read)",
        )
    arch, alpha, tensors = plan(adapter, hparams, base_blocks=base_blocks)
    dtype = {m.factors["down"].dtype for m in adapter.modules.values()}
    qtype = {"F16": gguf.GGMLQuantizationType.F16, "BF16": gguf.GGMLQuantizationType.BF16}.get(
        dtype.pop() if len(dtype) == 1 else "F32", gguf.GGMLQuantizationType.F32
    )
    target = Path(out)
    with atomic_write(target, force=force) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        if adapter.base_model:
            w.add_string("general.base_model.0.name", str(adapter.base_model))
        record = adapter.metadata.get("loratools")
        if record:
            w.add_string(PROVENANCE_KEY, record)
        for name, a, b in tensors:
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


def read_alpha(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The adapter KVs of a GGUF file (for inspect-like checks)."""
    gguf = require()

    reader = gguf.GGUFReader(path)
    out: dict[str, Any] = {}
    for key in ("general.type", "adapter.type", "adapter.lora.alpha", "general.architecture", PROVENANCE_KEY):
        field = reader.get_field(key)
        if field is not None:
            value = field.contents()
            out[key] = json.loads(value) if key == PROVENANCE_KEY else value
    return out
