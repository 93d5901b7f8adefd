"""Base checkpoints, header only: a safetensors file, a sharded folder (``model.safetensors.index.json``), or a
diffusers pipeline folder (``unet/diffusion_pytorch_model.safetensors``, ``text_encoder/model.safetensors``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import FileFormatError
from . import jsonfile
from .safetensors import Header, TensorInfo, read_header, shown

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
    if p.name.endswith(INDEX_SUFFIX):
        return _sharded(p)  # checked there: a folder or a special file of that name is refused
    if not p.exists():
        raise FileFormatError(f"{p}: no such file or folder")
    if p.is_file():
        return {k: BaseTensor(p, v) for k, v in read_header(p).tensors.items()}
    if not p.is_dir():
        raise FileFormatError(f"{p}: not a regular file or folder, expected a checkpoint")
    comps = [c for c in COMPONENTS if (p / c).is_dir()]
    if comps and ((p / "model_index.json").is_file() or _weights_in(p) is None):
        out: dict[str, BaseTensor] = {}
        for comp in comps:
            for k, v in base_tensors(p / comp).items():
                out[f"{comp}.{k}"] = v
        return out
    return base_tensors(_weights_in(p) or p / "model.safetensors")


def _weights_in(folder: Path) -> Path | None:
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
    if len(indexes) > 1:
        raise FileFormatError(
            f"{folder}: several safetensors index files ({', '.join(i.name for i in indexes[:3])})",
            "keep one, or name the index to read",
        )
    if indexes:
        return indexes[0]
    found = sorted(folder.glob("*.safetensors"))
    if len(found) > 1:
        raise FileFormatError(f"{folder}: several .safetensors files and no index", "name the file")
    if found:
        return found[0]
    if any(folder.glob("*.bin")):
        raise FileFormatError(f"{folder}: only pickle weights", "loratools reads base checkpoints as safetensors")
    return None


def shard_inside(name: str) -> bool:
    """A shard name from an index stays in its folder: relative, no ``..`` (symlinks are fine: the Hub's cache
    is made of them)."""
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name and "\0" not in name


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a safetensors index, checked: a JSON object (see :mod:`.jsonfile`) whose
    ``weight_map`` maps tensor names to shard file names inside the index's folder, and whose ``metadata``, when
    present, is an object."""
    doc = jsonfile.load_object(index, what="safetensors index")
    if "weight_map" not in doc:
        raise FileFormatError(f"{index.name}: a safetensors index without a weight_map", "is it an index?")
    weight_map = doc["weight_map"]
    if not isinstance(weight_map, dict):
        raise FileFormatError(
            f"{index.name}: weight_map must be an object of tensor name -> shard file, "
            f"this is {jsonfile.kind(weight_map)}"
        )
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise FileFormatError(
                f"{index.name}: weight_map gives tensor {shown(name)} {jsonfile.kind(shard)}, not a shard file name"
            )
    meta = doc.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise FileFormatError(f"{index.name}: metadata must be an object, this is {jsonfile.kind(meta)}")
    outside = sorted({s for s in weight_map.values() if not shard_inside(s)})
    if outside:
        raise FileFormatError(
            f"{index.name} names file(s) outside its folder: {', '.join(shown(s, 80) for s in outside[:3])}",
            "a shard must lie in the model's folder",
        )
    return weight_map


def _sharded(index: Path) -> dict[str, BaseTensor]:
    weight_map = read_index(index)
    headers: dict[str, Header] = {}
    for shard in sorted(set(weight_map.values())):
        path = index.parent / shard
        if not path.exists():
            raise FileFormatError(f"{index.name} names a shard that is missing: {shown(shard, 80)}")
        headers[shard] = read_header(path)
    for name, shard in weight_map.items():
        if name not in headers[shard].tensors:
            raise FileFormatError(
                f"{index.name} puts tensor {shown(name, 80)} in {shown(shard, 80)}, which does not hold it",
                "the index and its shards disagree",
            )
    out: dict[str, BaseTensor] = {}
    for shard, header in headers.items():
        for k, v in header.tensors.items():
            if k in out:
                raise FileFormatError(
                    f"{index.name}: tensor {shown(k, 80)} is in two shards ({out[k].file.name}, {shown(shard, 80)})"
                )
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
