"""Is an adapter sound? Every check yields findings (error or warning) instead of stopping at the first."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import FileFormatError, HeaderError, LoratoolsError, UnsafePickleError
from ..formats import FORMATS, adapter_file, detect, load_adapter, patterns, peft
from ..formats.common import open_raw
from ..formats.names import kohya_index
from ..io.checkpoint import BaseTensor, read_checkpoint
from ..io.digest import file_sha256
from ..io.pickle import TORCH_SUFFIXES
from ..model import Adapter, Module, TensorRef
from . import args

Severity = Literal["error", "warning"]

#: every finding code, with what it means (docs/validate.md lists these)
CODES: dict[str, str] = {
    "unreadable": "an adapter that cannot be read (a refused pickle, a config that is not JSON, no weights)",
    "header": "a safetensors header that lies: length, JSON, dtypes, shapes or offsets",
    "structure": "keys that no rule accounts for, or two tensors for one role",
    "empty": "no LoRA modules at all",
    "unpaired": "a factor without its partner (lora_A without lora_B, hada_w1_a without hada_w1_b, ...)",
    "rank-mismatch": "factors whose ranks or shapes do not fit together",
    "rank-config": "a tensor's rank disagrees with the config's r / rank_pattern",
    "alpha": "alpha is missing, zero, negative or not a number",
    "nonfinite": "NaN or Inf in a tensor",
    "zero-up": "an all-zero up factor: the module adds nothing (an untrained adapter?)",
    "mixed-dtypes": "the factors are stored in more than one float dtype",
    "target-unmatched": "a config target_modules entry that matches no module in the file",
    "init": "initialised with a method that changes the base (PiSSA, OLoRA, LoftQ, ...)",
    "stale-hash": "a header sshs_model_hash that does not match the tensors",
    "base-missing": "a module with no weight in the base checkpoint",
    "base-shape": "a module whose delta does not fit its base weight",
    "consumer": "with --for: something that consumer refuses or gets wrong (with the command that fixes it)",
}


@dataclass
class Finding:
    severity: Severity
    code: str
    message: str
    module: str | None = None


@dataclass
class ValidateReport:
    source: str
    format: str | None
    strict: bool
    findings: list[Finding] = field(default_factory=list)
    num_modules: int = 0

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error" or self.strict]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "ok": self.ok,
            "strict": self.strict,
            "num_modules": self.num_modules,
            "errors": sum(f.severity == "error" for f in self.findings),
            "warnings": sum(f.severity == "warning" for f in self.findings),
            "findings": [asdict(f) for f in self.findings],
        }


def validate(
    source: str | os.PathLike[str],
    *,
    format: str | None = None,
    base: str | os.PathLike[str] | None = None,
    strict: bool = False,
    fast: bool = False,
    for_: str | None = None,
) -> ValidateReport:
    """Check an adapter; ``fast`` reads headers only (no NaN scan, no hash check); ``for_`` adds what that
    consumer (vllm, tgi, llama.cpp, ollama, diffusers, comfyui) refuses or gets wrong.

    What is wrong with an adapter is a finding in the report. What keeps it from being checked at all raises
    (a LoratoolsError, as every other function does): ``source`` missing, unreadable or holding no adapter (a
    base checkpoint, a folder with no adapter, a README, a config, a pickle that is no pickle), or a ``base``
    that cannot be read. A weights file whose safetensors header lies, and a refused pickle, are findings: the
    file is an adapter's, and that is what is wrong with it."""
    from .consumers import RULES

    args.path(source, "source")
    args.choice(format, "format", FORMATS)
    args.optional_path(base, "base")
    for value, name in ((strict, "strict"), (fast, "fast")):
        args.flag(value, name)
    args.choice(for_, "for_", RULES)
    base_weights = read_checkpoint(base).tensors if base is not None else None  # unreadable: nothing to check against
    rep = ValidateReport(str(source), format, strict)

    def add(sev: Severity, code: str, msg: str, module: str | None = None) -> None:
        rep.findings.append(Finding(sev, code, msg, module))

    problems: list[str] = []
    if Path(source).exists() and not os.access(source, os.R_OK):
        raise FileFormatError(f"{source}: permission denied")
    try:
        rep.format = format or detect(source)
    except LoratoolsError as e:
        finding = _damage(source, e)
        if finding is None:
            raise  # missing, or no adapter: a README, a config, a base checkpoint, a folder without one
        add("error", *finding)
        return rep
    try:
        adapter = load_adapter(source, rep.format, problems=problems)
    except LoratoolsError as e:
        add("error", "header" if isinstance(e, HeaderError) else "unreadable", _text(e))
        return rep
    for msg in problems:
        add(
            "error",
            "header" if msg.startswith("tensor ") or "overlap" in msg or "data section" in msg else "structure",
            msg,
        )
    rep.num_modules = len(adapter.modules)
    if adapter.format == "peft" and not adapter.config:
        add("warning", "alpha", f"no {peft.CONFIG} beside the weights: alpha unknown, taken as the rank (scale 1)")
    if not adapter.modules:
        add("error", "empty", "no LoRA modules in the file")

    def modules() -> None:
        for m in adapter.modules.values():
            _check_module(m, adapter, add)

    steps: list[Any] = [modules, lambda: _check_dtypes(adapter, add), lambda: _check_config(adapter, add)]
    if not fast:
        steps += [lambda: _check_values(adapter, add), lambda: _check_hash(adapter, add)]
    if base is not None and base_weights is not None:
        steps.append(lambda: _check_base(adapter, base, base_weights, add))
    for step in steps:
        # what the file does to a check (a hostile pattern, data cut short) is a finding, and the others still run
        try:
            step()
        except HeaderError as e:
            add("error", "header", e.message)
        except LoratoolsError as e:
            add("error", "unreadable", e.message + (f" ({e.hint})" if e.hint else ""))
    if for_ is not None:

        def found(sev: str, msg: str, hint: str) -> None:
            add(sev, "consumer", msg + (f" (fix: {hint})" if hint else ""))  # type: ignore[arg-type]

        RULES[for_](adapter, found, _architecture(base) if base is not None else None)
    return rep


