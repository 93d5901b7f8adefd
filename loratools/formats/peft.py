"""PEFT adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors`` (or the legacy pickle
``adapter_model.bin``). Also what unsloth, LLaMA-Factory, Axolotl and mergekit write.

Keys: ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (``.lora_B.bias`` with ``lora_bias``),
``.lora_embedding_A`` / ``.lora_embedding_B`` for embeddings, ``.lora_magnitude_vector`` for DoRA;
full tensors: ``<module>.weight`` for ``modules_to_save``, ``<module>.base_layer.weight`` for saved embeddings,
``<module>.token_adapter.trainable_tokens_delta`` for trainable tokens.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import FileFormatError, IncompatibleAdaptersError
from ..io import jsonfile
from ..io.atomic import atomic_dir
from ..io.safetensors import shown, write_safetensors
from ..model import Adapter, Extra, Module, TensorRef, target_kind
from . import patterns as patterns_mod
from .common import KeyTable, Rule, build_module, carried_metadata, check_leftovers, group_keys, open_raw

NAME = "peft"
#: written as a folder holding these (formats.outputs checks -o against it)
FOLDER = "a folder (adapter_config.json + adapter_model.safetensors)"
PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

TABLE = KeyTable(
    [
        Rule(".lora_A.weight", "down"),
        Rule(".lora_B.weight", "up"),
        Rule(".lora_B.bias", "bias"),
        Rule(".lora_embedding_A", "down", layer="embedding"),
        Rule(".lora_embedding_B", "up", layer="embedding"),
        Rule(".lora_magnitude_vector", "magnitude"),
        Rule(".lora_magnitude_vector.weight", "magnitude"),
    ]
)

#: init methods whose adapters only fit a base that the initialisation itself changed
BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "eva")


def has_config(folder: Path) -> bool:
    """Whether ``folder`` holds an ``adapter_config.json`` of any kind: one that is a folder, a FIFO or a broken
    link is then refused when read, never silently skipped (the weights would be read with a guessed alpha)."""
    return os.path.lexists(folder / CONFIG)


def is_peft_folder(path: Path) -> bool:
    return path.is_dir() and has_config(path)


def looks_like(keys: list[str]) -> bool:
    return any(k.startswith(PREFIX) for k in keys) and any(TABLE.split(k) for k in keys)


def pattern_key(patterns: dict[str, Any], name: str, what: str = "rank_pattern") -> str | None:
    """PEFT's rule: the first key, in insertion order, with ``re.match(rf"(.*\\.)?({key})$", name)``; matched at
    bounded cost (:mod:`loratools.formats.patterns`), an invalid or pathological key refused."""
    return patterns_mod.pattern_key(list(patterns), name, what)


def rank_alpha_for(
    config: dict[str, Any], name: str, where: str = "config", alpha_key: str = "lora_alpha"
) -> tuple[int | None, float | None]:
    """The rank and alpha PEFT gives module ``name`` under ``config`` (patterns applied); ``where`` names the
    config in errors. ``alpha_key``: the global alpha's field (``alpha`` in LoHa / LoKr configs)."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rk = pattern_key(rank_pattern, name, f"{where} rank_pattern")
    ak = pattern_key(alpha_pattern, name, f"{where} alpha_pattern")
    r = rank_pattern[rk] if rk is not None else config.get("r")
    a = alpha_pattern[ak] if ak is not None else config.get(alpha_key)
    return (_rank(r), _alpha(a))


