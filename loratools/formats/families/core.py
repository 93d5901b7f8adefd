"""The parts every family table is made of: links between namings of one module, and the index that finds them.

A :class:`Link` ties one module of a model under its *original* name (the name in the model's own code: a
single-file checkpoint's, which kohya's trainers flatten into their names) to its diffusers module path(s).
Names are templates whose holes (``{i}``) stand for block numbers: ``double_blocks.{i}.img_attn.proj`` <->
``transformer_blocks.{i}.attn.to_out.0``. A fused original module (Flux's ``img_attn.qkv``) links to several
diffusers modules, its output rows split among them in order (:class:`Split`).

A :class:`Space` indexes a list of links both ways; looking a name up matches it against the templates, so a
flattened kohya name is read back exactly (``wi_0``, ``to_out_0`` and ``linear_1`` included), never by guessing
where the dots were.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_HOLE = re.compile(r"\{(\w+)\}")
#: a path segment that is a number (between dots or underscores, or at an end): ASCII digits only
_NUMBER = re.compile(r"(?<![^._])[0-9]+(?![^._])")
#: what a hole matches: a block number as a model's code writes it (ASCII, no leading zero, under 100,000), so
#: ``01``, ``\u0661`` (a unicode digit) or ``99999999999999999999`` is no block of any model and stays unresolved
BLOCK = r"(?:0|[1-9][0-9]{0,4})"

Holes = dict[str, str]


def flatten(dotted: str) -> str:
    """kohya's flattening: every dot becomes an underscore."""
    return dotted.replace(".", "_")


def skeleton(name: str) -> str:
    """A name (or template) with every number segment (or hole) as ``#``: the index key of a lookup."""
    return _NUMBER.sub("#", _HOLE.sub("#", name))


def fill(template: str, holes: Mapping[str, str]) -> str:
    return _HOLE.sub(lambda m: holes[m.group(1)], template)


def _pattern(template: str, flat: bool) -> re.Pattern[str]:
    out: list[str] = []
    seen: set[str] = set()
    pos = 0
    for m in _HOLE.finditer(template):
        literal = template[pos : m.start()]
        out.append(re.escape(flatten(literal) if flat else literal))
        name = m.group(1)
        out.append(f"(?P={name})" if name in seen else rf"(?P<{name}>{BLOCK})")
        seen.add(name)
        pos = m.end()
    tail = template[pos:]
    out.append(re.escape(flatten(tail) if flat else tail))
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class Split:
    """How the output rows of a fused module divide among its parts, in order: ``equal`` (q, k, v of one size)
    or ``qkv+rest`` (Flux's ``linear1``: q, k and v of one size, then the MLP's rows, ``rest_ratio`` times that
    size: 3 x 3072 + 12288 in Flux.1, as diffusers' converters split it)."""

    kind: str
    rest_ratio: int = 0

    def _unit(self, parts: int, out: int) -> int | None:
        n = parts if self.kind == "equal" else parts - 1 + self.rest_ratio
        return out // n if out and out % n == 0 else None

    def sizes(self, parts: int, out: int) -> list[int] | None:
        """The rows of each part of a fused weight with ``out`` rows; None when they do not split so."""
        unit = self._unit(parts, out)
        if unit is None:
            return None
        return [unit] * parts if self.kind == "equal" else [unit] * (parts - 1) + [unit * self.rest_ratio]

    def offset(self, index: int, parts: int, out: int) -> int:
        """The first row of part ``index`` (whose own weight has ``out`` rows) in the fused weight."""
        if self.kind == "equal" or index < parts - 1:
            return index * out
        return (parts - 1) * out // self.rest_ratio

    def full_sizes(self, parts: int, present: Mapping[int, int]) -> list[int] | None:
        """Every part's rows, from those of the parts at hand (index -> rows); None when they disagree."""
        units = {rows if self.kind == "equal" or i < parts - 1 else rows / self.rest_ratio
                 for i, rows in present.items()}  # fmt: skip
        if len(units) != 1 or int(next(iter(units))) != next(iter(units)):
            return None
        return self.sizes(
            parts, int(next(iter(units))) * (parts if self.kind == "equal" else parts - 1 + self.rest_ratio)
        )


EQUAL = Split("equal")


@dataclass(frozen=True)
class Link:
    """One module under its original name and its diffusers path(s).

    ``kind`` is the block kind inspect groups by; ``swap`` says the original stores the two halves of the output
    rows the other way round (``shift, scale`` where diffusers has ``scale, shift``): ``always``, or ``pair`` only
    when the weight is ``2 * in x in`` (SD3's last context block); ``leaves`` renames a tensor's last part in the
    original (``weight`` -> ``scale``; ``""``: the module path is itself the tensor); ``transpose``: the original
    stores the weight transposed (OpenCLIP's ``text_projection``)."""

    original: str
    diffusers: tuple[str, ...]
    kind: str = ""
    split: Split | None = None
    swap: str = ""
    leaves: tuple[tuple[str, str], ...] = ()
    transpose: bool = False

    def swaps(self, shape: tuple[int, ...] | None) -> bool:
        if self.swap == "always":
            return True
        return self.swap == "pair" and shape is not None and len(shape) >= 2 and shape[0] == 2 * shape[1]

    def leaf(self, leaf: str) -> str:
        return dict(self.leaves).get(leaf, leaf)


def same(template: str, kind: str) -> Link:
    """A module named alike in both namings."""
    return Link(template, (template,), kind)


def nest(outer: tuple[str, str], inner: Iterable[Link]) -> list[Link]:
    """``inner`` links under the block ``outer`` = (original prefix, diffusers prefix)."""
    o, d = outer
    return [
        Link(f"{o}.{ln.original}" if ln.original else o, tuple(f"{d}.{t}" for t in ln.diffusers), ln.kind,
             ln.split, ln.swap, ln.leaves, ln.transpose)
        for ln in inner
    ]  # fmt: skip


class Space:
    """Links between the diffusers paths of one component and another naming of it, indexed both ways."""

    def __init__(self, links: Iterable[Link]) -> None:
        self.links = tuple(links)
        self._orig: dict[tuple[bool, str], list[tuple[re.Pattern[str], Link]]] = {}
        self._diff: dict[str, list[tuple[re.Pattern[str], Link, int]]] = {}
        for ln in self.links:
            for flat in (False, True):
                key = skeleton(flatten(ln.original) if flat else ln.original)
                self._orig.setdefault((flat, key), []).append((_pattern(ln.original, flat), ln))
            for i, t in enumerate(ln.diffusers):
                self._diff.setdefault(skeleton(t), []).append((_pattern(t, False), ln, i))

    def original(self, name: str, flat: bool = False) -> tuple[Link, Holes] | None:
        """The link of an original module path (``flat``: as kohya flattens it), and its block numbers."""
        for rx, ln in self._orig.get((flat, skeleton(name)), ()):
            m = rx.match(name)
            if m:
                return ln, m.groupdict()
        return None

    def diffusers(self, name: str) -> tuple[Link, int, Holes] | None:
        """The link of a diffusers module path, which part of it the path is, and its block numbers."""
        for rx, ln, i in self._diff.get(skeleton(name), ()):
            m = rx.match(name)
            if m:
                return ln, i, m.groupdict()
        return None


def identity(links: Iterable[Link]) -> Space:
    """The space in which every diffusers path of ``links`` is its own original name (kohya files that flatten the
    diffusers paths themselves)."""
    out: dict[str, Link] = {}
    for ln in links:
        for t in ln.diffusers:
            out.setdefault(t, same(t, ln.kind))
    return Space(out.values())
