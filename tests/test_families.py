"""The name maps of each model family (loratools.formats.families) against the peers' own rules.

* single-file checkpoints: a tiny model's weights written under :func:`single_file_location` are read back exactly
  by diffusers' own converters (``convert_ldm_unet_checkpoint``, ``convert_ldm_clip_checkpoint``,
  ``convert_open_clip_checkpoint``, ``convert_flux_transformer_checkpoint_to_diffusers``,
  ``convert_sd3_transformer_checkpoint_to_diffusers``): the original names (which kohya's SDXL, Flux and SD3 LoRAs
  flatten) and the rows of fused q/k/v are the peers';
* kohya files (test_families_kohya.py): written by loratools from a diffusers LoRA, read by diffusers' own kohya
  converters and loaders, and converted back.
"""

from __future__ import annotations

from typing import Any

import families_kit as fk
import pytest
import torch
from families_kit import to_single_file

from loratools.formats.families import detect, family
from loratools.formats.families.core import fill, flatten

SD15_UNET: dict[str, Any] = dict(
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)  # fmt: skip
SDXL_BASE_UNET: dict[str, Any] = dict(
    block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)  # fmt: skip


def same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], values: bool = True) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:10]
    if values:
        for k, v in want.items():
            assert torch.equal(got[k], v), k


def _unet(config: dict[str, Any], meta: bool) -> Any:
    from diffusers import UNet2DConditionModel

    if meta:
        with torch.device("meta"):
            return UNet2DConditionModel(**config)
    return UNet2DConditionModel(**config)


@pytest.mark.parametrize(
    ("fid", "config", "meta"),
    [
        ("sd1", "TINY_SD", False),
        ("sdxl", "TINY_SDXL", False),
        pytest.param("sd1", "SD15", True, marks=pytest.mark.slow),
        pytest.param("sdxl", "SDXL", True, marks=pytest.mark.slow),
    ],
)
def test_unet_single_file_names_are_diffusers_own(mf: Any, fid: str, config: str, meta: bool) -> None:
    """Every UNet tensor at the place the family's table gives it in a single-file checkpoint, read back by
    diffusers' ``convert_ldm_unet_checkpoint`` under its own name (the real SD 1.5 / SDXL configs on the meta
    device: names only)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = {"TINY_SD": mf.UNET_CONFIG, "TINY_SDXL": fk.SDXL_UNET, "SD15": SD15_UNET, "SDXL": SDXL_BASE_UNET}[config]
    with mf._quiet():
        unet = _unet(cfg, meta)
    state = unet.state_dict()
    fam = family(fid, dict(unet.config))
    ckpt = to_single_file(fam, "unet", state)
    assert all(k.startswith("model.diffusion_model.") for k in ckpt)
    same_tensors(convert_ldm_unet_checkpoint(ckpt, dict(unet.config)), state, values=not meta)


def test_clip_single_file_names_are_diffusers_own(mf: Any) -> None:
    """CLIP-L under ``cond_stage_model.transformer.`` (SD 1.x) and ``conditioner.embedders.0.transformer.``
    (SDXL), OpenCLIP under ``cond_stage_model.model.`` (SD 2.x) and ``conditioner.embedders.1.model.`` (SDXL, q/k/v
    fused in ``in_proj_weight``, ``text_projection`` transposed): read back by diffusers' converters."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    _, te, te2 = fk.sdxl_models(mf)
    state = {k: v for k, v in te.state_dict().items() if "position_ids" not in k}
    want = {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in state.items()}
    for fid, root in (("sd1", "cond_stage_model.transformer."), ("sdxl", "conditioner.embedders.0.transformer.")):
        ckpt = to_single_file(family(fid), "text_encoder", state)
        assert all(k.startswith(root) for k in ckpt)
        same_tensors(convert_ldm_clip_checkpoint(ckpt), want)
    state2 = {k: v for k, v in te2.state_dict().items() if "position_ids" not in k}
    for fid, component, root in (("sd2", "text_encoder", "cond_stage_model.model."),
                                 ("sdxl", "text_encoder_2", "conditioner.embedders.1.model.")):  # fmt: skip
        # SD 2.x's encoder is a CLIPTextModel: diffusers ignores the checkpoint's text_projection there
        want2 = {k: v for k, v in state2.items() if fid != "sd2" or k != "text_projection.weight"}
        ckpt = to_single_file(family(fid), component, want2)
        assert f"{root}transformer.resblocks.0.attn.in_proj_weight" in ckpt
        same_tensors(convert_open_clip_checkpoint(te2, ckpt, prefix=root), want2)


