"""A model family: its components, each with the namings kohya files and single-file checkpoints give them, and
the name plans between those and diffusers paths (one module to one, a fused module to its parts, or back)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .core import Holes, Link, Space, Split, fill, flatten

Shapes = Mapping[str, tuple[int, ...]]
TEXT_MODEL = "text_model."


@dataclass(frozen=True)
class Part:
    """One component (``unet``, ``text_encoder_2``, ``transformer``) of a family.

    ``kohya``: (prefix, naming) pairs that kohya files use for it, read in order; the first is the one written.
    ``roots``: where its tensors sit in single-file checkpoints (the first is the default), named by ``file``.
    ``text_model``: a transformers CLIP text model, whose diffusers paths may lack ``text_model.`` (transformers 5
    dropped the level; kohya names and single-file checkpoints keep it)."""

    component: str
    kohya: tuple[tuple[str, Space], ...]
    roots: tuple[str, ...] = ()
    file: Space | None = None
    text_model: bool = False

    def canonical(self, path: str) -> str:
        """A diffusers path of this component in the form the tables name (``text_model.`` put back)."""
        if self.text_model and not path.startswith(TEXT_MODEL) and path != "text_projection":
            return TEXT_MODEL + path
        return path


@dataclass(frozen=True)
class Family:
    """A model family's name tables: one :class:`Part` per component."""

    id: str
    title: str
    parts: tuple[Part, ...]
    #: kohya's metadata / modelspec names of the family, for detection (lower case, matched as prefixes)
    aliases: tuple[str, ...] = ()

    def part(self, component: str) -> Part | None:
        return next((p for p in self.parts if p.component == component), None)

    def kohya_entry(self, name: str) -> tuple[Part, str, Link, Holes] | None:
        """The part, kohya prefix, link and block numbers of a kohya module name (longest prefix first)."""
        entries = [(pre, space, p) for p in self.parts for pre, space in p.kohya if name.startswith(pre)]
        entries.sort(key=lambda e: -len(e[0]))
        for pre, space, p in entries:
            hit = space.original(name[len(pre) :], flat=True)
            if hit:
                return p, pre, hit[0], hit[1]
        return None

    def diffusers_entry(self, name: str) -> tuple[Part, Link, int, Holes] | None:
        """The part, kohya link, part index and block numbers of a diffusers path (``unet.down_blocks...``)."""
        component, _, rest = name.partition(".")
        p = self.part(component)
        if p is None or not p.kohya:
            return None
        hit = p.kohya[0][1].diffusers(p.canonical(rest))
        return (p, *hit) if hit else None

    def kind_of(self, name: str) -> tuple[str, str] | None:
        """(component, block kind) of a kohya or diffusers module name."""
        k = self.kohya_entry(name)
        if k:
            return k[0].component, k[2].kind
        d = self.diffusers_entry(name)
        return (d[0].component, d[1].kind) if d else None


@dataclass(frozen=True)
class Step:
    """One move of a name plan: ``sources`` (None: a part the adapter lacks) become ``targets``. One to one is a
    rename; one to several splits a fused module by rows (``split``); several to one fuses. ``swap``: exchange the
    two halves of the output rows."""

    sources: tuple[str | None, ...]
    targets: tuple[str, ...]
    split: Split | None = None
    swap: bool = False


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)


def from_kohya(family: Family, names: Iterable[str], shapes: Shapes) -> Plan:
    """kohya module names -> diffusers paths (component first; text encoders with ``text_model.``)."""
    plan = Plan()
    for name in names:
        hit = family.kohya_entry(name)
        if hit is None:
            plan.unresolved.append(name)
            continue
        p, _, link, holes = hit
        targets = tuple(f"{p.component}.{fill(t, holes)}" for t in link.diffusers)
        split = link.split if len(targets) > 1 else None
        plan.steps.append(Step((name,), targets, split, link.swaps(shapes.get(name))))
    return plan


def to_kohya(family: Family, names: Iterable[str], shapes: Shapes) -> Plan:
    """diffusers paths -> kohya names; the parts of a fused module (q, k, v) become one module."""
    plan = Plan()
    groups: dict[tuple[str, str], tuple[Link, list[str | None], str]] = {}
    for name in names:
        hit = family.diffusers_entry(name)
        if hit is None:
            plan.unresolved.append(name)
            continue
        p, link, index, holes = hit
        target = p.kohya[0][0] + flatten(fill(link.original, holes))
        group = groups.setdefault((p.component, target), (link, [None] * len(link.diffusers), name))
        group[1][index] = name
    for (_, target), (link, sources, first) in groups.items():
        fused = len(sources) > 1
        swap = link.swaps(shapes.get(first)) if not fused else False
        plan.steps.append(Step(tuple(sources), (target,), link.split if fused else None, swap))
    return plan


@dataclass(frozen=True)
class SingleFileLocation:
    """Where a diffusers tensor lives in a single-file checkpoint: the tensor ``key``, the ``rows`` it occupies
    there (start, stop) when the checkpoint fuses it with others (q/k/v), ``swap_halves`` when the checkpoint
    stores the two halves of its rows the other way round, ``transposed`` when it stores the matrix transposed;
    ``fused``: how the fused tensor's rows divide, which part this is and among how many (a caller checks the
    tensor's own rows split so before it places ``rows``)."""

    key: str
    rows: tuple[int, int] | None = None
    swap_halves: bool = False
    transposed: bool = False
    fused: tuple[Split, int, int] | None = None

    def rows_in(self, full_rows: int) -> tuple[int, int] | str | None:
        """The rows this part has in a fused tensor of ``full_rows`` rows when they agree with :attr:`rows`; what
        disagrees, when not (a tensor whose rows do not split into the parts, or a part of another size)."""
        if self.fused is None or self.rows is None:
            return self.rows
        split, index, count = self.fused
        sizes = split.sizes(count, full_rows)
        if sizes is None:
            return f"{self.key} has {full_rows} rows, which do not split into its {count} parts"
        start = sum(sizes[:index])
        if (start, start + sizes[index]) != self.rows:
            return f"it has {self.rows[1] - self.rows[0]} output rows, its part of {self.key} has {sizes[index]}"
        return self.rows


def single_file_location(
    family: Family, tensor: str, weight_shape: tuple[int, ...], root: str | None = None
) -> SingleFileLocation | None:
    """The single-file checkpoint location of the diffusers tensor ``tensor`` (``unet.down_blocks.1.attentions.0.
    proj_in.weight``, ``text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.bias``): ``weight_shape`` is
    the shape of its module's weight (which sizes the rows of fused parts), ``root`` the component's prefix in the
    checkpoint (default: the family's usual one). None when the family has no such module."""
    module, _, leaf = tensor.rpartition(".")
    component, _, rest = module.partition(".")
    p = family.part(component)
    if p is None or p.file is None or not p.roots:
        return None
    hit = p.file.diffusers(p.canonical(rest))
    if hit is None:
        return None
    link, index, holes = hit
    name = fill(link.original, holes)
    mapped = link.leaf(leaf)
    key = (p.roots[0] if root is None else root) + (f"{name}.{mapped}" if mapped else name)
    rows = fused = None
    if link.split is not None and len(link.diffusers) > 1:
        start = link.split.offset(index, len(link.diffusers), weight_shape[0])
        rows = (start, start + weight_shape[0])
        fused = (link.split, index, len(link.diffusers))
    return SingleFileLocation(key, rows, link.swaps(weight_shape), link.transpose, fused)
