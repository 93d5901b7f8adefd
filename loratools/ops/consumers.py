"""Will it load there? What each consumer refuses, or silently gets wrong, and the command that fixes it.

What each rule is based on:

* llama.cpp: ``src/llama-adapter.cpp`` (``llama_adapter_lora_init_impl``) loads a GGUF file whose tensors name the
  model's (``LoRA tensor ... does not exist in base model``) and applies ``alpha / rank`` to each; the names are
  those of ``convert_lora_to_gguf.py``, which takes every module through its architecture's converter class and
  gguf's tensor name map (here :mod:`loratools.formats.gguf.surgery`). Ollama runs llama.cpp; its Modelfile
  ``ADAPTER`` also imports safetensors adapters, for Llama, Mistral and Gemma bases only (``docs/modelfile.md``).
* vLLM: ``vllm/lora/utils.py`` (``get_supported_lora_modules``: "all linear layers support LoRA", plus the model
  class's ``embedding_modules``) and ``lora_model.py`` (``from_local_checkpoint`` refuses a module whose name is
  not among them); embedding and lm_head LoRA are taken only where the model class registers them (not Qwen2/Qwen3:
  vllm-project/vllm#32599, #33234), so they are a warning, not an error.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path

from ..formats.families import BUILDERS, family, plan_from_kohya
from ..formats.gguf import surgery as sg
from ..model import Adapter
from ..model.components import COMPONENT_RE, KOHYA_COMPONENTS
from ..units import few
from .convert_names import detect_adapter, is_image

CONSUMERS = ("vllm", "tgi", "llama.cpp", "ollama", "diffusers", "comfyui", "mlx")
#: vLLM's default --max-lora-rank
VLLM_DEFAULT_MAX_RANK = 16

#: module path components of a multimodal model's encoders and projectors (not its language model)
TOWERS = frozenset({"vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder", "multi_modal_projector",
                    "mm_projector", "audio_tower", "audio_encoder", "audio_model", "vision_embed_tokens"})  # fmt: skip

Add = Callable[[str, str, str], None]  # severity, message, hint
#: a consumer's rule: the adapter, where findings go, the base's transformers architecture (None: no --base)
Rule = Callable[[Adapter, Add, "str | None"], None]


def src(a: Adapter) -> str:
    """The adapter's own path, ready to paste into a shell (SRC when it was not read from one)."""
    return shlex.quote(a.source) if a.source else "SRC"


def out(a: Adapter, tail: str) -> str:
    """An output name made from the adapter's own (in the current folder): ``lora.safetensors`` with ``-peft`` ->
    ``lora-peft``, with ``.gguf`` -> ``lora.gguf``."""
    stem = Path(a.source).stem if a.source else "adapter"
    return shlex.quote(stem + tail)


def base(a: Adapter) -> str:
    """The base model the adapter names when it names one the commands can take (a Hub id owner/name, or a path),
    or BASE."""
    return shlex.quote(a.base_model) if a.base_model and "/" in a.base_model else "BASE"


def _pipeline(a: Adapter) -> bool:
    """An adapter of an image pipeline (UNet, DiT transformer, text encoders): kohya ``lora_unet_`` / ``lora_te_``
    names, or diffusers component paths (not PEFT's, where ``transformer.`` is GPT-2's own)."""
    kohya = tuple(p for p, c in KOHYA_COMPONENTS.items() if c)
    return a.format != "peft" and any(n.startswith(kohya) or COMPONENT_RE.match(n) for n in a.modules)


