"""The shapes of a module's factors: which factors each kind carries, the rules they must follow, and the shape of
the delta they make. Header-only: shapes, never data.

The rules are those of LyCORIS' own rebuild (``lycoris.functional``), held as strictly as ComfyUI's loader (the
strictest consumer): Tucker cores are ``rank x rank x kh x kw``; a factor has at most 5 dims; only a rank may be 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

ModuleKind = Literal["lora", "loha", "lokr", "full"]
Shape = tuple[int, ...]

#: factor names each kind may carry; the first tuple is required, the second optional
FACTORS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "lora": (("down", "up"), ("mid",)),
    "loha": (("w1a", "w1b", "w2a", "w2b"), ("t1", "t2")),
    "lokr": ((), ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2")),
    "full": (("diff",), ()),
}

#: canonical LoKr factor names -> their LyCORIS key suffixes, for messages
LOKR_KEYS = {
    "w1": "lokr_w1", "w1a": "lokr_w1_a", "w1b": "lokr_w1_b",
    "w2": "lokr_w2", "w2a": "lokr_w2_a", "w2b": "lokr_w2_b", "t2": "lokr_t2",
}  # fmt: skip


def _ones(shape: Shape) -> bool:
    return all(s == 1 for s in shape)


def _dims(name: str, shape: Shape, allowed: tuple[int, ...]) -> list[str]:
    if len(shape) in allowed:
        return []
    want = " or ".join(f"{n}-D" for n in allowed)
    return [f"{name} {list(shape)} must be {want}"]


def _tucker(name: str, t: Shape, a_name: str, a: Shape, b_name: str, b: Shape) -> list[str]:
    """A Tucker core ``rank x rank x kh x kw`` between ``a`` (rank x out) and ``b`` (rank x in)."""
    problems = _dims(name, t, (4,)) + _dims(a_name, a, (2,)) + _dims(b_name, b, (2,))
    if not problems and not (t[0] == a[0] == t[1] == b[0]):
        problems.append(
            f"Tucker core {name} {list(t)} does not fit {a_name} {list(a)} and {b_name} {list(b)}: "
            "it must be rank x rank x kh x kw"
        )
    return problems


def _check_lora(f: Mapping[str, Shape]) -> list[str]:
    down, up = f["down"], f["up"]
    if len(up) < 2 or len(down) < 2:
        return [f"factors must be at least 2-D (down {list(down)}, up {list(up)})"]
    if not _ones(up[2:]):
        return [f"up factor {list(up)} must be 1x1 in its kernel dims"]
    if "mid" not in f:
        if up[1] != down[0]:
            return [f"rank mismatch: down has rank {down[0]}, up has rank {up[1]}"]
        return []
    mid = f["mid"]
    if len(mid) != 4:
        return [f"Tucker core (lora_mid) {list(mid)} must be 4-D: rank x rank x kh x kw"]
    if not _ones(down[2:]):
        return [f"with a Tucker core the kernel is the core's: down {list(down)} must be 1x1 in its kernel dims"]
    if not (mid[0] == mid[1] == down[0] == up[1]):
        return [
            f"Tucker core {list(mid)} does not fit up {list(up)} and down {list(down)}: "
            "it must be rank x rank x kh x kw, with the rank of both"
        ]
    return []


def _check_loha(f: Mapping[str, Shape]) -> list[str]:
    if ("t1" in f) != ("t2" in f):
        return ["one Tucker core (hada_t1 / hada_t2) without the other: both halves are Tucker or neither"]
    problems: list[str] = []
    halves: list[Shape] = []
    for i in ("1", "2"):
        a, b = f[f"w{i}a"], f[f"w{i}b"]
        if f"t{i}" in f:
            found = _tucker(f"hada_t{i}", f[f"t{i}"], f"hada_w{i}_a", a, f"hada_w{i}_b", b)
            halves.append((a[1], b[1], *f[f"t{i}"][2:]) if not found else ())
        else:
            found = _dims(f"hada_w{i}_a", a, (2,)) + _dims(f"hada_w{i}_b", b, (2, 4))
            if not found and a[1] != b[0]:
                found.append(f"rank mismatch: hada_w{i}_a {list(a)} and hada_w{i}_b {list(b)}")
            halves.append((a[0], *b[1:]) if not found else ())
        problems += found
    if not problems and halves[0] != halves[1]:
        problems.append(f"the two Hadamard halves have different shapes ({list(halves[0])} and {list(halves[1])})")
    return problems


def _check_lokr(f: Mapping[str, Shape]) -> list[str]:
    problems: list[str] = []
    if "w1" in f:
        problems += _dims("lokr_w1", f["w1"], (2,))
    else:
        a, b = f["w1a"], f["w1b"]
        problems += _dims("lokr_w1_a", a, (2,)) + _dims("lokr_w1_b", b, (2,))
        if not problems and a[1] != b[0]:
            problems.append(f"rank mismatch: lokr_w1_a {list(a)} and lokr_w1_b {list(b)}")
    if "t2" in f and "w2" in f:
        return ["lokr_t2 goes with lokr_w2_a + lokr_w2_b, not with a full lokr_w2"]
    if "w2" in f:
        problems += _dims("lokr_w2", f["w2"], (2, 4))
    elif "t2" in f:
        problems += _tucker("lokr_t2", f["t2"], "lokr_w2_a", f["w2a"], "lokr_w2_b", f["w2b"])
    else:
        a, b = f["w2a"], f["w2b"]
        found = _dims("lokr_w2_a", a, (2,)) + _dims("lokr_w2_b", b, (2, 4))
        if not found and a[1] != b[0]:
            found.append(f"rank mismatch: lokr_w2_a {list(a)} and lokr_w2_b {list(b)}")
        problems += found
    if not problems and "w1b" in f and "w2b" in f and f["w1b"][0] != f["w2b"][0]:
        problems.append(
            f"w1 and w2 are both low-rank with different ranks ({f['w1b'][0]} and {f['w2b'][0]}): "
            "which one alpha divides by is ambiguous (LyCORIS gives both the same)"
        )
    return problems


def _check_full(f: Mapping[str, Shape]) -> list[str]:
    diff = f["diff"]
    return [] if diff else ["a full diff must be at least 1-D, found a scalar"]


def factor_problems(kind: ModuleKind, f: Mapping[str, Shape]) -> list[str]:
    """What is wrong with the factors of a ``kind`` module, given their shapes by canonical name (empty when they
    fit): missing or unexpected factors, too many dims, shapes that do not fit together."""
    have = f.keys()
    required, optional = FACTORS[kind]
    missing = [n for n in required if n not in have]
    if kind == "lokr":
        for i in ("1", "2"):
            full, a, b = f"w{i}", f"w{i}a", f"w{i}b"
            if full in have and (a in have or b in have):
                both = ", ".join(LOKR_KEYS[n] for n in (full, a, b) if n in have)
                return [f"both a full and a low-rank w{i} ({both}): LoKr takes one or the other"]
            if full not in have and not {a, b} <= have:
                missing.append(f"{LOKR_KEYS[full]} (or {LOKR_KEYS[a]} + {LOKR_KEYS[b]})")
    if missing:
        return [f"missing factor(s) {', '.join(missing)}"]
    unknown = set(have) - set(required) - set(optional)
    if unknown:
        return [f"unexpected factor(s) {', '.join(sorted(unknown))}"]
    deep = [f"{k} {list(s)}" for k, s in f.items() if len(s) > 5]
    if deep:
        return [f"factor(s) with more than 5 dims: {', '.join(deep)}"]
    return {"lora": _check_lora, "loha": _check_loha, "lokr": _check_lokr, "full": _check_full}[kind](f)


def delta_shape(kind: ModuleKind, f: Mapping[str, Shape]) -> Shape:
    """Shape of the delta in (out, in[, kh, kw]) orientation, from factors that fit (:func:`factor_problems`)."""
    if kind == "lora":
        up, down = f["up"], f["down"]
        k = f["mid"][2:] if "mid" in f else down[2:]
        return (up[0], down[1], *k)
    if kind == "loha":
        if "t1" in f:
            return (f["w1a"][1], f["w1b"][1], *f["t1"][2:])
        return (f["w1a"][0], math.prod(f["w1b"][1:]))
    if kind == "lokr":
        a1, b1 = (f["w1"] if "w1" in f else (f["w1a"][0], f["w1b"][1]))[:2]
        if "w2" in f:
            w2 = f["w2"]
        elif "t2" in f:
            w2 = (f["w2a"][1], f["w2b"][1], *f["t2"][2:])
        else:
            w2 = (f["w2a"][0], *f["w2b"][1:])
        return (a1 * w2[0], b1 * w2[1], *w2[2:])
    return f["diff"]
