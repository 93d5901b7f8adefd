"""Which model an adapter is for, from its module names and shapes (header only), its metadata (kohya's
``ss_base_model_version``, SAI's ``modelspec.architecture``) when that agrees, and a base model's config.

Image families are told apart by what only one of them has (Flux's ``double_blocks``, SD3's ``joint_blocks``,
SDXL's second CLIP encoder or ``add_embedding``, SD 1.x/2.x attention in the first UNet level) and by widths
(cross-attention 768 / 1024 / 2048, Flux's 3072). When several families remain, the name maps decide whether
that matters: the caller plans with each and needs them to agree. LLMs are named by their module layout.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

IMAGE = ("sd1", "sd2", "sdxl", "flux1", "sd3")
TITLES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "flux1": "Flux.1", "sd3": "SD3 / SD3.5"}

#: (pattern on the name with dots as underscores, families it leaves, what it shows)
_MARKS: list[tuple[re.Pattern[str], frozenset[str], str]] = [
    (re.compile(p), frozenset(f), why)
    for p, f, why in [
        (r"(down_blocks|up_blocks|mid_block|input_blocks|middle_block|output_blocks)_", ("sd1", "sd2", "sdxl"),
         "UNet blocks"),
        (r"(^|_)(double_blocks|single_blocks|single_transformer_blocks)_|img_attn|txt_attn|guidance_(in|embedder)"
         r"|processor_(qkv|proj)_lora|(^|_)x_embedder(?!_proj)", ("flux1",), "Flux blocks"),
        (r"joint_blocks_|(^|_)(x|context)_block_|pos_embed_proj|^text_encoder_3_", ("sd3",), "SD3 joint blocks"),
        (r"(^|_)transformer_blocks_\d+_(attn_add_|attn_to_add_out|ff_context|norm1_context)",
         ("flux1", "sd3"), "joint transformer blocks"),
        (r"^(lora_te\d?_text_model_|text_encoder(_\d)?_(text_model_)?encoder_layers_)", IMAGE, "a CLIP text encoder"),
        (r"^lora_te_", ("sd1", "sd2"), "lora_te_"),
        (r"^(lora_te2_|text_encoder_2_text_model)", ("sdxl", "sd3"), "a second CLIP text encoder"),
        (r"^(lora_te3_|text_encoder_\d_encoder_block)", ("flux1", "sd3"), "a T5 text encoder"),
        (r"^text_encoder_2_encoder_block", ("flux1",), "T5 as text_encoder_2"),
        (r"(^|_)(add_embedding|label_emb)_", ("sdxl",), "SDXL's added conditioning"),
        (r"(down_blocks_0_attentions|input_blocks_[12]_1|(down|up)_blocks_3_)", ("sd1", "sd2"),
         "attention in the first UNet level, or a fourth level"),
        (r"(attentions_\d+|input_blocks_\d+_1|output_blocks_\d+_1|middle_block_1)_transformer_blocks_[1-9]",
         ("sdxl",), "several transformer blocks per UNet attention"),
        (r"^(lora_te_|text_encoder_)(text_model_)?encoder_layers_(1[2-9]|2\d)_", ("sd2",),
         "more than 12 text encoder layers"),
    ]
]  # fmt: skip

#: widths that only one family has: cross-attention inputs of the UNet, the DiT's hidden size
_CROSS = re.compile(r"attn2_to_[kv]$")
_CROSS_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_DIT = re.compile(r"transformer_blocks_\d+_(attn_to_q|attn_add_q_proj|norm1_linear)$|double_blocks_\d+_img_attn_qkv$")
_DIT_DIM = {3072: "flux1", 1536: "sd3", 2432: "sd3"}

_LLM: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(p), fid, title)
    for p, fid, title in [
        (r"block_sparse_moe", "mixtral", "Mixtral (MoE decoder)"),
        (r"experts_\d+_(gate|up|down)_proj|shared_experts", "moe", "MoE decoder (Qwen-MoE, DeepSeek...)"),
        (r"self_attn_qkv_proj|mlp_gate_up_proj", "phi3", "Phi-3"),
        (r"gpt_neox_layers", "gpt_neox", "GPT-NeoX (Pythia)"),
        (r"(^|_)h_\d+_attn_c_(attn|proj)|(^|_)h_\d+_mlp_c_fc", "gpt2", "GPT-2"),
        (r"(^|_)h_\d+_self_attention_query_key_value", "falcon", "Falcon / BLOOM"),
        (r"decoder_layers_\d+_(self_attn_(q|k|v|out)_proj|fc[12])", "opt", "OPT"),
        (r"layer_\d+_attention_self_(query|key|value)", "bert", "BERT"),
        (r"block_\d+_layer_\d+_(SelfAttention|EncDecAttention|DenseReluDense)", "t5", "T5"),
        (r"layers_\d+_(self_attn_(q|k|v|o)_proj|mlp_(gate|up|down)_proj)", "llama",
         "Llama-style decoder (Llama, Mistral, Qwen, Gemma...)"),
    ]
]  # fmt: skip


@dataclass(frozen=True)
class Detection:
    """What an adapter is for. ``family``: the one family whose tables fit (None when several remain, which the
    name planner may still accept, or none); ``candidates``: the image families the evidence leaves; ``source``:
    where the answer comes from (``keys``, ``metadata``, ``config``, joined with ``+``); ``note``: what disagreed."""

    family: str | None
    candidates: tuple[str, ...]
    title: str
    source: str
    evidence: str
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.family, "name": self.title, "candidates": list(self.candidates), "from": self.source,
                "evidence": self.evidence, "note": self.note}  # fmt: skip


def _flat(name: str) -> str:
    for prefix in ("base_model.model.", "base_model_model_", "lycoris_"):
        name = name.removeprefix(prefix)
    return name.replace(".", "_")


def from_metadata(meta: Mapping[str, str]) -> str | None:
    """The family kohya's or SAI's metadata names (``ss_base_model_version``, ``modelspec.architecture``,
    ``ss_v2``)."""
    arch = (meta.get("modelspec.architecture") or "").lower()
    version = (meta.get("ss_base_model_version") or "").lower()
    for value, table in (
        (arch, (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v1", "sd1"), ("stable-diffusion-v2", "sd2"),
                ("stable-diffusion-3", "sd3"), ("flux", "flux1"), ("chroma", "flux1"))),
        (version, (("sdxl", "sdxl"), ("sd_v1", "sd1"), ("sd_v2", "sd2"), ("sd3", "sd3"), ("flux", "flux1"))),
    ):  # fmt: skip
        for prefix, fid in table:
            if value.startswith(prefix):
                return fid
    if (meta.get("ss_v2") or "").lower() == "true":
        return "sd2"
    return None


def from_config(configs: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The family a base model's configs name: ``model_index`` (a pipeline's), ``unet``, ``transformer``."""
    pipe = str(configs.get("model_index", {}).get("_class_name", ""))
    for marker, fid in (("StableDiffusionXL", "sdxl"), ("StableDiffusion3", "sd3"), ("Flux", "flux1")):
        if marker in pipe:
            return fid
    unet = configs.get("unet", {})
    if unet.get("addition_embed_type") == "text_time":
        return "sdxl"
    cross = unet.get("cross_attention_dim")
    if isinstance(cross, int) and cross in _CROSS_DIM:
        return _CROSS_DIM[cross]
    cls = str(configs.get("transformer", {}).get("_class_name", ""))
    return {"FluxTransformer2DModel": "flux1", "SD3Transformer2DModel": "sd3"}.get(cls)


