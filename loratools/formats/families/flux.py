"""Flux.1: Black Forest Labs' module names (single-file checkpoints, and kohya's ``lora_unet_`` names, with the
fused ``img_attn.qkv`` and ``single_blocks.N.linear1`` = q, k, v and the MLP's input) <-> diffusers'
``FluxTransformer2DModel``.

Rules from diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` (single_file_utils.py) and
``_convert_kohya_flux_lora_to_diffusers`` (lora_conversion_utils.py): the final layer's modulation stores
(shift, scale) where diffusers' ``AdaLayerNormContinuous`` has (scale, shift) (``swap_scale_shift``); the other
modulations keep their order. kohya's text encoders: ``lora_te1_`` CLIP-L, ``lora_te3_`` T5 (sd-scripts'
networks/lora_flux.py), which diffusers calls ``text_encoder`` and ``text_encoder_2``.
"""

from __future__ import annotations

import re

from .core import EQUAL, Link, Space, Split, identity, nest
from .family import Family, Part
from .text import CLIP, T5

#: BFL's MLP ratio: linear1 = q, k, v (hidden each) + the MLP's 4 * hidden rows (FluxParams.mlp_ratio)
MLP_RATIO = 4
QKV_MLP = Split("qkv+rest", MLP_RATIO)

_STREAM = [  # (BFL stream prefix, diffusers attention names, feed-forward, norm)
    ("img", ("to_q", "to_k", "to_v"), "to_out.0", "ff", "norm1", ("norm_q", "norm_k")),
    ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out", "ff_context", "norm1_context",
     ("norm_added_q", "norm_added_k")),
]  # fmt: skip


def _double() -> list[Link]:
    out: list[Link] = []
    for s, qkv, proj, ff, norm, qk in _STREAM:
        out += [
            Link(f"{s}_attn.qkv", tuple(f"attn.{t}" for t in qkv), "attention", EQUAL),
            Link(f"{s}_attn.proj", (f"attn.{proj}",), "attention"),
            Link(f"{s}_attn.norm.query_norm", (f"attn.{qk[0]}",), "norm", leaves=(("weight", "scale"),)),
            Link(f"{s}_attn.norm.key_norm", (f"attn.{qk[1]}",), "norm", leaves=(("weight", "scale"),)),
            Link(f"{s}_mlp.0", (f"{ff}.net.0.proj",), "ff"),
            Link(f"{s}_mlp.2", (f"{ff}.net.2",), "ff"),
            Link(f"{s}_mod.lin", (f"{norm}.linear",), "modulation"),
        ]
    return out


SINGLE = [
    Link("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "attention+ff", QKV_MLP),
    Link("linear2", ("proj_out",), "attention+ff"),
    Link("modulation.lin", ("norm.linear",), "modulation"),
    Link("norm.query_norm", ("attn.norm_q",), "norm", leaves=(("weight", "scale"),)),
    Link("norm.key_norm", ("attn.norm_k",), "norm", leaves=(("weight", "scale"),)),
]

LINKS = [
    *nest(("double_blocks.{i}", "transformer_blocks.{i}"), _double()),
    *nest(("single_blocks.{i}", "single_transformer_blocks.{i}"), SINGLE),
    Link("img_in", ("x_embedder",), "embedding"),
    Link("txt_in", ("context_embedder",), "embedding"),
    *[Link(f"{b}.{lay}", (f"time_text_embed.{d}.linear_{n}",), "time embedding")
      for b, d in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                   ("guidance_in", "guidance_embedder"))
      for lay, n in (("in_layer", 1), ("out_layer", 2))],
    Link("final_layer.linear", ("proj_out",), "output"),
    Link("final_layer.adaLN_modulation.1", ("norm_out.linear",), "modulation", swap="always"),
]  # fmt: skip

#: XLabs' LoRA processors -> the BFL module each adds to (``_convert_xlabs_flux_lora_to_diffusers``): double
#: blocks ``qkv_lora1`` / ``proj_lora1`` (image stream) and ``..2`` (text stream); single blocks ``qkv_lora`` adds
#: to the q, k, v rows of linear1 only (XLabs' SingleStreamBlockLoraProcessor), ``proj_lora`` to linear2
XLABS = re.compile(r"^(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(qkv|proj)_lora([12]?)$")
_XLABS_TARGET = {
    ("double", "qkv", "1"): "img_attn_qkv", ("double", "proj", "1"): "img_attn_proj",
    ("double", "qkv", "2"): "txt_attn_qkv", ("double", "proj", "2"): "txt_attn_proj",
    ("single", "qkv", ""): "linear1", ("single", "proj", ""): "linear2",
}  # fmt: skip


def xlabs_name(module: str) -> tuple[str, bool] | None:
    """An XLabs module (``double_blocks.0.processor.qkv_lora1``) as the kohya name of the module it adds to, and
    whether it covers only linear1's q, k, v rows (the MLP's rows must be padded with zeros)."""
    m = XLABS.match(module)
    if not m:
        return None
    kind, block, what, stream = m.groups()
    target = _XLABS_TARGET.get((kind, what, stream))
    if target is None:
        return None
    return f"lora_unet_{kind}_blocks_{block}_{target}", target == "linear1"


def flux1() -> Family:
    bfl = Space(LINKS)
    clip, t5 = Space(CLIP), Space(T5)
    return Family(
        "flux1",
        "Flux.1",
        (
            # kohya trainers call the transformer "unet"; some write diffusers paths under lora_transformer_
            Part(
                "transformer",
                (("lora_unet_", bfl), ("lora_transformer_", identity(LINKS))),
                ("", "model.diffusion_model."),
                bfl,
            ),
            Part("text_encoder", (("lora_te1_", clip),), ("text_encoders.clip_l.transformer.", ""), clip, True),
            Part("text_encoder_2", (("lora_te3_", t5),), ("text_encoders.t5xxl.transformer.", ""), t5),
        ),
        aliases=("flux", "chroma"),
    )
