"""Text encoders: transformers' CLIP text model (the names kohya flattens, ``lora_te_text_model_encoder_layers_0_
self_attn_q_proj``, and single-file checkpoints keep under ``cond_stage_model.transformer.`` and the like),
OpenCLIP's (SD 2.x and SDXL's second encoder in single files: ``transformer.resblocks.N.attn.in_proj_weight`` holds
q, k and v), and T5's encoder (Flux, SD3: ``lora_te3_``)."""

from __future__ import annotations

from .core import EQUAL, Link, same

#: transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` (transformers 4 names, with ``text_model.``)
CLIP = [
    *[same(f"text_model.encoder.layers.{{i}}.self_attn.{t}", "attention")
      for t in ("q_proj", "k_proj", "v_proj", "out_proj")],
    same("text_model.encoder.layers.{i}.mlp.fc1", "mlp"),
    same("text_model.encoder.layers.{i}.mlp.fc2", "mlp"),
    same("text_model.encoder.layers.{i}.layer_norm1", "norm"),
    same("text_model.encoder.layers.{i}.layer_norm2", "norm"),
    same("text_model.embeddings.token_embedding", "embedding"),
    same("text_model.embeddings.position_embedding", "embedding"),
    same("text_model.final_layer_norm", "norm"),
    same("text_projection", "projection"),
]  # fmt: skip

_LAYER = "text_model.encoder.layers.{i}"

#: OpenCLIP's text tower as single-file SD 2.x / SDXL checkpoints hold it (``convert_open_clip_checkpoint``,
#: ``DIFFUSERS_TO_LDM_MAPPING["openclip"]`` in diffusers' single_file_utils.py; kohya's sdxl_model_util.py)
OPEN_CLIP = [
    Link("transformer.resblocks.{i}.attn",
         tuple(f"{_LAYER}.self_attn.{t}" for t in ("q_proj", "k_proj", "v_proj")), "attention", EQUAL,
         leaves=(("weight", "in_proj_weight"), ("bias", "in_proj_bias"))),
    Link("transformer.resblocks.{i}.attn.out_proj", (f"{_LAYER}.self_attn.out_proj",), "attention"),
    Link("transformer.resblocks.{i}.mlp.c_fc", (f"{_LAYER}.mlp.fc1",), "mlp"),
    Link("transformer.resblocks.{i}.mlp.c_proj", (f"{_LAYER}.mlp.fc2",), "mlp"),
    Link("transformer.resblocks.{i}.ln_1", (f"{_LAYER}.layer_norm1",), "norm"),
    Link("transformer.resblocks.{i}.ln_2", (f"{_LAYER}.layer_norm2",), "norm"),
    Link("token_embedding", ("text_model.embeddings.token_embedding",), "embedding"),
    Link("positional_embedding", ("text_model.embeddings.position_embedding",), "embedding",
         leaves=(("weight", ""),)),
    Link("ln_final", ("text_model.final_layer_norm",), "norm"),
    Link("text_projection", ("text_projection",), "projection", leaves=(("weight", ""),), transpose=True),
]  # fmt: skip

#: transformers ``T5EncoderModel`` (v1.1: gated ``wi_0`` / ``wi_1``)
T5 = [
    *[same(f"encoder.block.{{i}}.layer.0.SelfAttention.{t}", "attention") for t in ("q", "k", "v", "o")],
    same("encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias", "embedding"),
    *[same(f"encoder.block.{{i}}.layer.1.DenseReluDense.{t}", "mlp") for t in ("wi_0", "wi_1", "wo", "wi")],
    same("encoder.block.{i}.layer.0.layer_norm", "norm"),
    same("encoder.block.{i}.layer.1.layer_norm", "norm"),
    same("encoder.final_layer_norm", "norm"),
    same("encoder.embed_tokens", "embedding"),
    same("shared", "embedding"),
]  # fmt: skip
