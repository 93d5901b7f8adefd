"""Which files of a repo a command needs: loratools' planning, over a checked file list (see :mod:`.filelist`).

An adapter is a PEFT folder's config and weights, a diffusers file, or a folder's one ``.safetensors``; a checkpoint
is a ``.safetensors`` file, a model folder (its config and other small files, its index and the shards it names), or
a diffusers pipeline (``model_index.json`` and its component folders), never weights in formats loratools does not
read. ``read_json`` gives the planner a repo's JSON file (an index) when it must look inside one."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

from ..errors import FileFormatError, HubError, LoratoolsError
from ..io.checkpoint import INDEX_SUFFIX
from ..io.pickle import is_pickle
from ..model.components import COMPONENTS
from ..units import few
from .ids import RepoRef, show

FetchKind = Literal["adapter", "checkpoint", "file"]

#: weights in formats loratools does not read, besides every pickle container (io.pickle's table): never downloaded
#: for a checkpoint
OTHER_WEIGHTS = (".msgpack", ".h5", ".onnx", ".onnx_data", ".gguf", ".tflite", ".ot", ".pb")


@dataclass
class Plan:
    files: list[str]  # paths in the repo to download
    target: str  # what the command reads, relative to the snapshot root ("" for the root folder)


def _split(path: str | None) -> tuple[str, str]:
    folder = (path or "").strip("/")
    return folder, f"{folder}/" if folder else ""


class _Tree:
    """A repo's files by folder, built once, so that a plan never rescans the whole list for each folder."""

    def __init__(self, files: set[str]) -> None:
        self.files: dict[str, list[str]] = {}  # folder ("" for the root) -> the names of its files
        self.dirs: dict[str, list[str]] = {}  # folder -> the names of its sub-folders
        linked: set[str] = set()
        for f in sorted(files):
            folder, _, name = f.rpartition("/")
            self.files.setdefault(folder, []).append(name)
            while folder and folder not in linked:  # each folder is entered in its parent once
                linked.add(folder)
                parent, _, sub = folder.rpartition("/")
                self.dirs.setdefault(parent, []).append(sub)
                folder = parent
        for subs in self.dirs.values():
            subs.sort()

    def has(self, folder: str) -> bool:
        return folder in self.files or folder in self.dirs


def plan_adapter(files: set[str], ref: RepoRef) -> Plan:
    """The adapter files of a repo: a PEFT folder's config and weights, a diffusers file, or the one .safetensors."""
    from ..formats import diffusers, peft

    path = ref.path
    if path is not None and path in files:
        name = PurePosixPath(path).name
        folder, prefix = _split(str(PurePosixPath(path).parent) if "/" in path else "")
        if name in (*peft.WEIGHTS, peft.CONFIG) and f"{prefix}{peft.CONFIG}" in files:
            return plan_adapter(files, RepoRef(ref.repo_id, folder or None))
        return Plan([path], path)
    folder, prefix = _split(path)
    inside = {f[len(prefix) :] for f in files if f.startswith(prefix)}
    if path and not inside:
        raise HubError(f"{ref.repo_id} has no file or folder {path}", "check the path inside the repo")
    top = {f for f in inside if "/" not in f}
    where = f"{ref.repo_id}/{folder}" if folder else ref.repo_id
    if peft.CONFIG in top:
        weights = next((w for w in peft.WEIGHTS if w in top), None)
        if weights is None:
            raise FileFormatError(f"{where}: {peft.CONFIG} but no {' or '.join(peft.WEIGHTS)}")
        return Plan([prefix + peft.CONFIG, prefix + weights], folder)
    if diffusers.FILENAME in top:
        return Plan([prefix + diffusers.FILENAME], prefix + diffusers.FILENAME)
    tensors = sorted(f for f in top if f.endswith(".safetensors"))
    if len(tensors) == 1:
        return Plan([prefix + tensors[0]], prefix + tensors[0])
    if tensors:
        shown = few(tensors, 6)
        raise FileFormatError(
            f"{where} holds {len(tensors)} .safetensors files: {shown}", f"name one: {where}/{tensors[0]}"
        )
    nested = sorted({f.rsplit("/", 1)[0] for f in inside if f.endswith(f"/{peft.CONFIG}")})
    raise FileFormatError(
        f"{where}: no adapter found in this repo" + ("" if not folder else " folder"),
        f"adapters in sub-folders: {', '.join(f'{where}/{n}' for n in nested[:4])}"
        if nested
        else f"expected {peft.CONFIG} (PEFT), {diffusers.FILENAME} (diffusers) or one .safetensors file",
    )


def _variant_of(name: str, names: set[str]) -> bool:
    """``x.fp16.safetensors`` beside ``x.safetensors`` (diffusers variants), or a variant index."""
    if re.search(r"\.safetensors\.index\.[^.]+\.json$", name):
        return True
    m = re.match(r"^(.+?)\.([A-Za-z0-9_]+)\.safetensors$", name)
    return m is not None and f"{m.group(1)}.safetensors" in names