def from_keys(names: Iterable[str], shapes: Mapping[str, tuple[int, ...]]) -> tuple[set[str], list[str]]:
    """The image families the names and widths leave, and why; all of them when nothing speaks for images."""
    left = set(IMAGE)
    why: list[str] = []
    marked = False
    for name in names:
        flat = _flat(name)
        for rx, fams, what in _MARKS:
            if rx.search(flat):
                marked = True
                if what not in why:
                    why.append(what)
                left &= fams
        shape = shapes.get(name)
        if shape and len(shape) >= 2:
            for rx, table in ((_CROSS, _CROSS_DIM), (_DIT, _DIT_DIM)):
                fid = table.get(shape[1]) if rx.search(flat) else None
                if fid:
                    marked = True
                    left &= {fid}
                    what = f"width {shape[1]}"
                    if what not in why:
                        why.append(what)
    return (left if marked else set()), why


def llm(names: Iterable[str]) -> tuple[str, str] | None:
    flats = [_flat(n) for n in names]
    for rx, fid, title in _LLM:
        if any(rx.search(f) for f in flats):
            return fid, title
    return None


def detect(
    names: Iterable[str],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    metadata: Mapping[str, str] | None = None,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
) -> Detection | None:
    """What the adapter with these module names is for; None when nothing tells."""
    names = list(names)
    left, why = from_keys(names, shapes or {})
    keys = sorted(left, key=IMAGE.index)
    told = [(src, fid) for src, fid in (("config", from_config(configs or {})), ("metadata", from_metadata(metadata or {})))
            if fid]  # fmt: skip
    if not keys and not why:  # no image module names
        hit = llm(names)
        if hit:
            return Detection(hit[0], (), hit[1], "keys", "module names")
        if told and not names:
            src, fid = told[0]
            return Detection(fid, (fid,), TITLES[fid], src, src)
        return None
    if not keys:
        return Detection(None, (), "unknown (the module names belong to different models)", "keys", ", ".join(why))
    notes = []
    for src, fid in told:
        if fid in keys:
            return Detection(fid, (fid,), TITLES[fid], f"keys+{src}", ", ".join(why))
        notes.append(f"the {src} says {TITLES[fid]}, the module names do not fit it")
    family = keys[0] if len(keys) == 1 else None
    title = TITLES[family] if family else " or ".join(TITLES[k] for k in keys)
    if len(keys) == len(IMAGE):
        title = "an image model's CLIP text encoder (SD 1.x/2.x, SDXL, Flux.1, SD3)"
    return Detection(family, tuple(keys), title, "keys", ", ".join(why), "; ".join(notes))
