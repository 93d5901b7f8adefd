"""PEFT folders of the types other than LoRA, read into the same model (:mod:`.peft` reads the folder, checks
the config and hands the tensors over here by ``peft_type``):

* ``LOHA``: ``<module>.hada_w1_a`` (out x r), ``.hada_w1_b`` (r x in), ``.hada_w2_a``, ``.hada_w2_b``; conv layers
  with ``use_effective_conv2d`` add Tucker cores ``.hada_t1`` / ``.hada_t2`` (then ``hada_w*_a`` is r x out).
  Scale ``alpha / r``, r and alpha per module from ``r`` / ``alpha`` / ``rank_pattern`` / ``alpha_pattern``.
  The loha kind of the model, as LyCORIS stores it.
* ``LOKR``: ``.lokr_w1`` or ``.lokr_w1_a`` + ``.lokr_w1_b``, ``.lokr_w2`` or ``.lokr_w2_a`` + ``.lokr_w2_b`` (+
  ``.lokr_t2``). PEFT scales by ``alpha / r`` always, also when both sides are full matrices, where LyCORIS (and
  so the model) has no rank and scale 1: that scale is folded into ``w1`` when it is not 1.
* ``ADALORA``: ``.lora_A`` (r x in), ``.lora_E`` (r x 1, the singular values), ``.lora_B`` (out x r); the config's
  ``rank_pattern`` holds each module's mask over its ``init_r`` triplets (saved files keep only the kept rows).
  PEFT merges ``B @ (A * E) * scaling / (ranknum + 1e-5)`` with ``scaling = lora_alpha`` (the kept rank where
  ``lora_alpha <= 0``) and ``ranknum = init_r`` (kept from before the pruning), ``1e-5`` added in float32: a
  lora module with ``down = A * E`` (mask applied) and that scale. Modules pruned to rank 0 add nothing and
  are left out.
* ``VERA``: shared ``base_model.vera_A`` (r x widest input) and ``base_model.vera_B`` (widest output x r), per
  module ``.vera_lambda_d`` (r) and ``.vera_lambda_b`` (out): ``delta = (lambda_b * B[:out]) @ (lambda_d *
  A[:, :in])``, a lora module of scale 1 (its ``origin`` ``vera``: the input width is the layer's, which the file
  does not record; see :meth:`loratools.model.Module.apply`). Folders saved without the projections
  (``save_projection=False``) are refused: PEFT rebuilds them from the base model.

Writing: LoHa and LoKr adapters go back to PEFT LOHA / LOKR folders (:func:`lycoris_config`) where PEFT would
build exactly these factors; AdaLoRA and VeRA are written as LoRA.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import FileFormatError, IncompatibleAdaptersError
from ..io.safetensors import shown
from ..model import Adapter, Module, TensorRef
from .common import LYCORIS_RULES, KeyGroup, KeyTable, Rule, build_module, check_leftovers, group_keys

#: the PEFT types loratools reads; every other is refused by name
TYPES = ("LORA", "LOHA", "LOKR", "ADALORA", "VERA")

LYCORIS_TABLE = KeyTable(list(LYCORIS_RULES))  # the factor names of LyCORIS' own files
ADALORA_TABLE = KeyTable([Rule(".lora_A", "down"), Rule(".lora_B", "up"), Rule(".lora_E", "e")])
VERA_TABLE = KeyTable([Rule(".vera_lambda_b", "lambda_b"), Rule(".vera_lambda_d", "lambda_d")])
TABLES = {"LOHA": LYCORIS_TABLE, "LOKR": LYCORIS_TABLE, "ADALORA": ADALORA_TABLE, "VERA": VERA_TABLE}
#: the kind of module each type's keys may hold
KINDS = {"LOHA": "loha", "LOKR": "lokr"}
#: VeRA's shared projections, saved beside the model's keys (not under base_model.model.)
VERA_SHARED = {"base_model.vera_A": "A", "base_model.vera_B": "B"}
#: PEFT's defaults where a config leaves a field out
DEFAULTS = {"LOHA": {"r": 8, "alpha": 8}, "LOKR": {"r": 8, "alpha": 8}, "ADALORA": {"init_r": 12, "lora_alpha": 8}}


def fill(
    adapter: Adapter,
    peft_type: str,
    tensors: dict[str, TensorRef],
    config: dict[str, Any],
    where: Path,
    problems: list[str] | None,
) -> None:
    """Put the modules (and ``modules_to_save`` copies) of a ``peft_type`` folder's ``tensors`` into ``adapter``;
    every key accounted for, damage raised or (``problems``) collected."""
    from .peft import PREFIX, take_extras

    stripped: dict[str, TensorRef] = {}
    shared: dict[str, TensorRef] = {}
    leftovers: list[str] = []
    for key, ref in tensors.items():
        if peft_type == "VERA" and key in VERA_SHARED:
            shared[VERA_SHARED[key]] = ref
        elif key.startswith(PREFIX):
            stripped[key[len(PREFIX) :]] = ref
        else:
            leftovers.append(key)
    groups, rest, conflicts = group_keys(stripped, TABLES[peft_type])
    take_extras(adapter, rest, stripped, config, leftovers)
    check_leftovers(leftovers, conflicts, f"peft {peft_type}", problems)
    build = {"LOHA": _lycoris, "LOKR": _lycoris, "ADALORA": _adalora, "VERA": _vera}[peft_type]
    context = _Context(peft_type, config, str(where), problems, shared)
    for name, g in sorted(groups.items()):
        m = build(name, g, context)
        if m is not None:
            adapter.modules[name] = m


class _Context:
    def __init__(
        self, peft_type: str, config: dict[str, Any], where: str, problems: list[str] | None, shared: dict[str, Any]
    ) -> None:
        self.type = peft_type
        self.config = config
        self.where = where
        self.problems = problems
        self.shared = shared

    def get(self, key: str) -> Any:
        value = self.config.get(key)
        return DEFAULTS.get(self.type, {}).get(key) if value is None else value

    def damage(self, message: str, hint: str | None = None) -> None:
        if self.problems is not None:
            self.problems.append(message)
            return
        raise FileFormatError(message, hint)


def _lycoris(name: str, g: KeyGroup, ctx: _Context) -> Module | None:
    from .peft import rank_alpha_for

    want = KINDS[ctx.type]
    if g.kind != want:
        ctx.damage(f"{shown(name)}: {ctx.where} says {ctx.type}, the file holds {g.kind} factors")
        return None
    r, alpha = rank_alpha_for(ctx.config, name, ctx.where, alpha_key="alpha")
    r = r if r is not None else DEFAULTS[ctx.type]["r"]
    alpha = alpha if alpha is not None else float(DEFAULTS[ctx.type]["alpha"])
    m = build_module(name, g, alpha=alpha)
    if m.check():
        return m  # load_adapter reports the shapes
    if m.rank is not None and m.rank != r:
        ctx.damage(
            f"{shown(name)}: its factors have rank {m.rank}, {ctx.where} gives it r={r}",
            "PEFT would refuse to load these factors; fix rank_pattern or the config's r",
        )
        return m
    if m.kind == "lokr" and m.rank is None:
        m.alpha = float(r)  # both sides full: the model's scale is 1 (LyCORIS stores alpha = r); PEFT's alpha / r
        # goes into w1
        scale = alpha / r
        if scale != 1.0:
            m.factors["w1"] = _scaled(m.factors["w1"], scale)
    return m


def _scaled(ref: TensorRef, scale: float) -> TensorRef:
    """``ref * scale``, computed in float32 (or float64) whatever the stored dtype: what PEFT's float32 merge adds."""
    dtype = ref.dtype if ref.dtype in ("F32", "F64") else "F32"

    def load() -> Any:
        import torch

        t = ref.load()
        return (t.double() * scale).to(torch.float64 if dtype == "F64" else torch.float32)

    return TensorRef(ref.shape, dtype, load)


