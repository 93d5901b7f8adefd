"""mlx-lm adapter folders (``mlx_lm.lora``): ``adapters.safetensors`` + ``adapter_config.json``.

The config holds ``fine_tune_type`` (``lora`` or ``dora``; ``full`` is a fine-tune, not an adapter),
``num_layers`` (mlx-lm adapts the last N of ``model.layers``; -1: all) and ``lora_parameters``: ``rank``,
``scale`` (a plain multiplier: no alpha, no division by the rank), ``dropout``, ``keys`` (module paths inside
each layer, such as ``self_attn.q_proj``, or top-level paths such as ``lm_head``; null: every linear layer).

Tensors are named by the model's module paths, which for the models mlx-lm converts are transformers' own
(``model.layers.0.self_attn.q_proj``): ``<module>.lora_a`` (in x r), ``<module>.lora_b`` (r x out) and, for
DoRA, ``<module>.m`` (out: the magnitude of each output row, PEFT's orientation). mlx-lm's LoRALinear adds
``scale * (x @ lora_a) @ lora_b``, so the weight's delta is ``scale * lora_b.T @ lora_a.T``: ``up = lora_b.T``,
``down = lora_a.T``, ``alpha = scale * r``. Embeddings (``embed_tokens`` and kin) add ``scale * lora_a @ lora_b``
to the (vocab x dim) weight: the same transposes with the model's embedding layout.

Writing: mlx-lm builds every adapted layer with one rank and one scale. Lower-rank modules are padded with zero
rows and columns to the highest rank (the same delta), and a module whose scale differs from the most common one
has the ratio folded into its up factor. Layers the file has no factors for are built by mlx-lm with a zero
``lora_b``: they add nothing.
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
from ..model import Adapter, Module, TensorRef
from .common import KeyTable, Rule, build_module, carried_metadata, check_leftovers, group_keys, open_raw

NAME = "mlx"
#: written as a folder holding these (formats.outputs checks -o against it)
FOLDER = "a folder (adapter_config.json + adapters.safetensors)"
WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"
TYPES = ("lora", "dora")

TABLE = KeyTable([Rule(".lora_a", "down"), Rule(".lora_b", "up"), Rule(".m", "magnitude")])

#: leaf names of token-embedding layers (mlx-lm's LoRAEmbedding): their factors are laid out for a vocab x dim weight
EMBEDDINGS = ("embed_tokens", "wte", "embed_in", "word_embeddings", "tok_embeddings")
#: ``model.layers.3.self_attn.q_proj`` -> (``model.layers.``, 3, ``self_attn.q_proj``): mlx-lm's keys are relative
#: to each layer of the model's list of layers
LAYER_RE = re.compile(r"^(?P<prefix>(?:.+\.)?)(?P<index>\d+)\.(?P<rest>.+)$")


def is_mlx_folder(path: Path) -> bool:
    """A folder holding mlx-lm's ``adapters.safetensors`` (and no PEFT weights): it has an ``adapter_config.json``
    too, which is why this is asked before PEFT's detection."""
    return path.is_dir() and (path / WEIGHTS).is_file() and not any((path / n).exists() for n in PEFT_WEIGHTS)


PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def looks_like(keys: list[str]) -> bool:
    return bool(keys) and all(TABLE.split(k) for k in keys) and any(k.endswith(".lora_a") for k in keys)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def check_config(cfg: Any, where: str) -> dict[str, Any]:
    """The fields mlx-lm's loader reads, held to the values it accepts; one line naming the field otherwise."""
    if not isinstance(cfg, dict):
        raise FileFormatError(f"{where}: a config must be a JSON object")
    kind = cfg.get("fine_tune_type", "lora")
    if kind == "full":
        raise FileFormatError(
            f"{where}: fine_tune_type full: these are fine-tuned weights of the whole layers, not an adapter",
            "use them as the model's weights; loratools extract BASE TUNED makes an adapter of the difference",
        )
    if kind not in TYPES:
        raise FileFormatError(f"{where}: fine_tune_type must be lora or dora, not {str(kind)[:40]!r}")
    layers = cfg.get("num_layers", 16)
    if not isinstance(layers, int) or isinstance(layers, bool):
        raise FileFormatError(f"{where}: num_layers must be a whole number, not {str(layers)[:40]!r}")
    params = cfg.get("lora_parameters")
    if not isinstance(params, dict):
        raise FileFormatError(f"{where}: lora_parameters must be an object with rank, scale, dropout and keys")
    rank, scale = params.get("rank"), params.get("scale")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise FileFormatError(f"{where}: lora_parameters.rank must be a positive whole number, not {rank!r}")
    if not _is_number(scale):
        why = " (mlx-lm's config says scale, not alpha: a plain multiplier)" if "alpha" in params else ""
        raise FileFormatError(f"{where}: lora_parameters.scale must be a finite number, not {scale!r}{why}")
    if not math.isfinite(float(scale) * rank):  # type: ignore[arg-type]  # alpha = scale * rank must be a number
        raise FileFormatError(f"{where}: lora_parameters.scale {scale!r} times the rank {rank} is not a finite number")
    keys = params.get("keys")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise FileFormatError(f"{where}: lora_parameters.keys must be a list of module paths or null")
    return cfg


