"""Pairing two checkpoints and deciding what each changed tensor becomes: a factored LoRA module, a LoRA bias, a
tensor kept whole (PEFT ``modules_to_save``), or left out with the reason."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ShapeError
from ..io.checkpoint import Checkpoint
from ..model import Layer, Module, target_kind
from ..units import few
from .extract_factor import factor
from .extract_report import ExtractReport, SkippedTensor
from .lowrank import DTYPES
from .select import selector as selector  # extract's --include / --exclude: the one matcher (ops.select)

if TYPE_CHECKING:
    import torch

#: last part of the module path of input embeddings (``nn.Embedding``, stored vocab x hidden)
EMBEDDING_NAMES = frozenset(
    {
        "embed_tokens", "wte", "wpe", "embed_in", "word_embeddings", "position_embeddings", "token_type_embeddings",
        "embed_positions", "token_embedding", "position_embedding", "shared",
    }
)  # fmt: skip
#: ... and of output heads (``nn.Linear``, vocab x hidden)
HEAD_NAMES = frozenset({"lm_head", "embed_out"})
EMBEDDING_CHOICES = ("lora", "save", "skip")


def check_pairs(a: Checkpoint, b: Checkpoint, keep: Callable[[str], bool]) -> list[str]:
    """The base's tensor names to compare, in file and offset order; an error lists every mismatch."""
    names_a, names_b = a.tensors, b.tensors
    only_a = sorted(n for n in names_a if keep(n) and n not in names_b)
    only_b = sorted(n for n in names_b if keep(n) and n not in names_a)
    shapes = []
    for n, t in names_a.items():
        if keep(n) and n in names_b:
            sa, sb = t.shape, names_b[n].shape
            if sa != sb:
                shapes.append(f"{n} {list(sa)} vs {list(sb)}")
    if only_a or only_b or shapes:
        parts = []
        if only_a:
            parts.append(f"{len(only_a)} tensor(s) only in BASE: {few(only_a, 6)}")
        if only_b:
            parts.append(f"{len(only_b)} only in TUNED: {few(only_b, 6)}")
        if shapes:
            parts.append(f"{len(shapes)} with different shapes: {few(sorted(shapes), 6)}")
        raise ShapeError(
            "the checkpoints do not pair up: " + "; ".join(parts),
            "are both the same architecture? --exclude REGEX leaves tensors out",
        )
    order = []
    for wf in a.files:
        for info in sorted(wf.header.tensors.values(), key=lambda t: (t.start, t.name)):
            if keep(wf.prefix + info.name):
                order.append(wf.prefix + info.name)
    return order


class OpenFiles:
    """Open read handles, one per weights file, closed together."""

    def __init__(self) -> None:
        self.handles: dict[Path, Any] = {}

    def get(self, path: Path) -> Any:
        fh = self.handles.get(path)
        if fh is None:
            fh = self.handles[path] = open(path, "rb")  # noqa: SIM115 (closed in close())
        return fh

    def close(self) -> None:
        for fh in self.handles.values():
            fh.close()


def is_float(dtype: str) -> bool:
    return dtype.startswith(("F", "BF"))


def store_dtype(requested: str | None, dtype: str) -> str:
    if requested:
        return DTYPES[requested]
    return dtype if dtype in ("F64", "F32", "F16", "BF16") else "F32"


def place_one(
    name: str, diff: torch.Tensor, stored: str, rank: int | None, energy: float | None, max_rank: int | None,
    dtype: str | None, embeddings: str, modules: dict[str, Module], saves: dict[str, list[str]],
    others: list[tuple[str, torch.Tensor | None]], report: ExtractReport,
) -> None:  # fmt: skip
    """Decide what one changed float tensor becomes, and factor it if it is a weight matrix."""
    module, _, param = name.rpartition(".")
    if not (module and param == "weight" and diff.dim() >= 2):
        others.append((name, diff.cpu() if param == "bias" else None))
        return
    last = target_kind(module).rpartition(".")[2]
    embedding_like = diff.dim() == 2 and (last in EMBEDDING_NAMES or last in HEAD_NAMES)
    if embedding_like and embeddings == "save":
        saves.setdefault(module, []).append(name)
        return
    if embedding_like and embeddings == "skip":
        report.skipped.append(SkippedTensor(name, "an embedding; --embeddings skip"))
        return
    layer: Layer = "conv" if diff.dim() > 2 else "embedding" if last in EMBEDDING_NAMES else "linear"
    m, row = factor(module, diff, layer, rank, energy, max_rank, store_dtype(dtype, stored))
    modules[module] = m
    report.modules.append(row)


def place_others(
    others: list[tuple[str, torch.Tensor | None]],
    modules: dict[str, Module],
    saves: dict[str, list[str]],
    report: ExtractReport,
) -> dict[str, torch.Tensor]:
    """Changed tensors that are not weight matrices: LoRA biases, whole tensors, or left out. Returns the bias
    differences by module."""
    biases: dict[str, torch.Tensor] = {}
    for name, diff in others:
        module, _, param = name.rpartition(".")
        m = modules.get(module)
        if m is not None:
            if param != "bias" or diff is None:  # a module's other tensors
                report.skipped.append(SkippedTensor(name, "its module is a LoRA module, which cannot also be saved"))
            elif m.layer == "embedding":
                report.skipped.append(SkippedTensor(name, "PEFT embedding LoRA has no bias"))
            elif tuple(diff.shape) != (m.delta_shape()[0],):
                report.skipped.append(SkippedTensor(name, f"a bias of shape {list(diff.shape)} does not fit"))
            else:
                biases[module] = diff
        elif module and param in ("weight", "bias"):
            saves.setdefault(module, []).append(name)
        else:
            report.skipped.append(SkippedTensor(name, "not a .weight or .bias: no adapter format holds it"))
    return biases


def whole_modules(
    saves: dict[str, list[str]], names: Mapping[str, object], report: ExtractReport
) -> dict[str, list[str]]:
    """Every tensor of each module kept whole: PEFT's ``modules_to_save`` loads a module's whole state dict
    (a linear whose bias alone changed brings its weight too). A module with tensors other than a direct
    ``.weight`` / ``.bias`` (a container, a buffer) is left out: no adapter reader here would accept its keys."""
    out: dict[str, list[str]] = {}
    for module, changed in sorted(saves.items()):
        tensors = sorted(n for n in names if n.startswith(module + "."))
        odd = [n for n in tensors if n[len(module) + 1 :] not in ("weight", "bias")]
        if odd:
            why = f"its module also holds {odd[0]}, which modules_to_save would need"
            report.skipped += [SkippedTensor(n, why) for n in changed]
        else:
            out[module] = tensors
    return out
