"""Where the modules of an image-model adapter go in a base whose tensor names are not the adapter's own: a diffusers
pipeline or component folder (kohya's SGM or BFL names; Flux's fused ``qkv`` / ``linear1`` split by rows), or a
single-file checkpoint as A1111, ComfyUI and Forge keep them (SD 1.x / 2.x, SDXL with OpenCLIP's fused
``in_proj_weight``, Flux in BFL names with fused ``qkv`` and ``linear1``, SD3), whatever naming the adapter uses.

Every answer comes from the family's name tables (:mod:`loratools.formats.families`): a kohya name in the file's
own naming goes to its tensor as it is; any other goes through its diffusers path(s) and the single-file location of
each, where a part of a fused weight becomes a module over the whole weight, zero outside its rows (exact: plain
LoRA keeps its factors, the up factor padded; LoHa, LoKr and Tucker give their dense delta). A module the tables
cannot place is never guessed: :meth:`Placer.place` says what is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import LoratoolsError
from ..formats.families import (
    BUILDERS,
    Family,
    SingleFile,
    SingleFileLocation,
    family,
    from_kohya,
    single_file_location,
    single_files,
)
from ..formats.families.core import fill
from ..io.checkpoint import Checkpoint
from ..model import Adapter, Module, TensorRef
from ..model.components import COMPONENTS
from .convert_names import base_configs, detect_adapter, dotted_paths, is_image
from .fused import split_module, swap_halves

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Placed:
    """A module over the whole of base tensor ``key``."""

    key: str
    module: Module


Places = list[Placed]


class Placer:
    """Places modules in one base checkpoint (its single-file family read from its tensor names, or a pipeline's
    configs)."""

    def __init__(self, base: Checkpoint) -> None:
        self.base = base
        self.names = base.tensors
        self.files = single_files(self.names) if base.single_file else []
        self.configs: dict[str, dict[str, Any]] | None = {} if base.single_file else None  # read when needed
        self._paths: dict[int, dict[str, str]] = {}

    def describe(self) -> str:
        """What the base was read as (for a refusal's hint)."""
        if not self.files:
            return ""
        sf = self.files[0]
        where = ", ".join(f"{c} at {r or '(no prefix)'}" for c, r in sf.roots)
        titles = " or ".join(f.family.title for f in self.files)
        return f"the base is a {titles} single-file checkpoint ({where})"

    def place(self, adapter: Adapter, name: str, m: Module) -> Places | str | None:
        """The base tensors ``m`` changes, each with the module over the whole tensor; or what is missing; None
        when no image model's tables apply (neither the base nor the adapter is one)."""
        if self.files:
            options: list[tuple[Family, SingleFile | None]] = [(f.family, f) for f in self.files]
        else:
            if not is_image(detect_adapter(adapter)):
                return None
            if self.configs is None:
                self.configs = base_configs(self.base.root)
            det = detect_adapter(adapter, self.configs)
            ids = ((det.family,) if det.family else det.candidates) if det is not None else ()
            unet = self.configs.get("unet")
            options = [(family(fid, unet), None) for fid in ids if fid in BUILDERS]
            if not options:
                return None
        answers = [self._place(adapter, name, m, fam, sf) for fam, sf in options]
        found = [a for a in answers if not isinstance(a, str)]
        titles = " or ".join(fam.title for fam, _ in options)
        if not found:  # one reason for every family read, said once
            said = {str(a).replace(fam.title, "{family}") for a, (fam, _) in zip(answers, options, strict=True)}
            return said.pop().replace("{family}", titles) if len(said) == 1 else str(answers[0])
        keys = {tuple(p.key for p in a) for a in found}
        if len(found) < len(answers) or len(keys) > 1:
            return f"{name}: its place differs between {titles}, and nothing tells which this base is"
        return found[0]

    def _place(self, adapter: Adapter, name: str, m: Module, fam: Family, sf: SingleFile | None) -> Places | str:
        if adapter.format == "kohya":
            hit = fam.kohya_entry(name)
            if hit is None:
                return f"{name}: not a module of {fam.title}"
            part, prefix, link, holes = hit
            root = sf.root(part.component) if sf is not None else None
            own = part.file.original(name[len(prefix) :], flat=True) if part.file is not None else None
            if root is not None and own is not None and own[0] == link:  # the file's own naming: as it is
                key = root + fill(link.original, holes) + "." + link.leaf("weight")
                return [Placed(key, m)] if key in self.names else f"{name} -> {key}: not in the base"
            step = from_kohya(fam, [name], {name: m.weight_shape()}).steps[0]
            try:
                if len(step.targets) > 1:
                    assert step.split is not None
                    parts = [(p.name, p) for p in split_module(m, step.targets, step.split)]
                else:
                    parts = [(step.targets[0], swap_halves(m) if step.swap else m)]
            except LoratoolsError as e:
                return f"{name}: {e.message}"
        else:
            paths = self._paths.get(id(adapter))
            if paths is None:
                paths = self._paths[id(adapter)] = dotted_paths(adapter)
            parts = [(paths.get(name, name), m)]
        out: Places = []
        for path, part_module in parts:
            placed = self._locate(fam, sf, name, path, part_module)
            if isinstance(placed, str):
                return placed
            out.append(placed)
        return out

    def _locate(self, fam: Family, sf: SingleFile | None, name: str, path: str, m: Module) -> Placed | str:
        """The base tensor of diffusers module ``path`` (with its component), and ``m`` over all of it."""
        component, _, rel = path.partition(".")
        for cand in (path + ".weight", rel + ".weight" if component in COMPONENTS else ""):
            if cand in self.names:
                return Placed(cand, _renamed(m, name))
        if sf is None:
            return f"{name} -> {path}.weight: not in the base"
        root = sf.root(component)
        if root is None:
            return f"{name} -> {path}: this {fam.title} checkpoint holds no {component}"
        loc = single_file_location(fam, path + ".weight", m.weight_shape(), root)
        if loc is None:
            return f"{name} -> {path}: {fam.title}'s single-file table has no such module"
        if loc.key not in self.names:
            return f"{name} -> {loc.key}: not in the base"
        return _reshaped(_renamed(m, name), self.names[loc.key].shape, loc)


def _renamed(m: Module, name: str) -> Module:
    """``m`` under the adapter's own module name (a part of a split keeps its source's, for messages)."""
    if m.name == name:
        return m
    return Module(name, m.kind, dict(m.factors), alpha=m.alpha, rslora=m.rslora, layer=m.layer,
                  fan_in_fan_out=m.fan_in_fan_out, magnitude=m.magnitude, dora_axis=m.dora_axis, bias=m.bias)  # fmt: skip


def _moves(loc: SingleFileLocation) -> bool:
    return loc.rows is not None or loc.swap_halves or loc.transposed


def _reshaped(m: Module, full: tuple[int, ...], loc: SingleFileLocation) -> Placed | str:
    """``m`` as a module over the whole tensor at ``loc`` (its rows, halves swapped, transposed as stored there)."""
    if not _moves(loc):
        return Placed(loc.key, m)
    if len(full) < 2:
        return f"{m.name}: {loc.key} is {list(full)} in the base, not a weight matrix"
    rows = loc.rows_in(full[0])
    if isinstance(rows, str):
        return f"{m.name}: {rows}"
    where = f"rows {loc.rows[0]}:{loc.rows[1]} of {loc.key}" if loc.rows else loc.key
    if m.magnitude is not None and (loc.rows or loc.transposed):
        return f"{m.name}: a DoRA magnitude rescales the whole weight, and this module is {where} only"
    if m.bias is not None:
        return f"{m.name}: its LoRA bias would go to {where}, which loratools does not place"
    if loc.swap_halves and (loc.rows is None and not loc.transposed) and m.is_two_factor():
        return Placed(loc.key, _renamed(swap_halves(m), m.name))
    if m.is_two_factor() and m.layer == "linear" and not m.fan_in_fan_out and m.magnitude is None:
        return Placed(loc.key, _lora_over(m, full, loc))
    if m.magnitude is not None:
        return f"{m.name}: a DoRA module cannot be stored as {where} (swapped or transposed)"
    return Placed(loc.key, _dense_over(m, full, loc))


def _moved(t: torch.Tensor, full_rows: int, loc: SingleFileLocation) -> torch.Tensor:
    """Rows of a part (already transposed if need be) with halves swapped and placed among zeros."""
    import torch

    if loc.swap_halves:
        t = torch.cat(t.chunk(2)[::-1])
    if loc.rows is None:
        return t
    out = t.new_zeros((full_rows, *t.shape[1:]))
    out[loc.rows[0] : loc.rows[1]] = t
    return out


def _ref(shape: tuple[int, ...], dtype: str, load: Callable[[], torch.Tensor]) -> TensorRef:
    return TensorRef(shape, dtype, load)


def _lora_over(m: Module, full: tuple[int, ...], loc: SingleFileLocation) -> Module:
    """A plain LoRA module over the whole tensor: its up factor (the down's transpose when stored transposed) with
    its rows placed, the down factor kept; alpha and rank unchanged, so the scale is the same."""
    up, down = m.factors["up"], m.factors["down"]
    r = down.shape[0]

    def new_up() -> torch.Tensor:
        u = down.load().T.contiguous() if loc.transposed else up.load()
        return _moved(u, full[0], loc)

    def new_down() -> torch.Tensor:
        return up.load().T.contiguous() if loc.transposed else down.load()

    up_shape = (full[0], r)
    down_shape = (r, up.shape[0]) if loc.transposed else tuple(down.shape)
    factors = {"up": _ref(up_shape, up.dtype, new_up), "down": _ref(down_shape, down.dtype, new_down)}
    return Module(m.name, "lora", factors, alpha=m.alpha, rslora=m.rslora, layer="linear")


def _dense_over(m: Module, full: tuple[int, ...], loc: SingleFileLocation) -> Module:
    """LoHa, LoKr, Tucker (any module but plain LoRA) as a full difference over the whole tensor."""
    import torch

    def diff() -> torch.Tensor:
        d = m.delta(torch.float32)
        d = d.T if loc.transposed else d
        return _moved(d.reshape(d.shape[0], *full[1:]), full[0], loc)

    return Module(m.name, "full", {"diff": _ref(full, "F32", diff)})
