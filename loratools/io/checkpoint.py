"""Base checkpoints, header only: a safetensors file, a sharded folder (``model.safetensors.index.json``), or a
diffusers pipeline folder (``unet/diffusion_pytorch_model.safetensors``, ``text_encoder/model.safetensors``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import FileFormatError
from .safetensors import TensorInfo, read_header

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "controlnet")
INDEX_SUFFIX = ".safetensors.index.json"


@dataclass
class BaseTensor:
    file: Path
    info: TensorInfo

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape


def base_tensors(path: str | os.PathLike[str]) -> dict[str, BaseTensor]:
    """Every tensor of a base checkpoint by name; diffusers components get their folder as a prefix
    (``unet.down_blocks.0...``)."""
    p = Path(path)
    if not p.exists():
        raise FileFormatError(f"{p}: no such file or folder")
    if p.is_file():
        if p.name.endswith(INDEX_SUFFIX):
            return _sharded(p)
        return {k: BaseTensor(p, v) for k, v in read_header(p).tensors.items()}
    comps = [c for c in COMPONENTS if (p / c).is_dir()]
    if comps and ((p / "model_index.json").is_file() or _weights_in(p) is None):
        out: dict[str, BaseTensor] = {}
        for comp in comps:
            for k, v in base_tensors(p / comp).items():
                out[f"{comp}.{k}"] = v
        return out
    return base_tensors(_weights_in(p) or p / "model.safetensors")


def _weights_in(folder: Path) -> Path | None:
    for pattern in ("*" + INDEX_SUFFIX, "*.safetensors"):
        found = sorted(folder.glob(pattern))
        if found:
            if len(found) > 1 and pattern == "*.safetensors":
                raise FileFormatError(f"{folder}: several .safetensors files and no index", "name the file")
            return found[0]
    if any(folder.glob("*.bin")):
        raise FileFormatError(f"{folder}: only pickle weights", "loratools reads base checkpoints as safetensors")
    return None


def _sharded(index: Path) -> dict[str, BaseTensor]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FileFormatError(f"{index}: not a safetensors index ({e})") from None
    out: dict[str, BaseTensor] = {}
    for shard in sorted(set(weight_map.values())):
        from ..ops.merge import _inside

        if not _inside(shard):
            raise FileFormatError(f"{index.name} names a file outside its folder: {shard}")
        header = read_header(index.parent / shard)
        for k, v in header.tensors.items():
            out[k] = BaseTensor(index.parent / shard, v)
    return out


#: prefixes of single-file SD/SDXL checkpoints and their kohya names
SINGLE_FILE_PREFIXES = {
    "model.diffusion_model.": "lora_unet_",
    "cond_stage_model.transformer.": "lora_te_",
    "conditioner.embedders.0.transformer.": "lora_te1_",
    "conditioner.embedders.1.model.": "lora_te2_",
}


def _component_prefixes() -> dict[str, tuple[str, ...]]:
    """Component folder prefix ("unet.") -> every kohya prefix that names it, from the one table in
    formats.names; kohya's own Flux LoRAs call the transformer "unet"."""
    from ..formats.names import KOHYA_COMPONENTS

    out: dict[str, tuple[str, ...]] = {}
    for kohya, component in KOHYA_COMPONENTS.items():
        if component:
            out[component + "."] = (*out.get(component + ".", ()), kohya)
    out["transformer."] = (*out.get("transformer.", ()), "lora_unet_")
    return out


def kohya_index(names: list[str]) -> dict[str, str]:
    """Flattened kohya/LyCORIS module names -> the base's dotted module names (weights only)."""
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