def _fp32(x: float) -> float:
    """``x`` rounded to float32 (what ``ranknum + 1e-5`` is on a float32 parameter)."""
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def _adalora(name: str, g: KeyGroup, ctx: _Context) -> Module | None:
    missing = [r for r in ("down", "up", "e") if r not in g.parts]
    if missing:
        suffix = {"down": "lora_A", "up": "lora_B", "e": "lora_E"}
        ctx.damage(f"{shown(name)}: AdaLoRA module without {', '.join(suffix[r] for r in missing)}")
        return None
    a, b, e = g.parts["down"], g.parts["up"], g.parts["e"]
    init_r = ctx.get("init_r")
    if not isinstance(init_r, int) or isinstance(init_r, bool) or init_r < 0:
        ctx.damage(f"{ctx.where}: init_r must be a whole number >= 0, not {init_r!r}")
        return None
    rows = a.shape[0] if a.shape else 0
    patterns = ctx.config.get("rank_pattern") or {}
    mask = patterns.get(f"{name}.lora_E")
    keep: list[int] | None = None
    if mask is not None:
        kept = [i for i, on in enumerate(mask) if on]
        if len(mask) != init_r:
            ctx.damage(f"{shown(name)}: its rank_pattern mask has {len(mask)} entries, init_r is {init_r}")
            return None
        if rows == len(mask) and len(kept) != rows:
            keep = kept  # saved unpruned: the mask applied here, as PEFT's load does
        elif rows != len(kept):
            ctx.damage(f"{shown(name)}: lora_A has {rows} rows, its rank_pattern mask keeps {len(kept)}")
            return None
    elif rows != init_r:
        ctx.damage(f"{shown(name)}: lora_A has {rows} rows, init_r is {init_r} (and no rank_pattern mask)")
        return None
    rank = len(keep) if keep is not None else rows
    shapes_ok = len(a.shape) == 2 and len(b.shape) == 2 and len(e.shape) == 2 and e.shape == (rows, 1)
    if not shapes_ok or b.shape[1] != rows:
        ctx.damage(
            f"{shown(name)}: AdaLoRA factors do not fit: lora_A {list(a.shape)}, lora_E {list(e.shape)}, "
            f"lora_B {list(b.shape)} (A is r x in, E r x 1, B out x r)"
        )
        return None
    if rank == 0:
        return None  # pruned away: adds nothing
    lora_alpha = ctx.get("lora_alpha")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)):
        ctx.damage(f"{ctx.where}: lora_alpha must be a number, not {lora_alpha!r}")
        return None
    scaling = float(lora_alpha) if lora_alpha > 0 else float(rank)
    scale = scaling / _fp32(_fp32(float(init_r)) + 1e-5)
    down = _masked(a, keep, e)
    up = _masked(b, keep, None)
    return Module(
        name, "lora", {"down": down, "up": up}, alpha=scale * rank,
        fan_in_fan_out=bool(ctx.config.get("fan_in_fan_out", False)), origin="adalora",
    )  # fmt: skip


