"""Extract a LoRA adapter from two checkpoints: the difference ``D = tuned - base`` of each weight, factored.

Tensor pairs are read one at a time from their byte ranges (any checkpoint :mod:`loratools.io.checkpoint` reads:
a file, a model folder, shards with their index, a diffusers pipeline), so memory stays near one pair whatever
the model's size. Each changed weight's difference is formed in float32 on the chosen device and factored by a randomized SVD
(:func:`loratools.ops.linalg.randomized_svd`: O(mn k), exact when the difference's rank is at most the sketch's
width), to a fixed rank or, per module, to the smallest rank keeping a fraction of its Frobenius energy.

What becomes what:

* a changed ``<module>.weight`` of 2 or more dims: a LoRA module (linear; conv for 3-D to 5-D kernels);
* a changed embedding or output head (``embed_tokens``, ``lm_head``, ...): per ``embeddings``, an embedding /
  linear LoRA (``lora``), the tuned tensor kept whole as a PEFT ``modules_to_save`` entry (``save``), or left
  out with a warning (``skip``);
* a changed ``<module>.bias`` of a LoRA module: its difference as the LoRA bias (PEFT ``lora_bias``);
* any other changed ``.weight`` / ``.bias`` (norms, the bias of an unchanged linear): the tuned tensor kept whole
  under ``modules_to_save`` for its module (PEFT then loads that module's other tensors from the base);
* anything else that changed is left out, with a warning naming it and why.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..errors import IncompatibleAdaptersError, LoratoolsError, ShapeError, UsageError
from ..formats import FORMATS, save_adapter
from ..formats.outputs import check_output_name
from ..io.atomic import check_output
from ..io.checkpoint import read_checkpoint
from ..io.progress import Progress
from ..io.safetensors import read_bytes, tensor_from_bytes
from ..model import Adapter, Extra, Module, TensorRef, torch_dtype
from . import args, provenance
from .extract_config import Hasher, base_name, input_record, peft_config, weight_files
from .extract_pairs import (
    EMBEDDING_CHOICES,
    OpenFiles,
    check_pairs,
    is_float,
    place_one,
    place_others,
    selector,
    whole_modules,
)
from .extract_report import ExtractedModule, ExtractReport, SkippedTensor
from .lowrank import DTYPES, pick_device, work_device

if TYPE_CHECKING:
    import torch

__all__ = ["META_KEY", "ExtractReport", "ExtractedModule", "SkippedTensor", "extract", "extract_adapter"]

META_KEY = "loratools.extract"  # the report, in the output's header metadata


def extract_adapter(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    rank: int | None = None,
    energy: float | None = None,
    *,
    max_rank: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    embeddings: str = "save",
    base_model: str | None = None,
    progress: Progress | None = None,
) -> tuple[Adapter, ExtractReport]:
    """The adapter ``tuned - base`` in memory (PEFT form: ``modules_to_save``, ``lora_bias`` and the target list
    in its config), and the report. Nothing is written."""
    import torch

    args.path(base, "base")
    args.path(tuned, "tuned")
    _check_args(rank, energy, max_rank, embeddings, dtype, device, include, exclude, base_model, progress)
    dev, _ = work_device(device)
    la, lb = read_checkpoint(base), read_checkpoint(tuned)
    order = check_pairs(la, lb, selector(include, exclude))
    names_a, names_b = la.tensors, lb.tensors
    report = ExtractReport(
        str(base), str(tuned), None, "peft", rank, energy, max_rank, dev, embeddings, excluded=len(names_a) - len(order)
    )
    modules: dict[str, Module] = {}
    saves: dict[str, list[str]] = {}  # module -> its tensors kept whole
    others: list[tuple[str, torch.Tensor | None]] = []  # changed tensors that are not factored: decided at the end
    tick = progress(len(order)) if progress else None
    files = OpenFiles()
    try:
        with torch.no_grad():
            for name in order:
                ta, tb = names_a[name], names_b[name]
                ia, ib = ta.info, tb.info
                raw_a = read_bytes(files.get(ta.file), ia.start, ia.nbytes)
                raw_b = read_bytes(files.get(tb.file), ib.start, ib.nbytes)
                if ia.dtype == ib.dtype and raw_a == raw_b:
                    report.unchanged += 1
                elif not (is_float(ia.dtype) and is_float(ib.dtype)):
                    report.skipped.append(SkippedTensor(name, f"not a float tensor ({ia.dtype})"))
                else:
                    diff = tensor_from_bytes(raw_b, ib.dtype, ib.shape).to(dev, torch.float32, copy=True)
                    del raw_b
                    diff.sub_(tensor_from_bytes(raw_a, ia.dtype, ia.shape).to(dev))
                    del raw_a
                    norm = float(torch.linalg.vector_norm(diff))  # one pass for both checks
                    if not math.isfinite(norm) and not bool(torch.isfinite(diff).all()):
                        raise ShapeError(f"{name}: the difference holds inf or NaN", "is one checkpoint damaged?")
                    if norm == 0:
                        report.unchanged += 1
                    else:
                        place_one(name, diff, ib.dtype, rank, energy, max_rank, dtype, embeddings,
                             modules, saves, others, report)  # fmt: skip
                    del diff
                if tick:
                    tick()
    finally:
        files.close()
    biases = place_others(others, modules, saves, report)
    saves = whole_modules(saves, names_b, report)
    if not modules and not saves:
        if report.skipped:
            raise LoratoolsError(
                f"nothing to extract: the only changed tensors are left out ({_few(report.skipped)})",
                "--embeddings lora or save keeps changed embeddings",
            )
        raise LoratoolsError(
            f"no changed weights: the {report.unchanged} tensor pair(s) compared hold the same values",
            "is TUNED the fine-tuned model, and do --include / --exclude select its changed weights?",
        )
    adapter = Adapter(format="peft", base_model=base_model or base_name(base), source=str(tuned))
    for name in sorted(modules):
        adapter.modules[name] = modules[name]
    if biases:
        for name, m in adapter.modules.items():
            if m.layer == "embedding":
                continue
            out = m.delta_shape()[0]
            b = biases.get(name)
            dt = torch_dtype(next(iter(m.factors.values())).dtype)
            m.bias = TensorRef.of(b.to(dt) if b is not None else torch.zeros(out, dtype=dt))
    for tensors in saves.values():
        for name in tensors:
            adapter.extras[name] = Extra(names_b[name].ref(), "modules_to_save")
            report.saved.append(name)
    report.saved.sort()
    report.biases = sorted(n + ".bias" for n in biases)
    report.modules.sort(key=lambda r: r.name)
    report.skipped.sort(key=lambda r: r.name)
    adapter.config = peft_config(adapter, la, saves, bool(biases), base)
    report.params, report.bytes = adapter.num_params, adapter.nbytes
    if report.skipped:
        report.warnings.append(f"{len(report.skipped)} changed tensor(s) left out: {_few(report.skipped)}")
    return adapter, report


def _few(items: list[SkippedTensor], n: int = 8) -> str:
    shown = "; ".join(f"{s.name} ({s.reason})" for s in items[:n])
    return shown + (f"; and {len(items) - n} more" if len(items) > n else "")


def _check_args(
    rank: Any,
    energy: Any,
    max_rank: Any,
    embeddings: Any,
    dtype: Any,
    device: Any = None,
    include: Any = (),
    exclude: Any = (),
    base_model: Any = None,
    progress: Any = None,
) -> None:
    """Every argument but the paths, checked before anything is read."""
    rank, energy = args.integer(rank, "rank"), args.fraction(energy, "energy")
    args.one_of("rank", rank, "energy", energy)
    if args.integer(max_rank, "max_rank") is not None and rank is not None:
        raise UsageError("max_rank caps the ranks an energy picks; with a rank it has no use", param="max_rank")
    args.choice(embeddings, "embeddings", EMBEDDING_CHOICES, optional=False)
    args.choice(dtype, "dtype", DTYPES)
    args.device(device)
    args.regexes(include, "include")
    args.regexes(exclude, "exclude")
    args.text(base_model, "base_model")
    args.callback(progress, "progress")


# ---- the command ----------------------------------------------------------------------------------------------


def extract(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    out: str | os.PathLike[str],
    rank: int | None = None,
    energy: float | None = None,
    *,
    max_rank: int | None = None,
    to: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    embeddings: str = "save",
    base_model: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> ExtractReport:
    """Extract ``tuned - base`` as an adapter and write it to ``out`` (PEFT by default) atomically.

    The output's header metadata holds the report (:data:`META_KEY`) and a provenance record with the sha256 of
    every weights file of both checkpoints (hashed in a thread while the extraction runs).
    """
    for value, name in ((base, "base"), (tuned, "tuned"), (out, "out")):
        args.path(value, name)
    fmt = args.choice(to, "format", FORMATS) or "peft"
    args.flag(force, "force")
    _check_args(rank, energy, max_rank, embeddings, dtype, device, include, exclude, base_model, progress)
    include, exclude = list(include), list(exclude)
    pick_device(device)  # a missing GPU is told before anything is read
    check_output(out, force=force, inputs=[base, tuned])
    la, lb = read_checkpoint(base), read_checkpoint(tuned)
    if fmt != "peft" and not any(wf.prefix for wf in la.files):
        raise IncompatibleAdaptersError(
            f"{fmt} files name modules by their diffusers component (unet., text_encoder., ...), "
            f"and {base} is not a diffusers pipeline folder",
            "give the pipeline folders, or write PEFT (the default)",
        )
    check_output_name(out, fmt)
    hasher = Hasher(weight_files(la) + weight_files(lb))
    try:
        adapter, report = extract_adapter(
            base, tuned, rank, energy, max_rank=max_rank, dtype=dtype, device=device, include=include,
            exclude=exclude, embeddings=embeddings, base_model=base_model, progress=progress,
        )  # fmt: skip
    except BaseException:
        hasher.cancel()
        raise
    if fmt != "peft":
        if adapter.extras:
            names = sorted(adapter.extras)
            report.skipped += [SkippedTensor(n, f"kept whole, which {fmt} files cannot hold") for n in names]
            report.warnings.append(
                f"{len(names)} tensor(s) kept whole are left out: {fmt} files hold no modules_to_save "
                f"({', '.join(names[:6])}{' ...' if len(names) > 6 else ''})"
            )
            adapter.extras = {}
            report.saved = []
            report.params, report.bytes = adapter.num_params, adapter.nbytes
        adapter.format = fmt  # so that the writer keeps the metadata below
    elif adapter.config.get("lora_bias") and any(m.layer == "embedding" for m in adapter.modules.values()):
        hasher.cancel()
        raise IncompatibleAdaptersError(
            "PEFT cannot hold LoRA biases (changed biases: "
            f"{', '.join(report.biases[:4])}) and an embedding LoRA in one adapter",
            "--embeddings save keeps the embeddings whole, or --exclude '\\.bias$' leaves the biases out",
        )
    report.output, report.format = str(out), fmt
    digests = hasher.result()
    entry: dict[str, Any] = {"tool": "loratools", "command": "extract"}
    from ..version import __version__

    entry["version"] = __version__
    params: dict[str, Any] = {
        "rank": rank,
        "energy": energy,
        "max_rank": max_rank,
        "dtype": dtype,
        "embeddings": embeddings,
    }
    params.update({"include": include or None, "exclude": exclude or None})
    entry.update({k: v for k, v in params.items() if v is not None})
    entry["inputs"] = [input_record(base, la, digests), input_record(tuned, lb, digests)]
    adapter.metadata[provenance.KEY] = json.dumps(entry, sort_keys=True)
    adapter.metadata[META_KEY] = json.dumps(
        {k: v for k, v in report.to_dict().items() if k not in ("output", "warnings")}, separators=(",", ":")
    )
    save_adapter(adapter, out, fmt, force=force)
    return report
