"""Will it load there? What each consumer refuses, or silently gets wrong, and the command that fixes it."""

from __future__ import annotations

from collections.abc import Callable

from ..model import Adapter

CONSUMERS = ("vllm", "tgi", "llama.cpp", "ollama", "diffusers", "comfyui", "mlx")
#: vLLM's default --max-lora-rank
VLLM_DEFAULT_MAX_RANK = 16

Add = Callable[[str, str, str], None]  # severity, message, hint


def _common_llm(a: Adapter, add: Add, who: str) -> None:
    if a.format != "peft":
        add(
            "error",
            f"{who} reads PEFT adapter folders, this is a {a.format} file",
            "loratools convert SRC --to peft -o OUT",
        )
    if a.extras:
        add("error", f"{who} refuses full tensors (modules_to_save / saved embeddings): {', '.join(sorted(a.extras)[:3])}",
            "merge the adapter into the base instead: loratools merge BASE SRC -o OUT")  # fmt: skip
    if any(m.magnitude is not None for m in a.modules.values()):
        add("error", f"{who} cannot serve DoRA adapters", "merge it: loratools merge BASE SRC -o OUT")
    if any(m.bias is not None for m in a.modules.values()):
        add("error", f"{who} refuses LoRA bias tensors (lora_bias=True)", "merge it: loratools merge BASE SRC -o OUT")
    if any(m.kind != "lora" for m in a.modules.values()):
        add("error", f"{who} serves plain LoRA only (found LoHa/LoKr)", "loratools convert SRC --to peft -o OUT")


def _vllm(a: Adapter, add: Add) -> None:
    _common_llm(a, add, "vLLM")
    top = max((m.rank or 0 for m in a.modules.values()), default=0)
    if top > VLLM_DEFAULT_MAX_RANK:
        add("warning", f"rank {top} is above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_RANK}",
            f"start vLLM with --max-lora-rank {top}, or: loratools resize SRC --rank {VLLM_DEFAULT_MAX_RANK} -o OUT")  # fmt: skip


def _tgi(a: Adapter, add: Add) -> None:
    _common_llm(a, add, "TGI")
    if any(m.layer == "embedding" for m in a.modules.values()):
        add("error", "TGI reads only lora_A / lora_B of linear layers (found embedding LoRA)", "merge it instead")


def _llama_cpp(a: Adapter, add: Add, who: str = "llama.cpp") -> None:
    _common_llm(a, add, who)
    mods = list(a.modules.values())
    if any(m.rslora for m in mods):
        add("error", f"{who} applies alpha / r: rsLoRA modules (alpha / sqrt(r)) come out too weak",
            "loratools convert SRC --to gguf --base BASE -o OUT (bakes the scale)")  # fmt: skip
    alphas = {m.alpha for m in mods}
    if len(alphas) > 1:
        add("error", f"{who} stores one alpha for the file: per-module alphas would be mis-scaled",
            "loratools convert SRC --to gguf --base BASE -o OUT (bakes the differences)")  # fmt: skip


def _diffusers(a: Adapter, add: Add) -> None:
    if a.format == "peft":
        add("error", "diffusers pipelines load diffusers or kohya files, this is a PEFT folder",
            "loratools convert SRC --to diffusers -o OUT")  # fmt: skip
    if any(m.kind in ("loha", "lokr", "full") for m in a.modules.values()):
        add("error", "diffusers' LoRA loader reads LoRA only (found LyCORIS LoHa/LoKr/full modules)",
            "loratools convert SRC --to diffusers -o OUT (exact through the dense delta)")  # fmt: skip
    if a.extras:
        add("error", "diffusers files cannot carry full tensors", "merge them into the base instead")


def _comfyui(a: Adapter, add: Add) -> None:
    if a.format == "peft":
        add("error", "ComfyUI loads single .safetensors LoRA files, this is a PEFT folder",
            "loratools convert SRC --to kohya -o OUT")  # fmt: skip
    if any(m.rslora for m in a.modules.values()):
        add(
            "error",
            "ComfyUI applies alpha / r: rsLoRA modules come out too weak",
            "loratools convert SRC --to kohya -o OUT",
        )
    if any(m.magnitude is not None and m.dora_axis == "in" for m in a.modules.values()):
        add("warning", "dora_scale per input column: ComfyUI infers the axis from the shape; check the result", "")


def _mlx(a: Adapter, add: Add) -> None:
    """mlx-lm's ``load_adapters``: its own folder layout, LoRA or DoRA on linear and embedding layers (one rank and
    one scale, which convert arranges), nothing else."""
    mods = list(a.modules.values())
    if a.format != "mlx":
        add("error", f"mlx-lm reads its own adapter folders (adapters.safetensors), this is a {a.format} adapter",
            "loratools convert SRC --to mlx -o OUT")  # fmt: skip
    if a.extras:
        add("error", f"mlx-lm adapters hold no full tensors (modules_to_save / saved embeddings): "
            f"{', '.join(sorted(a.extras)[:3])}", "merge the adapter into the base instead: loratools merge BASE SRC -o OUT")  # fmt: skip
    if any(m.kind != "lora" or "mid" in m.factors for m in mods):
        add("error", "mlx-lm's adapters are LoRA or DoRA only (found LoHa/LoKr/Tucker)",
            "loratools convert SRC --to mlx -o OUT (LoRA through the exact dense delta)")  # fmt: skip
    if any(m.layer == "conv" for m in mods):
        add("error", "mlx-lm has no conv LoRA layers", "merge it instead: loratools merge BASE SRC -o OUT")
    if any(m.bias is not None for m in mods):
        add("error", "mlx-lm's LoRA layers have no bias (lora_bias=True)", "merge it: loratools merge BASE SRC -o OUT")
    if len({m.magnitude is not None for m in mods}) > 1:
        add(
            "error",
            "mlx-lm adapters are all DoRA or all LoRA (fine_tune_type)",
            "merge it: loratools merge BASE SRC -o OUT",
        )
    if a.format == "mlx" and (len({m.rank for m in mods}) > 1 or len({m.scale for m in mods}) > 1):
        add("error", "mlx-lm builds every layer with the config's one rank and scale: these modules differ",
            "loratools convert SRC --to mlx -o OUT (pads ranks, folds scales)")  # fmt: skip


RULES: dict[str, Callable[[Adapter, Add], None]] = {
    "vllm": _vllm,
    "tgi": _tgi,
    "llama.cpp": _llama_cpp,
    "ollama": lambda a, add: _llama_cpp(a, add, "Ollama (llama.cpp)"),
    "diffusers": _diffusers,
    "comfyui": _comfyui,
    "mlx": _mlx,
}
