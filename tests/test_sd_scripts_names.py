"""kohya files loratools writes are read by sd-scripts without dropped keys.

sd-scripts' networks/lora.py (kohya-ss/sd-scripts at 02298e3c) loads a LoRA file by building the network for the
model and then ``load_state_dict(weights_sd, False)``: a key whose module the network did not build is dropped
without a word. The names it builds, re-implemented here from its source apart from loratools' tables:

* ``create_network_from_weights``: a module's dim is read from its ``lora_down`` key (``key.split(".")[0]``), and
  with ``modules_dim`` given, ``LoRANetwork.__init__`` adds ``UNET_TARGET_REPLACE_MODULE_CONV2D_3X3`` to the UNet's
  target classes;
* ``LoRANetwork``: ``UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel"]``, ``UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 =
  ["ResnetBlock2D", "Downsample2D", "Upsample2D"]``, ``TEXT_ENCODER_TARGET_REPLACE_MODULE = ["CLIPAttention",
  "CLIPMLP"]``; prefixes ``lora_unet``, ``lora_te`` (one text encoder), ``lora_te1`` / ``lora_te2`` (SDXL's two);
* ``create_modules``: for every module whose class is a target, every ``Linear`` or ``Conv2d`` below it (itself
  included) is named ``(prefix + "." + name + "." + child_name).replace(".", "_")``.

The models those names come from are sd-scripts' own: SD 1.x's UNet has diffusers' module paths and class names
(library/original_unet.py), SDXL's is ``SdxlUNet2DConditionModel`` (library/sdxl_original_unet.py), whose module
paths are those of the single-file checkpoint it loads (``load_models_from_sdxl_checkpoint`` strips
``model.diffusion_model.``), its blocks ``ResnetBlock2D`` (``in_layers``, ``emb_layers``, ``out_layers``,
``skip_connection``), ``Transformer2DModel`` (``proj_in``, ``transformer_blocks``), ``Downsample2D`` (``op``) and
``Upsample2D`` (``conv``); the text encoders are transformers 4 CLIP models (``text_model.`` included).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import families_kit as fk
import torch

from loratools import load_adapter
from loratools.ops.convert import convert

UNET_TARGETS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_TARGETS = ("CLIPAttention", "CLIPMLP")


def sd_scripts_names(root: torch.nn.Module, prefix: str, targets: tuple[str, ...]) -> set[str]:
    """``create_modules``: the LoRA names sd-scripts builds for ``root``."""
    out = set()
    for name, module in root.named_modules():
        if type(module).__name__ in targets:
            for child_name, child in module.named_modules():
                if type(child).__name__ in ("Linear", "Conv2d"):
                    out.add((prefix + "." + name + "." + child_name).replace(".", "_"))
    return out


#: the block classes of sd-scripts' SdxlUNet2DConditionModel, by the first part of a block's own path
SGM_BLOCK = {"in_layers": "ResnetBlock2D", "emb_layers": "ResnetBlock2D", "out_layers": "ResnetBlock2D",
             "skip_connection": "ResnetBlock2D", "proj_in": "Transformer2DModel", "norm": "Transformer2DModel",
             "transformer_blocks": "Transformer2DModel", "proj_out": "Transformer2DModel", "op": "Downsample2D",
             "conv": "Upsample2D"}  # fmt: skip


def sgm_names(state: dict[str, torch.Tensor]) -> set[str]:
    """``create_modules`` over the module tree of ``SdxlUNet2DConditionModel`` as its state dict (SGM names, root
    removed) shows it: blocks ``input_blocks.N.M`` / ``middle_block.M`` / ``output_blocks.N.M``, each of the class
    its parts tell, and below them every weight of 2 (Linear) or 4 (Conv2d) dimensions."""
    out = set()
    for key, t in state.items():
        if not key.endswith(".weight") or t.dim() not in (2, 4):
            continue
        parts = key.removesuffix(".weight").split(".")
        depth = 2 if parts[0] == "middle_block" else 3
        if parts[0] not in ("input_blocks", "middle_block", "output_blocks") or len(parts) <= depth:
            continue
        if SGM_BLOCK.get(parts[depth]) in UNET_TARGETS:
            block, child = ".".join(parts[:depth]), ".".join(parts[depth:])
            out.add(("lora_unet." + block + "." + child).replace(".", "_"))
    return out


def written(path: Path) -> set[str]:
    return set(load_adapter(path).modules)


def test_sd1_kohya_names_are_what_sd_scripts_builds(mf: Any, tmp_path: Path) -> None:
    """A diffusers SD 1.x LoRA of transformers 5 names (no ``text_model.``) -> kohya: every module is one sd-scripts
    builds for the same UNet and (transformers 4) text encoder."""
    from conftest import FIXTURES

    known = sd_scripts_names(mf.tiny_unet(), "lora_unet", UNET_TARGETS)
    known |= sd_scripts_names(mf.LegacyCLIPTextModel(mf.tiny_clip()), "lora_te", TE_TARGETS)
    convert(FIXTURES / "diffusers_sd", "kohya", tmp_path / "k.safetensors")
    names = written(tmp_path / "k.safetensors")
    assert names and names <= known, sorted(names - known)[:5]
    assert any(n.startswith("lora_te_text_model_encoder_layers_0_") for n in names)


def test_sdxl_kohya_names_are_what_sd_scripts_builds(mf: Any, tmp_path: Path) -> None:
    """A diffusers SDXL LoRA of the UNet's blocks and both text encoders -> kohya: every module is one sd-scripts
    builds for SdxlUNet2DConditionModel and its two CLIP encoders. Modules outside those blocks (conv_in,
    time_embedding, add_embedding, conv_out) are none of sd-scripts' (ComfyUI and A1111 read them): the conversion
    says so."""
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin as XL

    unet, te, te2 = fk.sdxl_models(mf)
    base = fk.save_base(tmp_path / "base", "StableDiffusionXLPipeline", unet=unet, text_encoder=te, text_encoder_2=te2)
    from loratools.formats.families import family

    sgm = fk.to_single_file(family("sdxl", dict(unet.config)), "unet", dict(unet.state_dict()))
    known = sgm_names({k.removeprefix("model.diffusion_model."): v for k, v in sgm.items()})
    known |= sd_scripts_names(mf.LegacyCLIPTextModel(te), "lora_te1", TE_TARGETS)
    known |= sd_scripts_names(mf.LegacyCLIPTextModel(te2.text_model), "lora_te2", TE_TARGETS)
    meta = [fk.add_lora(mf, m, t, seed) for m, t, seed in
            ((unet, fk.UNET_TARGETS, 91), (te, fk.TE_TARGETS, 92), (te2, fk.TE_TARGETS, 93))]  # fmt: skip
    with mf._quiet():
        XL.save_lora_weights(
            str(tmp_path / "d"), unet_lora_layers=fk.lora_state(unet), text_encoder_lora_layers=fk.lora_state(te),
            text_encoder_2_lora_layers=fk.lora_state(te2), unet_lora_adapter_metadata=meta[0],
            text_encoder_lora_adapter_metadata=meta[1], text_encoder_2_lora_adapter_metadata=meta[2],
        )  # fmt: skip
    src = tmp_path / "d" / "pytorch_lora_weights.safetensors"
    outside = r"unet\.(conv_in|conv_out|time_embedding|add_embedding)($|\.)"
    convert(src, "kohya", tmp_path / "k.safetensors", base=base, exclude=[outside])
    names = written(tmp_path / "k.safetensors")
    assert names <= known, sorted(names - known)[:5]
    assert {n[:9] for n in names} == {"lora_unet", "lora_te1_", "lora_te2_"}
    rep = convert(src, "kohya", tmp_path / "all.safetensors", base=base)
    extra = written(tmp_path / "all.safetensors") - known
    assert extra == {"lora_unet_input_blocks_0_0", "lora_unet_out_2", "lora_unet_time_embed_0", "lora_unet_time_embed_2",
                     "lora_unet_label_emb_0_0", "lora_unet_label_emb_0_2"}  # fmt: skip
    assert any("sd-scripts" in n and "lora_unet_input_blocks_0_0" in n for n in rep.notes), rep.notes


#: sd-scripts' networks/lora_flux.py (kohya-ss/sd-scripts at 450630c6, ``LoRANetwork``): the Flux model's blocks
#: ``FLUX_TARGET_REPLACE_MODULE_DOUBLE = ["DoubleStreamBlock"]`` and ``..._SINGLE = ["SingleStreamBlock"]``
#: (library/flux_models.py: ``double_blocks.N`` and ``single_blocks.N`` of the BFL checkpoint it loads); from a file
#: (``create_network_from_weights`` -> ``modules_dim``) ``self.in_dims = [0] * 5`` adds every Linear whose name
#: holds one of ``FLUX_IN_FILTERS`` (``create_modules(True, None, unet, None, filter=...)``); text encoders
#: ``lora_te1`` (CLIP: ``CLIPAttention``, ``CLIPSdpaAttention``, ``CLIPMLP``) and ``lora_te3`` (T5)
FLUX_BLOCKS = {"double_blocks": "DoubleStreamBlock", "single_blocks": "SingleStreamBlock"}
FLUX_IN_FILTERS = ("_img_in", "_time_in", "_vector_in", "_guidance_in", "_txt_in")


def flux_names(state: dict[str, torch.Tensor]) -> set[str]:
    """``create_modules`` over sd-scripts' Flux as its (BFL-named) state dict shows it: every Linear (a 2-D weight)
    below a ``double_blocks.N`` / ``single_blocks.N`` block, and the in-layers the filters pick from the rest."""
    out = set()
    for key, t in state.items():
        if not key.endswith(".weight") or t.dim() != 2:
            continue
        name = ("lora_unet." + key.removesuffix(".weight")).replace(".", "_")
        parts = key.split(".")
        if parts[0] in FLUX_BLOCKS and len(parts) > 3 or any(f in name for f in FLUX_IN_FILTERS):
            out.add(name)
    return out


def test_flux_kohya_names_are_what_sd_scripts_builds(mf: Any, tmp_path: Path) -> None:
    """A diffusers Flux.1 LoRA of every transformer module kind and CLIP -> kohya: every module is one sd-scripts'
    lora_flux.py builds for the same (BFL-named) model, but the final layer's (``final_layer_linear``,
    ``final_layer_adaLN_modulation_1``): sd-scripts builds no LoRA there, so it would drop them on load (diffusers
    and ComfyUI read them)."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin as F

    from loratools.formats.families import family

    model, te = fk.flux_model(mf), mf.tiny_clip()
    bfl = fk.to_single_file(family("flux1"), "transformer", dict(model.state_dict()))
    known = flux_names(bfl) | sd_scripts_names(mf.LegacyCLIPTextModel(te), "lora_te1", TE_TARGETS)
    meta = [fk.add_lora(mf, model, fk.FLUX_TARGETS, 94), fk.add_lora(mf, te, fk.TE_TARGETS, 95)]
    with mf._quiet():
        F.save_lora_weights(str(tmp_path / "d"), transformer_lora_layers=fk.lora_state(model),
                            text_encoder_lora_layers=fk.lora_state(te), transformer_lora_adapter_metadata=meta[0],
                            text_encoder_lora_adapter_metadata=meta[1])  # fmt: skip
    rep = convert(tmp_path / "d" / "pytorch_lora_weights.safetensors", "kohya", tmp_path / "k.safetensors")
    names = written(tmp_path / "k.safetensors")
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1", "lora_unet_img_in",
            "lora_unet_time_in_in_layer", "lora_unet_guidance_in_out_layer", "lora_unet_vector_in_in_layer",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"} <= names  # fmt: skip
    assert names - known == {"lora_unet_final_layer_linear", "lora_unet_final_layer_adaLN_modulation_1"}
    assert any("sd-scripts" in n and "lora_unet_final_layer_linear" in n for n in rep.notes), rep.notes


