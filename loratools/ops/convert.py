"""Convert an adapter between formats: names, alphas, module kinds and dtypes, losing nothing silently.

* Names: dotted paths <-> kohya's flattened names (resolved against ``--base`` or the identifier table);
  diffusers components <-> PEFT's single model.
* Alpha: kept where the target stores it (kohya ``.alpha``, PEFT config and patterns, diffusers metadata, GGUF's
  one ``adapter.lora.alpha`` with per-module differences baked into the up factor); ``alpha_mode="bake"`` folds
  every scale into the up factor (alpha = rank).
* Module kinds the target cannot hold (LoHa, LoKr, Tucker, full diffs outside kohya files) become LoRA through
  the dense delta and the optimal SVD (exact unless ``rank``/``energy`` truncate).
* dtype: the factors are cast, and values that overflow or underflow the new dtype are counted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import IncompatibleAdaptersError, ShapeError, UsageError
from ..formats import FORMATS, load_adapter, peft_types, save_adapter
from ..formats.families import Step
from ..io.checkpoint import load_config
from ..model import Adapter, Module, TensorRef, torch_dtype
from . import args, provenance, select
from .convert_names import (
    Configs,
    base_configs,
    base_shape,
    detect_adapter,
    module_paths,
    outside_sd_scripts,
    plan_names,
)
from .fused import fuse_modules, split_module, swap_halves
from .linalg import lowrank_svd, rank_for_energy
from .lowrank import DTYPES, check_dense_all, factors, lora_module
from .select import LeftOut

TARGETS = (*FORMATS, "gguf")
ALPHA_MODES = ("keep", "bake")


@dataclass
class ConvertedModule:
    source: str
    name: str
    kind: str  # the source module's kind
    rank: int | None
    energy: float = 1.0  # fraction of the delta kept (1.0 unless a LyCORIS module was truncated)
    note: str = ""


@dataclass
class ConvertReport:
    source: str
    output: str | None
    source_format: str
    format: str
    modules: list[ConvertedModule] = field(default_factory=list)
    overflow: int = 0  # values beyond the target dtype's range (now inf)
    underflow: int = 0  # non-zero values that became zero
    notes: list[str] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)  # what --include / --exclude / --*-only left out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _layer_shapes(
    adapter: Adapter, base_shapes: Mapping[str, tuple[int, ...]] | None, base_names: list[str] | None,
    configs: Configs | None,
) -> dict[str, tuple[int, ...]]:  # fmt: skip
    """Each module's base weight shape, where the base is given: what a flattened LoHa/LoKr module needs to
    become LoRA with its conv kernel."""
    if not base_shapes:
        return {}
    paths = module_paths(adapter, base_names if base_names is not None else list(base_shapes), configs)
    det = detect_adapter(adapter, configs)
    out: dict[str, tuple[int, ...]] = {}
    for src, path in paths.items():
        shape = base_shape(path, base_shapes, det)
        if shape is not None:
            out[src] = shape
    return out


Ready = Mapping[str, tuple[Module, float, str, str]]  # source -> (module as LoRA if need be, energy, note, kind)


def _moved(
    step: Step, ready: Ready, rank: int | None, energy: float | None
) -> list[tuple[Module, str, str, float, str]]:
    """The modules one step of the name plan makes: (module, source, source kind, energy kept, note)."""
    named = [s for s in step.sources if s is not None]
    if len(step.sources) == 1:
        new, kept, note, kind = ready[named[0]]
        if len(step.targets) > 1:
            assert step.split is not None
            return [(p, named[0], kind, kept, note) for p in split_module(new, step.targets, step.split)]
        new = swap_halves(new) if step.swap else _renamed(new)
        new.name = step.targets[0]
        return [(new, named[0], kind, kept, note)]
    assert step.split is not None
    parts = [ready[s][0] if s is not None else None for s in step.sources]
    fused, kept = fuse_modules(parts, step.targets[0], step.split, rank, energy)
    note = f"fused and re-compressed to lora rank {fused.rank}" if kept < 1.0 else ""
    return [(fused, " + ".join(named), "lora", kept, note)]


def _renamed(m: Module) -> Module:
    """A copy of ``m`` to give another name (the source adapter keeps its own)."""
    return Module(
        m.name, m.kind, dict(m.factors), alpha=m.alpha, rslora=m.rslora, layer=m.layer,
        fan_in_fan_out=m.fan_in_fan_out, magnitude=m.magnitude, dora_axis=m.dora_axis, bias=m.bias,
    )  # fmt: skip


def vera_fitted(m: Module, shape: tuple[int, ...] | None) -> Module:
    """A module read from a PEFT VeRA folder, cut to its layer's input width (``shape``: the base weight's). VeRA's
    shared ``vera_A`` is as wide as the widest layer it adapts and the folder does not record each layer's own
    width: without the base it cannot be written as any other adapter."""
    if m.origin != "vera":
        return m
    if shape is None:
        raise IncompatibleAdaptersError(
            f"{m.name}: a VeRA module's shared projection vera_A is {m.factors['down'].shape[1]} wide (the widest "
            "layer it adapts); the folder does not record this layer's own width",
            "pass --base with the base model: each module is cut to its layer's width, as PEFT does",
        )
    if not m.fits(shape):
        raise ShapeError(f"{m.name}: its VeRA delta is {list(m.weight_shape())}, the base layer {list(shape)}")
    return m.fitted(shape)


def _lycoris(m: Module) -> bool:
    """A module that only a LyCORIS-aware file holds as it is: LoHa, LoKr, full diff, Tucker LoCon."""
    return m.kind != "lora" or "mid" in m.factors


def _keeps_lycoris(adapter: Adapter, to: str, rank: int | None, energy: float | None, fuses: bool) -> bool:
    """Whether LyCORIS modules stay as they are: in a kohya file, or in a PEFT LoHa / LoKr folder where PEFT holds
    every module as it is (:func:`~loratools.formats.peft_types.writable`), and only without ``rank`` / ``energy``,
    which turn them into LoRA in every target (an option given is never ignored). A rank or energy for an
    adapter without such modules, whose names fuse no q/k/v group (``fuses``) either, is refused: it would change
    nothing (``resize`` re-compresses LoRA)."""
    if rank is None and energy is None:
        return to == "kohya" or (to == "peft" and peft_types.writable(adapter) is not None)
    if not fuses and not any(_lycoris(m) for m in adapter.modules.values()):
        option = "rank" if rank is not None else "energy"
        raise UsageError(
            f"--{option} applies to LoHa, LoKr, Tucker LoCon and full-diff modules turned into LoRA and to q/k/v "
            "groups fused into one module, and this adapter has only plain LoRA modules that fuse nothing: it "
            "would change nothing",
            f"to re-compress LoRA modules, use `loratools resize --{option} ...`",
            param=option,
        )
    return False


def _as_lora(
    m: Module, rank: int | None, energy: float | None, device: str, work: Any, shape: tuple[int, ...] | None = None
) -> tuple[Module, float]:
    """A LyCORIS / Tucker / full module as plain LoRA: optimal rank-k factors of its delta (``shape``: the base
    layer's, for a module whose factors are flattened)."""
    svd = lowrank_svd(*factors(m, device, work))
    cum = svd.energy()
    n = svd.s.shape[0]
    if rank is not None:
        k = min(rank, n)
    elif energy is not None:
        k = rank_for_energy(svd.s, energy)
    else:  # exact: every singular value above rounding level
        s = svd.s
        k = max(1, int((s > s[0] * 1e-6).sum())) if n and float(s[0]) > 0 else 1
    dtype = next(iter(m.factors.values())).dtype
    out = lora_module(m, *svd.truncate(k), dtype if dtype in ("F32", "F16", "BF16") else "F32", shape)
    return out, float(cum[k - 1]) if n else 1.0


#: the factor each kind's scale is folded into by ``alpha_mode="bake"`` (the delta is linear in it)
BAKE_INTO = {"lora": ("up",), "loha": ("w1a",), "lokr": ("w1", "w1a")}


def _bake(m: Module) -> tuple[Module, bool]:
    """Fold the scale into one factor: alpha = rank, scale 1, the same delta (LoRA and Tucker LoCon: the up
    factor; LoHa: ``w1a``; LoKr: ``w1`` or ``w1a``), and whether there was a scale other than 1 to fold. Modules
    without a rank (full-matrix LoKr, full diffs) have scale 1 already."""
    if m.rank is None or m.kind not in BAKE_INTO:
        return m, False
    factors_ = dict(m.factors)
    folded = m.scale != 1.0 or m.rslora
    if folded:
        role = next(r for r in BAKE_INTO[m.kind] if r in m.factors)
        scale = m.scale
        ref = m.factors[role]
        factors_[role] = TensorRef(
            ref.shape, ref.dtype, lambda: (ref.load().double() * scale).to(torch_dtype(ref.dtype))
        )
    return Module(
        m.name, m.kind, factors_, alpha=float(m.rank), rslora=False, layer=m.layer,
        fan_in_fan_out=m.fan_in_fan_out, magnitude=m.magnitude, dora_axis=m.dora_axis, bias=m.bias,
    ), folded  # fmt: skip


class _Caster:
    """Casts tensors to a dtype and counts what the cast did to them."""

    def __init__(self, dtype: str, report: ConvertReport) -> None:
        self.dtype = dtype
        self.report = report

    def ref(self, ref: TensorRef) -> TensorRef:
        if ref.dtype == self.dtype or not ref.dtype.startswith(("F", "BF")):
            return ref
        target = torch_dtype(self.dtype)

        def load() -> Any:
            import torch

            t = ref.load()
            out = t.to(target)
            finite = torch.isfinite(t)
            self.report.overflow += int((finite & ~torch.isfinite(out)).sum())
            self.report.underflow += int(((t != 0) & (out == 0)).sum())
            return out

        return TensorRef(ref.shape, self.dtype, load)

    def module(self, m: Module) -> Module:
        return Module(
            m.name, m.kind, {k: self.ref(v) for k, v in m.factors.items()}, alpha=m.alpha, rslora=m.rslora,
            layer=m.layer, fan_in_fan_out=m.fan_in_fan_out,
            magnitude=self.ref(m.magnitude) if m.magnitude is not None else None, dora_axis=m.dora_axis,
            bias=self.ref(m.bias) if m.bias is not None else None,
        )  # fmt: skip


def check_args(
    to: Any, rank: Any, energy: Any, alpha_mode: Any, dtype: Any, base_model: Any = None
) -> tuple[int | None, float | None]:
    """The target and the options, checked before anything is read: at most one of a rank (>= 1) and an energy
    fraction (in (0, 1]) for the modules that become LoRA."""
    args.choice(to, "format", TARGETS, optional=False)
    rank, energy = args.integer(rank, "rank"), args.fraction(energy, "energy")
    if rank is not None and energy is not None:
        raise UsageError("give at most one of rank and energy", param="energy")
    args.choice(alpha_mode, "alpha_mode", ALPHA_MODES, optional=False)
    args.choice(dtype, "dtype", DTYPES)
    args.text(base_model, "base_model")
    return rank, energy


def convert_adapter(
    adapter: Adapter,
    to: str,
    *,
    rank: int | None = None,
    energy: float | None = None,
    alpha_mode: str = "keep",
    dtype: str | None = None,
    base_names: list[str] | None = None,
    base_model: str | None = None,
    report: ConvertReport | None = None,
    base_shapes: Mapping[str, tuple[int, ...]] | None = None,
    base_configs: Configs | None = None,
) -> tuple[Adapter, ConvertReport]:
    """``adapter`` in format ``to``. ``base_configs``: the base's configs by component (``unet``, ``transformer``,
    ``model_index``): which model family the names are for, and a UNet's block numbering."""
    import torch

    if not isinstance(adapter, Adapter):
        raise UsageError(f"adapter must be an Adapter (loratools.load_adapter gives one), not {type(adapter).__name__}")
    check_args(to, rank, energy, alpha_mode, dtype, base_model)
    if base_names is not None:
        args.strings(base_names, "base_names")
    rep = report or ConvertReport(str(adapter.source), None, adapter.format, to)
    steps = plan_names(adapter, to, base_names, base_configs)
    meta = {k: v for k, v in adapter.metadata.items() if to == "diffusers" or k != "lora_adapter_metadata"}
    out = Adapter(
        format=to,
        extras=dict(adapter.extras),
        metadata=meta,
        config=dict(adapter.config) if adapter.format == to else {},
        base_model=base_model or adapter.base_model,
    )
    if base_model and "base_model_name_or_path" in out.config:  # a PEFT config of its own: the option replaces it
        _replace(out.config, "base_model_name_or_path", base_model, rep)
    if adapter.format == "diffusers" and to != "diffusers":
        missing_alpha = not adapter.config
        if missing_alpha:
            rep.notes.append("the diffusers file stores no alpha (no lora_adapter_metadata): alpha = rank")
    caster = _Caster(DTYPES[dtype], rep) if dtype else None
    # modules whose rows move (split, fused, swapped) must be plain LoRA first, whatever the target holds
    moved = {s for st in steps if len(st.sources) > 1 or len(st.targets) > 1 or st.swap for s in st.sources if s}
    lycoris_ok = _keeps_lycoris(adapter, to, rank, energy, any(len(st.sources) > 1 for st in steps))
    layers = _layer_shapes(adapter, base_shapes, base_names, base_configs)
    lycoris = [m for n, m in adapter.modules.items() if _lycoris(m) and (not lycoris_ok or n in moved)]
    check_dense_all(lycoris)  # the dense deltas about to be formed, bounded before any work (headers only)
    ready: dict[str, tuple[Module, float, str, str]] = {}
    for src, m in adapter.modules.items():
        new, kept, note = vera_fitted(m, layers.get(src)), 1.0, ""
        if _lycoris(m) and (not lycoris_ok or src in moved):
            if m.magnitude is not None:
                raise IncompatibleAdaptersError(
                    f"{src}: a {m.type} module cannot become plain LoRA with its DoRA magnitude"
                )
            new, kept = _as_lora(m, rank, energy, "cpu", torch.float64, layers.get(src))
            note = f"{m.kind} -> lora rank {new.rank}"
        ready[src] = (new, kept, note, m.kind)
    baked = 0
    for step in steps:
        for new, src, kind, kept, note in _moved(step, ready, rank, energy):
            if alpha_mode == "bake":
                new, folded = _bake(new)
                baked += folded
            if caster is not None:
                new = caster.module(new)
            out.modules[new.name] = new
            rep.modules.append(ConvertedModule(src, new.name, kind, new.rank, kept, note))
    if alpha_mode == "bake" and not baked:
        rep.notes.append("--alpha-mode bake: every module already has scale 1 (alpha = rank): nothing to fold in")
    split = sum(1 for st in steps if len(st.targets) > 1)
    fused = sum(1 for st in steps if len(st.sources) > 1)
    if split:
        rep.notes.append(f"{split} fused module(s) split into their parts by rows (exact; all-zero parts left out)")
    if fused:
        rep.notes.append(f"{fused} group(s) of modules fused into one module each (q, k, v ...; exact at the summed "
                         "rank unless --rank / --energy re-compress)")  # fmt: skip
    outside = outside_sd_scripts(adapter, steps, base_configs) if to == "kohya" and adapter.format != "kohya" else []
    if outside:
        rep.notes.append(f"{len(outside)} module(s) lie outside the blocks sd-scripts' networks/lora*.py build LoRA "
                         f"for, so sd-scripts skips them (ComfyUI and A1111 read them): {', '.join(outside[:4])}"
                         + (" ..." if len(outside) > 4 else ""))  # fmt: skip
    if out.extras and to in ("kohya", "gguf", "diffusers"):
        raise IncompatibleAdaptersError(
            f"{to} cannot hold full tensors ({', '.join(sorted(out.extras)[:3])}): modules_to_save / saved "
            "embeddings would be lost",
            "keep the adapter in peft format, or merge it into the base",
        )
    return out, rep


def convert(
    source: str | os.PathLike[str],
    to: str,
    out: str | os.PathLike[str],
    *,
    rank: int | None = None,
    energy: float | None = None,
    alpha_mode: str = "keep",
    dtype: str | None = None,
    base: str | os.PathLike[str] | None = None,
    base_model: str | None = None,
    base_config: str | os.PathLike[str] | None = None,
    force: bool = False,
    origins: Mapping[str, str] | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    only: str | None = None,
) -> ConvertReport:
    """Read, convert, and write atomically. ``base``: the base model (a local folder or file) whose names resolve
    kohya's and whose config.json a GGUF export reads; ``base_config``: that config.json alone, when there is no
    ``base`` (the CLI fetches it from the Hub, as llama.cpp's converter does). ``origins``: the name the provenance
    record gives a source fetched from the Hub (see ``provenance.record``). ``include`` / ``exclude`` / ``only``
    (``"unet"`` or ``"text_encoders"``): which modules to convert (:mod:`.select`), chosen before any work."""
    from ..formats import input_files
    from ..formats.outputs import check_output_name
    from ..io.atomic import check_output

    args.path(source, "source")
    args.path(out, "out")
    args.optional_path(base, "base")
    args.optional_path(base_config, "base_config")
    origins = provenance.check_origins(origins)
    args.flag(force, "force")
    check_args(to, rank, energy, alpha_mode, dtype, base_model)
    flt = select.module_filter(include, exclude, only)
    check_output(out, force=force, inputs=input_files(source))
    if to == "gguf":
        from ..formats import gguf

        gguf.require()  # before any work: the optional package is there
    adapter = load_adapter(source)
    left_out = select.apply(flt, adapter, str(source))
    check_output_name(out, to)  # what the input is (or is not) is told first
    base_names = None
    base_shapes = None
    hparams = None
    configs = None
    if base is not None:
        from ..io.checkpoint import read_checkpoint

        tensors = read_checkpoint(base).tensors
        base_names = list(tensors)
        base_shapes = {n: t.shape for n, t in tensors.items()}
        configs = base_configs(base)
    if to == "gguf":
        hparams = _hparams(Path(base)) if base is not None else load_config(base_config) if base_config else None
    rep = ConvertReport(str(source), None, adapter.format, to, left_out=[left_out] if flt else [])
    if to == "gguf":
        _drop_unchanged_base_layers(adapter, base, rep)
    if base is not None and not _uses_base(adapter, to, rank, energy):
        rep.notes.append(
            "--base was not needed: it resolves kohya names for another format, gives flattened LyCORIS modules "
            "their kernel, and gives gguf its config; this conversion needs none of these"
        )
    converted, rep = convert_adapter(
        adapter, to, rank=rank, energy=energy, alpha_mode=alpha_mode, dtype=dtype, base_names=base_names,
        base_model=base_model, report=rep, base_shapes=base_shapes, base_configs=configs,
    )  # fmt: skip
    converted.metadata[provenance.KEY] = provenance.record(
        "convert", [(str(source), adapter.format)], origins=origins, to=to, rank=rank, energy=energy, dtype=dtype,
        alpha_mode=alpha_mode, base_model=base_model, **select.recorded(flt),
    )  # fmt: skip
    if to == "kohya":
        _kohya_metadata(converted, adapter, base_model, rep)
    if to == "gguf":
        from ..formats import gguf

        blocks = gguf.blocks_of(base_names) if base_names is not None else None
        written = gguf.write(converted, out, hparams=hparams, base_blocks=blocks, force=force)
    else:
        written = save_adapter(converted, out, to, force=force)
    rep.output = str(written)
    return rep


def _uses_base(adapter: Adapter, to: str, rank: int | None, energy: float | None) -> bool:
    """Whether ``--base`` has a job in this conversion (see the note in :func:`convert`)."""
    if to == "gguf" or (adapter.format == "kohya" and to != "kohya"):
        return True
    if any(m.origin == "vera" for m in adapter.modules.values()):
        return True
    to_lora = to != "kohya" or rank is not None or energy is not None
    return to_lora and any(_lycoris(m) and m.flattened for m in adapter.modules.values())


def _drop_unchanged_base_layers(adapter: Adapter, base: str | os.PathLike[str] | None, rep: ConvertReport) -> None:
    """PEFT saves a targeted embedding whole (``base_layer``) even when training left it as it was; llama.cpp's
    converter skips such copies. loratools drops them only after checking, against --base, that they are
    the base's own tensor."""
    import torch

    from ..io.checkpoint import read_checkpoint

    copies = [k for k, e in adapter.extras.items() if e.role == "base_layer"]
    if not copies or base is None:
        return
    tensors = read_checkpoint(base).tensors
    for key in copies:
        plain = key.replace(".base_layer.", ".")
        if plain not in tensors:
            continue
        if torch.equal(tensors[plain].ref().load(), adapter.extras[key].ref.load()):
            del adapter.extras[key]
            rep.notes.append(f"{key} is an unchanged copy of the base's {plain}: not written (llama.cpp skips it)")


def _kohya_metadata(out: Adapter, source: Adapter, base_model: str | None, rep: ConvertReport) -> None:
    """kohya's header where convert knows more than the tensors: the base model (``ss_sd_model_name``), from
    ``--base-model`` (which replaces what the source said, with a note) or a PEFT config's
    ``base_model_name_or_path``. The network keys (``ss_network_*``) and data hashes are made true by the kohya
    writer itself (:mod:`loratools.formats.kohya_meta`) on every write; the training keys of a kohya source stay
    (the same training, converted)."""
    name = base_model or (out.base_model if source.format != "kohya" else None)
    if name:
        _replace(out.metadata, "ss_sd_model_name", name, rep)


def _replace(table: dict[str, Any], key: str, value: str, rep: ConvertReport) -> None:
    """``--base-model`` written where the target keeps the base model, saying what it replaced."""
    old = table.get(key)
    if old and old != value:
        rep.notes.append(f"--base-model: {key} was {old!r}, now {value!r}")
    table[key] = value


def reads_base_weights(source: str | os.PathLike[str], to: str) -> bool:
    """Whether converting ``source`` to ``to`` reads tensor data of ``base`` besides its names and config: a GGUF
    export of an adapter holding saved base layers (PEFT's ``base_layer`` copies) compares them with the base's own.
    The CLI asks, to fetch a Hub base whole only then (a header-only view otherwise)."""
    if to != "gguf":
        return False
    from ..formats import gguf

    gguf.require()  # the optional package first, as convert itself checks it before reading anything
    return any(e.role == "base_layer" for e in load_adapter(source).extras.values())


def _hparams(base: Path) -> dict[str, Any] | None:
    """The base model's config.json beside ``base`` (a folder, or a file in one); None when there is none."""
    from ..io.checkpoint import read_config

    return read_config(base)
