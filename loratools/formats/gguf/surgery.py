"""What llama.cpp's converter does to each architecture's tensors, as far as it touches LoRA factors, and the
tensor names both ways.

Names come from the ``gguf`` package (``gguf.TensorNameMap``, ``MODEL_ARCH``, ``MODEL_TENSORS``): the same map
``convert_hf_to_gguf.py`` calls (``ModelBase.map_tensor_name``). Only the surgery is kept here, one row per
transformers architecture, each citing the converter class (llama.cpp ``conversion/*.py``, formerly one
``convert_hf_to_gguf.py``) whose ``modify_tensors`` it follows. ``convert_lora_to_gguf.py`` runs that same
``modify_tensors`` on a ``LoraTorchTensor`` (A, B), so a row permutation lands on B, a stack stacks both A and B:

* ``permute_qk``: ``LlamaModel.permute`` on the rows of q_proj (n_head, n_head) and k_proj (n_head, n_kv_head):
  the rows of B are permuted for llama.cpp's rotary layout.
* ``experts``: per-expert linear layers stacked into one 3-D tensor per layer and projection (``torch.stack`` of
  every expert's A and of every B: lora_a ``n_expert x r x in``, lora_b ``n_expert x out x r``), named by the
  name map from the stack's own name (``Experts.merged``).
* ``paths``: tensors the converter keeps fused (Phi-3's ``qkv_proj`` -> ``attn_qkv``, ``gate_up_proj`` ->
  ``ffn_up``): named as they are, nothing split.
* ``norm_offset``: Gemma's norms are stored as ``weight + 1``; LoRA never targets a norm, but a norm a merge tool
  put in an adapter (mergekit-extract-lora) is written with the offset, and read back without it.

``convert_lora_to_gguf.py`` (``LoraModel.modify_tensors``) also strips a vision-language container's
``model.language_model.`` / ``language_model.`` prefixes before the class's own rules (:data:`PREFIXES`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .pkg import require


@dataclass(frozen=True)
class Experts:
    """How one architecture's experts are named: ``per_expert`` in the checkpoint (one module per expert), and
    ``merged``, the name the converter gives each projection's stack before mapping it, for each of ``names``."""

    per_expert: str  # "model.layers.{bid}.mlp.experts.{xid}.{w}"
    merged: str  # "model.layers.{bid}.mlp.experts.{w}"
    names: tuple[str, ...]

    @property
    def pattern(self) -> re.Pattern[str]:
        rx = re.escape(self.per_expert)
        rx = rx.replace(r"\{bid\}", r"(?P<bid>0|[1-9][0-9]{0,8})").replace(r"\{xid\}", r"(?P<xid>0|[1-9][0-9]{0,8})")
        return re.compile(rx.replace(r"\{w\}", "(?P<w>" + "|".join(map(re.escape, self.names)) + ")"))


@dataclass(frozen=True)
class Surgery:
    arch: str  # the gguf.MODEL_ARCH member
    converter: str  # the llama.cpp class (and file) whose modify_tensors this row follows
    permute_qk: bool = False
    experts: Experts | None = None
    #: (gguf.MODEL_TENSOR member, module path in the block) where the name map cannot single out the transformers
    #: path: tensors kept fused (Phi-3), a router named apart (Mixtral)
    paths: tuple[tuple[str, str], ...] = ()
    norm_offset: float = 0.0


#: LlamaModel.modify_tensors: "block_sparse_moe.experts" stacked per w1/w2/w3, the stack named
#: "layers.{bid}.feed_forward.experts.{wid}.weight"
BLOCK_SPARSE = Experts("model.layers.{bid}.block_sparse_moe.experts.{xid}.{w}", "layers.{bid}.feed_forward.experts.{w}",
                       ("w1", "w2", "w3"))  # fmt: skip
#: Qwen2MoeModel.modify_tensors: "model.layers.{bid}.mlp.experts.{xid}.{w_name}.weight" stacked per down/gate/up
#: projection, the stack named "model.layers.{bid}.mlp.experts.{w_name}.weight"
QWEN_MOE = Experts("model.layers.{bid}.mlp.experts.{xid}.{w}", "model.layers.{bid}.mlp.experts.{w}",
                   ("gate_proj", "up_proj", "down_proj"))  # fmt: skip

_LLAMA = Surgery("LLAMA", "LlamaModel (conversion/llama.py)", permute_qk=True, experts=BLOCK_SPARSE,
                 paths=(("FFN_GATE_INP", "block_sparse_moe.gate"),))  # fmt: skip
_QWEN2_MOE = Surgery("QWEN2MOE", "Qwen2MoeModel (conversion/qwen.py)", experts=QWEN_MOE)
_GEMMA3 = Surgery("GEMMA3", "Gemma3Model (conversion/gemma.py): norm_shift 1.0 on norm weights", norm_offset=1.0)
_OLMO2 = Surgery("OLMO2", "Olmo2Model (conversion/olmo.py), no permutation")
_MISTRAL3 = Surgery("MISTRAL3", "Mistral3Model.Ministral3Model(LlamaModel) (conversion/mistral3.py)", permute_qk=True)