def test_flux_single_file_names_are_diffusers_own(mf: Any) -> None:
    """BFL names (``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1`` = q, k, v + MLP rows, the final
    modulation's halves swapped), read back by ``convert_flux_transformer_checkpoint_to_diffusers``. That converter
    splits linear1 at Flux.1-dev's own widths (3072 x 3 + 12288): those parts are given those rows here."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    state = dict(fk.flux_model(mf).state_dict())
    inner = fk.FLUX["attention_head_dim"] * fk.FLUX["num_attention_heads"]
    g = torch.Generator().manual_seed(5)
    for i in range(fk.FLUX["num_single_layers"]):
        for name, rows in (("attn.to_q", 3072), ("attn.to_k", 3072), ("attn.to_v", 3072), ("proj_mlp", 12288)):
            key = f"single_transformer_blocks.{i}.{name}"
            state[key + ".weight"] = torch.randn(rows, inner, generator=g)
            state[key + ".bias"] = torch.randn(rows, generator=g)
    ckpt = to_single_file(family("flux1"), "transformer", state)
    assert "double_blocks.0.img_attn.qkv.weight" in ckpt and "single_blocks.0.linear1.weight" in ckpt
    got = convert_flux_transformer_checkpoint_to_diffusers(dict(ckpt))
    same_tensors(got, state)
    ckpt = to_single_file(family("flux1"), "transformer", state, root="model.diffusion_model.")
    same_tensors(convert_flux_transformer_checkpoint_to_diffusers(dict(ckpt)), state)


def test_sd3_single_file_names_are_diffusers_own(mf: Any) -> None:
    """MMDiT names (``joint_blocks.N.x_block.attn.qkv``, SD3.5's ``attn2``, the last context block's and the final
    layer's modulation halves swapped), read back by ``convert_sd3_transformer_checkpoint_to_diffusers``."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    state = dict(fk.sd3_model(mf).state_dict())
    ckpt = to_single_file(family("sd3"), "transformer", state, extra={"pos_embed.pos_embed": "pos_embed"})
    assert "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in ckpt
    same_tensors(convert_sd3_transformer_checkpoint_to_diffusers(dict(ckpt)), state)


@pytest.mark.parametrize("fid", ["sd1", "sd2", "sdxl", "flux1", "sd3"])
def test_every_kohya_name_reads_back_to_its_own_module(fid: str) -> None:
    """No two templates flatten to one kohya name: each link's kohya name (block numbers filled in) reads back as
    that link, in every naming a family reads; in the naming it writes, each diffusers path of a link finds that
    link again (the kohya name is written from it)."""
    fam = family(fid)
    holes = {"i": "1", "j": "2", "k": "3"}
    for part in fam.parts:
        for n, (prefix, space) in enumerate(part.kohya):
            for link in space.links:
                flat = prefix + flatten(fill(link.original, holes))
                hit = fam.kohya_entry(flat)
                assert hit is not None and hit[0] == part and hit[2] == link, flat
                for t in link.diffusers if n == 0 else ():
                    back = fam.diffusers_entry(f"{part.component}.{fill(t, holes)}")
                    assert back is not None and back[1] == link, t


@pytest.mark.parametrize(
    ("names", "meta", "want"),
    [
        (["lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_0_mlp_fc1",
          "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"], {}, "sdxl"),
        (["lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_0_mlp_fc1"],
         {"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
        (["lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_0_mlp_fc1"],
         {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
        # SD 1.x and 2.x differ in widths only (their maps agree but for single-file text encoders)
        (["lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1"], {},
         ("sd1", "sd2")),
        (["lora_unet_down_blocks_0_attentions_0_proj_in"], {"ss_base_model_version": "sd_v1"}, "sd1"),
        (["lora_te_text_model_encoder_layers_14_mlp_fc1"], {}, "sd2"),
        (["lora_unet_double_blocks_0_img_attn_qkv", "lora_te1_text_model_encoder_layers_0_mlp_fc1"], {}, "flux1"),
        (["double_blocks.0.processor.qkv_lora1"], {}, "flux1"),
        (["transformer.single_transformer_blocks.0.attn.to_q"], {}, "flux1"),
        (["lora_unet_joint_blocks_0_x_block_attn_qkv"], {}, "sd3"),
        (["transformer.transformer_blocks.0.attn.add_q_proj"], {"modelspec.architecture": "stable-diffusion-3-m"},
         "sd3"),
        (["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "text_encoder_2.text_model.encoder."
          "layers.0.mlp.fc1"], {}, "sdxl"),
        (["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"], {}, "llama"),
        (["lycoris_model_layers_0_self_attn_q_proj"], {}, "llama"),
        (["transformer.h.0.attn.c_attn"], {}, "gpt2"),
        (["model.layers.0.block_sparse_moe.experts.0.w1"], {}, "mixtral"),
    ],
)  # fmt: skip
def test_detection_from_keys_and_metadata(names: list[str], meta: dict[str, str], want: Any) -> None:
    d = detect(names, {}, meta)
    assert d is not None and (d.family == want if isinstance(want, str) else d.candidates == want), d


def test_detection_by_widths_and_disagreement() -> None:
    # SD 1.x, 2.x and SDXL UNets tell apart by the cross-attention width, Flux / SD3 by the hidden size
    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    assert {w: detect([name], {name: (640, w)}).family for w in (768, 1024, 2048)} == {  # type: ignore[union-attr]
        768: "sd1",
        1024: "sd2",
        2048: "sdxl",
    }
    dit = "transformer.transformer_blocks.0.attn.to_q"
    assert detect([dit], {dit: (3072, 3072)}).family == "flux1"  # type: ignore[union-attr]
    assert detect([dit], {dit: (1536, 1536)}).family == "sd3"  # type: ignore[union-attr]
    both = detect(["transformer.transformer_blocks.0.attn.add_q_proj"])
    assert both is not None and both.family is None and set(both.candidates) == {"flux1", "sd3"}
    # metadata that the names contradict is reported, not followed
    d = detect(["lora_unet_double_blocks_0_img_attn_qkv"], {}, {"ss_base_model_version": "sdxl_base_v1-0"})
    assert d is not None and d.family == "flux1" and "metadata says SDXL" in d.note
    # a base's config decides between candidates
    d = detect(["transformer.transformer_blocks.0.attn.add_q_proj"], {}, {},
               {"transformer": {"_class_name": "SD3Transformer2DModel"}})  # fmt: skip
    assert d is not None and d.family == "sd3" and d.source == "keys+config"
