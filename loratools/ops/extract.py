"""Extract a LoRA adapter from two checkpoints: the difference ``D = tuned - base`` of each weight, factored.

Tensor pairs are read one at a time from their byte ranges (the layouts of :mod:`loratools.ops.merge`: a file, a
model folder, shards with their index, a diffusers pipeline), so memory stays near one pair whatever the model's
size. Each changed weight's difference is formed in float32 on the chosen device and factored by a randomized SVD
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

import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import IncompatibleAdaptersError, LoratoolsError, ShapeError, UsageError
from ..formats import FORMATS, patterns, save_adapter
from ..io import jsonfile
from ..io.atomic import check_output
from ..io.digest import file_sha256
from ..io.progress import Progress
from ..io.safetensors import read_bytes, tensor_from_bytes
from ..model import Adapter, Extra, Layer, Module, TensorRef, target_kind, torch_dtype
from . import args, provenance
from .linalg import LowRankSVD, randomized_svd, rank_for_energy
from .lowrank import DTYPES, pick_device, work_device
from .merge import Layout, layout_of

if TYPE_CHECKING:
    import torch

#: last part of the module path of input embeddings (``nn.Embedding``, stored vocab x hidden)
EMBEDDING_NAMES = frozenset(
    {
        "embed_tokens", "wte", "wpe", "embed_in", "word_embeddings", "position_embeddings", "token_type_embeddings",
        "embed_positions", "token_embedding", "position_embedding", "shared",
    }
)  # fmt: skip
#: ... and of output heads (``nn.Linear``, vocab x hidden)
HEAD_NAMES = frozenset({"lm_head", "embed_out"})
EMBEDDING_CHOICES = ("lora", "save", "skip")

OVERSAMPLE = 10  # extra sketch columns (Halko et al.'s p)
POWER_ITERS = 2  # power iterations (q)
START_RANK = 16  # first sketch width with --energy; doubled until the energy is reached
SEED = 0  # every module's sketch starts from this seed: the result does not depend on the order
RESIDUAL_BYTES = 32 << 20  # float32 work per chunk of rows when measuring the error
META_KEY = "loratools.extract"  # the report, in the output's header metadata


@dataclass
class ExtractedModule:
    name: str
    shape: list[int]  # the weight's stored shape
    layer: str  # linear, conv or embedding
    rank: int
    energy: float  # fraction of ||D||² the rank-k truncation keeps: sum(s[:k]²) / ||D||²
    error: float  # ||D - stored up @ down|| / ||D||, measured on the stored (rounded) factors
    norm: float  # ||D||, Frobenius


@dataclass
class SkippedTensor:
    name: str
    reason: str


@dataclass
class ExtractReport:
    base: str
    tuned: str
    output: str | None
    format: str
    rank: int | None
    energy: float | None
    max_rank: int | None
    device: str
    embeddings: str
    modules: list[ExtractedModule] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)  # tensors kept whole (PEFT modules_to_save)
    biases: list[str] = field(default_factory=list)  # bias differences stored as LoRA biases
    skipped: list[SkippedTensor] = field(default_factory=list)  # changed, but left out of the adapter
    unchanged: int = 0  # tensor pairs with equal values
    excluded: int = 0  # base tensors left out by --include / --exclude
    params: int = 0
    bytes: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, Any]:
        ranks = sorted(m.rank for m in self.modules)
        total = sum(m.norm**2 for m in self.modules)
        lost = sum((m.error * m.norm) ** 2 for m in self.modules)
        return {
            "modules": len(self.modules),
            "saved": len(self.saved),
            "biases": len(self.biases),
            "skipped": len(self.skipped),
            "unchanged": self.unchanged,
            "rank_min": ranks[0] if ranks else None,
            "rank_max": ranks[-1] if ranks else None,
            "error_max": max((m.error for m in self.modules), default=None),
            "error_total": math.sqrt(lost / total) if total else None,  # over all modules together
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["summary"] = self.summary
        return d


# ---- pairing the two checkpoints ---------------------------------------------------------------------------


def _selector(include: Iterable[str], exclude: Iterable[str]) -> Callable[[str], bool]:
    # user patterns: Python re syntax, matched at bounded cost (a pathological one is refused, never hangs)
    inc = patterns.pattern_set(args.strings(include, "include"), "--include", "search", UsageError)
    exc = patterns.pattern_set(args.strings(exclude, "exclude"), "--exclude", "search", UsageError)

    def keep(name: str) -> bool:
        if inc.patterns and not inc.any(name):
            return False
        return not exc.any(name)

    return keep


def _check_pairs(a: Layout, b: Layout, keep: Callable[[str], bool]) -> list[str]:
    """The base's tensor names to compare, in file and offset order; an error lists every mismatch."""
    names_a, names_b = a.names(), b.names()
    only_a = sorted(n for n in names_a if keep(n) and n not in names_b)
    only_b = sorted(n for n in names_b if keep(n) and n not in names_a)
    shapes = []
    for n, (i, key) in names_a.items():
        if keep(n) and n in names_b:
            j, key_b = names_b[n]
            sa, sb = a.files[i].header.tensors[key].shape, b.files[j].header.tensors[key_b].shape
            if sa != sb:
                shapes.append(f"{n} {list(sa)} vs {list(sb)}")
    if only_a or only_b or shapes:

        def few(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f" (and {len(items) - 6} more)" if len(items) > 6 else "")

        parts = []
        if only_a:
            parts.append(f"{len(only_a)} tensor(s) only in BASE: {few(only_a)}")
        if only_b:
            parts.append(f"{len(only_b)} only in TUNED: {few(only_b)}")
        if shapes:
            parts.append(f"{len(shapes)} with different shapes: {few(sorted(shapes))}")
        raise ShapeError(
            "the checkpoints do not pair up: " + "; ".join(parts),
            "are both the same architecture? --exclude REGEX leaves tensors out",
        )
    order = []
    for wf in a.files:
        for info in sorted(wf.header.tensors.values(), key=lambda t: (t.start, t.name)):
            if keep(wf.prefix + info.name):
                order.append(wf.prefix + info.name)
    return order