def _masked(ref: TensorRef, keep: list[int] | None, e: TensorRef | None) -> TensorRef:
    """AdaLoRA's A * E (``e`` given) or B, the kept triplets only: rows of A, columns of B."""
    rows = e is not None
    shape = list(ref.shape)
    if keep is not None:
        shape[0 if rows else 1] = len(keep)

    def load() -> Any:
        t = ref.load()
        if e is not None:
            t = t * e.load().to(t.dtype)
        if keep is not None:
            t = t[keep] if rows else t[:, keep]
        return t.contiguous()

    return TensorRef(shape, ref.dtype, load)


def _vera(name: str, g: KeyGroup, ctx: _Context) -> Module | None:
    if "A" not in ctx.shared or "B" not in ctx.shared:
        ctx.damage(
            f"{ctx.where}: a VeRA folder without its shared projections base_model.vera_A / vera_B (saved with "
            "save_projection=False: PEFT rebuilds them from projection_prng_key and the base model)",
            "re-save the adapter with save_projection=True",
        )
        ctx.shared.setdefault("A", None)
        ctx.shared.setdefault("B", None)
        return None
    A, B = ctx.shared["A"], ctx.shared["B"]
    if A is None or B is None:
        return None
    missing = [r for r in ("lambda_b", "lambda_d") if r not in g.parts]
    if missing:
        ctx.damage(f"{shown(name)}: VeRA module without {', '.join('vera_' + r for r in missing)}")
        return None
    lb, ld = g.parts["lambda_b"], g.parts["lambda_d"]
    fits = len(A.shape) == 2 and len(B.shape) == 2 and A.shape[0] == B.shape[1]
    if not fits or len(lb.shape) != 1 or len(ld.shape) != 1 or ld.shape[0] != A.shape[0] or lb.shape[0] > B.shape[0]:
        ctx.damage(
            f"{shown(name)}: VeRA vectors do not fit the shared projections: vera_lambda_d {list(ld.shape)}, "
            f"vera_lambda_b {list(lb.shape)}, vera_A {list(A.shape)} (r x in), vera_B {list(B.shape)} (out x r)"
        )
        return None
    r, out = ld.shape[0], lb.shape[0]

    def down() -> Any:
        a = A.load()[:r]
        d = ld.load()
        return (d.to(_work(a, d)).unsqueeze(-1) * a.to(_work(a, d))).contiguous()

    def up() -> Any:
        b = B.load()[:out, :r]
        lam = lb.load()
        return (lam.to(_work(b, lam)).unsqueeze(-1) * b.to(_work(b, lam))).contiguous()

    dt = _dtype(A.dtype, ld.dtype)
    factors = {
        "down": TensorRef((r, A.shape[1]), dt, down),
        "up": TensorRef((out, r), _dtype(B.dtype, lb.dtype), up),
    }
    return Module(
        name, "lora", factors, alpha=float(r),
        fan_in_fan_out=bool(ctx.config.get("fan_in_fan_out", False)), origin="vera",
    )  # fmt: skip


