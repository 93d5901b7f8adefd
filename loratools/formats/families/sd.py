"""SD 1.x, SD 2.x and SDXL.

kohya's SD 1.x / 2.x LoRAs flatten the diffusers UNet paths (``lora_unet_down_blocks_0_attentions_0_...``);
its SDXL LoRAs flatten the SGM paths of single-file checkpoints (``lora_unet_input_blocks_4_1_...``), which
diffusers maps with ``_maybe_map_sgm_blocks_to_diffusers`` and the UNet config. Both namings are read for every
UNet (some tools write the other one); kohya's own is written. Text encoders: ``lora_te_`` (SD 1.x/2.x; diffusers'
kohya writer says ``lora_te1_``), ``lora_te1_`` CLIP-L and ``lora_te2_`` OpenCLIP-bigG (SDXL), always named by
transformers' CLIP paths with ``text_model.``. Single files keep SD 1.x's CLIP under ``cond_stage_model.
transformer.``, SD 2.x's OpenCLIP under ``cond_stage_model.model.``, SDXL's under ``conditioner.embedders.0.
transformer.`` and ``conditioner.embedders.1.model.`` (single_file_utils.py: ``LDM_CLIP_PREFIX_TO_REMOVE``,
``convert_open_clip_checkpoint``).
"""

from __future__ import annotations

from .core import Space
from .family import Family, Part
from .text import CLIP, OPEN_CLIP
from .unet import SD_LAYOUT, SDXL_LAYOUT, UNetLayout, diffusers_links, sgm_links

UNET_ROOT = "model.diffusion_model."


def _unet(layout: UNetLayout, sgm_first: bool) -> Part:
    sgm, ids = Space(sgm_links(layout)), Space(diffusers_links())
    kohya = (("lora_unet_", sgm), ("lora_unet_", ids)) if sgm_first else (("lora_unet_", ids), ("lora_unet_", sgm))
    return Part("unet", kohya, (UNET_ROOT,), sgm)


def sd1(layout: UNetLayout | None = None) -> Family:
    clip = Space(CLIP)
    return Family(
        "sd1",
        "SD 1.x",
        (
            _unet(layout or SD_LAYOUT, False),
            Part(
                "text_encoder",
                (("lora_te_", clip), ("lora_te1_", clip)),
                ("cond_stage_model.transformer.",),
                clip,
                True,
            ),
        ),  # fmt: skip
        aliases=("sd_v1", "stable-diffusion-v1", "sd1"),
    )


def sd2(layout: UNetLayout | None = None) -> Family:
    clip = Space(CLIP)
    return Family(
        "sd2",
        "SD 2.x",
        (
            _unet(layout or SD_LAYOUT, False),
            Part(
                "text_encoder",
                (("lora_te_", clip), ("lora_te1_", clip)),
                ("cond_stage_model.model.",),
                Space(OPEN_CLIP),
                True,
            ),
        ),  # fmt: skip
        aliases=("sd_v2", "stable-diffusion-v2", "sd2"),
    )


def sdxl(layout: UNetLayout | None = None) -> Family:
    clip = Space(CLIP)
    return Family(
        "sdxl",
        "SDXL",
        (
            _unet(layout or SDXL_LAYOUT, True),
            Part("text_encoder", (("lora_te1_", clip),), ("conditioner.embedders.0.transformer.",), clip, True),
            Part("text_encoder_2", (("lora_te2_", clip),), ("conditioner.embedders.1.model.",), Space(OPEN_CLIP), True),
        ),  # fmt: skip
        aliases=("sdxl", "stable-diffusion-xl"),
    )
