"""Merge adapters into a base checkpoint, streaming: read a tensor (in row chunks), add its delta, write it.

The output keeps the base's layout: tensor names, order, dtypes, shard split, a correct index, and the other
files of the folder (config, tokenizer, ...). Per targeted weight: ``W + sum_i w_i * delta_i`` in float32 on the
chosen device, cast once to the stored dtype; DoRA, LoHa and LoKr modules are applied in turn on the whole tensor
(``Module.apply``). ``modules_to_save`` tensors replace the base's. Memory stays near one tensor (of the base's
memory map, or in float32 for the whole-tensor kinds) plus a few chunk buffers, never a shard.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import LoratoolsError
from ..formats import input_files, load_adapter
from ..formats.outputs import check_output_name
from ..io.atomic import check_output, stage
from ..io.checkpoint import Checkpoint, Index, read_checkpoint
from ..io.interrupts import checkpoint, critical
from ..io.progress import Progress
from ..io.safetensors import Header
from ..io.stream import threads
from . import provenance, select
from .linalg import one_thread
from .lowrank import DTYPES, pick_device
from .merge_engine import write_file
from .merge_html import render
from .merge_report import MergeReport, TensorReport
from .merge_targets import contribution_norms, resolve_targets
from .report_data import adapter_facts, check_report
from .report_pages import report_text

__all__ = ["MergeReport", "TensorReport", "merge", "render_report"]

#: files in a model folder that hold weights in another form: copying them would ship the unmerged model
STALE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".gguf")


def _copy_other_files(ckpt: Checkpoint, tmp: Path, report: MergeReport) -> None:
    """Everything in the base's folder but its weights and indexes (config, tokenizer, ...), as it is."""
    skip = {wf.rel for wf in ckpt.files} | {index.rel for index in ckpt.indexes}
    for path in sorted(ckpt.root.rglob("*")):
        checkpoint()
        rel = path.relative_to(ckpt.root)
        if any(part in (".git", ".cache") for part in rel.parts) or rel in skip:
            continue
        if not (path.is_dir() or path.is_file()):  # a FIFO or a device is not part of a model
            report.warnings.append(f"not copied: {rel} (not a regular file)")
            continue
        if path.is_dir():
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            continue
        if path.suffix.lower() in STALE_WEIGHTS:
            report.warnings.append(f"not copied: {rel} (weights in another format would be the unmerged model)")
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, tmp / rel)  # a new file: the umask's mode, as cp gives
        report.files_copied.append(str(rel))


def _write_index(index: Index, tmp: Path, sizes: dict[Path, int]) -> None:
    """The base's index as it is (its weight_map holds for the output: same tensors in the same shards), with the
    output's total size."""
    folder = index.rel.parent
    total = sum(size for rel, size in sizes.items() if rel.parent == folder)
    doc = dict(index.doc)
    doc["metadata"] = {**(doc.get("metadata") or {}), "total_size": total}
    (tmp / index.rel).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def merge(
    base: str | os.PathLike[str],
    adapters: list[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    weights: list[float] | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    report_path: str | os.PathLike[str] | None = None,
    origins: Mapping[str, str] | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    only: str | None = None,
) -> MergeReport:
    """Merge ``adapters`` into ``base``, writing ``out`` atomically in the base's layout, and the numerical
    report to ``report_path`` (``.json`` or ``.html``) if given: both appear, or neither does. ``origins``: the
    names the provenance record gives adapters fetched from the Hub (see ``provenance.record``). ``include`` /
    ``exclude`` / ``only`` (``"unet"`` or ``"text_encoders"``): which modules of each adapter are merged
    (:mod:`.select`), chosen before any tensor is read; every adapter must keep at least one.

    ``progress`` is told the total bytes and tensors; its tick is advanced by (bytes, tensors).
    """
    if not adapters:
        raise LoratoolsError("merge needs at least one adapter")
    weights = weights if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise LoratoolsError(f"{len(weights)} weight(s) for {len(adapters)} adapter(s)", "give one weight per adapter")
    if dtype is not None and dtype not in DTYPES:
        raise LoratoolsError(f"unknown dtype {dtype!r}", "use fp32, fp16 or bf16")
    out_dtype = DTYPES[dtype] if dtype else None
    origins = provenance.check_origins(origins)
    flt = select.module_filter(include, exclude, only)
    inputs = [p for src in [base, *adapters] for p in input_files(src)]
    check_output(out, force=force, inputs=inputs)
    if report_path is not None:
        check_report(report_path, out, force=force, inputs=inputs)
    dev = pick_device(device, allow_auto=True)
    ckpt = read_checkpoint(base)
    loaded = [load_adapter(a) for a in adapters]
    left_out = [select.apply(flt, ad, str(a)) for ad, a in zip(loaded, adapters, strict=True)]
    check_output_name(out, folder=not ckpt.single_file, what="the merged model (like its base)")
    import torch  # only now: the argument checks above need none (loratools merge --help, a missing path, ...)

    with one_thread(dev):  # small ops on the main thread: cheaper than OpenMP's fork and join on busy cores
        targets = resolve_targets(loaded, weights, ckpt)
        report = MergeReport(str(base), None, [str(a) for a in adapters], weights, dev, dtype)
        report.left_out = left_out if flt else []
        facts = [adapter_facts(ad, str(a), w) for ad, a, w in zip(loaded, adapters, weights, strict=True)]
        report.adapter_facts = facts
        shares = contribution_norms(targets, len(loaded))
    tick = progress(ckpt.total_bytes, "bytes", len(ckpt.tensors)) if progress else None
    record = provenance.record(
        "merge",
        [(str(a), ad.format) for a, ad in zip(adapters, loaded, strict=True)],
        origins=origins,
        weights=weights,
        dtype=dtype,
        **select.recorded(flt),
    )
    # from here on threads hand work to each other: a Ctrl-C waits for the next checkpoint (between chunks)
    with torch.no_grad(), critical(), stage(force=force, inputs=inputs) as outputs, threads(dev, "merge") as pool:
        if ckpt.single_file:
            wf = ckpt.files[0]
            header = _with_record(wf.header, record)
            write_file(wf.path, header, outputs.file(out), wf.prefix, targets, out_dtype, dev, report, tick, pool)
        else:
            tmp = outputs.folder(out)
            _copy_other_files(ckpt, tmp, report)
            sizes: dict[Path, int] = {}
            for wf in ckpt.files:
                (tmp / wf.rel).parent.mkdir(parents=True, exist_ok=True)
                header = _with_record(wf.header, record)
                sizes[wf.rel] = write_file(
                    wf.path, header, tmp / wf.rel, wf.prefix, targets, out_dtype, dev, report, tick, pool
                )
            for index in ckpt.indexes:
                _write_index(index, tmp, sizes)
        report.output = str(out)
        for t in report.tensors:
            t.contributions = shares.get(t.name, [])
        if report_path is not None:
            outputs.file(report_path).write_text(render_report(report, report_path), encoding="utf-8")
    return report


def render_report(report: MergeReport, path: str | os.PathLike[str]) -> str:
    """The report as the file ``path`` names it: a self-contained HTML page, or JSON."""
    return report_text(path, report.to_dict(), lambda: render(report))


def _with_record(header: Header, record: str) -> Header:
    meta = dict(header.metadata)
    meta[provenance.KEY] = record
    return Header(header.path, header.tensors, meta, header.header_len, header.file_size)
