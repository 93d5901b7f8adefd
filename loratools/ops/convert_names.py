"""The names a conversion gives: a plan of renames, splits and fusions, from the family's name tables.

kohya names go to diffusers paths (and back) through the table of the model family the adapter is for
(:mod:`loratools.formats.families`): SDXL's SGM blocks, Flux's fused ``qkv`` / ``linear1``, SD3's joint blocks,
the text encoders with transformers 4's ``text_model.``. A module the table does not know is refused, naming it.
Adapters of no image family (LLM LyCORIS networks, ``lycoris_model_layers_...``) keep the generic rule: kohya's
flattened names resolved against ``--base`` or the identifier table of :mod:`loratools.formats.names`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import IncompatibleAdaptersError, ShapeError
from ..formats.families import (
    BUILDERS,
    Detection,
    Family,
    Plan,
    Step,
    detect,
    family,
    plan_from_kohya,
    plan_to_kohya,
    single_file_location,
)
from ..formats.names import component_of, from_kohya, split_kohya, to_kohya
from ..io.checkpoint import read_config
from ..model import Adapter
from ..model.components import COMPONENTS

SAI_PREFIXES = ("model.diffusion_model.", "cond_stage_model.", "conditioner.embedders.")
DIFFUSERS_COMPONENTS = frozenset(COMPONENTS)
Configs = Mapping[str, Mapping[str, Any]]


def detect_adapter(adapter: Adapter, configs: Configs | None = None) -> Detection | None:
    """What ``adapter`` is for: its module names and shapes, its metadata, a base's configs."""
    shapes = {n: m.weight_shape() for n, m in adapter.modules.items()}
    return detect(list(adapter.modules), shapes, adapter.metadata, configs)


def is_image(det: Detection | None) -> bool:
    return det is not None and (det.family in BUILDERS or bool(det.candidates))


def _planned(hit: tuple[Plan, Family] | None, det: Detection, what: str) -> tuple[Plan, Family]:
    """The plan, or the refusal that names what is missing."""
    if hit is None:
        raise IncompatibleAdaptersError(
            f"cannot tell which model these modules are for ({det.title}), and their {what} names differ",
            "pass --base with the base model (a diffusers folder or component: its config.json tells which)",
        )
    plan, fam = hit
    if plan.unresolved:
        n = len(plan.unresolved)
        raise ShapeError(
            f"{n} module(s) are not modules of {fam.title} that loratools can name in {what}: "
            + ", ".join(plan.unresolved[:5])
            + (" ..." if n > 5 else ""),
            "a name that cannot be mapped is never guessed. A UNet's block numbers come from its config: pass --base "
            "with the base model (a diffusers folder); otherwise keep the source format, or remove these modules",
        )
    return plan, fam


def dotted_paths(adapter: Adapter) -> dict[str, str]:
    """Source name -> diffusers path with its component (a PEFT adapter of a UNet or transformer gets one)."""
    names = list(adapter.modules)
    if adapter.format != "peft" or not names:
        return {n: n for n in names}
    comp = component_of(names)
    return {n: f"{comp}.{n}" for n in names} if comp else {n: n for n in names}


def plan_names(
    adapter: Adapter, to: str, base_names: list[str] | None = None, configs: Configs | None = None
) -> list[Step]:
    """Every module's move into the target format's names."""
    names = list(adapter.modules)
    det = detect_adapter(adapter, configs)
    unet = (configs or {}).get("unet")
    shapes = {n: m.weight_shape() for n, m in adapter.modules.items()}
    if to == "kohya":
        if adapter.format == "kohya":
            return [Step((n,), (n,)) for n in names]
        dotted = dotted_paths(adapter)
        if is_image(det) and det is not None:
            back = {d: s for s, d in dotted.items()}
            plan, _ = _planned(plan_to_kohya(det, list(back), {dotted[n]: s for n, s in shapes.items()}, unet), det,
                               "kohya")  # fmt: skip
            return [Step(tuple(None if s is None else back[s] for s in st.sources), st.targets, st.split, st.swap)
                    for st in plan.steps]  # fmt: skip
        return [Step((n,), (n if adapter.format == "kohya" else to_kohya(n),)) for n in names]
    if adapter.format == "kohya":
        if is_image(det) and det is not None:
            steps = _planned(plan_from_kohya(det, names, shapes, unet), det, "diffusers")[0].steps
        else:
            steps = [Step((k,), (d,)) for k, d in _legacy_from_kohya(names, base_names, to).items()]
    else:
        steps = [Step((n,), (n,)) for n in names]
    return _components(steps, to)


