"""Base checkpoints, header only: the one reader behind every command that takes a model (merge, extract,
``convert --base``, diff, ``validate --base``).

A checkpoint is a safetensors file; a model folder holding one ``.safetensors`` file, or an index
(``model.safetensors.index.json``) and the shards it names; such an index named directly; or a diffusers pipeline
folder (``model_index.json``) whose component folders (``unet/``, ``text_encoder/``, ...) are each a model folder,
their tensors named with the component as a prefix (``unet.down_blocks.0...``).

Refused, each with an error that names it: a path that is missing, or neither a regular file nor a folder; a
folder or special file where a weights file is expected (a FIFO is never opened); several index files in one
folder (also when one of them is named); several ``.safetensors`` files and no index; a model folder (or a
pipeline component) with only pickle weights, or no weights; an index whose JSON lies (:func:`read_index`) or
that names no tensors; a shard that is missing or that is not a safetensors file; a tensor the index puts in a
shard that does not hold it; a tensor in two shards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import FileFormatError, LoratoolsError
from ..model import TensorRef
from ..model.components import COMPONENTS
from . import jsonfile
from .safetensors import Header, TensorInfo, read_header, read_scalar, read_tensor, shown

#: the file name ending of a safetensors index (``model.safetensors.index.json``,
#: ``diffusion_pytorch_model.safetensors.index.json``)
INDEX_SUFFIX = ".safetensors.index.json"
#: the most bytes a model's config.json may have (real ones are a few KB; a vision-language config a few hundred)
MAX_CONFIG_BYTES = 4 << 20


@dataclass(frozen=True)
class BaseTensor:
    file: Path  # the weights file that holds it
    info: TensorInfo  # its entry in that file's header (``info.name`` is its key there, without the prefix)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    def ref(self) -> TensorRef:
        """The tensor, loaded when asked for."""
        path, info = self.file, self.info
        return TensorRef(info.shape, info.dtype, lambda: read_tensor(path, info), lambda: read_scalar(path, info))


@dataclass
class WeightFile:
    path: Path  # where to read it
    rel: Path  # relative to the checkpoint's root (the file's own name for a single-file checkpoint)
    prefix: str  # the prefix of its tensors' names ("unet." in a pipeline, else "")
    header: Header


@dataclass
class Index:
    rel: Path  # relative to the checkpoint's root
    doc: dict[str, Any]  # the whole document, checked by read_index (its weight_map agrees with the shards)


@dataclass
class Checkpoint:
    root: Path  # the model folder, or the single file
    single_file: bool
    files: list[WeightFile]  # in order: components in COMPONENTS order, shards in name order
    indexes: list[Index] = field(default_factory=list)
    #: every tensor by its full name (with the component prefix), in file order then header order
    tensors: dict[str, BaseTensor] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(wf.header.file_size for wf in self.files)


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a base checkpoint's headers (see the module's docstring for what it can be and what is refused)."""
    p = Path(path)
    if p.name.endswith(INDEX_SUFFIX):  # an index named directly (a folder or special file of that name is refused)
        doc = read_index(p)
        _indexes_in(p.parent)  # the only one in its folder: the folder is the model
        shards, index = _sharded(p.parent, Path("."), p.name, doc, "")
        return _checkpoint(p.parent, False, shards, [index])
    if not p.exists():
        raise FileFormatError(f"{p}: no such file or folder")
    if p.is_file():
        return _checkpoint(p, True, [WeightFile(p, Path(p.name), "", read_header(p))], [])
    if not p.is_dir():
        raise FileFormatError(f"{p}: not a regular file or folder, expected a checkpoint")
    comps = [c for c in COMPONENTS if (p / c).is_dir()]
    files: list[WeightFile] = []
    indexes: list[Index] = []
    if comps and ((p / "model_index.json").is_file() or _weights_in(p) is None):
        for comp in comps:
            found, idx = _folder(p, Path(comp), comp + ".")
            files += found
            indexes += idx
    else:
        files, indexes = _folder(p, Path("."), "")
    return _checkpoint(p, False, files, indexes)


def _checkpoint(root: Path, single: bool, files: list[WeightFile], indexes: list[Index]) -> Checkpoint:
    tensors = {wf.prefix + k: BaseTensor(wf.path, v) for wf in files for k, v in wf.header.tensors.items()}
    return Checkpoint(root, single, files, indexes, tensors)


