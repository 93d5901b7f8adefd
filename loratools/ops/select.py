"""Which modules an operation works on: ``--include`` / ``--exclude`` (regular expressions searched in module names
as the adapter names them, matched at bounded cost like extract's) and the shorthands ``--unet-only`` (the
denoiser: diffusers ``unet`` / ``transformer`` / ``prior``, kohya ``lora_unet_`` / ``lora_transformer_``) and
``--text-encoders-only`` (``text_encoder*``, kohya ``lora_te*_``).

A filter is applied to the adapters as read (headers only), before any tensor is loaded; an input it leaves
empty is an error, and what it leaves out is reported. An adapter without pipeline components (an LLM adapter,
a LyCORIS ``lycoris_`` network on a whole model) has no UNet and no text encoder: a shorthand is refused there,
never a silent no-op.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import IncompatibleAdaptersError, ShapeError, UsageError
from ..formats import patterns
from ..formats.names import component_of, split_kohya
from ..model import Adapter
from ..model.components import COMPONENT_RE
from . import args

#: ``only`` values, and the diffusers components each keeps
ONLY = {
    "unet": frozenset({"unet", "transformer", "prior"}),
    "text_encoders": frozenset({"text_encoder", "text_encoder_2", "text_encoder_3"}),
}
#: how the options spell them, for messages
ONLY_OPTION = {"unet": "--unet-only", "text_encoders": "--text-encoders-only"}


def selector(include: Iterable[str], exclude: Iterable[str]) -> Callable[[str], bool]:
    """``--include`` / ``--exclude`` as a test of a name: kept when it matches some include (or there is none)
    and no exclude (``re.search`` semantics)."""
    # user patterns: Python re syntax, matched at bounded cost (a pathological one is refused, never hangs)
    inc = patterns.pattern_set(args.strings(include, "include"), "--include", "search", UsageError)
    exc = patterns.pattern_set(args.strings(exclude, "exclude"), "--exclude", "search", UsageError)

    def keep(name: str) -> bool:
        if inc.patterns and not inc.any(name):
            return False
        return not exc.any(name)

    return keep


@dataclass(frozen=True)
class ModuleFilter:
    """A checked filter (see :func:`module_filter`)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    only: str | None = None

    def describe(self) -> str:
        parts = [f"--include {p}" for p in self.include] + [f"--exclude {p}" for p in self.exclude]
        if self.only:
            parts.append(ONLY_OPTION[self.only])
        return " ".join(parts)


@dataclass
class LeftOut:
    """What a filter left out of one input: its module names (and full tensors, for PEFT ``modules_to_save``)."""

    source: str
    modules: list[str] = field(default_factory=list)


def module_filter(include: Any = (), exclude: Any = (), only: Any = None) -> ModuleFilter | None:
    """The filter arguments of an operation, checked before anything is read (a pattern ``re`` refuses, or one
    whose matching would not be bounded, is a :class:`UsageError`); None when nothing is filtered."""
    inc, exc = tuple(args.strings(include, "include")), tuple(args.strings(exclude, "exclude"))
    args.choice(only, "only", tuple(ONLY))
    selector(inc, exc)  # compiles them: a bad pattern is refused here
    if not inc and not exc and only is None:
        return None
    return ModuleFilter(inc, exc, only)


def recorded(flt: ModuleFilter | None) -> dict[str, Any]:
    """The filter as the provenance record keeps it (nothing when there is none)."""
    if flt is None:
        return {}
    return {"include": list(flt.include) or None, "exclude": list(flt.exclude) or None, "only": flt.only}


def component(name: str, adapter: Adapter, whole: str | None) -> str | None:
    """The pipeline component of one module name as the adapter names it; ``whole``: the component of an
    adapter whose names carry none (a PEFT adapter of a UNet)."""
    if adapter.format == "kohya" and "." not in name:
        try:
            return split_kohya(name)[0] or None
        except ShapeError:  # a kohya name with a prefix of no component
            return None
    m = COMPONENT_RE.match(name)
    return m.group(1) if m else whole


def _whole(adapter: Adapter) -> str | None:
    names = [n for n in adapter.modules if not COMPONENT_RE.match(n)]
    if adapter.format == "kohya" or not names:
        return None
    return component_of(names)


def apply(flt: ModuleFilter | None, adapter: Adapter, source: str) -> LeftOut:
    """Leave out of ``adapter`` (in place) what ``flt`` does not select, and say what that was. Refused: a
    shorthand on an adapter without pipeline components, and a filter that keeps nothing of this input."""
    left = LeftOut(source)
    if flt is None:
        return left
    keep = selector(flt.include, flt.exclude)
    whole = _whole(adapter)
    comps = {n: component(n, adapter, whole) for n in [*adapter.modules, *adapter.extras]}
    if flt.only is not None and not any(comps.values()):
        raise IncompatibleAdaptersError(
            f"{ONLY_OPTION[flt.only]}: {source} has no UNet, transformer or text encoder (its modules name no "
            "diffusion pipeline component: an LLM adapter?)",
            "select modules with --include / --exclude REGEX instead",
        )

    def kept(name: str) -> bool:
        if flt.only is not None and comps[name] not in ONLY[flt.only]:
            return False
        return keep(name.removesuffix(".weight").removesuffix(".base_layer"))

    for name in [n for n in comps if not kept(n)]:
        adapter.modules.pop(name, None)
        adapter.extras.pop(name, None)
        left.modules.append(name)
    if left.modules:
        _narrow_config(adapter)
    if not adapter.modules and not adapter.extras:
        raise IncompatibleAdaptersError(
            f"{flt.describe()} selects none of the {len(left.modules)} module(s) of {source}",
            "module names are matched as `loratools inspect` lists them (kohya: lora_unet_..., diffusers: "
            "unet.down_blocks..., PEFT: model.layers.0...)",
        )
    return left


def _narrow_config(adapter: Adapter) -> None:
    """A PEFT config (a diffusers file's, per component) names the modules it targets: after a filter, exactly
    the modules kept (full paths, which PEFT matches exactly), and no ``modules_to_save`` copy that was left out.
    Otherwise PEFT would build layers the file has no weights for."""
    if adapter.format == "peft":
        _narrow(adapter.config, list(adapter.modules), list(adapter.extras))
    elif adapter.format == "diffusers":
        for comp, cfg in adapter.config.items():
            if isinstance(cfg, dict):
                rel = [n.partition(".")[2] for n in adapter.modules if n.startswith(comp + ".")]
                extras = [n.partition(".")[2] for n in adapter.extras if n.startswith(comp + ".")]
                _narrow(cfg, rel, extras)


def _narrow(cfg: dict[str, Any], modules: list[str], extras: list[str]) -> None:
    if "target_modules" in cfg:
        cfg["target_modules"] = sorted(modules)
    saved = cfg.get("modules_to_save")
    if isinstance(saved, list):
        kept = [m for m in saved if any(e == m or e.startswith(m + ".") or f".{m}." in f".{e}" for e in extras)]
        cfg["modules_to_save"] = kept or None