def _dtype(a: str, b: str) -> str:
    """PEFT casts half-precision VeRA tensors to float32 on the CPU: the product is float32 unless both are F64."""
    return "F64" if a == b == "F64" else "F32"


def _work(*ts: Any) -> Any:
    import torch

    return torch.float64 if all(t.dtype == torch.float64 for t in ts) else torch.float32


# ---- writing LoHa / LoKr folders -----------------------------------------------------------------------------


def writable(adapter: Adapter) -> str | None:
    """The PEFT type that holds ``adapter`` as it is (``LOHA`` / ``LOKR``: every module of that kind, in a form
    PEFT builds), or None: a LoRA folder (or a refusal) then."""
    kinds = {m.kind for m in adapter.modules.values()}
    if kinds == {"loha"} and _loha_problem(adapter) is None:
        return "LOHA"
    if kinds == {"lokr"} and _lokr_plan(adapter)[0] is None:
        return "LOKR"
    return None


def _plain(m: Module) -> str | None:
    if m.magnitude is not None:
        return f"{m.name}: PEFT's {m.kind} has no DoRA magnitude"
    if m.bias is not None:
        return f"{m.name}: PEFT's {m.kind} has no bias"
    if m.fan_in_fan_out or m.layer == "embedding":
        return f"{m.name}: PEFT's {m.kind} takes Linear and Conv layers only (not embeddings, not Conv1D)"
    return None


def _loha_problem(adapter: Adapter) -> str | None:
    for m in adapter.modules.values():
        why = _plain(m)
        if why:
            return why
        if "t1" in m.factors and m.factors["t1"].shape[2:] in ((1, 1), (1,)):
            return f"{m.name}: PEFT builds no Tucker cores for a 1x1 kernel"
    return None


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS' (and PEFT's) split of ``dim`` into ``m * n``, ``m <= n`` as near ``factor`` (or the square root, for
    -1) as the divisors allow; a ``factor`` that divides ``dim`` is taken as it is."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    m, n = 1, dim
    while m < n:
        cand = m + 1
        while dim % cand:
            cand += 1
        if cand + dim // cand > m + n or cand > limit:
            break
        m, n = cand, dim // cand
    return (n, m) if m > n else (m, n)


def _lokr_dims(m: Module) -> tuple[int, int, int, int]:
    """(a, c, b, d): ``w1`` is a x c, ``w2`` b x d (d: the input channels of w2, as PEFT counts them)."""
    f = m.factors
    a, c = f["w1"].shape[:2] if "w1" in f else (f["w1a"].shape[0], f["w1b"].shape[1])
    if "w2" in f:
        b, d = f["w2"].shape[:2]
    elif "t2" in f:
        b, d = f["w2a"].shape[1], f["w2b"].shape[1]
    else:
        b, d = f["w2a"].shape[0], f["w2b"].shape[1]
    return a, c, b, d