class _Files:
    """Open read handles, one per weights file, closed together."""

    def __init__(self) -> None:
        self.handles: dict[Path, Any] = {}

    def get(self, path: Path) -> Any:
        fh = self.handles.get(path)
        if fh is None:
            fh = self.handles[path] = open(path, "rb")  # noqa: SIM115 (closed in close())
        return fh

    def close(self) -> None:
        for fh in self.handles.values():
            fh.close()


def _path(layout: Layout, i: int) -> Path:
    return layout.root if layout.single_file else layout.root / layout.files[i].rel


# ---- the factorisation --------------------------------------------------------------------------------------


def _numerical_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    """Singular values above ``s_max * eps * max(m, n)`` (float32): the rest is rounding."""
    import torch

    if not s.numel() or float(s[0]) <= 0:
        return 0
    tol = float(s[0]) * torch.finfo(torch.float32).eps * max(shape)
    return int((s > tol).sum())


def choose_rank(
    mat: torch.Tensor,
    total: float,
    rank: int | None,
    energy: float | None,
    max_rank: int | None = None,
    *,
    seed: int = SEED,
) -> tuple[LowRankSVD, int]:
    """The SVD (leading part) of ``mat`` and the rank to keep: ``rank``, or the smallest k whose
    ``sum(s[:k]²)`` reaches ``energy * total`` (``total = ||mat||²``), at most ``max_rank``. With ``energy`` the
    sketch starts at :data:`START_RANK` and doubles until the energy is reached, the sketch holds the whole
    numerical range, or the cap is hit. Never more than the numerical rank (at least 1)."""
    import torch

    m, n = mat.shape
    full = min(m, n)
    gen = torch.Generator(device=mat.device).manual_seed(seed)

    def sketch(k: int) -> LowRankSVD:
        return randomized_svd(mat, k, oversample=OVERSAMPLE, power_iters=POWER_ITERS, generator=gen)

    if rank is not None:
        k = min(rank, full)
        svd = sketch(k)
    else:
        assert energy is not None
        cap = min(max_rank or full, full)
        width = min(START_RANK, cap)
        while True:
            svd = sketch(width)
            s = svd.s
            k = rank_for_energy(s, energy, total)
            if k <= s.numel():
                break
            whole = s.numel() < min(width + OVERSAMPLE, full) or _numerical_rank(s, (m, n)) < s.numel()
            if width >= cap or s.numel() >= full or whole:  # whole: the sketch holds the numerical range
                k = s.numel()
                break
            width = min(2 * width, cap)
        k = min(k, cap)
    return svd, max(1, min(k, _numerical_rank(svd.s, (m, n))))


