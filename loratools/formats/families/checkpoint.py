"""Which family's single-file checkpoint a base is, from its tensor names alone: the files A1111, ComfyUI and Forge
load (``model.diffusion_model.*`` with ``cond_stage_model.*`` or ``conditioner.embedders.*``, BFL's bare
``double_blocks.*``, ComfyUI's ``text_encoders.*``), and where each component sits in it.

A UNet's block numbering is read from the file's own blocks (:meth:`UNetLayout.from_sgm`), never assumed. The
family is the one whose single-file tables name the most of the file's tensors; when several name as many (a
UNet-only file is SD 1.x's, SD 2.x's or SDXL's alike), every one of them is returned and the caller places each
module under each, accepting only an answer they agree on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .core import Space
from .family import Family, Part
from .sd import UNET_ROOT
from .unet import UNetLayout


@dataclass(frozen=True)
class SingleFile:
    """A family's tables and the prefix each of its components has in one single-file checkpoint (components the
    file does not hold have none)."""

    family: Family
    roots: tuple[tuple[str, str], ...]
    tensors: int  # how many of the file's tensors the tables name

    def root(self, component: str) -> str | None:
        return dict(self.roots).get(component)


def _named(space: Space, rest: str) -> bool:
    """Whether ``rest`` (a tensor name, root removed) is a tensor of a module of ``space``: a module path and its
    leaf (``weight``, ``in_proj_weight``), or a module that is itself the tensor (``positional_embedding``)."""
    module, _, leaf = rest.rpartition(".")
    hit = space.original(module) if module else None
    if hit is not None and (leaf in {hit[0].leaf(x) for x in ("weight", "bias")} or leaf in ("weight", "bias")):
        return True
    whole = space.original(rest)
    return whole is not None and whole[0].leaf("weight") == ""


def _root(part: Part, names: list[str]) -> tuple[str, int] | None:
    """The prefix under which ``part``'s tensors sit in the file, and how many there are."""
    assert part.file is not None
    best: tuple[str, int] | None = None
    for root in part.roots:
        n = sum(1 for name in names if name.startswith(root) and _named(part.file, name[len(root) :]))
        if n and (best is None or n > best[1]):
            best = (root, n)
    return best


def single_files(names: Iterable[str]) -> list[SingleFile]:
    """The families whose single-file tables name the most of these tensor names (several when they tie; none
    when no family names any)."""
    from . import BUILDERS, UNET_FAMILIES, family

    names = list(names)
    layout = UNetLayout.from_sgm(n[len(UNET_ROOT) :] for n in names if n.startswith(UNET_ROOT))
    found: list[SingleFile] = []
    for fid in BUILDERS:
        fam = family(fid, layout=layout if fid in UNET_FAMILIES else None)
        roots: list[tuple[str, str]] = []
        total = 0
        for part in fam.parts:
            hit = _root(part, names) if part.file is not None else None
            if hit is not None:
                roots.append((part.component, hit[0]))
                total += hit[1]
        if total:
            found.append(SingleFile(fam, tuple(roots), total))
    if not found:
        return []
    most = max(f.tensors for f in found)
    return [f for f in found if f.tensors == most]