def _indexes_in(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
    if len(indexes) > 1:
        raise FileFormatError(
            f"{folder}: several safetensors index files ({', '.join(shown(i.name, 80) for i in indexes[:3])})",
            "keep one",
        )
    return indexes


def _weights_in(folder: Path) -> Path | None:
    """A model folder's index or its one ``.safetensors`` file; None when it has neither (nor pickle weights)."""
    indexes = _indexes_in(folder)
    if indexes:
        return indexes[0]
    found = sorted(folder.glob("*.safetensors"))
    if len(found) > 1:
        raise FileFormatError(f"{folder}: several .safetensors files and no index", "name the file to read")
    if found:
        return found[0]
    if any(folder.glob("*.bin")):
        raise FileFormatError(f"{folder}: only pickle weights", "loratools reads base checkpoints as safetensors")
    return None


def _folder(root: Path, sub: Path, prefix: str) -> tuple[list[WeightFile], list[Index]]:
    """The weights of one model folder (``root / sub``): its index and shards, or its one file."""
    folder = root / sub
    found = _weights_in(folder)
    if found is None:
        raise FileFormatError(
            f"{folder}: no .safetensors weights found", "loratools reads base checkpoints as safetensors"
        )
    if found.name.endswith(INDEX_SUFFIX):
        files, index = _sharded(root, sub, found.name, read_index(found), prefix)
        return files, [index]
    return [WeightFile(found, sub / found.name, prefix, read_header(found))], []


def _sharded(root: Path, sub: Path, name: str, doc: dict[str, Any], prefix: str) -> tuple[list[WeightFile], Index]:
    """The shards an index names, every one read and checked against the index."""
    folder = root / sub
    weight_map: dict[str, str] = doc["weight_map"]
    shards = sorted(set(weight_map.values()))
    if not shards:
        raise FileFormatError(f"{name}: its weight_map names no tensors", "is the checkpoint complete?")
    missing = [s for s in shards if not (folder / s).exists()]  # a folder or a FIFO: refused by read_header
    if missing:
        raise FileFormatError(
            f"{name} names shard(s) that are missing: {', '.join(shown(s, 80) for s in missing[:3])}"
            + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
        )
    headers = {shard: read_header(folder / shard) for shard in shards}
    for tensor, shard in weight_map.items():
        if tensor not in headers[shard].tensors:
            raise FileFormatError(
                f"{name} puts tensor {shown(tensor, 80)} in {shown(shard, 80)}, which does not hold it",
                "the index and its shards disagree",
            )
    seen: dict[str, str] = {}
    for shard, header in headers.items():
        for k in header.tensors:
            if k in seen:
                raise FileFormatError(
                    f"{name}: tensor {shown(k, 80)} is in two shards ({shown(seen[k], 80)}, {shown(shard, 80)})"
                )
            seen[k] = shard
    files = [WeightFile(folder / s, sub / s, prefix, headers[s]) for s in shards]
    return files, Index(sub / name, doc)


def shard_inside(name: str) -> bool:
    """A shard name from an index stays in its folder: relative, no ``..`` (symlinks are fine: the Hub's cache
    is made of them)."""
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name and "\0" not in name


def read_index(index: Path) -> dict[str, Any]:
    """A safetensors index, checked: a JSON object (see :mod:`.jsonfile`) whose ``weight_map`` maps tensor names
    to shard file names inside the index's folder, and whose ``metadata``, when present, is an object."""
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
    return doc


def read_config(base: str | os.PathLike[str], name: str = "config.json") -> dict[str, Any] | None:
    """A checkpoint's own config (``config.json``, or ``model_index.json`` for a pipeline) from its folder (the
    file's folder for a single file); None when there is none. Read with the one JSON reader: size and depth
    limits, duplicate keys refused, NaN / Infinity allowed (transformers writes them)."""
    p = Path(base)
    cfg = (p if p.is_dir() else p.parent) / name
    if not cfg.exists():
        return None
    return load_config(cfg)


def load_config(cfg: str | os.PathLike[str]) -> dict[str, Any]:
    """A model config file itself (e.g. one fetched from the Hub): a JSON object, read as :func:`read_config`
    reads it."""
    value = jsonfile.load(cfg, what="model config", nonfinite=True, limit=MAX_CONFIG_BYTES)
    if not isinstance(value, dict):
        raise LoratoolsError(f"{cfg}: a {type(value).__name__}, not a JSON object: not a model config")
    return value
