"""SD3 / SD3.5: the MMDiT's module names (single-file checkpoints, and kohya's ``lora_unet_joint_blocks_N_x_block_
...`` of sd-scripts' networks/lora_sd3.py, whose q, k, v stay fused in ``attn.qkv``) <-> diffusers'
``SD3Transformer2DModel``.

Rules from diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` (single_file_utils.py): the final
layer's modulation, and that of the last block's context stream (``context_pre_only``: a 2 x hidden
``AdaLayerNormContinuous``), store (shift, scale) where diffusers has (scale, shift); SD3.5 Medium's ``x_block.attn2``
is diffusers' ``attn2``. Text encoders ``lora_te1_`` CLIP-L, ``lora_te2_`` CLIP-G, ``lora_te3_`` T5.
"""

from __future__ import annotations

from .core import EQUAL, Link, Space, nest
from .family import Family, Part
from .text import CLIP, T5


def _stream(x: bool) -> list[Link]:
    qkv = ("to_q", "to_k", "to_v") if x else ("add_q_proj", "add_k_proj", "add_v_proj")
    proj, ff, norm = ("to_out.0", "ff", "norm1") if x else ("to_add_out", "ff_context", "norm1_context")
    qk = ("norm_q", "norm_k") if x else ("norm_added_q", "norm_added_k")
    out = [
        Link("attn.qkv", tuple(f"attn.{t}" for t in qkv), "attention", EQUAL),
        Link("attn.proj", (f"attn.{proj}",), "attention"),
        Link("attn.ln_q", (f"attn.{qk[0]}",), "norm"),
        Link("attn.ln_k", (f"attn.{qk[1]}",), "norm"),
        Link("mlp.fc1", (f"{ff}.net.0.proj",), "ff"),
        Link("mlp.fc2", (f"{ff}.net.2",), "ff"),
        Link("adaLN_modulation.1", (f"{norm}.linear",), "modulation", swap="" if x else "pair"),
    ]
    if x:
        out += [
            Link("attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v"), "attention", EQUAL),
            Link("attn2.proj", ("attn2.to_out.0",), "attention"),
            Link("attn2.ln_q", ("attn2.norm_q",), "norm"),
            Link("attn2.ln_k", ("attn2.norm_k",), "norm"),
        ]
    return out


LINKS = [
    *nest(("joint_blocks.{i}.x_block", "transformer_blocks.{i}"), _stream(True)),
    *nest(("joint_blocks.{i}.context_block", "transformer_blocks.{i}"), _stream(False)),
    Link("x_embedder.proj", ("pos_embed.proj",), "embedding"),
    Link("context_embedder", ("context_embedder",), "embedding"),
    Link("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",), "time embedding"),
    Link("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",), "time embedding"),
    Link("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",), "time embedding"),
    Link("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",), "time embedding"),
    Link("final_layer.linear", ("proj_out",), "output"),
    Link("final_layer.adaLN_modulation.1", ("norm_out.linear",), "modulation", swap="always"),
]


def sd3() -> Family:
    mmdit, clip, t5 = Space(LINKS), Space(CLIP), Space(T5)
    return Family(
        "sd3",
        "SD3 / SD3.5",
        (
            Part("transformer", (("lora_unet_", mmdit),), ("model.diffusion_model.",), mmdit),
            Part("text_encoder", (("lora_te1_", clip),), ("text_encoders.clip_l.transformer.",), clip, True),
            Part("text_encoder_2", (("lora_te2_", clip),), ("text_encoders.clip_g.transformer.",), clip, True),
            Part("text_encoder_3", (("lora_te3_", t5),), ("text_encoders.t5xxl.transformer.",), t5),
        ),
        aliases=("sd3", "stable-diffusion-3"),
    )