def _rank(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _alpha(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return _finite(value)


def _finite(value: int | float) -> float | None:
    try:
        x = float(value)
    except OverflowError:
        return None
    return x if math.isfinite(x) else None


def _is_rank(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_RANK


def _is_alpha(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v) is not None


def _is_strings(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


#: the largest rank a config may give; a tensor dimension beyond it cannot exist anyway
MAX_RANK = 2**31 - 1

#: config fields that change the math (or that PEFT itself would fail on), and the JSON values PEFT gives them
_FIELDS: dict[str, tuple[Any, str]] = {
    "r": (_is_rank, f"a positive integer (at most {MAX_RANK})"),
    "lora_alpha": (_is_alpha, "a finite number"),
    "rank_pattern": (
        lambda v: isinstance(v, dict) and all(_is_rank(x) for x in v.values()),
        "an object of module pattern -> positive integer rank",
    ),
    "alpha_pattern": (
        lambda v: isinstance(v, dict) and all(_is_alpha(x) for x in v.values()),
        "an object of module pattern -> finite number",
    ),
    "target_modules": (lambda v: isinstance(v, str) or _is_strings(v), "a list of names or a regex string"),
    "exclude_modules": (lambda v: isinstance(v, str) or _is_strings(v), "a list of names or a regex string"),
    "modules_to_save": (lambda v: isinstance(v, str) or _is_strings(v), "a list of module names"),
    "layers_pattern": (lambda v: isinstance(v, str) or _is_strings(v), "a name or a list of names"),
    "layers_to_transform": (
        lambda v: (
            (isinstance(v, int) and not isinstance(v, bool))
            or (isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v))
        ),
        "a layer number or a list of them",
    ),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "peft_type": (lambda v: isinstance(v, str), "a string"),
    "task_type": (lambda v: isinstance(v, str), "a string"),
    "bias": (lambda v: isinstance(v, str), "a string"),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or a method name"),
    "base_model_name_or_path": (lambda v: isinstance(v, str), "a string"),
    # LoHa / LoKr, AdaLoRA, VeRA
    "alpha": (_is_alpha, "a finite number"),
    "init_r": (lambda v: _is_rank(v) or v == 0, f"a whole number from 0 to {MAX_RANK}"),
    "decompose_both": (lambda v: isinstance(v, bool), "true or false"),
    "decompose_factor": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number (-1: automatic)"),
    "use_effective_conv2d": (lambda v: isinstance(v, bool), "true or false"),
    "save_projection": (lambda v: isinstance(v, bool), "true or false"),
}


def _is_mask(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, bool) for x in v)


#: the fields whose meaning differs by peft_type: AdaLoRA's rank_pattern holds each module's mask of kept triplets
_TYPE_FIELDS: dict[str, dict[str, tuple[Any, str]]] = {
    "ADALORA": {
        "rank_pattern": (
            lambda v: isinstance(v, dict) and all(_is_mask(x) for x in v.values()),
            "an object of module.lora_E -> list of true/false (AdaLoRA's masks)",
        )
    },
}

#: fields where an explicit null makes PEFT itself fail (absent means its default), by peft_type
_NOT_NULL_BY_TYPE = {
    "LORA": ("r", "lora_alpha", "rank_pattern", "alpha_pattern"),
    "LOHA": ("r", "alpha", "rank_pattern", "alpha_pattern"),
    "LOKR": ("r", "alpha", "rank_pattern", "alpha_pattern"),
    "ADALORA": ("init_r", "lora_alpha", "alpha_pattern"),
    "VERA": ("r",),
}
_NOT_NULL = _NOT_NULL_BY_TYPE["LORA"]


def peft_type_of(cfg: dict[str, Any]) -> str:
    """The config's ``peft_type``, upper-case (PEFT's enum values); LORA when it names none."""
    value = cfg.get("peft_type")
    return value.upper() if isinstance(value, str) else "LORA"


def _preview(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (ValueError, TypeError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_config(cfg: dict[str, Any], where: str) -> None:
    """Refuse a config whose fields have values PEFT would never write or would fail on (one clear line, not a
    traceback later), and patterns that are not valid regular expressions (PEFT raises on them too)."""
    if not isinstance(cfg, dict):
        raise FileFormatError(f"{where}: a config must be a JSON object, not {_preview(cfg)}")
    kind = peft_type_of(cfg)
    fields = {**_FIELDS, **_TYPE_FIELDS.get(kind, {})}
    not_null = _NOT_NULL_BY_TYPE.get(kind, _NOT_NULL)
    for key, (ok, what) in fields.items():
        value = cfg.get(key)
        # absent means PEFT's default; an explicit null in these fields makes PEFT itself fail
        if (value is not None or (key in not_null and key in cfg)) and not ok(value):
            raise FileFormatError(f"{where}: {key} must be {what}, not {_preview(value)}")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key) and not (kind == "ADALORA" and key == "rank_pattern"):  # AdaLoRA's: names, not patterns
            patterns_mod.check(list(cfg[key]), f"{where} {key}", "peft")
    for key in ("target_modules", "exclude_modules"):
        if isinstance(cfg.get(key), str):
            patterns_mod.check([cfg[key]], f"{where} {key}", "fullmatch")
    layers = cfg.get("layers_pattern")
    if layers:  # PEFT builds rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\." from each
        for pattern in [layers] if isinstance(layers, str) else layers:
            patterns_mod.check([rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."], f"{where} layers_pattern", "search")


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    cfg = jsonfile.load_object(path, what="PEFT adapter config")
    check_config(cfg, str(path))
    return cfg


def find_weights(folder: Path) -> Path:
    for name in WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise FileFormatError(
        f"{folder}: has {CONFIG} but no {' or '.join(WEIGHTS)}",
        "a PEFT folder needs its weights file beside the config",
    )


def read(path: str | os.PathLike[str], *, problems: list[str] | None = None) -> Adapter:
    """Read a PEFT folder, or a bare PEFT weights file (alpha then comes from a config beside it, if any).

    With ``problems`` given (a list), damage that validate reports is collected there instead of raised.
    """
    from . import peft_types

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    config = read_config(folder) if has_config(folder) else {}
    weights = find_weights(p) if p.is_dir() else p
    peft_type = peft_type_of(config)
    if peft_type not in peft_types.TYPES:
        raise FileFormatError(
            f"{folder / CONFIG}: peft_type {shown(peft_type, 40)} is not supported",
            f"loratools reads PEFT {', '.join(peft_types.TYPES)} adapters",
        )
    raw = open_raw(weights, lenient=problems is not None)
    if problems is not None:
        problems.extend(raw.problems)
    if peft_type != "LORA":
        adapter = Adapter(
            format=NAME, metadata=dict(raw.metadata), config=config,
            base_model=config.get("base_model_name_or_path") or None, source=str(p),
        )  # fmt: skip
        peft_types.fill(adapter, peft_type, raw.tensors, config, folder / CONFIG, problems)
        return adapter
    stripped: dict[str, TensorRef] = {}
    leftovers: list[str] = []
    for key, ref in raw.tensors.items():
        if key.startswith(PREFIX):
            stripped[key[len(PREFIX) :]] = ref
        else:
            leftovers.append(key)
    groups, rest, conflicts = group_keys(stripped, TABLE)
    adapter = Adapter(
        format=NAME,
        metadata=dict(raw.metadata),
        config=config,
        base_model=config.get("base_model_name_or_path") or None,
        source=str(p),
    )
    take_extras(adapter, rest, stripped, config, leftovers)
    check_leftovers(leftovers, conflicts, NAME, problems)
    rslora = bool(config.get("use_rslora", False))
    fifo = bool(config.get("fan_in_fan_out", False))
    for name, g in sorted(groups.items()):
        _, alpha = rank_alpha_for(config, name, str(folder / CONFIG))
        if not config:
            alpha = None  # no config: nothing says otherwise, alpha = rank
        adapter.modules[name] = build_module(name, g, alpha=alpha, rslora=rslora, fan_in_fan_out=fifo)
    return adapter


def modules_to_save(config: dict[str, Any]) -> list[str]:
    mts = config.get("modules_to_save") or []
    return [mts] if isinstance(mts, str) else [str(m) for m in mts]


def take_extras(
    adapter: Adapter, rest: list[str], stripped: dict[str, TensorRef], config: dict[str, Any], leftovers: list[str]
) -> None:
    """The keys no module claimed (``rest``, without the ``base_model.model.`` prefix): full tensors of
    ``modules_to_save`` and saved embeddings go to ``adapter.extras``; any other is a leftover (with its prefix)."""
    saved = modules_to_save(config)
    for key in rest:
        role = extra_role(key, saved)
        if role is None:
            leftovers.append(PREFIX + key)
        else:
            adapter.extras[key] = Extra(stripped[key], role)


def extra_role(key: str, saved: list[str]) -> Any:
    """The role of a full tensor in a PEFT folder (``saved``: the config's ``modules_to_save``), or None: an
    unknown key."""
    if key.endswith(".base_layer.weight"):
        return "base_layer"
    if key.endswith("trainable_tokens_delta"):
        return "trainable_tokens"
    module, _, param = key.rpartition(".")
    if param in ("weight", "bias") and saved:
        escaped = [re.escape(m) for m in saved]
        if patterns_mod.pattern_key(escaped, module, f"{CONFIG} modules_to_save") is not None:
            return "modules_to_save"
    # an embedding or lm_head saved whole (resized vocabulary, or targeted embeddings) is kept too
    if param == "weight" and module.rpartition(".")[2] in ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out"):
        return "base_layer"
    return None


# ---- writing --------------------------------------------------------------------------------------------


def _common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def pattern_exceptions(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """The modules whose value is not ``default``, keyed by full path, in an order PEFT reads right: it gives a
    module the value of the first key that matches the end of its path (``get_pattern_key``), so a path that ends
    with another key (Flux's ``single_transformer_blocks.0.proj_out`` and ``proj_out``) is listed too, with its own
    value, and longer paths come first."""
    keys = {n for n, v in values.items() if v != default}
    for n in values:
        parts = n.split(".")
        if n not in keys and any(".".join(parts[i:]) in keys for i in range(1, len(parts))):
            keys.add(n)
    return {n: values[n] for n in sorted(keys, key=lambda k: (-k.count("."), k))}


def set_targets(cfg: dict[str, Any], adapter: Adapter) -> None:
    """A written config's ``target_modules`` (kept when it is a regex or already names every module's kind),
    ``base_model_name_or_path`` and ``task_type``."""
    old = cfg.get("target_modules")
    wanted = targets(adapter)
    if not (isinstance(old, list) and set(wanted) <= set(old)) and not isinstance(old, str):
        cfg["target_modules"] = wanted
    cfg.setdefault("base_model_name_or_path", adapter.base_model)
    cfg.setdefault("task_type", None)


def targets(adapter: Adapter) -> list[str]:
    """``target_modules`` for a written config: PEFT matches a list entry against the end of a module path, so
    ``to_out.0``, not ``0`` (which would match any ``.0``)."""
    return sorted({target_kind(n) for n in adapter.modules})


def make_config(adapter: Adapter) -> dict[str, Any]:
    """A config under which PEFT gives every module exactly the rank, alpha and scale it has here.

    The source's own config is kept when it already does; otherwise r / lora_alpha take the most common
    values and rank_pattern / alpha_pattern name the exceptions by full module path.
    """
    mods = list(adapter.modules.values())
    for m in mods:
        if m.kind != "lora":
            raise IncompatibleAdaptersError(
                f"{m.name}: PEFT LoRA folders cannot hold {m.kind} modules", "convert them to LoRA first"
            )
        if "mid" in m.factors:
            raise IncompatibleAdaptersError(f"{m.name}: PEFT cannot hold a LoRA with a Tucker core")
        if m.magnitude is not None and m.dora_axis != "out":
            raise IncompatibleAdaptersError(f"{m.name}: DoRA magnitude per input column has no PEFT form")
    if len({m.magnitude is not None for m in mods}) > 1:
        raise IncompatibleAdaptersError("PEFT cannot mix DoRA and plain LoRA modules in one adapter")
    if len({m.fan_in_fan_out for m in mods}) > 1:
        raise IncompatibleAdaptersError("PEFT cannot mix fan_in_fan_out and plain modules in one adapter")
    # mixed rsLoRA and plain modules: bake rsLoRA into alpha (alpha' / r == alpha / sqrt(r))
    rslora = len({m.rslora for m in mods}) == 1 and bool(mods[0].rslora)

    def alpha_of(m: Module) -> float:
        r = m.rank or 1
        a = float(m.alpha) if m.alpha is not None else float(r)
        if m.rslora and not rslora and m.alpha is not None:
            a = a * r / math.sqrt(r)
        return a

    cfg: dict[str, Any] = (
        dict(adapter.config) if adapter.format == NAME and peft_type_of(adapter.config) == "LORA" else {}
    )
    if (
        cfg
        and bool(cfg.get("use_rslora", False)) == rslora
        and all(rank_alpha_for(cfg, name) == (m.rank, alpha_of(m)) for name, m in adapter.modules.items())
    ):
        return cfg
    # keyed by the names the adapter files them under (a diffusers component's are relative to it)
    ranks = {name: int(m.rank or 0) for name, m in adapter.modules.items()}
    alphas = {name: alpha_of(m) for name, m in adapter.modules.items()}
    r = _common(list(ranks.values())) if mods else 8
    a = _common(list(alphas.values())) if mods else 8.0
    cfg.update(
        {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": int(a) if float(a).is_integer() else a,
            "use_rslora": rslora,
            "use_dora": any(m.magnitude is not None for m in mods),
            "fan_in_fan_out": any(m.fan_in_fan_out for m in mods),
            "rank_pattern": pattern_exceptions(ranks, r),
            "alpha_pattern": {n: (int(v) if v.is_integer() else v) for n, v in pattern_exceptions(alphas, a).items()},
        }
    )
    set_targets(cfg, adapter)
    cfg.setdefault("bias", "none")
    return cfg


def tensors_for(adapter: Adapter) -> dict[str, TensorRef]:
    out: dict[str, TensorRef] = {}
    for name, m in adapter.modules.items():
        layer = "embedding" if m.layer == "embedding" else None
        for role, ref in m.tensors().items():
            if role == "magnitude" and len(ref.shape) > 1:  # kohya's dora_scale (out, 1): PEFT keeps (out,)
                if m.layer != "linear":
                    raise IncompatibleAdaptersError(f"{name}: a conv DoRA magnitude has no PEFT form here")
                ref = _flat(ref)
            out[PREFIX + name + TABLE.suffix_for(m.kind, role, layer)] = ref
    for key, extra in adapter.extras.items():
        out[PREFIX + key] = extra.ref
    return out


def _flat(ref: TensorRef) -> TensorRef:
    return TensorRef((ref.numel,), ref.dtype, lambda: ref.load().reshape(-1))


def write(adapter: Adapter, out: str | os.PathLike[str], *, force: bool = False) -> Path:
    if any(n.startswith(("lora_", "lycoris_")) and "." not in n for n in adapter.modules):
        raise IncompatibleAdaptersError(
            "kohya-style module names (lora_unet_...) have no dots to turn into PEFT module paths",
            "resolve them against the base model first",
        )
    from . import peft_types

    typed = peft_types.writable(adapter)
    if typed is not None:
        config = peft_types.lycoris_config(adapter, typed)
        tensors = peft_types.lycoris_tensors(adapter)
    else:
        config = make_config(adapter)
        tensors = tensors_for(adapter)
    metadata = {"format": "pt", **carried_metadata(adapter, NAME)}
    target = Path(out)
    with atomic_dir(target, force=force) as tmp:
        # top level sorted; a pattern's order is PEFT's precedence (the first key that matches wins): kept
        (tmp / CONFIG).write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n", encoding="utf-8")
        write_safetensors(tmp / WEIGHTS[0], tensors, metadata)
    return target