def _legacy_from_kohya(names: list[str], base_names: list[str] | None, to: str) -> dict[str, str]:
    """kohya names of no known image family: against ``base_names``, or by the identifier table."""
    found, missing = from_kohya(names, base_names)
    if missing:
        raise ShapeError(
            f"{len(missing)} kohya name(s) cannot be turned back into module paths: {', '.join(missing[:5])}",
            "pass --base with the base model (folder or .safetensors) to resolve them against its real names",
        )
    sai = [d for d in found.values() if d.startswith(SAI_PREFIXES)]
    if sai and to in ("diffusers", "peft", "gguf"):
        raise IncompatibleAdaptersError(
            f"{len(sai)} module(s) resolve to single-file (SAI) checkpoint paths such as {sai[0]}, and the module "
            "names tell no model family whose table would map them",
            "resolve against the diffusers version of the base (its folder), or keep the kohya format",
        )
    out = {}
    for kohya, path in found.items():
        comp, _ = split_kohya(kohya)
        if comp and path.split(".")[0] not in DIFFUSERS_COMPONENTS:
            path = f"{comp}.{path}"  # resolved against one component's folder: put the component back
        out[kohya] = path
    return out


def _components(steps: list[Step], to: str) -> list[Step]:
    """The component part of the targets: stripped for PEFT and GGUF (one model), found for diffusers."""
    targets = [t for st in steps for t in st.targets]
    comps = {t.split(".")[0] for t in targets}
    if to in ("peft", "gguf") and comps <= DIFFUSERS_COMPONENTS:
        if len(comps) > 1:
            raise IncompatibleAdaptersError(
                f"a PEFT adapter holds one model; this one has {', '.join(sorted(comps))}",
                "convert to diffusers or kohya, which keep components",
            )
        return [Step(st.sources, tuple(t.partition(".")[2] for t in st.targets), st.split, st.swap) for st in steps]
    if to == "diffusers" and not comps <= DIFFUSERS_COMPONENTS:
        component = component_of(targets)
        if component is None:
            raise IncompatibleAdaptersError(
                "cannot tell which diffusers component (unet, transformer, text_encoder) these modules belong to",
                "diffusers files are for diffusion pipelines; convert LLM adapters to peft, kohya or gguf",
            )
        return [Step(st.sources, tuple(f"{component}.{t}" for t in st.targets), st.split, st.swap) for st in steps]
    return steps


def module_paths(adapter: Adapter, base_names: list[str] | None, configs: Configs | None) -> dict[str, str]:
    """Source name -> diffusers path (or the base's own path, for names of no known family), where one is known:
    what a base's shapes are looked up by."""
    if adapter.format != "kohya":
        return dotted_paths(adapter)
    det = detect_adapter(adapter, configs)
    if is_image(det):
        shapes = {n: m.weight_shape() for n, m in adapter.modules.items()}
        hit = plan_from_kohya(det, list(adapter.modules), shapes, (configs or {}).get("unet"))
        return {st.sources[0]: st.targets[0] for st in hit[0].steps if len(st.targets) == 1} if hit else {}  # type: ignore[misc]
    if base_names is None:
        return {}
    return from_kohya(list(adapter.modules), base_names)[0]


def base_shape(path: str, base_shapes: Mapping[str, tuple[int, ...]], det: Detection | None) -> tuple[int, ...] | None:
    """The shape of module ``path``'s weight in a base: under its own name, without its component (a component
    folder), in the family's single-file checkpoint, or as the one base name that ends with it."""
    comp, dot, rel = path.partition(".")
    for cand in (path + ".weight", rel + ".weight" if dot and comp in DIFFUSERS_COMPONENTS else None):
        if cand and cand in base_shapes:
            return tuple(base_shapes[cand])
    if det is not None and det.family in BUILDERS:
        loc = single_file_location(family(det.family), path + ".weight", (1, 1))
        if loc is not None and loc.rows is None and loc.key in base_shapes:
            return tuple(base_shapes[loc.key])
    ends = [n for n in base_shapes if n.endswith("." + path + ".weight")]
    return tuple(base_shapes[ends[0]]) if len(ends) == 1 else None


