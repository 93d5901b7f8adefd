"""Module names between formats: kohya flattens dots to underscores, so going back needs the real names.

Two ways back, both refusing rather than guessing:

* against a base model's own tensor names (``--base``): every base module, flattened the kohya way, is a key;
* without a base, by a table of the identifiers that themselves contain underscores (``down_blocks``,
  ``self_attn``, ``q_proj``, ...): a flattened name is split at underscores and re-joined greedily into known
  identifiers; a name with any part the table does not know is not resolved (the caller lists it).
"""

from __future__ import annotations

import re

from ..errors import ShapeError
from ..model.components import COMPONENT_KOHYA
from ..model.components import KOHYA_COMPONENTS as KOHYA_COMPONENTS  # io.checkpoint reads it from here (for now)

#: identifiers with underscores in them, from the module trees of diffusers UNets and DiTs, CLIP/T5 text
#: encoders and the common transformers LLMs
COMPOUNDS = [
    "down_blocks",
    "up_blocks",
    "mid_block",
    "transformer_blocks",
    "single_transformer_blocks",
    "temporal_transformer_blocks",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "to_add_out",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_qkv",
    "proj_in",
    "proj_out",
    "proj_mlp",
    "ff_context",
    "conv_in",
    "conv_out",
    "conv_shortcut",
    "conv_norm_out",
    "time_emb_proj",
    "time_embedding",
    "time_embed",
    "linear_1",
    "linear_2",
    "context_embedder",
    "x_embedder",
    "time_text_embed",
    "timestep_embedder",
    "text_embedder",
    "guidance_embedder",
    "norm_out",
    "norm_1",
    "norm_2",
    "norm1_context",
    "norm_added_q",
    "norm_added_k",
    "text_model",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "out_proj",
    "qkv_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj",
    "embed_tokens",
    "lm_head",
    "final_layer_norm",
    "layer_norm1",
    "layer_norm2",
    "input_layernorm",
    "post_attention_layernorm",
    "token_embedding",
    "position_embedding",
    "shared_experts",
    "w1",
    "w2",
    "w3",
    "c_attn",
    "c_proj",
    "c_fc",
    "wte",
    "wpe",
    "ln_1",
    "ln_2",
    "ln_f",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "query_key_value",
]
SIMPLE = [
    "model",
    "layers",
    "layer",
    "mlp",
    "attn",
    "attn1",
    "attn2",
    "attn3",
    "ff",
    "net",
    "proj",
    "norm",
    "norm1",
    "norm2",
    "norm3",
    "attentions",
    "resnets",
    "conv",
    "conv1",
    "conv2",
    "downsamplers",
    "upsamplers",
    "encoder",
    "decoder",
    "transformer",
    "h",
    "blocks",
    "block",
    "experts",
    "gate",
    "fc1",
    "fc2",
    "dense",
    "wo",
    "wi",
    "wq",
    "wk",
    "wv",
    "query",
    "key",
    "value",
    "output",
    "input",
]


def _compound_table() -> dict[str, list[list[str]]]:
    by_first: dict[str, list[list[str]]] = {}
    for c in COMPOUNDS:
        parts = c.split("_")
        by_first.setdefault(parts[0], []).append(parts)
    for v in by_first.values():
        v.sort(key=len, reverse=True)
    return by_first


_TABLE = _compound_table()
_KNOWN = set(SIMPLE) | set(COMPOUNDS)


#: module leaves that are nn.Linear in every diffusers and transformers model that has them (attention and MLP
#: projections): a flattened LoHa/LoKr module on one of these is a linear layer, whatever base it was made for
LINEAR_LEAVES = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "fc1", "fc2", "gate_proj", "up_proj", "down_proj",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "time_emb_proj",
)  # fmt: skip


def is_linear_leaf(name: str) -> bool:
    """Whether module ``name`` (dotted, or kohya-flattened) ends in one of :data:`LINEAR_LEAVES`."""
    return any(name.endswith(("." + leaf, "_" + leaf.replace(".", "_"))) or name == leaf for leaf in LINEAR_LEAVES)


def undot(flat: str) -> str | None:
    """``down_blocks_0_attentions_1_proj_in`` -> ``down_blocks.0.attentions.1.proj_in``; None if any part of
    the name is not a known identifier or a number."""
    tokens = flat.split("_")
    out: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        for parts in _TABLE.get(tok, []):
            if tokens[i : i + len(parts)] == parts:
                out.append("_".join(parts))
                i += len(parts)
                break
        else:
            if not (tok.isdigit() or tok in _KNOWN):
                return None
            out.append(tok)
            i += 1
    return ".".join(out)