def _lokr_plan(adapter: Adapter) -> tuple[str | None, dict[str, Any]]:
    """(why PEFT cannot hold it, or None; the global fields and each module's r and alpha when it can)."""
    mods = list(adapter.modules.values())
    for m in mods:
        why = _plain(m)
        if why:
            return why, {}
    dims = {m.name: _lokr_dims(m) for m in mods}
    # the decompose factor: w1 must be what PEFT's factorization makes of each layer's width
    sides = {(a * b, a) for a, c, b, d in dims.values()} | {(c * d, c) for a, c, b, d in dims.values()}
    for f in [-1, *sorted({x for _, x in sides})]:
        if all(factorization(n, f)[0] == x for n, x in sides):
            factor = f
            break
    else:
        return "PEFT's decompose_factor cannot give these LoKr modules their w1 shapes", {}
    both = any("w1" not in m.factors for m in mods)
    effective = any("t2" in m.factors for m in mods)
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for m in mods:
        a, c, b, d = dims[m.name]
        need_w2 = -(-max(b, d) // 2)  # PEFT keeps w2 full when r >= max(b, d) / 2
        need_w1 = -(-max(a, c) // 2) if both else 1
        if m.rank is None:
            r = max(need_w2, need_w1, 1)
            ranks[m.name], alphas[m.name] = r, float(r)
            continue
        r = m.rank
        full2, full1 = "w2" in m.factors, "w1" in m.factors
        if (r >= need_w2) != full2 or (both and (r >= need_w1) != full1):
            return f"{m.name}: PEFT would build its LoKr factors differently at rank {r}", {}
        ranks[m.name], alphas[m.name] = r, float(m.alpha) if m.alpha is not None else float(r)
    return None, {
        "ranks": ranks, "alphas": alphas, "decompose_factor": factor, "decompose_both": both,
        "use_effective_conv2d": effective,
    }  # fmt: skip


def _patterns(ranks: dict[str, int], alphas: dict[str, float]) -> dict[str, Any]:
    """r and alpha (the common values) and the exceptions, in the order PEFT's suffix match reads right."""
    from .peft import pattern_exceptions

    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    a = Counter(alphas.values()).most_common(1)[0][0] if alphas else 8.0
    return {
        "r": r,
        "alpha": int(a) if float(a).is_integer() else a,
        "rank_pattern": pattern_exceptions(ranks, r),
        "alpha_pattern": {n: (int(v) if v.is_integer() else v) for n, v in pattern_exceptions(alphas, a).items()},
    }


def lycoris_config(adapter: Adapter, peft_type: str) -> dict[str, Any]:
    """The config of a PEFT ``LOHA`` / ``LOKR`` folder under which PEFT builds exactly these modules' factors
    and gives each its scale: r and alpha per module (the common values, exceptions as patterns by full path),
    LoKr's ``decompose_factor`` / ``decompose_both`` and ``use_effective_conv2d`` from the factors' shapes."""
    from .peft import set_targets

    mods = list(adapter.modules.values())
    if peft_type == "LOHA":
        why = _loha_problem(adapter)
        if why:
            raise IncompatibleAdaptersError(why, "convert it to LoRA (loratools convert --to peft --rank K)")
        ranks = {m.name: int(m.rank or 0) for m in mods}
        alphas = {m.name: float(m.alpha) if m.alpha is not None else float(m.rank or 1) for m in mods}
        fields: dict[str, Any] = {"use_effective_conv2d": any("t1" in m.factors for m in mods)}
    else:
        why, plan = _lokr_plan(adapter)
        if why:
            raise IncompatibleAdaptersError(why, "convert it to LoRA (loratools convert --to peft --rank K)")
        ranks, alphas = plan.pop("ranks"), plan.pop("alphas")
        fields = plan
    from .peft import peft_type_of, rank_alpha_for

    own = dict(adapter.config) if adapter.format == "peft" and peft_type_of(adapter.config) == peft_type else {}
    kept = own and all(own.get(k, v) == v for k, v in fields.items())
    if kept and all(rank_alpha_for(own, n, alpha_key="alpha") == (r, alphas[n]) for n, r in ranks.items()):
        cfg = own  # the source's own config already gives every module its rank and alpha
    else:
        for key in ("r", "alpha", "rank_pattern", "alpha_pattern", "lora_alpha", "use_rslora", "use_dora"):
            own.pop(key, None)
        cfg = {**own, "peft_type": peft_type, **_patterns(ranks, alphas), **fields}
    set_targets(cfg, adapter)
    cfg.setdefault("rank_dropout", 0.0)
    cfg.setdefault("module_dropout", 0.0)
    cfg.setdefault("init_weights", True)
    return cfg


#: factors PEFT stores flattened (r x in*kh*kw) for a conv layer without Tucker cores
FLAT = {"loha": ("w1b", "w2b"), "lokr": ("w2b",)}


def lycoris_tensors(adapter: Adapter) -> dict[str, TensorRef]:
    """The tensors of a LOHA / LOKR folder: LyCORIS' factors under PEFT's names, a conv kernel's low-rank factor
    flattened as PEFT holds it (the same delta: the kernel dims follow the input channel in both)."""
    from .peft import PREFIX

    out: dict[str, TensorRef] = {}
    for name, m in adapter.modules.items():
        tucker = "t1" in m.factors or "t2" in m.factors
        for role, ref in m.factors.items():
            if not tucker and role in FLAT[m.kind] and len(ref.shape) > 2:
                ref = _flat(ref)
            out[PREFIX + name + LYCORIS_TABLE.suffix_for(m.kind, role)] = ref
    for key, extra in adapter.extras.items():
        out[PREFIX + key] = extra.ref
    return out


def _flat(ref: TensorRef) -> TensorRef:
    shape = (ref.shape[0], math.prod(ref.shape[1:]))
    return TensorRef(shape, ref.dtype, lambda: ref.load().reshape(shape))
