"""Hostile numbers: NaN/Inf alphas and factors, overflowing scales and weights, Kronecker and Hadamard products
far larger than their files, rank 0, and the dense-delta limit. Each ends in one Error line naming the module
(before any SVD sees a NaN, before any work on a delta over the limit), or in a correct result, in bounded time."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import hostile
import pytest
import torch
from safetensors.torch import save_file
from test_hostile_lycoris import CONV, LINEAR, Tensors, lora, r, write_kohya

from loratools import load_adapter
from loratools.errors import LoratoolsError, ShapeError

NAN, INF = float("nan"), float("inf")


def _with(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = value
    return t


#: id -> (module, tensors): each holds one value no arithmetic can honour
NONFINITE: dict[str, tuple[str, Callable[[], Tensors], str]] = {
    "lora-nan-alpha": (CONV, lambda: lora((2, 4, 3, 3), (8, 2, 1, 1), alpha=torch.tensor(NAN)), "alpha is nan"),
    "lora-inf-alpha": (CONV, lambda: lora((2, 4, 3, 3), (8, 2, 1, 1), alpha=torch.tensor(INF)), "alpha is inf"),
    "lora-nan-down": (
        CONV,
        lambda: {"lora_down.weight": _with(r(2, 4, 3, 3), NAN), "lora_up.weight": r(8, 2, 1, 1)},
        "NaN or Inf in its down",
    ),  # fmt: skip
    "lora-inf-up": (
        LINEAR,
        lambda: {"lora_down.weight": r(2, 8), "lora_up.weight": _with(r(8, 2), -INF)},
        "NaN or Inf in its up",
    ),  # fmt: skip
    "loha-inf-w1a": (
        LINEAR,
        lambda: {"hada_w1_a": _with(r(8, 2), INF), "hada_w1_b": r(2, 8), "hada_w2_a": r(8, 2), "hada_w2_b": r(2, 8)},
        "w1a",
    ),  # fmt: skip
    "loha-nan-alpha": (
        LINEAR,
        lambda: {
            "hada_w1_a": r(8, 2),
            "hada_w1_b": r(2, 8),
            "hada_w2_a": r(8, 2),
            "hada_w2_b": r(2, 8),
            "alpha": torch.tensor(NAN),
        },
        "alpha is nan",
    ),  # fmt: skip
    "lokr-nan-w2": (CONV, lambda: {"lokr_w1": r(2, 2), "lokr_w2": _with(r(4, 2, 3, 3), NAN)}, "w2"),
    "tucker-inf-mid": (
        CONV,
        lambda: lora((2, 4, 1, 1), (8, 2, 1, 1), **{"lora_mid.weight": _with(r(2, 2, 3, 3), INF)}),
        "mid",
    ),  # fmt: skip
    "full-nan-diff": (CONV, lambda: {"diff": _with(r(8, 4, 3, 3), NAN)}, "diff"),
    # finite in the file, not once scaled: float64 factors near 1e200 with alpha 1e200 overflow float64
    "lora-scale-overflows": (
        LINEAR,
        lambda: {
            "lora_down.weight": r(2, 8).double() * 1e200,
            "lora_up.weight": r(8, 2).double(),
            "alpha": torch.tensor(1e200, dtype=torch.float64),
        },
        "overflows",
    ),  # fmt: skip
    "loha-product-overflows": (
        LINEAR,
        lambda: {
            "hada_w1_a": r(8, 2).double() * 1e160,
            "hada_w1_b": r(2, 8).double() * 1e160,
            "hada_w2_a": r(8, 2).double(),
            "hada_w2_b": r(2, 8).double(),
        },
        "overflows",
    ),  # fmt: skip
}

COMMANDS: dict[str, Callable[[Path, Path], list[object]]] = {
    "mix-rank": lambda p, o: ["mix", p, p, "--rank", "1", "-o", o / "m.safetensors"],
    "mix-cat": lambda p, o: ["mix", p, "-o", o / "m.safetensors"],
    "resize": lambda p, o: ["resize", p, "--rank", "1", "-o", o / "r.safetensors"],
    "convert": lambda p, o: ["convert", p, "--to", "diffusers", "-o", o / "c.safetensors"],
    "spectrum": lambda p, o: ["inspect", p, "--spectrum"],
}
#: the (case, command) pairs of the default run; every pair runs under -m slow
DEFAULT = {
    ("lora-nan-alpha", "mix-rank"), ("lora-nan-alpha", "resize"), ("loha-inf-w1a", "convert"),
    ("lokr-nan-w2", "mix-rank"), ("tucker-inf-mid", "resize"), ("full-nan-diff", "spectrum"),
    ("lora-scale-overflows", "mix-rank"), ("loha-product-overflows", "convert"), ("lora-inf-up", "mix-cat"),
}  # fmt: skip


@pytest.mark.parametrize(
    ("case", "command"),
    [
        pytest.param(c, k, marks=() if (c, k) in DEFAULT else pytest.mark.slow, id=f"{c}-{k}")
        for c in sorted(NONFINITE)
        for k in COMMANDS
        if not (k == "convert" and c.startswith("lora-"))  # plain LoRA converts by copying: no SVD to protect
    ],
)
def test_nonfinite_refused_before_any_svd(case: str, command: str, tmp_path: Path) -> None:
    name, build, says = NONFINITE[case]
    path = write_kohya(tmp_path / "in.safetensors", {name: build()})
    out = tmp_path / "out"
    out.mkdir()
    args = COMMANDS[command](path, out)
    hostile.run(args, inputs=[path], out=out / "x", says=[name, says])
    assert not list(out.iterdir())


@pytest.mark.parametrize("case", ["lora-nan-alpha", "lokr-nan-w2", "full-nan-diff"])
def test_merge_refuses_nonfinite(case: str, tmp_path: Path) -> None:
    name, build, says = NONFINITE[case]
    path = write_kohya(tmp_path / "in.safetensors", {name: build()})
    base = _unet_base(tmp_path)
    out = tmp_path / "merged.safetensors"
    hostile.run(["merge", base, path, "-o", out], inputs=[path, base], out=out, says=[name, says.split(" in its")[0]])


@pytest.mark.parametrize(("command", "weights"), [("mix", "nan,1"), ("mix", "1,inf"), ("merge", "nan"), ("merge", "-inf")])  # fmt: skip
def test_nonfinite_weights_refused(command: str, weights: str, tmp_path: Path) -> None:
    path = write_kohya(tmp_path / "in.safetensors", {CONV: lora((2, 4, 3, 3), (8, 2, 1, 1))})
    out = tmp_path / "out.safetensors"
    if command == "mix":
        args: list[object] = ["mix", path, path, "--weights", weights, "-o", out]
    else:
        args = ["merge", _unet_base(tmp_path), path, "--weights", weights, "-o", out]
    hostile.run(args, inputs=[path], out=out, code={1, 2}, says="not a finite number")


def _unet_base(tmp_path: Path) -> Path:
    path = tmp_path / "base.safetensors"
    if not path.exists():
        save_file({"conv_in.weight": r(8, 4, 3, 3), f"{LINEAR[len('lora_unet_') :]}.weight": r(8, 8)}, str(path))
    return path


# ---- products far larger than their files -----------------------------------------------------------------------

#: id -> (tensors, the delta shape they claim); each file is at most a few MB
HUGE: dict[str, tuple[Callable[[], Tensors], tuple[int, ...]]] = {
    # the issue's case: 64x64 (x) 64x64x3x3 = 4096 x 4096 x 3 x 3, 151 M elements from 160 KB
    "lokr-64x64-kron-64x64x3x3": (lambda: {"lokr_w1": r(64, 64), "lokr_w2": r(64, 64, 3, 3)}, (4096, 4096, 3, 3)),
    # low-rank halves claiming 10^5 x 10^5 per side: 2 x 10^5 x 2 x 10^5 = 4 * 10^10 elements from 1.6 MB
    "lokr-lowrank-1e5": (
        lambda: {"lokr_w1_a": r(100_000, 1), "lokr_w1_b": r(1, 100_000), "lokr_w2_a": r(2, 1), "lokr_w2_b": r(1, 2)},
        (200_000, 200_000),
    ),  # fmt: skip
    "loha-2e4": (
        lambda: {
            "hada_w1_a": r(20_000, 1),
            "hada_w1_b": r(1, 20_000),
            "hada_w2_a": r(20_000, 1),
            "hada_w2_b": r(1, 20_000),
        },
        (20_000, 20_000),
    ),  # fmt: skip
    "tucker-1e4": (
        lambda: lora((1, 10_000, 1, 1), (10_000, 1, 1, 1), **{"lora_mid.weight": r(1, 1, 3, 3)}),
        (10_000, 10_000, 3, 3),
    ),  # fmt: skip
}
HUGE_COMMANDS = {
    "convert": lambda p, o: ["convert", p, "--to", "diffusers", "-o", o],
    "mix-rank": lambda p, o: ["mix", p, "--rank", "4", "-o", o],
    "mix-cat": lambda p, o: ["mix", p, p, "-o", o],
    "resize": lambda p, o: ["resize", p, "--rank", "4", "-o", o],
    "spectrum": lambda p, o: ["inspect", p, "--spectrum"],
}
HUGE_DEFAULT = {("lokr-64x64-kron-64x64x3x3", c) for c in HUGE_COMMANDS} | {
    ("lokr-lowrank-1e5", "convert"), ("loha-2e4", "resize"), ("tucker-1e4", "mix-rank"),
}  # fmt: skip


@pytest.mark.parametrize(
    ("case", "command"),
    [
        pytest.param(c, k, marks=() if (c, k) in HUGE_DEFAULT else pytest.mark.slow, id=f"{c}-{k}")
        for c in sorted(HUGE)
        for k in HUGE_COMMANDS
    ],
)
def test_huge_product_refused_before_any_work(case: str, command: str, tmp_path: Path) -> None:
    build, shape = HUGE[case]
    path = write_kohya(tmp_path / "in.safetensors", {CONV: build()})
    out = tmp_path / "out.safetensors"
    size = f"{math.prod(shape):,}"
    r_ = hostile.run(
        HUGE_COMMANDS[command](path, out), inputs=[path], out=out, seconds=10, says=[CONV, size, "LORATOOLS_MAX_DELTA"]
    )
    assert "x".join(map(str, shape)) in r_.stderr


@pytest.mark.parametrize("case", sorted(HUGE))
def test_huge_product_inspect_and_merge(case: str, tmp_path: Path) -> None:
    """inspect shows the header facts (and LoKr's norm, which needs no dense delta: ||kron(a, b)|| = ||a|| ||b||);
    merge refuses it against a base weight of another size without forming it."""
    build, shape = HUGE[case]
    parts = build()
    path = write_kohya(tmp_path / "in.safetensors", {CONV: parts})
    hostile.run(["inspect", path, "--fast"], inputs=[path], code=0, seconds=10)
    if case.startswith("lokr"):
        out = hostile.run(["inspect", path, "--json"], inputs=[path], code=0, seconds=10)
        import json

        (mod,) = json.loads(out.stdout)["modules"]
        assert mod["shape"] == list(shape)
        w = {k.removeprefix("lokr_"): v.double() for k, v in parts.items()}

        def norm(i: str) -> float:  # ||a @ b|| from the Gram matrices: the product itself would not fit in memory
            if f"w{i}" in w:
                return float(w[f"w{i}"].norm())
            a, b = w[f"w{i}_a"], w[f"w{i}_b"]
            return math.sqrt(float(((a.T @ a) * (b @ b.T)).sum()))

        assert mod["norm"] == pytest.approx(norm("1") * norm("2"), rel=1e-9)
    else:
        hostile.run(["inspect", path], inputs=[path], says="LORATOOLS_MAX_DELTA", seconds=10)
    base = _unet_base(tmp_path)
    merged = tmp_path / "merged.safetensors"
    hostile.run(["merge", base, path, "-o", merged], inputs=[path, base], out=merged, says="conv_in", seconds=10)


def test_lokr_norm_is_the_dense_norm() -> None:
    """The Kronecker-product norm rule against the dense delta, for every LoKr layout."""
    from loratools.model import Module, TensorRef

    layouts = [
        {"w1": (2, 3), "w2": (4, 2, 3, 3)},
        {"w1a": (2, 1), "w1b": (1, 3), "w2a": (4, 1), "w2b": (1, 5)},
        {"w1": (3, 2), "t2": (2, 2, 3, 3), "w2a": (2, 4), "w2b": (2, 2)},
        {"w1": (2, 2), "w2a": (4, 2), "w2b": (2, 2, 3, 3)},
    ]
    for i, layout in enumerate(layouts):
        m = Module("m", "lokr", {k: TensorRef.of(r(*s, seed=i).double()) for k, s in layout.items()}, alpha=3.0)
        assert m.delta_norm() == pytest.approx(float(m.delta(dtype=torch.float64).norm()), rel=1e-12), layout


# ---- the limit itself -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "code"), [("287", 1), ("288", 0), ("1_000", 0), ("abc", 1), ("0", 1), ("-5", 1), ("1e9", 1)]
)
def test_limit_from_the_environment(limit: str, code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LORATOOLS_MAX_DELTA sets the limit (elements): a full diff of 8x4x3x3 = 288 elements passes at 288, not at
    287; a value that is not a positive whole number is an Error, not a silent default."""
    path = write_kohya(tmp_path / "in.safetensors", {CONV: {"diff": r(8, 4, 3, 3)}})
    out = tmp_path / "out.safetensors"
    monkeypatch.setenv("LORATOOLS_MAX_DELTA", limit)
    says = None if code == 0 else ("288" if limit.isdigit() and int(limit) else "LORATOOLS_MAX_DELTA")
    # (successes are run without out=: the umask-mode check of outputs belongs to the output-paths work)
    hostile.run(["convert", path, "--to", "diffusers", "-o", out], inputs=[path], out=None if code == 0 else out, code=code, says=says)  # fmt: skip
    assert out.exists() == (code == 0)


def test_plain_lora_never_forms_its_dense_delta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank-1 LoRA of 10^5 x 10^5 (10^10 elements dense, 800 KB of factors) mixes and re-compresses from its
    factors, under a limit of 1 element: the limit only bounds what must be densified."""
    monkeypatch.setenv("LORATOOLS_MAX_DELTA", "1")
    path = write_kohya(tmp_path / "big.safetensors", {LINEAR: lora((1, 100_000), (100_000, 1))})
    mixed, resized = tmp_path / "mixed.safetensors", tmp_path / "resized.safetensors"
    hostile.run(["mix", path, path, "--weights", "1,0.5", "--rank", "1", "-o", mixed], inputs=[path], code=0, seconds=20)  # fmt: skip
    hostile.run(["resize", path, "--rank", "1", "--dtype", "fp32", "-o", resized], inputs=[path], code=0, seconds=20)
    src = load_adapter(path).modules[LINEAR]
    for out, factor in ((mixed, 1.5), (resized, 1.0)):
        m = load_adapter(out).modules[LINEAR]
        assert m.rank == 1 and m.delta_norm() == pytest.approx(factor * src.delta_norm(), rel=1e-5)


# ---- rank 0: a module that adds nothing goes through everything ----------------------------------------------------

RANK0: dict[str, Callable[[], Tensors]] = {
    "loha-rank0": lambda: {"hada_w1_a": r(8, 0), "hada_w1_b": r(0, 8), "hada_w2_a": r(8, 0), "hada_w2_b": r(0, 8)},
    "lokr-rank0": lambda: {"lokr_w1_a": r(2, 0), "lokr_w1_b": r(0, 2), "lokr_w2_a": r(4, 0), "lokr_w2_b": r(0, 4)},
    "tucker-rank0": lambda: {
        "lora_down.weight": r(0, 8, 1, 1),
        "lora_mid.weight": r(0, 0, 3, 3),
        "lora_up.weight": r(8, 0, 1, 1),
    },  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(RANK0))
def test_rank_zero_is_refused_everywhere(case: str, tmp_path: Path) -> None:
    """A rank-0 module adds nothing, and PEFT (r=0) and ComfyUI (alpha / rank) fail on one: refused by name."""
    parts = RANK0[case]()
    parts["alpha"] = torch.tensor(4.0)
    name = CONV if case == "tucker-rank0" else LINEAR
    if case == "tucker-rank0":  # a conv: 8 x 8 x 3 x 3
        base = tmp_path / "base.safetensors"
        save_file({"conv_in.weight": r(8, 8, 3, 3)}, str(base))
    else:
        base = _unet_base(tmp_path)
    path = write_kohya(tmp_path / "in.safetensors", {name: parts})
    hostile.call(load_adapter, path, raises=ShapeError, inputs=[path], says="rank 0")
    hostile.run(["inspect", path], inputs=[path], code=1, says="rank 0")
    out = tmp_path / "out.safetensors"
    for args in (["convert", path, "--to", "diffusers"], ["mix", path, path, "--rank", "2"],
                 ["resize", path, "--rank", "2"], ["merge", base, path]):  # fmt: skip
        hostile.run([*args, "-o", out], inputs=[path, base], code=1, out=out, says="rank 0")
    r0 = hostile.run(["validate", path], inputs=[path], code=1, findings=True)
    assert "rank 0" in r0.stdout


def test_library_calls_raise_loratools_errors() -> None:
    """The same refusals through the library: LoratoolsError subclasses with one-line messages."""
    from loratools.model import Module, TensorRef
    from loratools.ops.lowrank import factors
    from loratools.ops.mix import mix_adapters

    nan = Module("m", "lora", {"down": TensorRef.of(r(2, 8)), "up": TensorRef.of(r(8, 2))}, alpha=NAN)
    hostile.call(factors, nan, "cpu", torch.float64, raises=LoratoolsError, says="alpha is nan")
    huge = Module("h", "lokr", {"w1": TensorRef.of(r(64, 64)), "w2": TensorRef.of(r(64, 64, 3, 3))})
    hostile.call(huge.delta_matrix, raises=LoratoolsError, says="more than the limit")
    hostile.call(huge.check_dense, raises=LoratoolsError, says="150,994,944")
    bad = Module("b", "lokr", {"w1": TensorRef.of(r(2, 2)), "w1a": TensorRef.of(r(2, 1)), "w1b": TensorRef.of(r(1, 2)), "w2": TensorRef.of(r(2, 2))})  # fmt: skip
    hostile.call(bad.delta, raises=ShapeError, says="both a full and a low-rank w1")
    hostile.call(bad.delta_norm, raises=ShapeError, says="both")
    hostile.call(bad.apply, torch.zeros(4, 4), raises=ShapeError, says="both")
    from loratools.model import Adapter

    a = Adapter("kohya", modules={"m": Module("m", "lora", {"down": TensorRef.of(r(2, 8)), "up": TensorRef.of(r(8, 2))})})  # fmt: skip
    hostile.call(mix_adapters, [a, a], [1.0, NAN], raises=LoratoolsError, says="must be a finite number")
