"""Tiny SDXL, Flux.1 and SD3 models built from configs, with PEFT LoRA adapters on them, saved the way diffusers
saves them (``save_lora_weights``) and as base folders whose configs tell loratools which model they are. The
peers' loaders then read what loratools writes (test_families.py). Imports of the peers stay inside functions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import peers_kit as kit
import torch

from loratools.formats.families import single_file_location

SDXL_UNET: dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2, transformer_layers_per_block=(1, 2),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=40,
)  # fmt: skip
FLUX: dict[str, Any] = dict(
    patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
)  # fmt: skip
SD3: dict[str, Any] = dict(
    sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
    pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
)  # fmt: skip

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1", "linear_2"]  # fmt: skip
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                "norm1_context.linear", "norm.linear", "proj_mlp", "proj_out", "x_embedder", "context_embedder",
                "norm_out.linear", "linear_1", "linear_2"]  # fmt: skip
SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
               "norm1_context.linear", "proj_out", "context_embedder", "norm_out.linear", "linear_1", "linear_2",
               "pos_embed.proj"]  # fmt: skip


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def sdxl_models(mf: Any) -> tuple[Any, Any, Any]:
    """(unet, text_encoder, text_encoder_2): SDXL's layout (no attention in the first level, two transformer blocks
    per attention in the second) and its two CLIP text models, tiny."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    _seeded(11)
    with mf._quiet():
        unet = UNet2DConditionModel(**SDXL_UNET).float().eval()
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**mf.CLIP_CONFIG)).float().eval()
    return unet, mf.tiny_clip(), te2


def flux_model(mf: Any) -> Any:
    from diffusers import FluxTransformer2DModel

    _seeded(12)
    with mf._quiet():
        return FluxTransformer2DModel(**FLUX).float().eval()


def sd3_model(mf: Any) -> Any:
    from diffusers import SD3Transformer2DModel

    _seeded(13)
    with mf._quiet():
        return SD3Transformer2DModel(**SD3).float().eval()


def add_lora(mf: Any, model: Any, targets: list[str], seed: int, r: int = 2, alpha: float = 3.0) -> dict[str, Any]:
    """A randomised PEFT LoRA on ``model`` (alpha != r); returns its diffusers metadata."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=True)
    with mf._quiet():
        inject_adapter_in_model(cfg, model, adapter_name="default")
    mf._randomize_peft(model, seed)
    return mf._config_dict_for_metadata(cfg)


def lora_state(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def deltas(model: Any, prefix: str) -> dict[str, torch.Tensor]:
    """Each LoRA layer's delta (PEFT's own ``get_delta_weight``), by ``prefix`` + module path."""
    return {n: kit.delta_of(layer) for n, layer in kit.lora_layers(model, prefix).items()}


def save_base(folder: Path, pipeline: str, **components: Any) -> Path:
    """A diffusers pipeline folder (``model_index.json`` and each component's weights and config)."""
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": pipeline}
    for name, model in components.items():
        model.save_pretrained(folder / name, safe_serialization=True)
        index[name] = ["diffusers" if "diffusers" in type(model).__module__ else "transformers", type(model).__name__]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def unpeft(model: Any) -> None:
    """Take the PEFT adapter off (the model is then a clean base to save or load into)."""
    if getattr(model, "peft_config", None):
        model.delete_adapters("default")


def to_single_file(fam: Any, component: str, state: dict[str, torch.Tensor], root: str | None = None,
                   extra: dict[str, str] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """``state`` (a diffusers component's tensors) under the single-file names :func:`single_file_location` gives,
    fused rows put together. ``extra``: tensors no module table covers (a buffer), by hand."""
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if extra and key in extra:
            out[extra[key]] = t
            continue
        module = key.rsplit(".", 1)[0]
        weight = state.get(module + ".weight", t)
        loc = single_file_location(fam, f"{component}.{key}", tuple(weight.shape), root)
        assert loc is not None, key
        value = t.T if loc.transposed else t
        if loc.swap_halves:
            value = torch.cat(value.chunk(2)[::-1])
        if loc.rows is None:
            assert loc.key not in out, f"{key}: two tensors at {loc.key}"
            out[loc.key] = value
        else:
            assert loc.rows[1] - loc.rows[0] == value.shape[0], key
            pieces.setdefault(loc.key, []).append((loc.rows[0], value))
    for k, parts in pieces.items():
        parts.sort(key=lambda p: p[0])
        row = 0
        for start, v in parts:
            assert start == row, f"{k}: rows {row}..{start} unfilled"
            row += v.shape[0]
        out[k] = torch.cat([v for _, v in parts])
    return out


def single_file(fam: Any, **models: Any) -> dict[str, torch.Tensor]:
    """The models (by component) as one single-file checkpoint of family ``fam``, copies of their weights."""
    out: dict[str, torch.Tensor] = {}
    for component, model in models.items():
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if "position_ids" not in k}
        out |= to_single_file(fam, component, state)
    return out


def diffusers_fused(mixin: Any, mf: Any, lora: Path, **models: Any) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' own ``load_lora_weights`` + ``fuse_lora`` (+ ``unload_lora_weights``, which keeps the fused
    weights) on ``models`` (by component, clean), through a pipeline of those components alone; their weights
    after it, by component."""

    class Pipe(mixin):  # type: ignore[misc,valid-type]
        hf_device_map = None

        def __init__(self) -> None:
            self.components = models
            for name in mixin._lora_loadable_modules:  # the pipeline's other components: absent
                setattr(self, name, models.get(name))

    pipe = Pipe()
    with kit.loads_cleanly():
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="default")
        pipe.fuse_lora(components=list(models))
        pipe.unload_lora_weights()
    return {c: {k: v.detach().clone() for k, v in m.state_dict().items() if "position_ids" not in k}
            for c, m in models.items()}  # fmt: skip


def sdxl_lora(mf: Any, root: Path, seeds: tuple[int, int, int]) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A tiny SDXL saved as a diffusers pipeline folder under ``root``/base, a LoRA on its UNet and both text encoders
    (one seed each) saved by diffusers' own ``save_lora_weights``; returns (base, the LoRA file, its deltas by
    diffusers module path)."""
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin as XL

    unet, te, te2 = sdxl_models(mf)
    base = save_base(root / "base", "StableDiffusionXLPipeline", unet=unet, text_encoder=te, text_encoder_2=te2)
    meta = [
        add_lora(mf, m, t, seed)
        for m, t, seed in zip((unet, te, te2), (UNET_TARGETS, TE_TARGETS, TE_TARGETS), seeds, strict=True)
    ]
    with mf._quiet():
        XL.save_lora_weights(
            str(root / "diffusers"), unet_lora_layers=lora_state(unet), text_encoder_lora_layers=lora_state(te),
            text_encoder_2_lora_layers=lora_state(te2), unet_lora_adapter_metadata=meta[0],
            text_encoder_lora_adapter_metadata=meta[1], text_encoder_2_lora_adapter_metadata=meta[2],
        )  # fmt: skip
    want = deltas(unet, "unet.") | deltas(te, "text_encoder.") | deltas(te2, "text_encoder_2.")
    return base, root / "diffusers" / "pytorch_lora_weights.safetensors", want
