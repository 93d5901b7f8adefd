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
import os
from collections import Counter
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


def permute(rows: Any, n_head: int, n_head_kv: int | None) -> Any:
    """llama.cpp's ``LlamaModel.permute``, on the rows (output dim) of a tensor."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def plan(adapter: Adapter, hparams: dict[str, Any]) -> tuple[str, float, list[tuple[str, Any, Any]]]:
    """(GGUF architecture, file alpha, [(gguf tensor base name, lora_a, lora_b)]) with every rule applied;
    a and b are float32 torch tensors in numpy layout."""
    import torch

    try:
        import gguf
    except ImportError:
        raise LoratoolsError("writing GGUF needs the gguf package", "pip install 'loratools[gguf]'") from None
    archs = hparams.get("architectures") or []
    arch_name = archs[0] if isinstance(archs, list) and archs else hparams.get("model_type", "?")
    if not isinstance(arch_name, str) or arch_name not in ARCHITECTURES:
        raise IncompatibleAdaptersError(
            f"GGUF export knows no rules for architecture {arch_name!r} yet",
            "supported: " + ", ".join(sorted(ARCHITECTURES)),
        )
    arch, permutes = ARCHITECTURES[arch_name]
    n_head = _count(hparams, "num_attention_heads")
    n_kv = _count(hparams, "num_key_value_heads", n_head)
    n_blocks = _count(hparams, "num_hidden_layers")
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
    alphas = [m.alpha if m.alpha is not None else float(m.rank or 1) for m in mods]
    alpha = float(Counter(alphas).most_common(1)[0][0]) if alphas else 1.0
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    tmap = gguf.get_tensor_name_map(arch_enum, n_blocks)
    out: list[tuple[str, Any, Any]] = []
    missing: list[str] = []
    for m in mods:
        name = tmap.get_name(m.name + ".weight", try_suffixes=(".weight",))
        if name is None:
            missing.append(m.name)
            continue
        r = int(m.rank or 1)
        a = m.factors["down"].load().to(torch.float32).reshape(r, -1)
        b = m.factors["up"].load().to(torch.float32).reshape(-1, r)
        # llama.cpp applies alpha / r to every module: bake whatever else this module's scale is into B
        want = m.scale
        if want != alpha / r:
            b = b * (want / (alpha / r))
        leaf = m.name.rsplit(".", 1)[-1]
        if permutes and leaf == "q_proj":
            b = permute(b, n_head, n_head)
        elif permutes and leaf == "k_proj":
            b = permute(b, n_head, n_kv)
        if name == "token_embd.weight":
            a = a.T.contiguous()  # PEFT's lora_embedding_A is r x vocab; llama.cpp reads vocab x r
        out.append((name, a, b))
    if missing:
        raise IncompatibleAdaptersError(
            f"{len(missing)} module(s) have no {arch} GGUF tensor: {', '.join(missing[:5])}",
            "is --base the model this adapter was trained on?",
        )
    return arch, alpha, out


def _count(hparams: dict[str, Any], key: str, default: int | None = None) -> int:
    value = hparams.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LoratoolsError(f"the base config's {key} must be a positive integer, not {json.dumps(value)[:40]}")
    return value


def write(
    adapter: Adapter, out: str | os.PathLike[str], *, hparams: dict[str, Any] | None, force: bool = False
) -> Path:
    import gguf
    import numpy as np

    if hparams is None:
        raise LoratoolsError(
            "GGUF export needs the base model's config.json (architecture, head counts)",
            "pass --base with the base model folder (only config.json is read)",
        )
    arch, alpha, tensors = plan(adapter, hparams)
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
    import gguf

    reader = gguf.GGUFReader(path)
    out: dict[str, Any] = {}
    for key in ("general.type", "adapter.type", "adapter.lora.alpha", "general.architecture", PROVENANCE_KEY):
        field = reader.get_field(key)
        if field is not None:
            value = field.contents()
            out[key] = json.loads(value) if key == PROVENANCE_KEY else value
    return out
