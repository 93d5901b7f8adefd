"""Combine adapters: ``cat`` (exact), ``svd`` (the exact weighted sum re-compressed to rank K, optimal in
Frobenius norm), ``linear`` (PEFT's combination of A and B separately, which is NOT the weighted sum), or one of
the task-vector merges on each module's dense delta (``ties``, ``dare_linear``, ``dare_ties``,
``magnitude_prune``: :mod:`.mix_dense`).

For one module, with input i contributing ``w_i * delta_i = w_i * s_i * B_i @ A_i``:

* cat:    ``up = [B_1 .. B_n]``, ``down = [w_1 s_1 A_1; ..; w_n s_n A_n]``, rank = sum of ranks, scale 1.
* svd:    the SVD of that stacked product from two thin QRs and one R x R SVD, truncated to rank K.
* linear: ``A = sum_i sign_i sqrt(|w_i s_i|) A_i``, ``B = sum_i sqrt(|w_i s_i|) B_i`` (equal ranks only).

A module missing from an input counts as zero there. LoHa / LoKr / Tucker modules take part through exact
factors of their (small) dense delta.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..errors import IncompatibleAdaptersError, LoratoolsError, ShapeError, UsageError
from ..formats import FORMATS, load_adapter, save_adapter
from ..formats.kohya import kohya_name
from ..formats.kohya_meta import BASE_MODEL_KEYS
from ..io.progress import Progress
from ..model import Adapter, Module, rows
from . import args, provenance, select
from .linalg import lowrank_svd
from .lowrank import (
    DTYPES,
    check_dense_all,
    factors,
    lora_module,
    pick_device,
    refuse_dora,
    refuse_nonfinite,
    stored_dtype,
    work_device,
)
from .mix_dense import DENSE_METHODS, SIGN_METHODS, compress, dense_mix
from .select import LeftOut

Method = Literal["cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
METHODS = ("cat", "svd", "linear", *DENSE_METHODS)


@dataclass
class MixedModule:
    name: str
    inputs: int  # how many inputs have this module
    rank: int
    energy: float | None = None  # svd: fraction of the weighted sum's energy the result keeps


@dataclass
class MixReport:
    output: str | None
    format: str
    method: str
    weights: list[float]
    rank: int | None
    modules: list[MixedModule] = field(default_factory=list)
    density: float | None = None  # ties, dare_*, magnitude_prune: the fraction of each delta's entries kept
    majority_sign: str | None = None  # ties, dare_ties: how the sign of each entry is elected
    seed: int | None = None  # dare_*: the seed of the random masks (given, or drawn and reported)
    warnings: list[str] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)  # what --include / --exclude / --*-only left out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def match_key(name: str, cross: bool) -> str:
    """The name modules are matched by: their own, or across formats the kohya spelling both sides share."""
    if cross and "." in name:
        try:
            return kohya_name(name)
        except LoratoolsError:
            return name
    return name


def check_args(
    count: int,
    weights: list[float] | None,
    method: str | None,
    rank: int | None,
    dtype: str | None = None,
    device: str | None = None,
    strict: bool = False,
    progress: Progress | None = None,
    what: str = "input",
    density: float | None = None,
    majority_sign: str | None = None,
    seed: int | None = None,
) -> tuple[list[float], Method]:
    """The arguments of a mix of ``count`` inputs, checked before anything is read: the weights (1 each by
    default) and the method (``svd`` with a rank, ``cat`` without); ``density`` (needed by, and only by, the
    pruning methods), ``majority_sign`` (ties and dare_ties) and ``seed`` (dare_*)."""
    weights = args.weights(weights, count, what) if weights is not None else [1.0] * count
    method = args.choice(method, "method", METHODS)
    rank = args.integer(rank, "rank")
    args.fraction(density, "density")
    args.choice(majority_sign, "majority_sign", SIGN_METHODS)
    args.integer(seed, "seed", minimum=0)
    args.choice(dtype, "dtype", DTYPES)
    args.device(device)
    args.flag(strict, "strict")
    args.callback(progress, "progress")
    method = method or ("svd" if rank is not None else "cat")
    if method == "svd" and rank is None:
        raise UsageError("method svd needs a rank (--rank K)", "or use method cat, which is exact", param="rank")
    if method in ("cat", "linear") and rank is not None:
        raise UsageError(
            f"a rank applies to method svd (or a pruning method), not {method}",
            "leave out the rank, or use method svd",
            param="rank",
        )
    if method in DENSE_METHODS and density is None:
        raise UsageError(
            f"method {method} needs a density (the fraction of each delta's entries kept, such as 0.2)",
            param="density",
        )
    if method not in DENSE_METHODS and density is not None:
        raise UsageError(f"a density applies to ties, dare_linear, dare_ties and magnitude_prune, not {method}",
                         param="density")  # fmt: skip
    if majority_sign is not None and method not in ("ties", "dare_ties"):
        raise UsageError(f"a majority sign method applies to ties and dare_ties, not {method}",
                         param="majority_sign")  # fmt: skip
    if seed is not None and method not in ("dare_linear", "dare_ties"):
        raise UsageError(f"a seed applies to dare_linear and dare_ties (their random masks), not {method}",
                         param="seed")  # fmt: skip
    return weights, method  # type: ignore[return-value]


def mix_adapters(
    adapters: list[Adapter],
    weights: list[float] | None = None,
    method: Method | None = None,
    rank: int | None = None,
    *,
    dtype: str | None = None,
    device: str | None = None,
    strict: bool = False,
    progress: Progress | None = None,
    density: float | None = None,
    majority_sign: str | None = None,
    seed: int | None = None,
) -> tuple[Adapter, MixReport]:
    """The weighted combination of ``adapters`` (1 each by default) as a new adapter, in the format and naming of
    the first, and its report. The default method is ``cat`` (exact) without ``rank``, ``svd`` with it.
    ``ties``, ``dare_linear``, ``dare_ties`` and ``magnitude_prune`` (:mod:`.mix_dense`) need ``density``;
    ``majority_sign`` is ``total`` (default) or ``frequency``; DARE's masks follow ``seed`` (drawn at random and
    reported when not given). These re-compress to ``rank`` when given, else keep the exact full-rank result."""
    import torch

    if not isinstance(adapters, (list, tuple)) or not all(isinstance(a, Adapter) for a in adapters):
        raise UsageError("adapters must be a list of Adapter objects (loratools.load_adapter gives them)")
    if not adapters:
        raise UsageError("mix needs at least one adapter")
    weights, method = check_args(
        len(adapters), weights, method, rank, dtype, device, strict, progress, "adapter", density, majority_sign, seed
    )
    dev, work = work_device(device)
    first = adapters[0]
    report = MixReport(None, first.format, method, list(weights), rank)
    if method in DENSE_METHODS:
        report.density = float(density)  # type: ignore[arg-type]
        if method in ("ties", "dare_ties"):
            report.majority_sign = majority_sign = majority_sign or "total"
        if method.startswith("dare"):
            report.seed = seed = secrets.randbits(63) if seed is None else seed
    bases = {a.base_model for a in adapters if a.base_model}
    if len(bases) > 1:
        msg = f"the inputs were made for different base models: {', '.join(sorted(bases))}"
        if strict:
            raise IncompatibleAdaptersError(msg, "leave out --strict to mix them anyway")
        report.warnings.append(msg)
    for i, a in enumerate(adapters):
        if a.extras:
            raise IncompatibleAdaptersError(
                f"input {i + 1} carries full replacement tensors ({', '.join(sorted(a.extras)[:3])}): "
                "a weighted mix of whole weights has no exact meaning",
                "mix adapters without modules_to_save / saved embeddings",
            )
    cross = len({a.format for a in adapters}) > 1
    order: dict[str, list[tuple[float, Module]]] = {}
    position: dict[int, int] = {}  # id(module) -> its input's position (the seed of DARE's masks)
    for i, (a, w) in enumerate(zip(adapters, weights, strict=True)):
        for name, m in a.modules.items():
            refuse_dora(m, "mixing it")
            order.setdefault(match_key(name, cross), []).append((w, m))
            position[id(m)] = i
    check_dense_all(m for a in adapters for m in a.modules.values())  # before any work: headers only
    out = Adapter(format=first.format, config=dict(first.config), base_model=first.base_model)
    # a mix was trained by none of its inputs: of their header metadata only what names the base model (and how the
    # adapter is used with it) stays true, when all inputs agree on it; the kohya writer derives the network keys
    for key in BASE_MODEL_KEYS:
        values = {a.metadata.get(key) for a in adapters}
        if len(values) == 1 and None not in values:
            out.metadata[key] = values.pop()  # type: ignore[assignment]
    tick = progress(len(order)) if progress else None
    for parts in order.values():
        template = parts[0][1]
        shape = template.weight_shape()
        for _, m in parts[1:]:
            if m.weight_shape() != shape and math.prod(m.weight_shape()) != math.prod(shape):
                raise ShapeError(
                    f"{template.name}: shapes differ between inputs ({list(shape)} and {list(m.weight_shape())})",
                    "are the adapters made for the same base model?",
                )
            if (m.layer == "embedding") != (
                template.layer == "embedding"
            ) or m.fan_in_fan_out != template.fan_in_fan_out:
                raise ShapeError(
                    f"{template.name}: the inputs disagree on the layer's layout (embedding / fan_in_fan_out)"
                )
        target = stored_dtype(template, dtype)
        energy = None
        if method in DENSE_METHODS:
            indexed = [(position[id(m)], w, m) for w, m in parts]
            delta, ranks = dense_mix(indexed, method, float(density), majority_sign or "total", seed or 0, dev, work)  # type: ignore[arg-type]
            up, down, energy = compress(delta, rank, seed or 0, ranks)
        elif method == "linear":
            up, down = _linear(parts, dev, work)
        else:
            ups, downs = [], []
            for w, m in parts:
                u, d = factors(m, dev, work)
                ups.append(u)
                downs.append(d * w)
            up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
        refuse_nonfinite(template, up, down, what="the weighted sum")
        if method == "svd":
            assert rank is not None
            svd = lowrank_svd(up, down)
            k = min(rank, svd.s.shape[0])
            energy = float(svd.energy()[k - 1]) if k else 1.0
            up, down = svd.truncate(k)
        known = next((m.delta_shape() for _, m in parts if not m.flattened), None)  # another input knows the kernel
        module = lora_module(template, up, down, target, known if template.flattened else None)
        out.modules[template.name] = module
        report.modules.append(MixedModule(template.name, len(parts), up.shape[1], energy))
        if tick:
            tick()
    return out, report


def _linear(parts: list[tuple[float, Module]], dev: str, work: Any) -> tuple[Any, Any]:
    ranks = {m.rank for _, m in parts}
    if len(ranks) != 1 or any(not m.is_two_factor() for _, m in parts):
        raise IncompatibleAdaptersError(
            f"{parts[0][1].name}: --method linear needs plain LoRA modules of one rank (found ranks {sorted(map(str, ranks))})",
            "use --method cat (exact) or svd",
        )
    up = down = None
    for w, m in parts:
        u = rows(m.factors["up"].load().to(dev, work))
        d = rows(m.factors["down"].load().to(dev, work))
        ws = w * m.scale
        root = math.sqrt(abs(ws)) if math.isfinite(ws) else math.nan
        u, d = u * root, d * (root if ws >= 0 else -root)
        refuse_nonfinite(m, u, d, what="the weighted factors")
        up = u if up is None else up + u
        down = d if down is None else down + d
    return up, down


def mix(
    sources: list[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    weights: list[float] | None = None,
    method: Method | None = None,
    rank: int | None = None,
    *,
    to: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    strict: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    origins: Mapping[str, str] | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    only: str | None = None,
    density: float | None = None,
    majority_sign: str | None = None,
    seed: int | None = None,
) -> MixReport:
    """Read, mix, and write atomically. The default method is ``cat`` without ``rank``, ``svd`` with it.
    ``origins``: the names the provenance record gives sources fetched from the Hub (see ``provenance.record``).
    ``include`` / ``exclude`` / ``only`` (``"unet"`` or ``"text_encoders"``): which modules of each input take
    part (:mod:`.select`), chosen before any work; every input must keep at least one. ``density``,
    ``majority_sign``, ``seed``: for the pruning methods, as in :func:`mix_adapters`."""
    from ..formats import input_files
    from ..formats.outputs import check_output_name
    from ..io.atomic import check_output

    sources = args.path_list(sources, "sources")
    origins = provenance.check_origins(origins)
    args.path(out, "out")
    args.choice(to, "format", FORMATS)
    args.flag(force, "force")
    weights, method = check_args(
        len(sources), weights, method, rank, dtype, device, strict, progress, "input", density, majority_sign, seed
    )
    flt = select.module_filter(include, exclude, only)
    pick_device(device)  # a missing GPU is told before anything is read
    check_output(out, force=force, inputs=[p for s in sources for p in input_files(s)])
    adapters = [load_adapter(s) for s in sources]
    left_out = [select.apply(flt, a, str(s)) for a, s in zip(adapters, sources, strict=True)]
    check_output_name(out, to or adapters[0].format)
    mixed, report = mix_adapters(
        adapters, weights, method, rank, dtype=dtype, device=device, strict=strict, progress=progress,
        density=density, majority_sign=majority_sign, seed=seed,
    )  # fmt: skip
    report.left_out = left_out if flt else []
    mixed.metadata[provenance.KEY] = provenance.record(
        "mix",
        [(str(s), a.format) for s, a in zip(sources, adapters, strict=True)],
        origins=origins,
        method=method,
        weights=weights,
        rank=rank,
        dtype=dtype,
        density=report.density,
        majority_sign=report.majority_sign,
        seed=report.seed,
        **select.recorded(flt),
    )
    fmt = to or mixed.format
    written = save_adapter(mixed, out, fmt, force=force)
    report.output, report.format = str(written), fmt
    return report