def _folder_and_weights(p: Path) -> tuple[Path, Path]:
    if p.is_dir():
        if not (p / WEIGHTS).is_file():
            raise FileFormatError(f"{p}: no {WEIGHTS} in this folder")
        return p, p / WEIGHTS
    return p.parent, p


def read(path: str | os.PathLike[str], *, problems: list[str] | None = None) -> Adapter:
    """Read an mlx-lm adapter folder (or its ``adapters.safetensors``, with the config beside it)."""
    folder, weights = _folder_and_weights(Path(path))
    if not os.path.lexists(folder / CONFIG):
        raise FileFormatError(
            f"{weights}: no {CONFIG} beside it: the scale mlx-lm applies is only in the config",
            "put the adapter_config.json mlx_lm.lora wrote next to it",
        )
    cfg = check_config(jsonfile.load_object(folder / CONFIG, what="mlx-lm adapter config"), str(folder / CONFIG))
    params = cfg["lora_parameters"]
    scale = float(params["scale"])
    raw = open_raw(weights, lenient=problems is not None)
    if problems is not None:
        problems.extend(raw.problems)
    groups, leftovers, conflicts = group_keys(raw.tensors, TABLE)
    check_leftovers(leftovers, conflicts, NAME, problems)
    model = cfg.get("model")
    adapter = Adapter(
        format=NAME, metadata=dict(raw.metadata), config=cfg, source=str(path),
        base_model=model if isinstance(model, str) and model else None,
    )  # fmt: skip
    dora = cfg.get("fine_tune_type") == "dora"
    for name, g in sorted(groups.items()):
        if "down" not in g.parts or "up" not in g.parts:
            missing = "lora_a" if "down" not in g.parts else "lora_b"
            check_leftovers([], [f"{shown(name)}: has no {missing}"], NAME, problems)
            continue
        a, b = g.parts["down"], g.parts["up"]
        if len(a.shape) != 2 or len(b.shape) != 2:
            check_leftovers([], [f"{shown(name)}: lora_a {list(a.shape)} / lora_b {list(b.shape)} are not matrices "
                                 "(mixture-of-experts SwitchLinear LoRA has no counterpart in other formats)"],
                            NAME, problems)  # fmt: skip
            continue
        if "magnitude" in g.parts and not dora:
            check_leftovers([], [f"{shown(name)}: a DoRA magnitude (.m) in a {cfg.get('fine_tune_type', 'lora')} "
                                 "adapter"], NAME, problems)  # fmt: skip
        if a.shape[1] != params["rank"] or b.shape[0] != params["rank"]:
            check_leftovers([], [f"{shown(name)}: lora_a {list(a.shape)} / lora_b {list(b.shape)} are not of "
                                 f"lora_parameters.rank {params['rank']}: mlx-lm builds every layer with that rank "
                                 "and would not load them"], NAME, problems)  # fmt: skip
            continue
        g.parts["down"], g.parts["up"] = _t(a), _t(b)
        r = g.parts["down"].shape[0]
        layer = "embedding" if name.rpartition(".")[2] in EMBEDDINGS else None
        g.layer = layer
        m = build_module(name, g, alpha=scale * r)
        adapter.modules[name] = m
    return adapter


def _t(ref: TensorRef) -> TensorRef:
    return TensorRef(tuple(reversed(ref.shape)), ref.dtype, lambda: ref.load().T.contiguous())


# ---- writing --------------------------------------------------------------------------------------------


def _problem(m: Module) -> str | None:
    if m.kind != "lora" or "mid" in m.factors:
        return f"{m.name}: mlx-lm adapters hold LoRA only (found {m.type})"
    if m.layer == "conv" or any(len(t.shape) > 2 for t in m.factors.values()):
        return f"{m.name}: mlx-lm adapters have no conv LoRA"
    if m.bias is not None:
        return f"{m.name}: mlx-lm's LoRA layers have no bias"
    if m.magnitude is not None and (m.dora_axis != "out" or sum(s != 1 for s in m.magnitude.shape) > 1):
        return f"{m.name}: mlx-lm's DoRA magnitude is one value per output row"
    return None


def layer_key(name: str) -> tuple[int | None, str]:
    """(the layer index, the key mlx-lm's ``lora_parameters.keys`` names the module by)."""
    hit = LAYER_RE.match(name)
    return (int(hit["index"]), hit["rest"]) if hit else (None, name)