#: diffusers model classes whose config numbers a component's blocks
CONFIG_COMPONENTS = {"UNet2DConditionModel": "unet", "FluxTransformer2DModel": "transformer",
                     "SD3Transformer2DModel": "transformer"}  # fmt: skip


def base_configs(base: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The configs of a diffusers base by component: a pipeline folder's ``model_index.json`` and its ``unet/`` and
    ``transformer/`` configs, or a component folder's (or a file's folder's) own ``config.json``."""
    p = Path(base)
    folder = p if p.is_dir() else p.parent
    out: dict[str, dict[str, Any]] = {}
    pipeline = read_config(folder, "model_index.json")
    if pipeline is not None:
        out["model_index"] = pipeline
    for component in ("unet", "transformer"):
        if (folder / component).is_dir():
            cfg = read_config(folder / component)
            if cfg is not None:
                out[component] = cfg
    own = read_config(folder)
    if own is not None and str(own.get("_class_name")) in CONFIG_COMPONENTS:
        out.setdefault(CONFIG_COMPONENTS[str(own["_class_name"])], own)
    return out


#: where sd-scripts builds LoRA modules, by family and component (diffusers paths): networks/lora.py under a UNet's
#: ``Transformer2DModel``, ``ResnetBlock2D``, ``Downsample2D`` and ``Upsample2D`` blocks (diffusers' down / mid / up
#: blocks); networks/lora_flux.py under Flux's ``DoubleStreamBlock`` / ``SingleStreamBlock`` and, from a file, its
#: in-layers (img_in, txt_in, time_in, vector_in, guidance_in), not its final layer; networks/lora_sd3.py under the
#: MMDiT's ``SingleDiTBlock`` (each joint block's x_block and context_block) and, from a file (``emb_dims = [0] * 6``),
#: its embedders and final layer: every Linear of SD3 that loratools names
SD_SCRIPTS_BLOCKS: dict[str, dict[str, tuple[str, ...]]] = {
    "sd1": {"unet": ("down_blocks.", "mid_block.", "up_blocks.")},
    "flux1": {"transformer": ("transformer_blocks.", "single_transformer_blocks.", "x_embedder", "context_embedder",
                              "time_text_embed.")},
    "sd3": {"transformer": ("transformer_blocks.", "pos_embed.proj", "context_embedder", "time_text_embed.",
                            "proj_out", "norm_out.linear")},
}  # fmt: skip
SD_SCRIPTS_BLOCKS["sd2"] = SD_SCRIPTS_BLOCKS["sdxl"] = SD_SCRIPTS_BLOCKS["sd1"]
#: the text encoders' modules sd-scripts builds: every Linear under transformers' ``CLIPAttention`` / ``CLIPMLP``
#: and (lora_flux.py, lora_sd3.py: ``lora_te3``) T5's ``T5Attention`` / ``T5DenseGatedActDense``
SD_SCRIPTS_TEXT = re.compile(r"\.(self_attn|mlp)\.|\.SelfAttention\.[qkvo]$|\.DenseReluDense\.(wi_0|wi_1|wo)$")


def outside_sd_scripts(adapter: Adapter, steps: list[Step], configs: Configs | None = None) -> list[str]:
    """The kohya names of an SD 1.x / 2.x / SDXL / Flux.1 / SD3 adapter's modules that sd-scripts builds no LoRA
    module for (its loader drops them; ComfyUI and A1111 read them): the UNet's conv_in, time and added embeddings,
    conv_out, Flux's final layer, a text encoder's embeddings and projection."""
    det = detect_adapter(adapter, configs)
    if det is None or det.family not in SD_SCRIPTS_BLOCKS:
        return []
    blocks_of = SD_SCRIPTS_BLOCKS[det.family]
    paths = dotted_paths(adapter)
    out = []
    for st in steps:
        for s in st.sources:
            if s is None:
                continue
            comp, _, rel = paths.get(s, s).partition(".")
            blocks = blocks_of.get(comp)
            inside = rel.startswith(blocks) if blocks else SD_SCRIPTS_TEXT.search(rel) is not None
            if not inside:
                out.append(st.targets[0])
                break
    return out
