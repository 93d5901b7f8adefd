"""What the reports (merge, extract, diff) say about their inputs, as data for their JSON and their HTML page: an
adapter's facts (format, base model, ranks, alphas, targets, weight), and where a tensor sits in the model (its
layer and its module type, the two axes of the pages' heatmaps)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OutputError, OutputNameError
from ..io.atomic import check_output
from ..model import Adapter
from ..model.adapter import target_kind

#: what a report file may be named: its suffix says how it is written (a page, or JSON)
REPORT_SUFFIXES = (".json", ".html", ".htm")


def check_report(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    *,
    force: bool,
    inputs: Iterable[str | os.PathLike[str]],
) -> None:
    """Before any work: a report is an output like ``out`` (never an input, never replacing what exists without
    ``force``), apart from it, and named ``.html`` (a page) or ``.json``."""
    check_output(path, force=force, inputs=inputs)
    if out is not None:
        r, o = Path(os.path.realpath(path)), Path(os.path.realpath(out))
        if r == o or r.is_relative_to(o) or o.is_relative_to(r):
            raise OutputError(f"the report {path} and the output {out} overlap", "write the report beside it")
    if Path(path).suffix.lower() not in REPORT_SUFFIXES:  # a usage error (exit 2), still before any work
        raise OutputNameError(
            f"report {path}: the report is written as .json or .html",
            f"name it {Path(path).with_suffix('.html')} (a page) or {Path(path).with_suffix('.json')}",
        )


@dataclass
class AdapterFacts:
    path: str
    format: str
    base_model: str | None
    modules: int
    ranks: list[int] = field(default_factory=list)  # the distinct ranks, smallest first
    alphas: list[float] = field(default_factory=list)  # the distinct alphas stored (none: alpha = rank)
    targets: dict[str, int] = field(default_factory=dict)  # module count per target kind (q_proj, to_k, ...)
    types: dict[str, int] = field(default_factory=dict)  # module count per type (lora, dora, loha, ...)
    weight: float | None = None  # the weight it was merged or mixed with


def adapter_facts(adapter: Adapter, path: str, weight: float | None = None) -> AdapterFacts:
    mods = adapter.modules.values()
    types: dict[str, int] = {}
    for m in mods:
        types[m.type] = types.get(m.type, 0) + 1
    return AdapterFacts(
        path=path,
        format=adapter.format,
        base_model=adapter.base_model,
        modules=len(adapter.modules),
        ranks=sorted({r for m in mods if (r := m.rank) is not None}),
        alphas=sorted({float(m.alpha) for m in mods if m.alpha is not None}),
        targets=_targets(adapter),
        types=dict(sorted(types.items())),
        weight=weight,
    )


def _targets(adapter: Adapter) -> dict[str, int]:
    """Module count per target kind; kohya's flattened names (``lora_unet_..._1_attn1_to_q``) by what follows
    their last block number (``attn1_to_q``), or their prefix (``lora_unet_conv_in`` -> ``conv_in``)."""
    counts: dict[str, int] = {}
    for name in adapter.modules:
        kind = target_kind(name) if "." in name else _KOHYA_TAIL.sub("", name)
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


_KOHYA_TAIL = re.compile(r"^(?:.*_\d+_|lora_[a-z]+\d?_|lycoris_)")
_NUMBER = re.compile(r"\.(\d+)(?=\.)")
_SUFFIX = re.compile(r"\.(weight|bias)$")


def layer_and_type(name: str) -> tuple[str, str]:
    """Where a tensor or module sits: (layer, module type), split after the name's last number that is followed
    by more of the name: ``model.layers.3.self_attn.q_proj.weight`` -> (``model.layers.3``, ``self_attn.q_proj``);
    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` -> (``...transformer_blocks.0``, ``attn1.to_q``).
    A name without such a number has no layer (``""``) and its last part as type (``lm_head``)."""
    bare = _SUFFIX.sub("", name)
    last = None
    for m in _NUMBER.finditer(bare):
        last = m
    if last is None:
        return "", target_kind(bare)
    return bare[: last.end()], bare[last.end() + 1 :]


def layer_order(label: str) -> tuple[tuple[int, object], ...]:
    """A sort key that puts ``x.2`` before ``x.10`` (numbers compared as numbers) and names without a layer last."""
    if not label:
        return ((2, ""),)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in label.split("."))
