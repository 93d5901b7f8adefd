"""Re-compress an adapter: to a fixed rank, or per module to the smallest rank that keeps a fraction of the
delta's Frobenius energy. The SVD comes from the factors (two thin QRs and an r x r SVD), never the dense delta;
a module already at or below the target is kept exactly."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import UsageError
from ..formats import FORMATS, load_adapter, save_adapter
from ..io.progress import Progress
from ..model import Adapter
from . import args, provenance
from .linalg import lowrank_svd, rank_for_energy
from .lowrank import (
    DTYPES,
    check_dense_all,
    factors,
    lora_module,
    pick_device,
    refuse_dora,
    stored_dtype,
    work_device,
)


@dataclass
class ResizedModule:
    name: str
    old_rank: int | None
    new_rank: int
    energy: float  # fraction of the delta's squared Frobenius norm kept
    kept: bool  # True: the module was carried over exactly


@dataclass
class ResizeReport:
    output: str | None
    format: str
    rank: int | None
    energy: float | None
    modules: list[ResizedModule] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_args(
    rank: int | None, energy: float | None, dtype: str | None, device: str | None, progress: Progress | None
) -> tuple[int | None, float | None]:
    """Exactly one of a rank (>= 1) and an energy fraction (in (0, 1]), checked before anything is read."""
    rank, energy = args.integer(rank, "rank"), args.fraction(energy, "energy")
    args.one_of("rank", rank, "energy", energy)
    args.choice(dtype, "dtype", DTYPES)
    args.device(device)
    args.callback(progress, "progress")
    return rank, energy


def resize_adapter(
    adapter: Adapter,
    rank: int | None = None,
    energy: float | None = None,
    *,
    dtype: str | None = None,
    device: str | None = None,
    progress: Progress | None = None,
) -> tuple[Adapter, ResizeReport]:
    """``adapter`` re-compressed to ``rank``, or per module to the smallest rank keeping ``energy`` of its delta's
    Frobenius energy (give one of the two), and the report. A plain LoRA module already at or below the target is
    kept exactly; DoRA modules that would need truncating are refused."""
    if not isinstance(adapter, Adapter):
        raise UsageError(f"adapter must be an Adapter (loratools.load_adapter gives one), not {type(adapter).__name__}")
    rank, energy = check_args(rank, energy, dtype, device, progress)
    dev, work = work_device(device)
    out = Adapter(
        format=adapter.format,
        extras=dict(adapter.extras),
        metadata=dict(adapter.metadata),
        config=dict(adapter.config),
        base_model=adapter.base_model,
    )
    report = ResizeReport(None, adapter.format, rank, energy)
    check_dense_all(adapter.modules.values())  # before any work: headers only
    tick = progress(len(adapter.modules)) if progress else None
    for name, m in adapter.modules.items():
        old = m.rank
        plain = m.is_two_factor()
        if plain and rank is not None and old is not None and old <= rank and dtype is None:
            out.modules[name] = m
            report.modules.append(ResizedModule(name, old, old, 1.0, True))
            if tick:
                tick()
            continue
        up, down = factors(m, dev, work)
        svd = lowrank_svd(up, down)
        cum = svd.energy()
        n = svd.s.shape[0]
        if rank is not None:
            k = min(rank, n)
        else:
            assert energy is not None
            k = rank_for_energy(svd.s, energy)
        if plain and old is not None and k >= old and dtype is None:
            out.modules[name] = m
            report.modules.append(ResizedModule(name, old, old, 1.0, True))
        else:
            refuse_dora(m, "re-compressing it")
            out.modules[name] = lora_module(m, *svd.truncate(k), stored_dtype(m, dtype))
            report.modules.append(ResizedModule(name, old, k, float(cum[k - 1]), False))
        if tick:
            tick()
    return out, report


def resize(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    rank: int | None = None,
    energy: float | None = None,
    *,
    to: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    origins: Mapping[str, str] | None = None,
) -> ResizeReport:
    """Read ``source``, resize it (:func:`resize_adapter`) and write the result to ``out`` atomically, in the
    source's format or ``to``. ``origins``: the name the provenance record gives a source fetched from the Hub
    (see ``provenance.record``)."""
    from ..formats import input_files
    from ..formats.outputs import check_output_name
    from ..io.atomic import check_output

    args.path(source, "source")
    args.path(out, "out")
    origins = provenance.check_origins(origins)
    args.choice(to, "format", FORMATS)
    args.flag(force, "force")
    rank, energy = check_args(rank, energy, dtype, device, progress)
    pick_device(device)  # a missing GPU is told before anything is read
    check_output(out, force=force, inputs=input_files(source))
    adapter = load_adapter(source)
    check_output_name(out, to or adapter.format)
    resized, report = resize_adapter(adapter, rank, energy, dtype=dtype, device=device, progress=progress)
    resized.metadata[provenance.KEY] = provenance.record(
        "resize", [(str(source), adapter.format)], origins=origins, rank=rank, energy=energy, dtype=dtype
    )
    fmt = to or resized.format
    written = save_adapter(resized, out, fmt, force=force)
    report.output, report.format = str(written), fmt
    return report