def split_kohya(name: str) -> tuple[str, str]:
    """``lora_unet_x_y`` -> (``unet``, ``x_y``)."""
    for prefix in sorted(KOHYA_COMPONENTS, key=len, reverse=True):
        if name.startswith(prefix):
            return KOHYA_COMPONENTS[prefix], name[len(prefix) :]
    raise ShapeError(f"{name}: not a kohya module name (lora_unet_..., lora_te_..., lycoris_...)")


#: where a transformers 5 CLIP text model's paths start (``encoder.layers.0.self_attn...``, ``embeddings...``)
CLIP_LAYERS = ("encoder.layers.", "embeddings.", "final_layer_norm")


def to_kohya(name: str, components: bool = True) -> str:
    """A dotted name (``unet.down_blocks.0...`` or, for a whole model, ``model.layers.0...``) in kohya form. A CLIP
    text encoder's path keeps transformers 4's ``text_model.`` level, which kohya consumers expect
    (``lora_te_text_model_encoder_layers_0_...``) and transformers 5 dropped."""
    comp, dot, rest = name.partition(".")
    if components and dot and comp in COMPONENT_KOHYA and comp:
        if comp.startswith("text_encoder") and rest.startswith(CLIP_LAYERS):
            rest = "text_model." + rest
        return COMPONENT_KOHYA[comp] + rest.replace(".", "_")
    return COMPONENT_KOHYA[""] + name.replace(".", "_")


def from_kohya(names: list[str], base_names: list[str] | None = None) -> tuple[dict[str, str], list[str]]:
    """kohya names -> dotted names (with a diffusers component where the prefix names one), and the names
    that could not be resolved. With ``base_names`` (a base checkpoint's tensor names) they are matched
    against the base; otherwise by the identifier table."""
    index = kohya_index(base_names) if base_names is not None else {}
    found: dict[str, str] = {}
    missing: list[str] = []
    for name in names:
        if base_names is not None:
            module = index.get(name)
            if module is None:
                missing.append(name)
            else:
                found[name] = module
            continue
        comp, rest = split_kohya(name)
        path = undot(rest)
        if path is None:
            missing.append(name)
        else:
            found[name] = f"{comp}.{path}" if comp else path
    return found, missing


def component_of(names: list[str]) -> str | None:
    """The diffusers component a set of component-less module paths belongs to, from their first parts."""
    first = {re.split(r"[._]", n, maxsplit=1)[0] for n in names}
    if first <= {"down", "up", "mid", "conv", "time", "down_blocks", "up_blocks", "mid_block"} or any(
        n.startswith(("down_blocks", "up_blocks", "mid_block")) for n in names
    ):
        return "unet"
    if any(n.startswith(("transformer_blocks", "single_transformer_blocks")) for n in names):
        return "transformer"
    if all(n.startswith("text_model") for n in names):
        return "text_encoder"
    return None


# ---- kohya names against a base checkpoint's own tensor names ----------------------------------------------------

#: prefixes of single-file SD/SDXL checkpoints and their kohya names
SINGLE_FILE_PREFIXES = {
    "model.diffusion_model.": "lora_unet_",
    "cond_stage_model.transformer.": "lora_te_",
    "conditioner.embedders.0.transformer.": "lora_te1_",
    "conditioner.embedders.1.model.": "lora_te2_",
}


def _component_prefixes() -> dict[str, tuple[str, ...]]:
    """Component folder prefix ("unet.") -> every kohya prefix that names it, from :data:`KOHYA_COMPONENTS`;
    kohya's own Flux LoRAs call the transformer "unet"."""
    out: dict[str, tuple[str, ...]] = {}
    for kohya, component in KOHYA_COMPONENTS.items():
        if component:
            out[component + "."] = (*out.get(component + ".", ()), kohya)
    out["transformer."] = (*out.get("transformer.", ()), "lora_unet_")
    return out


def kohya_index(names: list[str]) -> dict[str, str]:
    """Flattened kohya/LyCORIS module names -> a base checkpoint's dotted module names (from its tensor names;
    weights only)."""
    out: dict[str, str] = {}
    components = _component_prefixes()
    for name in names:
        if not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        flat = module.replace(".", "_")
        out.setdefault("lycoris_" + flat, module)
        for table in (SINGLE_FILE_PREFIXES, components):
            for prefix, kohya in table.items():
                if module.startswith(prefix):
                    rest = module[len(prefix) :].replace(".", "_")
                    for k in (kohya,) if isinstance(kohya, str) else kohya:
                        out.setdefault(k + rest, module)
                        if k.startswith("lora_te") and not rest.startswith("text_model"):
                            # transformers 5 CLIP text models lost their `text_model.` level; kohya names keep it
                            out.setdefault(k + "text_model_" + rest, module)
        out.setdefault("lora_unet_" + flat, module)
    return out