def _architecture(base: str | os.PathLike[str]) -> str | None:
    """The base's transformers architecture from its config.json (None without one, or when it names none)."""
    from ..formats.gguf.writer import architecture
    from ..io.checkpoint import read_config

    try:
        cfg = read_config(base)
        return architecture(cfg) if cfg is not None else None
    except LoratoolsError:  # a config that is not one: _check_base and the base's own reader say so
        return None


def _text(e: LoratoolsError) -> str:
    return e.message if isinstance(e, HeaderError) or not e.hint else f"{e.message} ({e.hint})"


def _damage(source: str | os.PathLike[str], e: LoratoolsError) -> tuple[str, str] | None:
    """Why detection failed, as a finding (code, message), when it is the file's own damage: a file named as
    weights (.safetensors or a tensor pickle) whose bytes cannot be read as such, or that holds no tensor at all.
    None when there is nothing to judge: the path is missing, readable weights hold no adapter, or the file is
    not named as weights at all (a README, a config, a .gguf)."""
    p = Path(source)
    if isinstance(e, (HeaderError, UnsafePickleError)) and (p.is_dir() or _named_as_weights(p)):
        return ("header" if isinstance(e, HeaderError) else "unreadable"), _text(e)
    if not p.is_file() or not _named_as_weights(p):
        return None
    try:
        raw = open_raw(p, lenient=True)  # on this error path only: are the bytes weights at all?
    except LoratoolsError as damage:
        return ("header" if isinstance(damage, HeaderError) else "unreadable"), _text(damage)
    return ("empty", _text(e)) if not raw.tensors else None


def _named_as_weights(p: Path) -> bool:
    return p.suffix.lower() in (".safetensors", *TORCH_SUFFIXES)


def _check_module(m: Module, adapter: Adapter, add: Any) -> None:
    for problem in m.check():
        code = "unpaired" if problem.startswith("missing factor") else "rank-mismatch"
        add("error", code, problem, m.name)
    if m.alpha is None:
        if adapter.format == "kohya":
            add("warning", "alpha", "no .alpha tensor: every consumer then uses alpha = rank (scale 1)", m.name)
        elif adapter.format == "peft" and adapter.config:
            add("error", "alpha", "no lora_alpha in the config for this module", m.name)
    elif not math.isfinite(m.alpha) or m.alpha <= 0:
        add("error", "alpha", f"alpha is {m.alpha:g}: it must be a positive number", m.name)
    cfg = _config_for(adapter, m.name)
    if cfg is not None and not m.check() and m.rank is not None:  # check first: rank reads the factors' shapes
        want, _ = peft.rank_alpha_for(cfg[0], cfg[1], _config_name(adapter, m.name))
        if want is not None and want != m.rank:
            add("error", "rank-config", f"tensors have rank {m.rank}, the config says {want}", m.name)


def _config_for(adapter: Adapter, name: str) -> tuple[dict[str, Any], str] | None:
    """The PEFT-style config governing a module, and the module's name relative to it (a PEFT LoRA config: the
    other PEFT types' readers hold their factors to their config themselves)."""
    if adapter.format == "peft" and adapter.config and peft.peft_type_of(adapter.config) == "LORA":
        return adapter.config, name
    if adapter.format == "diffusers":
        comp, _, rel = name.partition(".")
        if comp in adapter.config:
            return adapter.config[comp], rel
    return None