def _residual(mat: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """``||mat - up @ down||`` in row chunks: never a second dense matrix of the whole size."""
    import torch

    rows, cols = mat.shape
    step = max(1, RESIDUAL_BYTES // max(1, cols * 4))
    sq = 0.0
    for r0 in range(0, rows, step):
        chunk = torch.addmm(mat[r0 : r0 + step], up[r0 : r0 + step], down, alpha=-1)
        sq += float(torch.linalg.vector_norm(chunk)) ** 2
    return math.sqrt(sq)


def factor(
    name: str,
    diff: torch.Tensor,
    layer: Layer,
    rank: int | None,
    energy: float | None,
    max_rank: int | None,
    dtype: str,
) -> tuple[Module, ExtractedModule]:
    """One LoRA module (scale 1: alpha = rank) for the float32 difference ``diff`` of a weight, stored as
    ``dtype``, and its report row. ``up @ down`` is ``U_k sqrt(S_k) · sqrt(S_k) V_kᵀ``, the rank-k truncation of
    the SVD; the error is measured on the stored factors, their rounding included."""
    import torch

    # the orientation of up @ down: out x in*kh*kw; an embedding's delta is hidden x vocab (PEFT's B @ A)
    mat = diff.T if layer == "embedding" else diff.reshape(diff.shape[0], -1)
    norm = float(torch.linalg.vector_norm(mat))
    svd, k = choose_rank(mat, norm * norm, rank, energy, max_rank)
    root = svd.s[:k].sqrt()
    store = torch_dtype(dtype)
    up = (svd.left[:, :k] * root).to(store)
    down = (root[:, None] * svd.right[:k]).to(store)
    error = _residual(mat, up.float(), down.float()) / norm
    kept = min(1.0, float((svd.s[:k].double() ** 2).sum()) / (norm * norm))
    if layer == "conv":
        kernel = tuple(diff.shape[2:])
        up = up.reshape(up.shape[0], k, *([1] * len(kernel)))
        down = down.reshape(k, diff.shape[1], *kernel)
    module = Module(
        name=name,
        kind="lora",
        factors={"down": TensorRef.of(down.cpu().contiguous()), "up": TensorRef.of(up.cpu().contiguous())},
        alpha=float(k),
        layer=layer,
    )
    return module, ExtractedModule(name, list(diff.shape), layer, k, kept, error, norm)


# ---- the extraction ---------------------------------------------------------------------------------------


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("F", "BF"))


def _store_dtype(requested: str | None, dtype: str) -> str:
    if requested:
        return DTYPES[requested]
    return dtype if dtype in ("F64", "F32", "F16", "BF16") else "F32"


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
    la, lb = layout_of(base), layout_of(tuned)
    order = _check_pairs(la, lb, _selector(include, exclude))
    names_a, names_b = la.names(), lb.names()
    report = ExtractReport(
        str(base), str(tuned), None, "peft", rank, energy, max_rank, dev, embeddings, excluded=len(names_a) - len(order)
    )
    modules: dict[str, Module] = {}
    saves: dict[str, list[str]] = {}  # module -> its tensors kept whole
    others: list[tuple[str, torch.Tensor | None]] = []  # changed tensors that are not factored: decided at the end
    tick = progress(len(order)) if progress else None
    files = _Files()
    try:
        with torch.no_grad():
            for name in order:
                i, key = names_a[name]
                j, key_b = names_b[name]
                ia, ib = la.files[i].header.tensors[key], lb.files[j].header.tensors[key_b]
                raw_a = read_bytes(files.get(_path(la, i)), ia.start, ia.nbytes)
                raw_b = read_bytes(files.get(_path(lb, j)), ib.start, ib.nbytes)
                if ia.dtype == ib.dtype and raw_a == raw_b:
                    report.unchanged += 1
                elif not (_is_float(ia.dtype) and _is_float(ib.dtype)):
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
                        _one(name, diff, ib.dtype, rank, energy, max_rank, dtype, embeddings,
                             modules, saves, others, report)  # fmt: skip
                    del diff
                if tick:
                    tick()
    finally:
        files.close()
    biases = _place_others(others, modules, saves, report)
    saves = _whole_modules(saves, names_b, report)
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
    adapter = Adapter(format="peft", base_model=base_model or _base_name(base), source=str(tuned))
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
            j, key_b = names_b[name]
            adapter.extras[name] = Extra(lb.files[j].header.ref(key_b), "modules_to_save")
            report.saved.append(name)
    report.saved.sort()
    report.biases = sorted(n + ".bias" for n in biases)
    report.modules.sort(key=lambda r: r.name)
    report.skipped.sort(key=lambda r: r.name)
    adapter.config = _config(adapter, la, saves, bool(biases), base)
    report.params, report.bytes = adapter.num_params, adapter.nbytes
    if report.skipped:
        report.warnings.append(f"{len(report.skipped)} changed tensor(s) left out: {_few(report.skipped)}")
    return adapter, report


def _few(items: list[SkippedTensor], n: int = 8) -> str:
    shown = "; ".join(f"{s.name} ({s.reason})" for s in items[:n])
    return shown + (f"; and {len(items) - n} more" if len(items) > n else "")


def _one(
    name: str, diff: torch.Tensor, stored: str, rank: int | None, energy: float | None, max_rank: int | None,
    dtype: str | None, embeddings: str, modules: dict[str, Module], saves: dict[str, list[str]],
    others: list[tuple[str, torch.Tensor | None]], report: ExtractReport,
) -> None:  # fmt: skip
    """Decide what one changed float tensor becomes, and factor it if it is a weight matrix."""
    module, _, param = name.rpartition(".")
    if not (module and param == "weight" and diff.dim() >= 2):
        others.append((name, diff.cpu() if param == "bias" else None))
        return
    last = target_kind(module).rpartition(".")[2]
    embedding_like = diff.dim() == 2 and (last in EMBEDDING_NAMES or last in HEAD_NAMES)
    if embedding_like and embeddings == "save":
        saves.setdefault(module, []).append(name)
        return
    if embedding_like and embeddings == "skip":
        report.skipped.append(SkippedTensor(name, "an embedding; --embeddings skip"))
        return
    layer: Layer = "conv" if diff.dim() > 2 else "embedding" if last in EMBEDDING_NAMES else "linear"
    m, row = factor(module, diff, layer, rank, energy, max_rank, _store_dtype(dtype, stored))
    modules[module] = m
    report.modules.append(row)


def _place_others(
    others: list[tuple[str, torch.Tensor | None]],
    modules: dict[str, Module],
    saves: dict[str, list[str]],
    report: ExtractReport,
) -> dict[str, torch.Tensor]:
    """Changed tensors that are not weight matrices: LoRA biases, whole tensors, or left out. Returns the bias
    differences by module."""
    biases: dict[str, torch.Tensor] = {}
    for name, diff in others:
        module, _, param = name.rpartition(".")
        m = modules.get(module)
        if m is not None:
            if param != "bias" or diff is None:  # a module's other tensors
                report.skipped.append(SkippedTensor(name, "its module is a LoRA module, which cannot also be saved"))
            elif m.layer == "embedding":
                report.skipped.append(SkippedTensor(name, "PEFT embedding LoRA has no bias"))
            elif tuple(diff.shape) != (m.delta_shape()[0],):
                report.skipped.append(SkippedTensor(name, f"a bias of shape {list(diff.shape)} does not fit"))
            else:
                biases[module] = diff
        elif module and param in ("weight", "bias"):
            saves.setdefault(module, []).append(name)
        else:
            report.skipped.append(SkippedTensor(name, "not a .weight or .bias: no adapter format holds it"))
    return biases


def _whole_modules(
    saves: dict[str, list[str]], names: dict[str, tuple[int, str]], report: ExtractReport
) -> dict[str, list[str]]:
    """Every tensor of each module kept whole: PEFT's ``modules_to_save`` loads a module's whole state dict
    (a linear whose bias alone changed brings its weight too). A module with tensors other than a direct
    ``.weight`` / ``.bias`` (a container, a buffer) is left out: no adapter reader here would accept its keys."""
    out: dict[str, list[str]] = {}
    for module, changed in sorted(saves.items()):
        tensors = sorted(n for n in names if n.startswith(module + "."))
        odd = [n for n in tensors if n[len(module) + 1 :] not in ("weight", "bias")]
        if odd:
            why = f"its module also holds {odd[0]}, which modules_to_save would need"
            report.skipped += [SkippedTensor(n, why) for n in changed]
        else:
            out[module] = tensors
    return out


def _config(adapter: Adapter, base: Layout, saves: dict[str, list[str]], lora_bias: bool, src: Any) -> dict[str, Any]:
    """PEFT config fields the writer does not derive: the rest (``r``, ``lora_alpha``, ``rank_pattern``,
    ``alpha_pattern``, default ``target_modules``) comes from :func:`loratools.formats.peft.make_config`."""
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": _task_type(src),
        "base_model_name_or_path": adapter.base_model,
        "bias": "none",
        "lora_dropout": 0.0,
        "inference_mode": True,
        "fan_in_fan_out": False,
        "lora_bias": lora_bias,
        "modules_to_save": sorted(saves) or None,
    }
    targets = _exact_targets(list(adapter.modules), base)
    if targets is not None:
        cfg["target_modules"] = targets
    return cfg