#: sd-scripts' networks/lora_sd3.py (kohya-ss/sd-scripts at 48d368fa, unchanged since e54462a4): ``LoRANetwork``
#: (l. 231-236) ``SD3_TARGET_REPLACE_MODULE = ["SingleDiTBlock"]``, ``TEXT_ENCODER_TARGET_REPLACE_MODULE =
#: ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP", "T5Attention", "T5DenseGatedActDense"]``, prefixes ``lora_unet``,
#: ``lora_te1`` (CLIP-L), ``lora_te2`` (CLIP-G), ``lora_te3`` (T5, l. 420: built when ``create_network_from_weights``
#: saw a ``lora_te3`` key, l. 208); ``create_modules`` (l. 322-334) names every Linear or Conv2d below a target
#: ``(prefix + "." + name + "." + child_name).replace(".", "_")``; from a file (``modules_dim`` given) ``self.emb_dims
#: = [0] * 6`` (l. 283) makes l. 435-450 search the whole MMDiT for the Linears and Conv2ds whose name holds one of
#: ``SD3_EMB_FILTERS``. The MMDiT is library/sd3_models.py's (same commit): ``joint_blocks`` (l. 841) of
#: ``MMDiTBlock``, whose ``context_block`` and ``x_block`` are ``SingleDiTBlock`` (l. 691-692), its module paths
#: those of the single-file checkpoint it loads
SD3_BLOCK = re.compile(r"joint_blocks\.\d+\.(x_block|context_block)\.")
SD3_EMB_FILTERS = ("context_embedder", "_t_embedder", "x_embedder", "y_embedder", "final_layer_adaLN_modulation",
                   "final_layer_linear")  # fmt: skip