def _config_name(adapter: Adapter, name: str) -> str:
    """How errors name the config governing a module."""
    if adapter.format == "diffusers":
        from ..formats.diffusers import META_KEY

        return f"header {META_KEY} ({name.partition('.')[0]})"
    return peft.CONFIG


def _check_dtypes(adapter: Adapter, add: Any) -> None:
    floats = {t.dtype for m in adapter.modules.values() for t in m.factors.values() if t.dtype.startswith(("F", "BF"))}
    if len(floats) > 1:
        add("warning", "mixed-dtypes", f"factors are stored in several dtypes: {', '.join(sorted(floats))}")


def _check_config(adapter: Adapter, add: Any) -> None:
    configs: list[tuple[str, dict[str, Any]]] = []
    if adapter.format == "peft" and adapter.config:
        configs = [("", adapter.config)]
    elif adapter.format == "diffusers":
        configs = [(comp + ".", cfg) for comp, cfg in adapter.config.items() if isinstance(cfg, dict)]
    for prefix, cfg in configs:
        names = [n[len(prefix) :] for n in adapter.modules if n.startswith(prefix)]
        targets = cfg.get("target_modules")
        where = _config_name(adapter, prefix) + " target_modules"
        if isinstance(targets, str):
            if targets != "all-linear" and not any(patterns.fullmatch(targets, n, where) for n in names):
                add("warning", "target-unmatched", f"target_modules regex {targets!r} matches no module")
        elif isinstance(targets, list):
            for t in targets:
                if not any(n == t or n.endswith("." + t) for n in names):
                    add("warning", "target-unmatched", f"{prefix}target_modules entry {t!r} matches no module")
        init = cfg.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(peft.BASE_MODIFYING_INITS):
            add(
                "warning",
                "init",
                f"init_lora_weights={init!r}: this adapter only fits a base that the initialisation changed, "
                "unless it was saved converted (path_initial_model_for_weight_conversion)",
            )


def _check_values(adapter: Adapter, add: Any) -> None:
    import torch

    def finite(ref: TensorRef) -> bool:
        t = ref.load()
        return not t.is_floating_point() or bool(torch.isfinite(t).all())

    for m in adapter.modules.values():
        bad = [role for role, ref in m.tensors().items() if not finite(ref)]
        if bad:
            add("error", "nonfinite", f"NaN or Inf in {', '.join(bad)}", m.name)
        up = m.factors.get("up") or m.factors.get("w2a") or m.factors.get("w2") or m.factors.get("w2b")
        if up is not None and not bad and not bool(up.load().any()):
            add("warning", "zero-up", "the up factor is all zeros: this module changes nothing", m.name)
    for name, extra in adapter.extras.items():
        if not finite(extra.ref):
            add("error", "nonfinite", f"NaN or Inf in {name}")


def _check_hash(adapter: Adapter, add: Any) -> None:
    want = adapter.metadata.get("sshs_model_hash")
    # kohya's hash is the sha256 of the data section; LyCORIS writes "0x" + a per-tensor hash of its own
    if not want or want.startswith("0x") or adapter.source is None:
        return
    src = adapter_file(adapter.source)
    raw = open_raw(src) if src.is_file() else None
    if raw is None or raw.header is None:
        return
    if file_sha256(src, start=raw.header.data_start) != want.lower():
        add("warning", "stale-hash", "header sshs_model_hash does not match the tensors (A1111 trusts it)")


def _check_base(adapter: Adapter, base: str | os.PathLike[str], tensors: dict[str, BaseTensor], add: Any) -> None:
    index = kohya_index(list(tensors)) if adapter.format == "kohya" else {}
    for m in adapter.modules.values():
        module = index.get(m.name, m.name)
        bt = tensors.get(module + ".weight") or tensors.get(module + ".base_layer.weight")
        if bt is None:
            add("error", "base-missing", f"no weight for this module in {Path(base).name}", m.name)
            continue
        if m.check():
            continue
        want = m.weight_shape()
        have = bt.shape
        # a 1x1 conv LoRA on a Linear, or a LoHa whose conv kernel is flattened, fits by element count
        flat_fit = want[0] == have[0] and math.prod(want) == math.prod(have)
        if tuple(want) != tuple(have) and not flat_fit:
            hint = ""
            if tuple(want[:2]) == tuple(have[1::-1]):
                hint = " (transposed: fan_in_fan_out set wrong?)"
            add("error", "base-shape", f"delta is {list(want)}, base weight is {list(have)}{hint}", m.name)
