"""What the GGUF tests share: tiny base models built from transformers configs (one per architecture loratools
converts for llama.cpp), random adapters on every weight they hold, and llama.cpp's converter rules written out
independently of loratools' own table (the oracle the tests hold the writer and the reader to).

Every rule below is read from llama.cpp's converter (``conversion/*.py``, formerly ``convert_hf_to_gguf.py``, and
``convert_lora_to_gguf.py``), with names always taken from the ``gguf`` package's own tables.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loratools.model import Adapter, Module, TensorRef

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


@dataclass(frozen=True)
class Oracle:
    """One architecture as llama.cpp's converter treats it."""

    config: str  # the transformers config class
    kwargs: dict[str, Any]
    arch: str  # gguf.MODEL_ARCH member the converter class sets
    permute: bool = False  # LlamaModel.permute on q_proj / k_proj (LlamaModel, OlmoModel, and their subclasses)
    experts: tuple[str, str, tuple[str, ...]] | None = None  # (per-expert name, stack name, projections)
    head: bool = True  # whether MODEL_TENSORS has OUTPUT (Gemma/Gemma2: no, lm_head is dropped)
    family: str = "plain"


# LlamaModel.modify_tensors: model.layers.{bid}.block_sparse_moe.experts.{xid}.{wid}.weight, wid in w1 w2 w3,
# stacked and named layers.{bid}.feed_forward.experts.{wid}.weight
MIXTRAL = ("model.layers.{bid}.block_sparse_moe.experts.{xid}.{w}", "layers.{bid}.feed_forward.experts.{w}.weight",
           ("w1", "w2", "w3"))  # fmt: skip
# Qwen2MoeModel.modify_tensors: model.layers.{bid}.mlp.experts.{xid}.{w_name}.weight, stacked and named
# model.layers.{bid}.mlp.experts.{w_name}.weight
QWEN_MOE = ("model.layers.{bid}.mlp.experts.{xid}.{w}", "model.layers.{bid}.mlp.experts.{w}.weight",
            ("down_proj", "gate_proj", "up_proj"))  # fmt: skip

ORACLES: dict[str, Oracle] = {
    "llama": Oracle("LlamaConfig", {}, "LLAMA", permute=True, family="permute"),
    "mistral": Oracle("MistralConfig", {}, "LLAMA", permute=True, family="permute"),
    "mixtral": Oracle(
        "MixtralConfig",
        dict(num_local_experts=4, num_experts_per_tok=2),
        "LLAMA",
        permute=True,
        experts=MIXTRAL,
        family="experts",
    ),  # fmt: skip
    "qwen2": Oracle("Qwen2Config", {}, "QWEN2"),
    "qwen3": Oracle("Qwen3Config", dict(head_dim=8), "QWEN3"),
    "qwen2moe": Oracle(
        "Qwen2MoeConfig", dict(MOE, shared_expert_intermediate_size=16), "QWEN2MOE", experts=QWEN_MOE, family="experts"
    ),  # fmt: skip
    "qwen3moe": Oracle("Qwen3MoeConfig", dict(MOE, head_dim=8), "QWEN3MOE", experts=QWEN_MOE, family="experts"),
    "gemma": Oracle("GemmaConfig", dict(head_dim=8), "GEMMA", head=False, family="norm-offset"),
    "gemma2": Oracle("Gemma2Config", dict(head_dim=8), "GEMMA2", head=False, family="norm-offset"),
    "gemma3": Oracle("Gemma3TextConfig", dict(head_dim=8, tie_word_embeddings=False), "GEMMA3", family="norm-offset"),
    "phi3": Oracle("Phi3Config", {}, "PHI3", family="fused"),
    "granite": Oracle("GraniteConfig", {}, "GRANITE", permute=True, family="permute"),
    "olmo": Oracle("OlmoConfig", {}, "OLMO", permute=True, family="permute"),
    "olmo2": Oracle("Olmo2Config", {}, "OLMO2"),
    "olmo3": Oracle("Olmo3Config", {}, "OLMO2"),
    "smollm3": Oracle("SmolLM3Config", dict(tie_word_embeddings=False), "SMOLLM3", permute=True, family="permute"),
    "ministral3": Oracle("Ministral3Config", {}, "MISTRAL3", permute=True, family="permute"),
    "arcee": Oracle("ArceeConfig", {}, "ARCEE", permute=True, family="permute"),
    "cohere": Oracle("CohereConfig", {}, "COMMAND_R"),
    "cohere2": Oracle("Cohere2Config", {}, "COHERE2"),
    "ernie4_5": Oracle("Ernie4_5Config", dict(head_dim=8), "ERNIE4_5"),
    "exaone4": Oracle("Exaone4Config", {}, "EXAONE4"),
}
#: one architecture of each surgery kind runs in the default test run; the rest under -m slow
DEFAULT = {"llama", "qwen2", "phi3", "gemma", "qwen2moe"}