SD3_TE_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP", "T5Attention", "T5DenseGatedActDense")


def sd3_names(state: dict[str, torch.Tensor]) -> set[str]:
    """``create_modules`` over sd-scripts' MMDiT as its (single-file-named) state dict shows it: every Linear (a
    2-D weight) below a ``SingleDiTBlock``, and every Linear or Conv2d (a 4-D weight) the embedding filters pick."""
    out = set()
    for key, t in state.items():
        if not key.endswith(".weight") or t.dim() not in (2, 4):
            continue
        name = ("lora_unet." + key.removesuffix(".weight")).replace(".", "_")
        if SD3_BLOCK.match(key) and t.dim() == 2 or any(f in name for f in SD3_EMB_FILTERS):
            out.add(name)
    return out


def tiny_t5() -> Any:
    """A tiny transformers ``T5EncoderModel`` of T5 v1.1's gated feed-forward (``T5DenseGatedActDense``), as SD3's
    and Flux's T5-XXL."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(14)
    cfg = T5Config(
        vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu"
    )
    return T5EncoderModel(cfg).float().eval()


def test_sd3_kohya_names_are_what_sd_scripts_builds(mf: Any, tmp_path: Path) -> None:
    """A diffusers SD3 / SD3.5 LoRA of every MMDiT module kind (SD3.5 Medium's attn2, the last block's pre-only
    context stream), both CLIP encoders and T5 -> kohya: every module is one sd-scripts' lora_sd3.py builds for the
    same (single-file-named) MMDiT and text encoders (T5 included: it is no "outside" module), but CLIP-G's
    ``text_projection``, which it would drop on load: the conversion says so."""
    from diffusers.loaders.lora_pipeline import SD3LoraLoaderMixin as S
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from loratools.formats.families import family

    model, te, t5 = fk.sd3_model(mf), mf.tiny_clip(), tiny_t5()
    with mf._quiet():
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**mf.CLIP_CONFIG)).float().eval()
    single = fk.to_single_file(family("sd3"), "transformer", dict(model.state_dict()),
                               extra={"pos_embed.pos_embed": "pos_embed"})  # fmt: skip
    known = sd3_names({k.removeprefix("model.diffusion_model."): v for k, v in single.items()})
    known |= sd_scripts_names(mf.LegacyCLIPTextModel(te), "lora_te1", SD3_TE_TARGETS)
    known |= sd_scripts_names(mf.LegacyCLIPTextModel(te2.text_model), "lora_te2", SD3_TE_TARGETS)
    known |= sd_scripts_names(t5, "lora_te3", SD3_TE_TARGETS)
    meta = [fk.add_lora(mf, model, fk.SD3_TARGETS, 96), fk.add_lora(mf, te, fk.TE_TARGETS, 97),
            fk.add_lora(mf, te2, [*fk.TE_TARGETS, "text_projection"], 98), fk.add_lora(mf, t5, ["q", "k", "v", "o", "wi_0", "wi_1", "wo"], 99)]  # fmt: skip
    with mf._quiet():
        S.save_lora_weights(str(tmp_path / "d"), transformer_lora_layers=fk.lora_state(model),
                            text_encoder_lora_layers=fk.lora_state(te), text_encoder_2_lora_layers=fk.lora_state(te2),
                            transformer_lora_adapter_metadata=meta[0], text_encoder_lora_adapter_metadata=meta[1],
                            text_encoder_2_lora_adapter_metadata=meta[2])  # fmt: skip
    saved = tmp_path / "d" / "pytorch_lora_weights.safetensors"
    with safe_open(str(saved), "pt") as f:
        header = f.metadata()
    # diffusers' SD3 loader has no T5 LoRA: its modules go in by hand, under the component diffusers would name
    src = tmp_path / "all.safetensors"
    save_file(
        load_file(str(saved)) | {"text_encoder_3." + k: v for k, v in fk.lora_state(t5).items()}, str(src), header
    )
    rep = convert(src, "kohya", tmp_path / "k.safetensors")
    names = written(tmp_path / "k.safetensors")
    assert {"lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_x_block_attn2_qkv",
            "lora_unet_joint_blocks_1_context_block_attn_qkv", "lora_unet_joint_blocks_0_context_block_mlp_fc2",
            "lora_unet_joint_blocks_1_x_block_adaLN_modulation_1", "lora_unet_x_embedder_proj",
            "lora_unet_t_embedder_mlp_0", "lora_unet_y_embedder_mlp_2", "lora_unet_context_embedder",
            "lora_unet_final_layer_linear", "lora_unet_final_layer_adaLN_modulation_1",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_0_mlp_fc1",
            "lora_te3_encoder_block_0_layer_0_SelfAttention_q",
            "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_1"} <= names  # fmt: skip
    assert names - known == {"lora_te2_text_projection"}
    note = [n for n in rep.notes if "sd-scripts" in n]
    assert len(note) == 1 and note[0].startswith("1 module(s)") and "lora_te2_text_projection" in note[0], rep.notes
