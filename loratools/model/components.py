"""How module paths name the parts of a diffusion pipeline: diffusers' component folders and kohya's prefixes for
them. The one table of each: the readers and writers, the base-checkpoint reader, the merge and the Hub's planning
all take them from here."""

from __future__ import annotations

import re

#: the component folders of a diffusers pipeline that hold adapted weights; a diffusers LoRA file puts them in front
#: of its module paths (``unet.down_blocks.0...``, ``text_encoder_2.text_model...``)
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "controlnet")

#: a module path or key that starts with a component
COMPONENT_RE = re.compile(r"^(" + "|".join(re.escape(c) for c in COMPONENTS) + r")\.")

#: kohya prefix -> diffusers component ("" for a whole model: LyCORIS' generic prefix); SDXL's two text encoders are
#: ``lora_te1_`` and ``lora_te2_``, SD 1.x's one ``lora_te_``
KOHYA_COMPONENTS = {
    "lora_unet_": "unet",
    "lora_transformer_": "transformer",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
    "lycoris_": "",
}


def _writer_prefixes() -> dict[str, str]:
    out: dict[str, str] = {}
    for prefix, component in KOHYA_COMPONENTS.items():
        out.setdefault(component, prefix)  # the first listed is the one written
    return out


#: diffusers component -> the kohya prefix a writer gives it; a whole model (no component) gets ``lycoris_``
COMPONENT_KOHYA = _writer_prefixes()