#: transformers architecture -> what llama.cpp's converter does to it. Anything else is refused by name.
SURGERY: dict[str, Surgery] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,  # registered to LlamaModel
    "MixtralForCausalLM": _LLAMA,  # registered to LlamaModel: its experts are LlamaModel's block_sparse_moe stack
    "Qwen2ForCausalLM": Surgery("QWEN2", "Qwen2Model (conversion/qwen.py), no permutation"),
    "Qwen3ForCausalLM": Surgery("QWEN3", "Qwen3Model(Qwen2Model) (conversion/qwen.py)"),
    "Qwen2MoeForCausalLM": _QWEN2_MOE,
    "Qwen3MoeForCausalLM": Surgery("QWEN3MOE", "Qwen3MoeModel(Qwen2MoeModel) (conversion/qwen.py)", experts=QWEN_MOE),
    "GemmaForCausalLM": Surgery("GEMMA", "GemmaModel (conversion/gemma.py): norm weights + 1", norm_offset=1.0),
    "Gemma2ForCausalLM": Surgery("GEMMA2", "Gemma2Model (conversion/gemma.py): norm weights + 1", norm_offset=1.0),
    "Gemma3ForCausalLM": _GEMMA3,
    "Gemma3ForConditionalGeneration": _GEMMA3,  # its text model: the TEXT class registered for it
    "Phi3ForCausalLM": Surgery(
        "PHI3",
        "Phi3MiniModel (conversion/phi.py): no modify_tensors, fused tensors mapped as they are",
        paths=(("ATTN_QKV", "self_attn.qkv_proj"), ("FFN_UP", "mlp.gate_up_proj")),
    ),
    "GraniteForCausalLM": Surgery("GRANITE", "GraniteModel(LlamaModel) (conversion/granite.py)", permute_qk=True),
    "OlmoForCausalLM": Surgery("OLMO", "OlmoModel (conversion/olmo.py): permutes q/k as LlamaModel", permute_qk=True),
    "Olmo2ForCausalLM": _OLMO2,
    "Olmo3ForCausalLM": _OLMO2,  # registered to Olmo2Model
    "SmolLM3ForCausalLM": Surgery("SMOLLM3", "SmolLM3Model(LlamaModel) (conversion/smollm3.py)", permute_qk=True),
    "ArceeForCausalLM": Surgery("ARCEE", "ArceeModel(LlamaModel) (conversion/arcee.py)", permute_qk=True),
    "CohereForCausalLM": Surgery("COMMAND_R", "CommandR2Model (conversion/command_r.py), no modify_tensors"),
    "Cohere2ForCausalLM": Surgery("COHERE2", "Cohere2Model (conversion/command_r.py): only zero biases skipped"),
    "Ernie4_5ForCausalLM": Surgery(
        "ERNIE4_5",
        "Ernie4_5Model (conversion/ernie.py): splits only a fused qkv_proj / up_gate_proj, which "
        "transformers' Ernie 4.5 does not have",
    ),  # fmt: skip
    "Exaone4ForCausalLM": Surgery("EXAONE4", "Exaone4Model (conversion/exaone.py), no permutation"),
    "Ministral3ForCausalLM": _MISTRAL3,
    "Mistral3ForConditionalGeneration": _MISTRAL3,  # its text model
}

#: LoraModel.modify_tensors (convert_lora_to_gguf.py): prefixes of a vision-language container's text model
PREFIXES = (("model.language_model.", "model."), ("language_model.", ""))

#: module paths to prefer, in order, when the name map gives several for one GGUF tensor: transformers' own layout
#: (a prefix ends with a dot; ``lm_head`` is the path itself)
PREFERRED = ("model.layers.0.self_attn.", "model.layers.0.mlp.", "model.layers.0.", "lm_head", "model.")
#: transformers' paths where the name map offers several under the preferred prefix (``q_layernorm`` first)
PATHS = (("ATTN_Q_NORM", "self_attn.q_norm"), ("ATTN_K_NORM", "self_attn.k_norm"))
BLOCK_RE = re.compile(r"model\.layers\.(0|[1-9][0-9]{0,8})\.(.+)")
GGUF_BLOCK_RE = re.compile(r"blk\.(0|[1-9][0-9]{0,8})\.(.+)")


def supported() -> str:
    """The supported transformers architectures, short: ``Gemma, Gemma2, ..., Llama, ...``."""
    names = {re.sub(r"For(CausalLM|ConditionalGeneration)$", "", a) for a in SURGERY}
    return ", ".join(sorted(names))


def by_gguf_arch(arch: str) -> Surgery | None:
    """The surgery of a GGUF architecture name (``llama``), as every transformers architecture writing it has it."""
    gguf = require()
    for s in SURGERY.values():
        if gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, s.arch)] == arch:
            return s
    return None


