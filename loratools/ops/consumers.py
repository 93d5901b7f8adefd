"""Will it load there? What each consumer refuses, or silently gets wrong, and the command that fixes it."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path

from ..model import Adapter
from ..model.components import COMPONENT_RE, KOHYA_COMPONENTS

CONSUMERS = ("vllm", "tgi", "llama.cpp", "ollama", "diffusers", "comfyui")
#: vLLM's default --max-lora-rank
VLLM_DEFAULT_MAX_RANK = 16

Add = Callable[[str, str, str], None]  # severity, message, hint


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


def _common_llm(a: Adapter, add: Add, who: str) -> None:
    if _pipeline(a):  # no conversion makes an image model's adapter servable by a language model server
        add("error", f"{who} serves language models; this {a.format} adapter is for an image pipeline (UNet / "
            "text encoders)", f"load it with diffusers or ComfyUI: loratools validate {src(a)} --for diffusers")  # fmt: skip
        return
    if a.format != "peft":
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


def _vllm(a: Adapter, add: Add) -> None:
    _common_llm(a, add, "vLLM")
    top = max((m.rank or 0 for m in a.modules.values()), default=0)
    if top > VLLM_DEFAULT_MAX_RANK:
        add("warning", f"rank {top} is above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_RANK}",
            f"start vLLM with --max-lora-rank {top}, or: loratools resize {src(a)} --rank {VLLM_DEFAULT_MAX_RANK} "
            f"-o {out(a, f'-r{VLLM_DEFAULT_MAX_RANK}')}")  # fmt: skip


def _tgi(a: Adapter, add: Add) -> None:
    _common_llm(a, add, "TGI")
    if any(m.layer == "embedding" for m in a.modules.values()):
        add("error", "TGI reads only lora_A / lora_B of linear layers (found embedding LoRA)", "merge it instead")


def _llama_cpp(a: Adapter, add: Add, who: str = "llama.cpp") -> None:
    _common_llm(a, add, who)
    mods = list(a.modules.values())
    if any(m.rslora for m in mods):
        add("error", f"{who} applies alpha / r: rsLoRA modules (alpha / sqrt(r)) come out too weak",
            f"loratools convert {src(a)} --to gguf --base {base(a)} -o {out(a, '.gguf')} (bakes the scale)")  # fmt: skip
    alphas = {m.alpha for m in mods}
    if len(alphas) > 1:
        add("error", f"{who} stores one alpha for the file: per-module alphas would be mis-scaled",
            f"loratools convert {src(a)} --to gguf --base {base(a)} -o {out(a, '.gguf')} (bakes the differences)")  # fmt: skip


def _diffusers(a: Adapter, add: Add) -> None:
    if a.format == "peft":
        add("error", "diffusers pipelines load diffusers or kohya files, this is a PEFT folder",
            f"loratools convert {src(a)} --to diffusers -o {out(a, '-diffusers.safetensors')}")  # fmt: skip
    if any(m.kind in ("loha", "lokr", "full") for m in a.modules.values()):
        add("error", "diffusers' LoRA loader reads LoRA only (found LyCORIS LoHa/LoKr/full modules)",
            f"loratools convert {src(a)} --to diffusers -o {out(a, '-lora.safetensors')} (exact through the dense delta)")  # fmt: skip
    if a.extras:
        add("error", "diffusers files cannot carry full tensors", "merge them into the base instead")


def _comfyui(a: Adapter, add: Add) -> None:
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


RULES: dict[str, Callable[[Adapter, Add], None]] = {
    "vllm": _vllm,
    "tgi": _tgi,
    "llama.cpp": _llama_cpp,
    "ollama": lambda a, add: _llama_cpp(a, add, "Ollama (llama.cpp)"),
    "diffusers": _diffusers,
    "comfyui": _comfyui,
}