def _exact_targets(modules: list[str], base: Layout) -> str | None:
    """PEFT targets every module whose name ends with a ``target_modules`` entry. When the adapter covers only
    some of the base's modules of a kind (``q_proj`` changed in some layers only, or ``to_out.0``), a list of
    kinds would put zero LoRAs on the rest, or on unrelated modules: give a regex of the exact paths instead."""
    kinds = {target_kind(n) for n in modules}
    if any(k.rpartition(".")[2].isdigit() for k in kinds):
        return _regex(modules)
    have, lasts = set(modules), {k.rpartition(".")[2] for k in kinds}
    for name, (i, key) in base.names().items():
        module, _, param = name.rpartition(".")
        matrix = len(base.files[i].header.tensors[key].shape) >= 2
        if param == "weight" and matrix and module not in have and module.rpartition(".")[2] in lasts:
            return _regex(modules)
    return None


def _regex(modules: list[str]) -> str:
    return "(" + "|".join(re.escape(m) for m in sorted(modules)) + ")"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = jsonfile.load(path, what="model config", nonfinite=True)
    except LoratoolsError:
        return {}  # only names and task types come from it: a config that cannot be read says nothing
    return value if isinstance(value, dict) else {}


def _folder_config(src: Any) -> dict[str, Any]:
    p = Path(src)
    if not p.is_dir():
        return {}
    return _read_json(p / "config.json") or _read_json(p / "model_index.json")


