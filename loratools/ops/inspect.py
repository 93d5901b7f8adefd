"""What an adapter holds: format, base model (and the model family its names are for), sizes, dtypes, the targets
grouped by block kind, and a row per module."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..formats import FORMATS, detect, load_adapter
from ..formats.families import block_kind
from ..model import Adapter, Module
from . import args, provenance
from .convert_names import detect_adapter, is_image


@dataclass
class ModuleInfo:
    name: str
    type: str
    rank: int | None
    alpha: float | None
    scale: float
    shape: list[int]
    dtype: str
    norm: float | None = None
    spectrum: Spectrum | None = None


@dataclass
class Spectrum:
    """Singular values of the delta (from its factors), and how many carry the energy."""

    singular_values: list[float]
    effective_rank: float  # exp of the entropy of the normalised singular values (Roy & Vetterli)
    rank_90: int  # smallest rank keeping 90% of the Frobenius energy
    rank_99: int


def spectrum(m: Module) -> Spectrum:
    import torch

    from .linalg import effective_rank, lowrank_svd, rank_for_energy
    from .lowrank import factors

    s = lowrank_svd(*factors(m, "cpu", torch.float64)).s
    return Spectrum([float(x) for x in s], effective_rank(s), rank_for_energy(s, 0.9), rank_for_energy(s, 0.99))


@dataclass
class ExtraInfo:
    name: str
    role: str
    shape: list[int]
    dtype: str


@dataclass
class InspectReport:
    source: str
    format: str
    base_model: str | None
    num_modules: int
    num_params: int
    size_on_disk: int
    dtypes: dict[str, int]
    #: modules per target: per block kind and component for image models (``unet attention``, ``text_encoder
    #: mlp``), per module leaf for others (``q_proj``)
    target_modules: dict[str, int]
    types: dict[str, int]
    modules: list[ModuleInfo]
    extras: list[ExtraInfo] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    made_by: dict[str, Any] | None = None  # loratools' provenance record, when loratools wrote the file
    #: the model family the module names (and metadata) are for: id, name, candidates, from, evidence, note
    family: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def size_on_disk(source: str | os.PathLike[str]) -> int:
    p = Path(source)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.iterdir() if f.is_file())
    return p.stat().st_size


def report(
    adapter: Adapter, source: str | os.PathLike[str] | None, *, norms: bool = True, spectra: bool = False
) -> InspectReport:
    """The report on ``adapter``, read from ``source`` (named in the report, and measured for its size on disk; None:
    made in memory, size 0)."""
    modules = [
        ModuleInfo(
            name=m.name,
            type=m.type,
            rank=m.rank,
            alpha=m.alpha,
            scale=m.scale,
            shape=list(m.weight_shape()),
            dtype=m.dtype,
            norm=m.delta_norm() if norms else None,
            spectrum=spectrum(m) if spectra else None,
        )
        for m in adapter.modules.values()
    ]
    types: dict[str, int] = {}
    for mi in modules:
        types[mi.type] = types.get(mi.type, 0) + 1
    found = detect_adapter(adapter)
    return InspectReport(
        source="" if source is None else str(source),
        format=adapter.format,
        base_model=adapter.base_model,
        num_modules=len(modules),
        num_params=adapter.num_params,
        size_on_disk=0 if source is None else size_on_disk(source),
        dtypes=adapter.dtypes(),
        target_modules=target_groups(adapter) if is_image(found) else adapter.target_kinds(),
        types=dict(sorted(types.items())),
        modules=modules,
        extras=[ExtraInfo(k, e.role, list(e.ref.shape), e.ref.dtype) for k, e in adapter.extras.items()],
        metadata=dict(adapter.metadata),
        config=dict(adapter.config),
        made_by=provenance.parse(adapter.metadata),
        family=found.to_dict() if found is not None else None,
    )


def target_groups(adapter: Adapter) -> dict[str, int]:
    """Modules per component and block kind (``unet attention``, ``transformer modulation``, ``text_encoder mlp``)
    from the family's tables; a module they do not know counts under its leaf."""
    found = detect_adapter(adapter)
    counts: dict[str, int] = {}
    for name in adapter.modules:
        hit = block_kind(found, name)
        label = f"{hit[0]} {hit[1]}" if hit else f"other {name.replace('.', '_').rsplit('_', 1)[-1]}"
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items()))


def inspect_adapter(adapter: Adapter, *, norms: bool = True, spectra: bool = False) -> InspectReport:
    """What an adapter in memory holds: format, base model, sizes, dtypes and a row per module, with each delta's
    norm (``norms``, from the factors) and singular values (``spectra``). The size on disk is its source's (0 for an
    adapter made in memory)."""
    if not isinstance(adapter, Adapter):
        hint = "loratools.inspect(path) reads a file or folder" if isinstance(adapter, (str, os.PathLike)) else None
        raise UsageError(
            f"adapter must be an Adapter (loratools.load_adapter gives one), not {type(adapter).__name__}", hint
        )
    args.flag(norms, "norms")
    args.flag(spectra, "spectra")
    on_disk = adapter.source is not None and os.path.exists(adapter.source)
    return report(adapter, adapter.source if on_disk else None, norms=norms, spectra=spectra)


def inspect(
    source: str | os.PathLike[str], format: str | None = None, *, norms: bool = True, spectra: bool = False
) -> InspectReport:
    """Inspect a file or folder. With ``norms=False`` only the header is read (no tensor data, no torch);
    ``spectra`` adds each module's singular values, computed from its factors."""
    args.path(source, "source")
    args.choice(format, "format", FORMATS)
    args.flag(norms, "norms")
    args.flag(spectra, "spectra")
    adapter = load_adapter(source, format or detect(source))
    return report(adapter, source, norms=norms, spectra=spectra)