def gguf_arch(s: Surgery) -> str:
    gguf = require()
    name: str = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, s.arch)]
    return name


@lru_cache(maxsize=32)
def name_map(arch: str) -> Any:
    """gguf's tensor name map of a MODEL_ARCH member, made for block 0 alone: a module's block number is taken out
    and put back, so no map of every block a config claims is ever built."""
    gguf = require()
    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), 1)


def strip_prefix(name: str) -> str:
    for old, new in PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def to_gguf(s: Surgery, module: str) -> str | None:
    """The GGUF tensor name (``blk.0.attn_q.weight``) of a module's weight, or None when the architecture has none."""
    tmap = name_map(s.arch)
    name = strip_prefix(module)
    m = BLOCK_RE.fullmatch(name)
    if m is None:
        found: str | None = tmap.get_name(name + ".weight", try_suffixes=(".weight",))
        return None if found is None or found.startswith("blk.") else found
    found = tmap.get_name(f"model.layers.0.{m.group(2)}.weight", try_suffixes=(".weight",))
    if found is None or not found.startswith("blk.0."):
        return None
    return f"blk.{m.group(1)}.{found.removeprefix('blk.0.')}"


def expert_of(s: Surgery, module: str) -> tuple[int, int, str] | None:
    """(block, expert, projection) of a per-expert module, or None."""
    if s.experts is None:
        return None
    m = s.experts.pattern.fullmatch(strip_prefix(module))
    return (int(m.group("bid")), int(m.group("xid")), m.group("w")) if m else None


def expert_stack_name(s: Surgery, bid: int, w: str) -> str | None:
    """The GGUF name of one layer's stack of projection ``w`` (``blk.3.ffn_gate_exps.weight``)."""
    assert s.experts is not None
    found: str | None = name_map(s.arch).get_name(s.experts.merged.format(bid=0, w=w) + ".weight",
                                                  try_suffixes=(".weight",))  # fmt: skip
    if found is None or not found.startswith("blk.0."):
        return None
    return f"blk.{bid}.{found.removeprefix('blk.0.')}"


@lru_cache(maxsize=32)
def _reverse(arch: str) -> dict[str, list[str]]:
    """GGUF name (block 0, no ``.weight``) -> the module paths gguf's map sends there, in the map's order."""
    out: dict[str, list[str]] = {}
    for hf, (_, gname) in name_map(arch).mapping.items():
        out.setdefault(gname, []).append(hf)
    return out


def kind_of(s: Surgery, gname: str) -> str | None:
    """The gguf.MODEL_TENSOR member a GGUF tensor name (``blk.3.ffn_gate_exps.weight``) is, in this architecture."""
    gguf = require()
    base = gname.removesuffix(".weight")
    m = GGUF_BLOCK_RE.fullmatch(base)
    key = f"blk.{{bid}}.{m.group(2)}" if m else base
    for t in gguf.MODEL_TENSORS[getattr(gguf.MODEL_ARCH, s.arch)]:
        if gguf.TENSOR_NAMES[t] == key:
            name: str = t.name
            return name
    return None


def from_gguf(s: Surgery, gname: str) -> str | None:
    """The module path of a (non-expert) GGUF tensor name, in transformers' layout; None when it names nothing of
    this architecture. Checked both ways: the name map sends the path back to ``gname``."""
    if not gname.endswith(".weight"):
        return None
    base = gname.removesuffix(".weight")
    m = GGUF_BLOCK_RE.fullmatch(base)
    kind = kind_of(s, gname)
    if kind is None:
        return None
    fixed = dict(PATHS + s.paths).get(kind)
    if fixed is not None and m is not None:
        path: str | None = f"model.layers.{m.group(1)}.{fixed}"
    else:
        key = f"blk.0.{m.group(2)}" if m else base
        cands = _reverse(s.arch).get(key, [])
        path = None
        for prefix in PREFERRED:
            hit = next((c for c in cands if (c.startswith(prefix) if prefix[-1] == "." else c == prefix)), None)
            if hit is not None:
                path = hit if m is None else f"model.layers.{m.group(1)}." + hit.removeprefix("model.layers.0.")
                break
    if path is None or to_gguf(s, path) != gname:
        return None
    return path


def tensor_of(rules: Surgery, module: str) -> str | None:
    """The GGUF tensor a module's LoRA goes to under one architecture's rules (a stack for an expert), or None."""
    expert = expert_of(rules, module)
    return expert_stack_name(rules, expert[0], expert[2]) if expert else to_gguf(rules, module)


def anywhere(module: str) -> str | None:
    """The GGUF tensor a module's LoRA goes to under any supported architecture (the first that has one), or None:
    a module no architecture's name map knows (a vision tower, an architecture llama.cpp has no rules for)."""
    for rules in dict.fromkeys(SURGERY.values()):
        name = tensor_of(rules, module)
        if name is not None:
            return name
    return None