def _common_llm(a: Adapter, add: Add, who: str, reads: str = "peft") -> bool:
    """The rules every language-model server shares; False when the adapter is an image pipeline's (nothing else
    applies then: no conversion makes it servable)."""
    if _pipeline(a):
        add("error", f"{who} serves language models; this {a.format} adapter is for an image pipeline (UNet / "
            "text encoders)", f"load it with diffusers or ComfyUI: loratools validate {src(a)} --for diffusers")  # fmt: skip
        return False
    if a.format != reads and reads == "peft":  # (llama.cpp's own format message is its rule's)
        add(
            "error",
            f"{who} reads PEFT adapter folders, this is a {a.format} file",
            f"loratools convert {src(a)} --to peft -o {out(a, '-peft')}",
        )
    if a.extras:
        add("error", f"{who} refuses full tensors (modules_to_save / saved embeddings): {', '.join(sorted(a.extras)[:3])}",
            f"merge the adapter into the base instead: loratools merge {base(a)} {src(a)} -o {out(a, '-merged')}")  # fmt: skip
    if any(m.magnitude is not None for m in a.modules.values()):
        add(
            "error",
            f"{who} cannot serve DoRA adapters",
            f"merge it: loratools merge {base(a)} {src(a)} -o {out(a, '-merged')}",
        )
    if any(m.bias is not None for m in a.modules.values()):
        add("error", f"{who} refuses LoRA bias tensors (lora_bias=True)",
            f"merge it: loratools merge {base(a)} {src(a)} -o {out(a, '-merged')}")  # fmt: skip
    if any(m.kind != "lora" for m in a.modules.values()):
        add("error", f"{who} serves plain LoRA only (found LoHa/LoKr)",
            f"loratools convert {src(a)} --to peft -o {out(a, '-lora')}")  # fmt: skip
    return True


def _vllm(a: Adapter, add: Add, arch: str | None = None) -> None:
    if not _common_llm(a, add, "vLLM"):
        return
    conv = [n for n, m in a.modules.items() if m.layer == "conv"]
    if conv:
        add("error", f"vLLM takes LoRA on linear layers and embeddings, not on {len(conv)} conv layer(s): {few(conv, 4)}",
            "leave these modules out (or merge the adapter)")  # fmt: skip
    towers = [n for n in a.modules if TOWERS.intersection(n.split("."))]
    if towers:
        add("warning", f"vLLM takes LoRA on the language model only and ignores {len(towers)} module(s) of the "
            f"vision/audio encoder or projector: {few(towers, 4)}",
            f"merge the adapter into the base to keep them (loratools merge {base(a)} {src(a)} -o {out(a, '-merged')}), "
            f"or leave them out (loratools convert {src(a)} --to peft --exclude PATTERN -o {out(a, '-text')})")  # fmt: skip
    emb = [n for n, m in a.modules.items() if m.layer == "embedding" or n.rsplit(".", 1)[-1] == "lm_head"]
    if emb:
        add("warning", f"vLLM takes LoRA on {few(emb, 3)} only for model classes that register them as "
            "embedding modules (not Qwen2/Qwen3)", "merge these modules into the base if vLLM refuses the adapter")  # fmt: skip
    top = max((m.rank or 0 for m in a.modules.values()), default=0)
    if top > VLLM_DEFAULT_MAX_RANK:
        add("warning", f"rank {top} is above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_RANK}",
            f"start vLLM with --max-lora-rank {top}, or: loratools resize {src(a)} --rank {VLLM_DEFAULT_MAX_RANK} "
            f"-o {out(a, f'-r{VLLM_DEFAULT_MAX_RANK}')}")  # fmt: skip


def _tgi(a: Adapter, add: Add, arch: str | None = None) -> None:
    if not _common_llm(a, add, "TGI"):
        return
    if any(m.layer == "embedding" for m in a.modules.values()):
        add("error", "TGI reads only lora_A / lora_B of linear layers (found embedding LoRA)", "merge it instead")