def _not_read(name: str) -> bool:
    """Weights loratools does not read: every pickle container, and the other formats."""
    return is_pickle(name) or name.lower().endswith(OTHER_WEIGHTS)


def shards_of(index: Any, what: str, names: set[str]) -> set[str]:
    """The shard files a ``*.safetensors.index.json`` names, each one a file beside it (in ``names``)."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(index, dict):
        raise FileFormatError(f"{what}: a JSON {type(index).__name__}, not an index object")
    if not isinstance(weight_map, dict):
        found = "none" if weight_map is None else f"a {type(weight_map).__name__}"
        raise FileFormatError(f"{what}: 'weight_map' must map tensor names to shard files, found {found}")
    if not weight_map:
        raise FileFormatError(f"{what}: 'weight_map' is empty")
    shards: set[str] = set()
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise FileFormatError(f"{what}: the shard of {show(key)} is {show(shard)}, not a file name")
        if shard not in shards:
            if "/" in shard or shard in (".", "..") or not shard.endswith(".safetensors"):
                raise FileFormatError(f"{what}: {show(shard)} is not the name of a .safetensors file beside it")
            if shard not in names:
                raise FileFormatError(f"{what}: it names the shard {show(shard)}, which the repo does not have")
            shards.add(shard)
    return shards


def _checkpoint_folder(
    tree: _Tree, folder: str, read_json: Callable[[str], Any], subfolders: bool, repo: str = ""
) -> list[str]:
    """The files of one model folder a merge needs: its config and other small files, and its safetensors weights
    (the shards its index names, when it has one); never weights in other formats. With ``subfolders``, the same
    for every folder below it (not hidden)."""
    wanted: list[str] = []
    todo = [folder]
    while todo:
        here = todo.pop(0)
        prefix = f"{here}/" if here else ""
        top = [f for f in tree.files.get(here, []) if not f.startswith(".")]
        names = set(top)
        indexes = [f for f in top if f.endswith(INDEX_SUFFIX)]
        shards = None
        if len(indexes) == 1:
            shards = shards_of(read_json(prefix + indexes[0]), f"{repo}/{prefix}{indexes[0]}".lstrip("/"), names)
        for f in top:
            if _not_read(f) or _variant_of(f, names):
                continue
            if f.lower().endswith(".safetensors") and shards is not None and f not in shards:
                continue
            wanted.append(prefix + f)
        if subfolders:
            todo[:0] = [f"{prefix}{sub}" for sub in tree.dirs.get(here, []) if not sub.startswith(".")]
    return wanted


def plan_checkpoint(files: set[str], ref: RepoRef, read_json: Callable[[str], Any]) -> Plan:
    """A base model to merge into: one .safetensors file, a model folder (config, index, shards, tokenizer...), or a
    diffusers pipeline (``model_index.json`` and its component folders), without weights in other formats."""
    path = ref.path
    tree = _Tree(files)
    if path is not None and path in files:
        if path.endswith(INDEX_SUFFIX):
            folder = str(PurePosixPath(path).parent) if "/" in path else ""
            return Plan(_checkpoint_folder(tree, folder, read_json, False, ref.repo_id), path)
        if not path.endswith(".safetensors"):
            raise FileFormatError(f"{ref}: not a .safetensors checkpoint", "loratools merges into safetensors weights")
        return Plan([path], path)
    folder, prefix = _split(path)
    if path and not tree.has(folder):
        raise HubError(f"{ref.repo_id} has no file or folder {path}", "check the path inside the repo")
    top = tree.files.get(folder, [])
    subs = tree.dirs.get(folder, [])
    pipeline = "model_index.json" in top or (
        not any(f.endswith(".safetensors") for f in top) and any(s in COMPONENTS for s in subs)
    )
    if pipeline:
        wanted = [
            prefix + f
            for f in top
            if not f.startswith(".") and not f.lower().endswith(".safetensors") and not _not_read(f)
        ]
        for sub in subs:
            if not sub.startswith("."):
                wanted += _checkpoint_folder(tree, f"{prefix}{sub}", read_json, True, ref.repo_id)
    else:
        wanted = _checkpoint_folder(tree, folder, read_json, False, ref.repo_id)
    if not any(f.endswith(".safetensors") for f in wanted):
        where = f"{ref.repo_id}/{folder}" if folder else ref.repo_id
        raise FileFormatError(
            f"{where}: no .safetensors weights found", "loratools merges into safetensors checkpoints"
        )
    return Plan(wanted, folder)


def plan(files: set[str], ref: RepoRef, kind: FetchKind, read_json: Callable[[str], Any]) -> Plan:
    """What a command of ``kind`` needs of a repo holding ``files``."""
    if kind == "adapter":
        return plan_adapter(files, ref)
    if kind == "checkpoint":
        return plan_checkpoint(files, ref, read_json)
    if kind == "file":  # one named file, as it is (a base model's config.json)
        if ref.path is None or ref.path not in files:
            raise HubError(f"{ref} is not a file in the repo", "name a file: owner/name/path/in/repo")
        return Plan([ref.path], ref.path)
    raise LoratoolsError(f"unknown kind {kind!r}", "adapter, checkpoint or file")
