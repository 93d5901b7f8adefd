"""What every format shares: raw tensor files (safetensors or pickle), and splitting keys into module + role
with a suffix table. A reader accounts for every key: whatever no rule claims is reported, never dropped."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FileFormatError, ShapeError, UnknownKeysError
from ..io.pickle import is_torch_pickle
from ..io.safetensors import Header, read_header, shown
from ..model import PROVENANCE_KEY, Adapter, Module, ModuleKind, TensorRef

SHARED_ROLES = ("alpha", "magnitude", "bias")


@dataclass
class RawFile:
    """The tensors of one file, by key, not yet interpreted."""

    path: Path
    tensors: dict[str, TensorRef]
    metadata: dict[str, str]
    header: Header | None = None  # None for pickles
    problems: list[str] = field(default_factory=list)


def open_raw(path: str | os.PathLike[str], *, lenient: bool = False) -> RawFile:
    p = Path(path)
    if not p.exists():
        raise FileFormatError(f"{p}: no such file or folder")
    if p.is_dir():
        raise FileFormatError(f"{p}: is a folder, expected a file")
    if is_torch_pickle(p):
        from ..io.pickle import read_pickle

        data = read_pickle(p)
        return RawFile(p, {k: TensorRef.of(v) for k, v in data.items()}, {})
    try:
        header = read_header(p, lenient=lenient)
    except PermissionError:
        raise FileFormatError(f"{p}: permission denied") from None
    return RawFile(p, {k: header.ref(k) for k in header.tensors}, header.metadata, header, list(header.problems))


@dataclass(frozen=True)
class Rule:
    """``<module><suffix>`` -> role. Role is a factor name, or ``alpha``/``magnitude``/``bias``."""

    suffix: str
    role: str
    kind: ModuleKind = "lora"
    layer: str | None = None  # forces the module's layer (embedding)


#: LyCORIS' LoHa / LoKr factor names: the same in kohya / LyCORIS files and in PEFT's LOHA / LOKR folders
LYCORIS_RULES = (
    Rule(".hada_w1_a", "w1a", "loha"),
    Rule(".hada_w1_b", "w1b", "loha"),
    Rule(".hada_w2_a", "w2a", "loha"),
    Rule(".hada_w2_b", "w2b", "loha"),
    Rule(".hada_t1", "t1", "loha"),
    Rule(".hada_t2", "t2", "loha"),
    Rule(".lokr_w1", "w1", "lokr"),
    Rule(".lokr_w1_a", "w1a", "lokr"),
    Rule(".lokr_w1_b", "w1b", "lokr"),
    Rule(".lokr_w2", "w2", "lokr"),
    Rule(".lokr_w2_a", "w2a", "lokr"),
    Rule(".lokr_w2_b", "w2b", "lokr"),
    Rule(".lokr_t2", "t2", "lokr"),
)


class KeyTable:
    """A suffix table: splits ``base_model.model.x.lora_A.weight`` into ``x`` and ``(down, lora)``."""

    def __init__(self, rules: Iterable[Rule], prefix: str = "") -> None:
        self.ordered = list(rules)
        self.rules = sorted(self.ordered, key=lambda r: -len(r.suffix))
        self.prefix = prefix
        alternatives = "|".join(re.escape(r.suffix) for r in self.rules)
        self._re = re.compile(rf"^{re.escape(prefix)}(?P<module>.+?)(?P<suffix>{alternatives})$")
        self._by_suffix = {r.suffix: r for r in self.rules}

    def split(self, key: str) -> tuple[str, Rule] | None:
        m = self._re.match(key)
        if not m:
            return None
        return m.group("module"), self._by_suffix[m.group("suffix")]

    def suffix_for(self, kind: str, role: str, layer: str | None = None) -> str:
        """The suffix a writer uses: the first rule listed for this role (any kind for alpha/magnitude/bias),
        preferring one made for ``layer``."""
        cands = [r for r in self.ordered if r.role == role and (r.kind == kind or role in SHARED_ROLES)]
        pick = [r for r in cands if r.layer == layer] or [r for r in cands if r.layer is None]
        if not pick:
            what = f"{layer} " if layer and layer != "linear" else ""
            raise ShapeError(f"this format cannot store a {what}{kind} {role} tensor")
        return pick[0].suffix


@dataclass
class KeyGroup:
    """The keys of one module, grouped by :func:`group_keys`: the factors and other tensors by role, the kind and
    layer their suffixes say."""

    kind: ModuleKind | None = None
    layer: str | None = None
    parts: dict[str, TensorRef] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)


def group_keys(tensors: Mapping[str, TensorRef], table: KeyTable) -> tuple[dict[str, KeyGroup], list[str], list[str]]:
    """Group keys by module. Returns (groups, leftover keys, conflicts)."""
    groups: dict[str, KeyGroup] = {}
    leftovers: list[str] = []
    conflicts: list[str] = []
    for key, ref in tensors.items():
        hit = table.split(key)
        if hit is None:
            leftovers.append(key)
            continue
        module, rule = hit
        g = groups.setdefault(module, KeyGroup())
        if rule.role not in SHARED_ROLES:
            if g.kind is not None and g.kind != rule.kind:
                conflicts.append(f"{shown(module)}: mixes {g.kind} and {rule.kind} factors")
            g.kind = rule.kind
        if rule.layer:
            g.layer = rule.layer
        if rule.role in g.parts:
            conflicts.append(f"{shown(module)}: two tensors for {rule.role} ({shown(key)})")
        g.parts[rule.role] = ref
        g.keys.append(key)
    return groups, leftovers, conflicts


def build_module(
    name: str,
    g: KeyGroup,
    *,
    alpha: float | None,
    rslora: bool = False,
    fan_in_fan_out: bool = False,
    dora_axis: str = "out",
) -> Module:
    parts = dict(g.parts)
    parts.pop("alpha", None)
    magnitude = parts.pop("magnitude", None)
    bias = parts.pop("bias", None)
    kind: ModuleKind = g.kind or "lora"
    layer = g.layer or ("conv" if any(len(t.shape) >= 3 for t in parts.values()) else "linear")
    return Module(
        name=name,
        kind=kind,
        factors=parts,
        alpha=alpha,
        rslora=rslora,
        layer=layer,  # type: ignore[arg-type]
        fan_in_fan_out=fan_in_fan_out,
        magnitude=magnitude,
        dora_axis="in" if dora_axis == "in" else "out",
        bias=bias,
    )


def check_leftovers(leftovers: list[str], conflicts: list[str], fmt: str, problems: list[str] | None) -> None:
    """Unknown keys and conflicts: an error, or (lenient) findings."""
    if problems is not None:
        problems.extend(conflicts)
        if leftovers:
            problems.append(f"unknown key(s) for {fmt}: {', '.join(shown(k, 80) for k in sorted(leftovers)[:20])}")
        return
    if conflicts:
        raise FileFormatError(conflicts[0])
    if leftovers:  # names are data: escaped where they hold control characters
        raise UnknownKeysError([shown(k, 200) for k in leftovers], fmt)


def scalar(ref: TensorRef) -> float:
    if ref.numel != 1:
        raise ShapeError(f"alpha must be a single number, found a tensor of shape {list(ref.shape)}")
    return ref.item()


def json_safe(value: Any) -> Any:
    """Config values as plain JSON types."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [json_safe(v) for v in value]
    return value


def carried_metadata(adapter: Adapter, fmt: str) -> dict[str, str]:
    """Header metadata a writer keeps: all of it in the source's own format; across formats only loratools'
    own provenance record (kohya ``ss_*`` keys mean nothing in a PEFT file, and vice versa). Digests of the data
    (``sshs_*``, ``modelspec.hash_sha256``) are never carried: they described the old bytes (the kohya writer
    computes its own)."""
    from .kohya_meta import HASH_KEYS

    if adapter.format == fmt:
        return {k: v for k, v in adapter.metadata.items() if k not in HASH_KEYS}
    return {k: v for k, v in adapter.metadata.items() if k == PROVENANCE_KEY}