def _llama_cpp(a: Adapter, add: Add, arch: str | None = None, who: str = "llama.cpp") -> None:
    rules = sg.SURGERY.get(arch) if arch is not None else None
    if arch is not None and rules is None:
        add("error", f"the base is a {arch}: loratools knows llama.cpp's converter rules for {sg.supported()} "
            "only, so no GGUF adapter can be written for it here", "merge the adapter into the base instead, "
            "and convert the merged model with llama.cpp")  # fmt: skip
    if a.format == "gguf":  # read back through the converter's own tables: names, layout and scale are llama.cpp's
        written = a.metadata.get("general.architecture")
        if rules is not None and written != sg.gguf_arch(rules):
            add("error", f"the adapter is for a {written} model and the base is a {arch} "
                f"({sg.gguf_arch(rules)}): llama.cpp refuses it", "give the base the adapter was made for")  # fmt: skip
        if a.extras:
            add("warning", f"{who} skips the norm tensors a merge tool put in this file: {', '.join(sorted(a.extras)[:3])}",
                "merge the adapter into the base to keep them")  # fmt: skip
        return
    if not _common_llm(a, add, who, reads="gguf"):
        return
    fix = f"loratools convert {src(a)} --to gguf --base {base(a)} -o {out(a, '.gguf')}"
    if who == "llama.cpp":
        add("error", f"llama.cpp loads GGUF adapters, this is a {a.format} adapter", fix)
    else:
        add("warning", f"{who} imports safetensors adapters for Llama, Mistral and Gemma bases only; a GGUF "
            "adapter works for every architecture its llama.cpp knows", fix)  # fmt: skip
    if arch is None or rules is not None:
        unknown = [n for n in a.modules if (sg.tensor_of(rules, n) if rules else sg.anywhere(n)) is None]
        where = f"a {arch}" if rules else "the architectures loratools converts for llama.cpp (docs/convert.md)"
        if unknown:
            add("error", f"{len(unknown)} module(s) have no GGUF tensor in {where}: {few(unknown, 4)}",
                "leave them out, or merge the adapter instead")  # fmt: skip
    mods = list(a.modules.values())
    if any(m.rslora for m in mods):
        add("error", f"{who} applies alpha / r: rsLoRA modules (alpha / sqrt(r)) come out too weak",
            f"{fix} (bakes the scale)")  # fmt: skip
    alphas = {m.alpha for m in mods}
    if len(alphas) > 1:
        add("error", f"{who} stores one alpha for the file: per-module alphas would be mis-scaled",
            f"{fix} (bakes the differences)")  # fmt: skip


def _diffusers_names(a: Adapter, add: Add) -> None:
    """Module names no diffusers loader maps onto a model are loaded nowhere (a LoRA that does nothing): what the
    family's tables do not know is an error. diffusers' kohya converters (``lora_conversion_utils``) read SD 1.x /
    SDXL and Flux files; SD3 kohya files it does not read at all."""
    fix = f"loratools convert {src(a)} --to diffusers -o {out(a, '-diffusers.safetensors')} (maps every name it knows, refuses the others)"
    det = detect_adapter(a)
    if not is_image(det) or det is None:
        if a.format in ("kohya", "diffusers"):
            add("error", f"these module names are no diffusion model's that diffusers loads ({few(list(a.modules), 3)})",
                "diffusers pipelines take LoRAs of SD 1.x/2.x, SDXL, Flux.1, SD3 and newer families")  # fmt: skip
        return
    fids = [f for f in ((det.family,) if det.family else det.candidates) if f in BUILDERS]
    if a.format == "diffusers":
        unknown = [n for n in a.modules if not any(family(f).diffusers_entry(n) for f in fids)]
        if unknown:
            add("error", f"{len(unknown)} module(s) name no module of {det.title} that diffusers knows: "
                f"{few(unknown, 3)}", "rewrite the file from its source: " + fix)  # fmt: skip
        return
    if a.format != "kohya":
        return
    hit = plan_from_kohya(det, list(a.modules), {n: m.weight_shape() for n, m in a.modules.items()})
    unknown = hit[0].unresolved if hit else list(a.modules)
    if unknown:
        add("error", f"{len(unknown)} kohya module(s) map to no module of {det.title}: {few(unknown, 3)}", fix)
    elif det.family == "sd3":
        add("error", "diffusers has no converter for kohya SD3 files (lora_unet_joint_blocks_...)", fix)
    elif det.family == "flux1":
        te3 = [n for n in a.modules if n.startswith("lora_te3_")]
        if te3:
            add("error", f"diffusers' kohya Flux converter does not load T5 modules ({few(te3, 3)})", fix)
        top = [n for n in a.modules if n.startswith(("lora_unet_img_in", "lora_unet_txt_in", "lora_unet_time_in",
                                                     "lora_unet_vector_in", "lora_unet_guidance_in"))]  # fmt: skip
        if top:
            add("warning", f"diffusers' kohya Flux converter names the embedders without their `transformer.` "
                f"prefix, and its loader then leaves them out ({few(top, 3)})", fix)  # fmt: skip