def make_config(adapter: Adapter, rank: int, scale: float) -> dict[str, Any]:
    mods = list(adapter.modules.values())
    keys = sorted({layer_key(n)[1] for n in adapter.modules})
    own = dict(adapter.config) if adapter.format == NAME else {}
    indices = [i for i, _ in map(layer_key, adapter.modules) if i is not None]
    layers = own.get("num_layers")
    # mlx-lm adapts the last N layers: the source's N is kept where the modules still sit in N consecutive layers
    # ending with the last one they reach (as mlx-lm wrote them); anything else gets all layers (-1), where the
    # layers without factors add nothing
    if not (
        isinstance(layers, int)
        and layers > 0
        and set(indices) == set(range(max(indices or [0]) + 1 - layers, max(indices or [0]) + 1))
    ):
        layers = -1
    params = dict(own.get("lora_parameters") or {})
    params.update({"rank": rank, "scale": scale, "keys": keys})
    params.setdefault("dropout", 0.0)
    own.update(
        {
            "fine_tune_type": "dora" if any(m.magnitude is not None for m in mods) else "lora",
            "num_layers": layers,
            "lora_parameters": params,
        }
    )
    if adapter.base_model:
        own.setdefault("model", adapter.base_model)
    return own


def plan(adapter: Adapter) -> tuple[int, float]:
    """The one rank and one scale of the folder: the highest rank, the most common scale."""
    mods = list(adapter.modules.values())
    if not mods:
        raise IncompatibleAdaptersError("an mlx-lm adapter needs at least one module")
    for m in mods:
        why = _problem(m)
        if why:
            raise IncompatibleAdaptersError(why, "convert it to LoRA first: loratools convert SRC --to peft --rank K")
    if len({m.magnitude is not None for m in mods}) > 1:
        raise IncompatibleAdaptersError("mlx-lm cannot mix DoRA and plain LoRA modules in one adapter")
    if adapter.extras:
        raise IncompatibleAdaptersError(
            f"mlx-lm adapters hold no full tensors ({', '.join(sorted(adapter.extras)[:3])})",
            "merge the adapter into its base instead: loratools merge BASE SRC -o OUT",
        )
    if any(n.startswith(("lora_", "lycoris_")) and "." not in n for n in adapter.modules):
        raise IncompatibleAdaptersError(
            "kohya-style module names (lora_unet_...) are not the model's module paths mlx-lm names tensors by",
            "resolve them against the base model first",
        )
    rank = max(int(m.rank or 0) for m in mods)
    scale = Counter(m.scale for m in mods).most_common(1)[0][0]
    if not math.isfinite(scale) or scale == 0:
        scale = 1.0
    return rank, scale


def tensors_for(adapter: Adapter, rank: int, scale: float) -> dict[str, TensorRef]:
    out: dict[str, TensorRef] = {}
    for name, m in adapter.modules.items():
        ratio = m.scale / scale
        down, up = m.factors["down"], m.factors["up"]
        out[name + ".lora_a"] = _padded(down, rank, 1.0, transpose_to="a")
        out[name + ".lora_b"] = _padded(up, rank, ratio, transpose_to="b")
        if m.magnitude is not None:
            out[name + ".m"] = _flat(m.magnitude)
    return out


def _flat(ref: TensorRef) -> TensorRef:
    """DoRA's magnitude as mlx-lm holds it: one value per output row, a vector."""
    return TensorRef((ref.numel,), ref.dtype, lambda: ref.load().reshape(-1))


def _padded(ref: TensorRef, rank: int, ratio: float, transpose_to: str) -> TensorRef:
    """``down`` (r x in) as ``lora_a`` (in x rank) or ``up`` (out x r) as ``lora_b`` (rank x out): transposed,
    zero-padded to ``rank``, ``ratio`` folded in (computed in float64, stored in the factor's dtype)."""
    r = ref.shape[0] if transpose_to == "a" else ref.shape[1]
    width = ref.shape[1] if transpose_to == "a" else ref.shape[0]
    shape = (width, rank) if transpose_to == "a" else (rank, width)

    def load() -> Any:
        import torch

        t = ref.load()
        t = t.T if transpose_to == "b" else t  # up.T is r x out; down stays r x in until the end
        if ratio != 1.0:
            t = (t.double() * ratio).to(t.dtype)
        if r < rank:
            t = torch.cat([t, t.new_zeros(rank - r, t.shape[1])])
        return (t.T if transpose_to == "a" else t).contiguous()

    return TensorRef(shape, ref.dtype, load)


def write(adapter: Adapter, out: str | os.PathLike[str], *, force: bool = False) -> Path:
    rank, scale = plan(adapter)
    config = make_config(adapter, rank, scale)
    tensors = tensors_for(adapter, rank, scale)
    metadata = carried_metadata(adapter, NAME)
    target = Path(out)
    with atomic_dir(target, force=force) as tmp:
        (tmp / CONFIG).write_text(json.dumps(config, indent=4, sort_keys=True) + "\n", encoding="utf-8")
        write_safetensors(tmp / WEIGHTS, tensors, metadata)
    return target
