"""A model card for an adapter, from what ``inspect`` reports: the front matter's facts in the Hub's conventions,
and a body with the adapter's facts, the recipe when loratools made it, and how to load it. Presentation only:
``hub.push`` writes the front matter (huggingface_hub's ``ModelCard``) and uploads; the CLI composes the two."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from ..units import few, human_bytes
from .inspect import InspectReport
from .provenance import describe

#: PEFT's task_type -> the Hub's pipeline_tag
PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
_KINDS = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA", "full": "full-diff"}


def _g(x: float) -> str:
    return f"{x:g}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def recipe(entry: dict[str, Any]) -> str:
    """The recipe of a file loratools made, for people: ``mix of A (0.7) and B (0.3), svd to rank 16``."""
    inputs = [PurePosixPath(str(i.get("source", "?")).replace("\\", "/")).name for i in entry.get("inputs", [])]
    command = entry.get("command")
    if not inputs:
        return describe(entry)
    if command == "mix":
        weights = entry.get("weights") or [1.0] * len(inputs)
        parts = [f"{n} ({_g(float(w))})" for n, w in zip(inputs, weights, strict=False)]
        text = f"mix of {_join(parts)}"
        method, rank = entry.get("method"), entry.get("rank")
        if method == "svd":
            text += f", svd to rank {rank}" if rank else ", svd"
        elif method == "cat":
            text += ", exact (cat: the ranks add up)"
        elif method == "linear":
            text += ", PEFT's linear combination of factors (not the weighted sum of the deltas)"
    elif command == "resize":
        text = f"resize of {inputs[0]}"
        if entry.get("rank"):
            text += f" to rank {entry['rank']}"
        elif entry.get("energy"):
            text += f", keeping {_g(float(entry['energy']))} of the energy"
    else:
        return describe(entry)
    if entry.get("dtype"):
        text += f", stored as {entry['dtype']}"
    return text


def _spread(values: list[float | int | None]) -> str:
    known = sorted({v for v in values if v is not None})
    if not known:
        return "-"
    shown = [str(int(v)) if float(v).is_integer() else _g(float(v)) for v in known]
    return shown[0] if len(shown) == 1 else f"{shown[0]} to {shown[-1]} (by module)"


def card_metadata(
    rep: InspectReport, *, is_hub_id: Callable[[str | None], bool], license: str | None = None
) -> dict[str, Any]:
    """The model card's YAML front matter, in the Hub's conventions. ``is_hub_id`` says whether a string is a model
    id on the Hub (``hub.is_model_id``: the CLI passes it, ops knows no Hub)."""
    meta: dict[str, Any] = {}
    # PEFT's base_model_name_or_path is what from_pretrained took: a Hub id unless it is a local path. kohya's
    # "base model" fields are labels (sd_v1, a checkpoint's file name), never ids, and are left to the body.
    if rep.format == "peft" and is_hub_id(rep.base_model) and not os.path.exists(rep.base_model or ""):
        meta["base_model"] = rep.base_model
        meta["base_model_relation"] = "adapter"
    library = {"peft": "peft", "diffusers": "diffusers"}.get(rep.format)
    if library:
        meta["library_name"] = library
    task = rep.config.get("task_type") if rep.format == "peft" else None
    if isinstance(task, str) and task in PIPELINE_TAGS:
        meta["pipeline_tag"] = PIPELINE_TAGS[task]
    license = license or rep.metadata.get("modelspec.license") or rep.metadata.get("license")
    if license:
        meta["license"] = license
    meta["tags"] = ["lora", rep.format, "loratools"]
    return meta


def card_body(rep: InspectReport, repo_id: str, meta: dict[str, Any], files: list[str], endpoint: str) -> str:
    """The markdown of a README.md for an adapter (below its front matter): the facts ``inspect`` gives, the recipe
    when loratools made it, and how to load it. ``files``: what the push uploads; ``endpoint``: the Hub in use, for
    the base model's link."""
    name = repo_id.split("/", 1)[1]
    base = rep.base_model
    link = f"[{base}]({endpoint.rstrip('/')}/{base})"
    base_text = link if "base_model" in meta else f"`{base}`" if base else None
    kinds = ", ".join(f"{k} {v}" for k, v in rep.types.items())
    kind_text = "/".join(dict.fromkeys(_KINDS.get(t.split("+")[0], t) for t in rep.types)) or "LoRA"
    targets = [f"{k} x{v}" for k, v in rep.target_modules.items()]
    target_text = few(targets, 8)
    lines = [
        f"# {name}",
        "",
        f"A {kind_text} adapter"
        + (f" for {base_text}" if base_text else "")
        + f", in {rep.format} format. Published with loratools.",
        "",
        "| | |",
        "|---|---|",
        f"| Format | {rep.format} |",
        f"| Base model | {base_text or 'unknown'} |",
        f"| Rank | {_spread([m.rank for m in rep.modules])} |",
        f"| Alpha | {_spread([m.alpha for m in rep.modules])} |",
        f"| Targets | {target_text or '-'} |",
        f"| Modules | {rep.num_modules} ({kinds}) |",
        f"| Parameters | {rep.num_params:,} |",
        f"| Size | {human_bytes(rep.size_on_disk)} ({', '.join(files[:4])}{', ...' if len(files) > 4 else ''}) |",
        f"| Dtypes | {', '.join(f'{k} x{v}' for k, v in rep.dtypes.items())} |",
    ]
    if rep.made_by:
        lines += ["", "## How it was made", "", recipe(rep.made_by) + ".", "", f"Record: `{describe(rep.made_by)}`"]
    lines += ["", "## Use", ""]
    if rep.format == "peft":
        lines += [
            "```python",
            "from peft import PeftModel",
            "",
            f'model = PeftModel.from_pretrained(base_model, "{repo_id}")' + (f"  # base_model: {base}" if base else ""),
            "```",
        ]
    else:
        weight = files[0] if len(files) == 1 else None
        lines += [
            "```python",
            f'pipe.load_lora_weights("{repo_id}"' + (f', weight_name="{weight}")' if weight else ")"),
            "```",
        ]
    lines += ["", "```sh", f"loratools inspect {repo_id}", "```", ""]
    return "\n".join(lines)