def _base_name(src: Any) -> str:
    """``_name_or_path`` from the base folder's config (a Hub id when the model came from the Hub), else the
    path as given."""
    name = _folder_config(src).get("_name_or_path")
    return name if isinstance(name, str) and name else str(src)


def _task_type(src: Any) -> str | None:
    archs = _folder_config(src).get("architectures") or []
    return "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in archs) else None


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


# ---- provenance: sha256 of every weights file, in a thread beside the extraction --------------------------


class _Hasher:
    """sha256 of each file, computed in a background thread (hashlib and file reads release the GIL)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.digests: dict[Path, str] = {}
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for p in self.paths:
                self.digests[p] = file_sha256(p, stop=self.stop)
        except BaseException as e:  # surfaced in result()
            self.error = e

    def result(self) -> dict[Path, str]:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.digests

    def cancel(self) -> None:
        """Stop between two reads and wait for the thread (milliseconds): no thread outlives a failed run."""
        self.stop.set()
        self.thread.join()


def _weight_files(layout: Layout) -> list[Path]:
    return [_path(layout, i) for i in range(len(layout.files))]


def _input_record(source: Any, layout: Layout, digests: dict[Path, str]) -> dict[str, Any]:
    """One input of the provenance record. ``sha256`` is the file's own for a single file; for a folder, the
    sha256 of its ``sha256sum``-style listing (``<sha256>  <file>`` lines), each file's own under ``files``."""
    files = _weight_files(layout)
    listed = [
        {"file": str(p.relative_to(layout.root)) if not layout.single_file else p.name, "sha256": digests[p]}
        for p in files
    ]
    if layout.single_file:
        digest = listed[0]["sha256"]
    else:
        digest = hashlib.sha256("".join(f"{f['sha256']}  {f['file']}\n" for f in listed).encode()).hexdigest()
    return {"source": str(source), "format": "checkpoint", "sha256": digest, "files": listed}


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
    la, lb = layout_of(base), layout_of(tuned)
    if fmt != "peft" and not any(wf.prefix for wf in la.files):
        raise IncompatibleAdaptersError(
            f"{fmt} files name modules by their diffusers component (unet., text_encoder., ...), "
            f"and {base} is not a diffusers pipeline folder",
            "give the pipeline folders, or write PEFT (the default)",
        )
    hasher = _Hasher(_weight_files(la) + _weight_files(lb))
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
    entry["inputs"] = [_input_record(base, la, digests), _input_record(tuned, lb, digests)]
    adapter.metadata[provenance.KEY] = json.dumps(entry, sort_keys=True)
    adapter.metadata[META_KEY] = json.dumps(
        {k: v for k, v in report.to_dict().items() if k not in ("output", "warnings")}, separators=(",", ":")
    )
    save_adapter(adapter, out, fmt, force=force)
    return report