def build_base(name: str, folder: Path, seed: int = 0) -> dict[str, Any]:
    """A tiny model of the architecture, saved as transformers saves it (config.json, model.safetensors);
    returns its config as a dict."""
    import transformers

    o = ORACLES[name]
    cfg = getattr(transformers, o.config)(**{**SMALL, **o.kwargs})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    model.save_pretrained(folder)
    out: dict[str, Any] = cfg.to_dict()
    return out


def base_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def random_adapter(shapes: dict[str, tuple[int, ...]], *, seed: int = 0, rslora: bool = False) -> Adapter:
    """A LoRA on every matrix of a base (embedding and lm_head included), ranks 2-4 and alphas that differ from
    module to module (also between the experts of one layer), random factors."""
    g = torch.Generator().manual_seed(seed)
    a = Adapter("peft", base_model="org/tiny-base")
    for key, shape in sorted(shapes.items()):
        if len(shape) != 2 or not key.endswith(".weight"):
            continue
        name = key.removesuffix(".weight")
        h = zlib.crc32(name.encode())  # ranks and alphas differ between neighbours, experts of one stack too
        r = 2 + h % 3
        alpha = float(4 + 2 * ((h >> 4) % 4))
        if name.endswith("embed_tokens"):
            vocab, hidden = shape
            f = {"down": torch.randn(r, vocab, generator=g), "up": torch.randn(hidden, r, generator=g)}
            layer = "embedding"
        else:
            out, inn = shape
            f = {"down": torch.randn(r, inn, generator=g), "up": torch.randn(out, r, generator=g)}
            layer = "linear"
        factors = {k: TensorRef.of(v) for k, v in f.items()}
        a.modules[name] = Module(name, "lora", factors, alpha=alpha, rslora=rslora, layer=layer)  # type: ignore[arg-type]
    return a


def llama_permute(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """LlamaModel.permute, as convert_hf_to_gguf.py writes it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(path: Path) -> tuple[Any, dict[str, np.ndarray]]:
    """The owner's reader (gguf.GGUFReader): the file's fields, and its tensors in numpy layout (float32)."""
    import gguf

    r = gguf.GGUFReader(path)
    out = {}
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape)]
        data = np.array(t.data)
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = gguf.quants.dequantize(data, t.tensor_type)
        out[t.name] = data.astype(np.float32).reshape(shape)
    return r, out


def field(reader: Any, key: str) -> Any:
    f = reader.get_field(key)
    return None if f is None else f.contents()


def llama_cpp_delta(alpha: float, a: np.ndarray, b: np.ndarray, embedding: bool = False) -> torch.Tensor:
    """What llama.cpp adds for one pair (llama-adapter.cpp get_scale: alpha / rank with rank = lora_b's ne[0],
    scale 1 when alpha is 0; llm_build_inp_embd for token_embd, whose lora_a is vocab x r): ``out x in``."""
    r = b.shape[-1]
    scale = alpha / r if alpha else 1.0
    if embedding:
        return torch.from_numpy(scale * (b @ a.T))
    return torch.from_numpy(scale * (b @ a))


def expected_tensors(o: Oracle, adapter: Adapter, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """GGUF tensor base name -> the delta (``out x in``, stacked ``n_expert x out x in`` for experts) llama.cpp
    must compute from the file, from the adapter's own modules and the converter's rules: names by gguf's map
    (block count from the config), q/k rows permuted, experts stacked."""
    import gguf

    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, o.arch), cfg["num_hidden_layers"])
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads")
    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, dict[int, torch.Tensor]] = {}
    import re

    for name, m in adapter.modules.items():
        d = m.delta_matrix(torch.float64)  # out x in, scale included
        if o.experts is not None:
            rx = re.escape(o.experts[0]).replace(r"\{bid\}", r"(\d+)").replace(r"\{xid\}", r"(\d+)")
            hit = re.fullmatch(rx.replace(r"\{w\}", r"(\w+)"), name)
            if hit:
                stack = tmap.get_name(o.experts[1].format(bid=hit.group(1), w=hit.group(3)), try_suffixes=(".weight",))
                stacks.setdefault(stack, {})[int(hit.group(2))] = d
                continue
        gname = tmap.get_name(name + ".weight", try_suffixes=(".weight",))
        assert gname is not None, name
        leaf = name.rsplit(".", 1)[-1]
        if o.permute and leaf == "q_proj":
            d = llama_permute(d, n_head, n_head)
        if o.permute and leaf == "k_proj":
            d = llama_permute(d, n_head, n_kv)
        out[gname] = d
    for gname, experts in stacks.items():
        out[gname] = torch.stack([experts[x] for x in sorted(experts)])
    return out


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5 * max(1.0, float(want.abs().max())),
                               msg=lambda s: f"{what}: {s}")  # fmt: skip


def same_deltas(a: Adapter, b: Adapter) -> None:
    assert sorted(a.modules) == sorted(b.modules), sorted(set(a.modules) ^ set(b.modules))
    for name, m in a.modules.items():
        close(b.modules[name].delta(torch.float64), m.delta(torch.float64), name)


def finite(x: float) -> bool:
    return math.isfinite(x)