def _diffusers(a: Adapter, add: Add, arch: str | None = None) -> None:
    if a.format == "peft":
        add("error", "diffusers pipelines load diffusers or kohya files, this is a PEFT folder",
            f"loratools convert {src(a)} --to diffusers -o {out(a, '-diffusers.safetensors')}")  # fmt: skip
    else:
        _diffusers_names(a, add)
    if any(m.kind in ("loha", "lokr", "full") for m in a.modules.values()):
        add("error", "diffusers' LoRA loader reads LoRA only (found LyCORIS LoHa/LoKr/full modules)",
            f"loratools convert {src(a)} --to diffusers -o {out(a, '-lora.safetensors')} (exact through the dense delta)")  # fmt: skip
    if a.extras:
        add("error", "diffusers files cannot carry full tensors", "merge them into the base instead")


def _comfyui(a: Adapter, add: Add, arch: str | None = None) -> None:
    if a.format == "peft":
        add("error", "ComfyUI loads single .safetensors LoRA files, this is a PEFT folder",
            f"loratools convert {src(a)} --to kohya -o {out(a, '.safetensors')}")  # fmt: skip
    if any(m.rslora for m in a.modules.values()):
        add(
            "error",
            "ComfyUI applies alpha / r: rsLoRA modules come out too weak",
            f"loratools convert {src(a)} --to kohya -o {out(a, '-kohya.safetensors')}",
        )
    if any(m.magnitude is not None and m.dora_axis == "in" for m in a.modules.values()):
        add("warning", "dora_scale per input column: ComfyUI infers the axis from the shape; check the result", "")


def _mlx(a: Adapter, add: Add, arch: str | None = None) -> None:
    """mlx-lm's ``load_adapters``: its own folder layout, LoRA or DoRA on linear and embedding layers (one rank and
    one scale, which convert arranges), nothing else."""
    mods = list(a.modules.values())
    if a.format != "mlx":
        add("error", f"mlx-lm reads its own adapter folders (adapters.safetensors), this is a {a.format} adapter",
            f"loratools convert {src(a)} --to mlx -o {out(a, '-mlx')}")  # fmt: skip
    if a.extras:
        add("error", f"mlx-lm adapters hold no full tensors (modules_to_save / saved embeddings): "
            f"{', '.join(sorted(a.extras)[:3])}", f"merge the adapter into the base instead: loratools merge {base(a)} {src(a)} -o {out(a, '-merged')}")  # fmt: skip
    if any(m.kind != "lora" or "mid" in m.factors for m in mods):
        add("error", "mlx-lm's adapters are LoRA or DoRA only (found LoHa/LoKr/Tucker)",
            f"loratools convert {src(a)} --to mlx -o {out(a, '-mlx')} (LoRA through the exact dense delta)")  # fmt: skip
    if any(m.layer == "conv" for m in mods):
        add(
            "error",
            "mlx-lm has no conv LoRA layers",
            f"merge it instead: loratools merge {base(a)} {src(a)} -o {out(a, '-merged')}",
        )
    if any(m.bias is not None for m in mods):
        add(
            "error",
            "mlx-lm's LoRA layers have no bias (lora_bias=True)",
            f"merge it: loratools merge {base(a)} {src(a)} -o {out(a, '-merged')}",
        )
    if len({m.magnitude is not None for m in mods}) > 1:
        add(
            "error",
            "mlx-lm adapters are all DoRA or all LoRA (fine_tune_type)",
            f"merge it: loratools merge {base(a)} {src(a)} -o {out(a, '-merged')}",
        )
    if a.format == "mlx" and (len({m.rank for m in mods}) > 1 or len({m.scale for m in mods}) > 1):
        add("error", "mlx-lm builds every layer with the config's one rank and scale: these modules differ",
            f"loratools convert {src(a)} --to mlx -o {out(a, '-mlx')} (pads ranks, folds scales)")  # fmt: skip


RULES: dict[str, Rule] = {
    "vllm": _vllm,
    "tgi": _tgi,
    "llama.cpp": _llama_cpp,
    "ollama": lambda a, add, arch: _llama_cpp(a, add, arch, "Ollama (llama.cpp)"),
    "diffusers": _diffusers,
    "comfyui": _comfyui,
    "mlx": _mlx,
}
