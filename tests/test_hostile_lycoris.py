"""Hostile LyCORIS shapes: factors that do not fit together give one Error line in inspect, convert, mix and merge
and an error finding in validate, never a traceback; shapes LyCORIS itself makes still load and match its rebuild.

Every file is built here from code (torch tensors written with the ``safetensors`` package into tmp_path). The
modules are named for the tiny UNet of ``fixtures/make_fixtures.py``: ``conv_in`` (a conv, 8 x 4 x 3 x 3) and a
linear ``to_q`` (8 x 8), so that merge has a real base to refuse them against.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import hostile
import pytest
import torch
from safetensors.torch import save_file

CONV = "lora_unet_conv_in"  # 8 x 4 x 3 x 3 in the tiny UNet
LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # 8 x 8

Tensors = dict[str, torch.Tensor]


def r(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + len(shape)))


def write_kohya(path: Path, modules: dict[str, Tensors], metadata: dict[str, str] | None = None) -> Path:
    """A kohya/LyCORIS file: ``{module: {suffix: tensor}}`` -> ``<module>.<suffix>`` keys."""
    flat = {f"{m}.{k}": v.contiguous() for m, parts in modules.items() for k, v in parts.items()}
    save_file(flat, str(path), metadata=metadata)
    return path


def lora(down: tuple[int, ...], up: tuple[int, ...], **extra: torch.Tensor) -> Tensors:
    return {"lora_down.weight": r(*down), "lora_up.weight": r(*up), **extra}


def loha(w1a: tuple[int, ...], w1b: tuple[int, ...], w2a: tuple[int, ...], w2b: tuple[int, ...], **extra: torch.Tensor) -> Tensors:  # fmt: skip
    return {"hada_w1_a": r(*w1a), "hada_w1_b": r(*w1b), "hada_w2_a": r(*w2a), "hada_w2_b": r(*w2b), **extra}


#: id -> (module name, its tensors, words the Error must contain). Each is one wrong shape LyCORIS cannot rebuild
#: (or rebuilds into something no consumer loads); the conv is 8 x 4 x 3 x 3, the linear 8 x 8.
SHAPES: dict[str, tuple[str, Callable[[], Tensors], str]] = {
    # LoCon Tucker (lora_mid): rank x rank x kh x kw between a 1x1 down and a 1x1 up
    "mid-with-3x3-down": (CONV, lambda: lora((2, 4, 3, 3), (8, 2, 1, 1), **{"lora_mid.weight": r(2, 2, 3, 3)}), "1x1"),
    "mid-wrong-rank": (
        CONV,
        lambda: lora((2, 4, 1, 1), (8, 2, 1, 1), **{"lora_mid.weight": r(3, 3, 3, 3)}),
        "Tucker core",
    ),  # fmt: skip
    "mid-not-square": (
        CONV,
        lambda: lora((2, 4, 1, 1), (8, 2, 1, 1), **{"lora_mid.weight": r(2, 3, 3, 3)}),
        "Tucker core",
    ),  # fmt: skip
    "mid-3d": (CONV, lambda: lora((2, 4, 1, 1), (8, 2, 1, 1), **{"lora_mid.weight": r(2, 2, 3)}), "4-D"),
    "mid-alone": (CONV, lambda: {"lora_mid.weight": r(2, 2, 3, 3)}, "missing factor"),
    "mid-on-loha": (
        CONV,
        lambda: loha((8, 2), (2, 36), (8, 2), (2, 36), **{"lora_mid.weight": r(2, 2, 3, 3)}),
        "mixes",
    ),  # fmt: skip
    # plain LoCon
    "up-with-3x3-kernel": (CONV, lambda: lora((2, 4, 3, 3), (8, 2, 3, 3)), "1x1"),
    "lora-rank-mismatch": (CONV, lambda: lora((2, 4, 3, 3), (8, 3, 1, 1)), "rank mismatch"),
    "lora-1d-down": (LINEAR, lambda: lora((2,), (8, 2)), "at least 2-D"),
    "lora-6d-down": (CONV, lambda: lora((2, 4, 3, 3, 1, 1), (8, 2, 1, 1)), "more than 5 dims"),
    "lora-zero-out": (CONV, lambda: lora((2, 4, 3, 3), (0, 2, 1, 1)), "only a rank may be 0"),
    "lora-zero-kernel": (CONV, lambda: lora((2, 4, 0, 3), (8, 2, 1, 1)), "only a rank may be 0"),
    # LoHa
    "loha-4d-w2b": (CONV, lambda: loha((8, 2), (2, 36), (8, 2), (2, 4, 3, 3)), "different shapes"),
    "loha-pair-rank-mismatch": (CONV, lambda: loha((8, 2), (3, 36), (8, 2), (2, 36)), "rank mismatch"),
    "loha-halves-differ": (LINEAR, lambda: loha((8, 2), (2, 8), (4, 2), (2, 8)), "different shapes"),
    "loha-3d-w1a": (LINEAR, lambda: loha((8, 2, 1), (2, 8), (8, 2), (2, 8)), "must be 2-D"),
    "loha-missing-w2b": (
        LINEAR,
        lambda: {k: v for k, v in loha((8, 2), (2, 8), (8, 2), (2, 8)).items() if k != "hada_w2_b"},
        "missing factor",
    ),  # fmt: skip
    "loha-one-tucker-core": (
        CONV,
        lambda: loha((2, 8), (2, 4), (2, 8), (2, 4), hada_t1=r(2, 2, 3, 3)),
        "one Tucker core",
    ),  # fmt: skip
    "loha-tucker-wrong-rank": (
        CONV,
        lambda: loha((2, 8), (2, 4), (2, 8), (2, 4), hada_t1=r(3, 3, 3, 3), hada_t2=r(2, 2, 3, 3)),
        "Tucker core",
    ),  # fmt: skip
    "loha-tucker-kernels-differ": (
        CONV,
        lambda: loha((2, 8), (2, 4), (2, 8), (2, 4), hada_t1=r(2, 2, 3, 3), hada_t2=r(2, 2, 1, 1)),
        "different shapes",
    ),  # fmt: skip
    # LoKr
    "lokr-w1-and-w1a": (
        CONV,
        lambda: {"lokr_w1": r(2, 2), "lokr_w1_a": r(2, 1), "lokr_w1_b": r(1, 2), "lokr_w2": r(4, 2, 3, 3)},
        "both",
    ),  # fmt: skip
    "lokr-w1-and-w1b": (
        CONV,
        lambda: {"lokr_w1": r(2, 2), "lokr_w1_b": r(1, 2), "lokr_w2": r(4, 2, 3, 3)},
        "both",
    ),  # fmt: skip
    "lokr-w2-and-w2a": (
        CONV,
        lambda: {"lokr_w1": r(2, 2), "lokr_w2": r(4, 2, 3, 3), "lokr_w2_a": r(4, 1), "lokr_w2_b": r(1, 18)},
        "both",
    ),  # fmt: skip
    "lokr-w2-rank-mismatch": (
        CONV,
        lambda: {"lokr_w1": r(2, 2), "lokr_w2_a": r(4, 2), "lokr_w2_b": r(3, 18)},
        "rank mismatch",
    ),  # fmt: skip
    "lokr-w1-rank-mismatch": (
        CONV,
        lambda: {"lokr_w1_a": r(2, 2), "lokr_w1_b": r(1, 2), "lokr_w2": r(4, 2, 3, 3)},
        "rank mismatch",
    ),  # fmt: skip
    "lokr-t2-wrong-rank": (
        CONV,
        lambda: {"lokr_w1": r(2, 2), "lokr_t2": r(3, 3, 3, 3), "lokr_w2_a": r(2, 4), "lokr_w2_b": r(2, 2)},
        "Tucker core",
    ),  # fmt: skip
    "lokr-t2-with-full-w2": (
        CONV,
        lambda: {"lokr_w1": r(2, 2), "lokr_w2": r(4, 2, 3, 3), "lokr_t2": r(2, 2, 3, 3)},
        "lokr_t2 goes with",
    ),  # fmt: skip
    "lokr-4d-w1": (CONV, lambda: {"lokr_w1": r(2, 2, 1, 1), "lokr_w2": r(4, 2, 3, 3)}, "must be 2-D"),
    "lokr-3d-w2": (CONV, lambda: {"lokr_w1": r(2, 2), "lokr_w2": r(4, 2, 9)}, "2-D or 4-D"),
    "lokr-ranks-differ": (
        CONV,
        lambda: {"lokr_w1_a": r(2, 1), "lokr_w1_b": r(1, 2), "lokr_w2_a": r(4, 2), "lokr_w2_b": r(2, 18)},
        "ambiguous",
    ),  # fmt: skip
    "lokr-missing-w2": (CONV, lambda: {"lokr_w1": r(2, 2)}, "missing factor"),
    # DoRA magnitudes, alphas, full diffs, biases
    "dora-scale-length": (CONV, lambda: lora((2, 4, 3, 3), (8, 2, 1, 1), dora_scale=r(7, 1, 1, 1)), "magnitude"),
    "dora-scale-two-axes": (CONV, lambda: lora((2, 4, 3, 3), (8, 2, 1, 1), dora_scale=r(2, 4, 1, 1)), "magnitude"),
    "dora-scale-on-loha": (LINEAR, lambda: loha((8, 2), (2, 8), (8, 2), (2, 8), dora_scale=r(9, 1)), "magnitude"),
    "dora-scale-without-factors": (
        CONV,
        lambda: {"dora_scale": r(8, 1, 1, 1), "alpha": torch.tensor(1.0)},
        "no factors",
    ),  # fmt: skip
    "alpha-vector": (CONV, lambda: lora((2, 4, 3, 3), (8, 2, 1, 1), alpha=torch.ones(2)), "single number"),
    "alpha-matrix": (CONV, lambda: lora((2, 4, 3, 3), (8, 2, 1, 1), alpha=torch.ones(2, 2)), "single number"),
    "full-diff-scalar": (CONV, lambda: {"diff": torch.tensor(1.0)}, "scalar"),
    "full-bias-length": (CONV, lambda: {"diff": r(8, 4, 3, 3), "diff_b": r(7)}, "bias"),
}


@pytest.fixture(scope="module")
def unet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base holding the two weights the module names resolve to (a single file, built without diffusers)."""
    path = tmp_path_factory.mktemp("base") / "unet.safetensors"
    save_file(
        {
            "conv_in.weight": r(8, 4, 3, 3, seed=7),
            "conv_in.bias": r(8, seed=7),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": r(8, 8, seed=7),
        },
        str(path),
    )
    return path


#: the cases every default run tries in convert, mix and merge (one of each kind); the rest run under -m slow.
#: inspect and validate try every case by default: they hold the whole of Module.check().
EACH_KIND = {
    "mid-wrong-rank", "up-with-3x3-kernel", "loha-4d-w2b", "loha-tucker-wrong-rank", "lokr-w1-and-w1a",
    "lokr-w2-rank-mismatch", "dora-scale-length", "alpha-vector", "full-bias-length",
}  # fmt: skip
SOME = [pytest.param(c, marks=() if c in EACH_KIND else pytest.mark.slow) for c in sorted(SHAPES)]


def _file(case: str, tmp_path: Path) -> tuple[Path, str]:
    name, build, says = SHAPES[case]
    return write_kohya(tmp_path / f"{case}.safetensors", {name: build()}), says


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_inspect_refuses(case: str, tmp_path: Path) -> None:
    path, says = _file(case, tmp_path)
    hostile.run(["inspect", path], inputs=[path], says=says)


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_validate_finds(case: str, tmp_path: Path) -> None:
    """validate returns (never raises) with an error finding that says what is wrong."""
    from loratools.ops.validate import validate

    path, says = _file(case, tmp_path)
    rep = hostile.call(validate, path, inputs=[path])
    assert not rep.ok
    assert any(says.lower() in f.message.lower() for f in rep.errors), [f.message for f in rep.findings]


@pytest.mark.parametrize("case", SOME)
def test_convert_refuses(case: str, tmp_path: Path) -> None:
    path, says = _file(case, tmp_path)
    out = tmp_path / "out.safetensors"
    hostile.run(["convert", path, "--to", "diffusers", "-o", out], inputs=[path], out=out, says=says)


@pytest.mark.parametrize("case", SOME)
def test_mix_refuses(case: str, tmp_path: Path) -> None:
    path, says = _file(case, tmp_path)
    good = write_kohya(tmp_path / "good.safetensors", {CONV: lora((2, 4, 3, 3), (8, 2, 1, 1))})
    out = tmp_path / "mixed.safetensors"
    hostile.run(["mix", good, path, "--rank", "2", "-o", out], inputs=[path, good], out=out, says=says)


@pytest.mark.parametrize("case", SOME)
def test_merge_refuses(case: str, unet: Path, tmp_path: Path) -> None:
    path, says = _file(case, tmp_path)
    out = tmp_path / "merged.safetensors"
    hostile.run(["merge", unet, path, "-o", out], inputs=[path, unet], out=out, says=says)


# ---- shapes that are right: LyCORIS makes them, loratools must take them, with LyCORIS' own delta ----------------

#: id -> (module, tensors, LyCORIS' own rebuild of the delta at scale alpha / rank)
VALID: dict[str, tuple[str, Callable[[], Tensors]]] = {
    "locon-tucker": (CONV, lambda: lora((2, 4, 1, 1), (8, 2, 1, 1), **{"lora_mid.weight": r(2, 2, 3, 3)})),
    "locon-2d-factors-with-mid": (CONV, lambda: lora((2, 4), (8, 2), **{"lora_mid.weight": r(2, 2, 3, 3)})),
    "loha-conv-flat": (CONV, lambda: loha((8, 2), (2, 36), (8, 3), (3, 36))),
    "loha-tucker": (
        CONV,
        lambda: loha((2, 8), (2, 4), (2, 8), (2, 4), hada_t1=r(2, 2, 3, 3), hada_t2=r(2, 2, 3, 3)),
    ),  # fmt: skip
    "lokr-conv-lowrank-w2": (CONV, lambda: {"lokr_w1": r(2, 2), "lokr_w2_a": r(4, 1), "lokr_w2_b": r(1, 2, 3, 3)}),
    "lokr-tucker-w2": (
        CONV,
        lambda: {
            "lokr_w1_a": r(2, 1),
            "lokr_w1_b": r(1, 2),
            "lokr_t2": r(1, 1, 3, 3),
            "lokr_w2_a": r(1, 4),
            "lokr_w2_b": r(1, 2),
        },
    ),  # fmt: skip
    "lokr-both-lowrank-linear": (
        LINEAR,
        lambda: {"lokr_w1_a": r(2, 1), "lokr_w1_b": r(1, 4), "lokr_w2_a": r(4, 1), "lokr_w2_b": r(1, 2)},
    ),  # fmt: skip
    "dora-conv-per-row": (CONV, lambda: lora((2, 4, 3, 3), (8, 2, 1, 1), dora_scale=r(8, 1, 1, 1).abs() + 1)),
    "full-with-bias": (CONV, lambda: {"diff": r(8, 4, 3, 3), "diff_b": r(8)}),
}


def _lycoris_delta(parts: Tensors, scale: float) -> torch.Tensor:
    """The delta as LyCORIS' own functional rebuild computes it (``lycoris.functional``)."""
    from lycoris.functional import locon as f_locon
    from lycoris.functional import loha as f_loha
    from lycoris.functional import lokr as f_lokr

    g = parts.get
    if "lora_down.weight" in parts:
        return f_locon.diff_weight(g("lora_down.weight"), g("lora_up.weight"), g("lora_mid.weight"), gamma=scale)
    if "hada_w1_a" in parts:
        ws = [g(k) for k in ("hada_w1_b", "hada_w1_a", "hada_w2_b", "hada_w2_a", "hada_t1", "hada_t2")]
        return f_loha.diff_weight(*ws, gamma=scale)
    if "diff" in parts:
        return parts["diff"]
    ws = [g(f"lokr_{k}") for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")]
    return f_lokr.diff_weight(*ws, gamma=scale)


@pytest.mark.parametrize("case", sorted(VALID))
def test_shapes_lycoris_makes_are_taken_with_its_delta(case: str, unet: Path, tmp_path: Path) -> None:
    """Not stricter than LyCORIS where ComfyUI loads the file too: each loads, validates, converts, mixes and
    merges, and its delta is LyCORIS' own rebuild (the rank alpha divides by is LyCORIS' too)."""
    from loratools import load_adapter
    from loratools.formats.names import is_linear_leaf
    from loratools.ops.validate import validate

    name, build = VALID[case]
    parts = build()
    parts["alpha"] = torch.tensor(1.5)
    path = write_kohya(tmp_path / "ok.safetensors", {name: parts})
    m = load_adapter(path).modules[name]
    assert not validate(path).errors
    rank = next((parts[k].shape[0] for k in ("lora_down.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b") if k in parts), None)  # fmt: skip
    scale = 1.5 / rank if rank else 1.0
    want = _lycoris_delta({k: v.double() for k, v in parts.items()}, scale)
    torch.testing.assert_close(m.delta(dtype=torch.float64).reshape(want.shape), want, rtol=1e-10, atol=1e-12)
    assert m.delta_norm() == pytest.approx(float(want.norm()), rel=1e-9)
    out = tmp_path / "out"
    out.mkdir()
    for args in (
        ["inspect", path],
        ["convert", path, "--to", "diffusers", "--base", unet, "-o", out / "c.safetensors"],
        ["mix", path, path, "--weights", "1,-0.5", "-o", out / "m.safetensors"],
        ["merge", unet, path, "-o", out / "merged.safetensors"],
    ):
        if args[0] in ("mix", "convert") and "dora_scale" in parts:
            hostile.run(args, inputs=[path], says="DoRA")  # DoRA neither mixes nor becomes plain LoRA
            continue
        if args[0] == "mix" and m.flattened and not is_linear_leaf(name):  # LoRA needs the kernel only the base gives
            hostile.run(args, inputs=[path], says=["flattened", "--base"])
            continue
        hostile.run(args, inputs=[path, unet], code=0)


# ---- Module.check() is complete: whatever shapes it passes, every operation on them runs ------------------------

KIND_FACTORS = {
    "lora": ["down", "up", "mid"],
    "loha": ["w1a", "w1b", "w2a", "w2b", "t1", "t2"],
    "lokr": ["w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2"],
    "full": ["diff"],
}


def test_check_is_complete() -> None:
    """Random factor shapes of every kind (0-5 dims, sizes 0-4, with magnitudes, biases, layouts): either
    ``check()`` names a problem, or delta, delta_norm (equal to the dense norm), apply and the SVD factors all run
    and agree on the shape. A shape check that misses a case shows up here as a torch exception."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from loratools.errors import LoratoolsError
    from loratools.model import Module, TensorRef
    from loratools.ops.lowrank import factors

    shape = st.lists(st.sampled_from([0, 1, 1, 2, 2, 3, 4]), min_size=0, max_size=5).map(tuple)
    module = st.sampled_from(sorted(KIND_FACTORS)).flatmap(
        lambda kind: st.tuples(
            st.just(kind),
            st.dictionaries(st.sampled_from(KIND_FACTORS[kind]), shape, min_size=1, max_size=6),
            st.none() | st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple),
            st.none() | st.integers(1, 4),
            st.sampled_from(["out", "in"]),
            st.sampled_from(["linear", "conv", "embedding"]),
            st.booleans(),
        )
    )

    examples = int(__import__("os").environ.get("LORATOOLS_FUZZ_EXAMPLES", "150"))

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(module)
    def run(spec: tuple) -> None:  # type: ignore[type-arg]
        kind, shapes, mag, bias, axis, layer, fifo = spec
        g = torch.Generator().manual_seed(len(shapes))
        m = Module(
            "m", kind, {k: TensorRef.of(torch.randn(s, generator=g, dtype=torch.float64)) for k, s in shapes.items()},
            alpha=2.0, layer=layer, fan_in_fan_out=fifo, dora_axis=axis,
            magnitude=None if mag is None else TensorRef.of(torch.rand(mag, dtype=torch.float64) + 0.5),
            bias=None if bias is None else TensorRef.of(torch.randn(bias, dtype=torch.float64)),
        )  # fmt: skip
        if m.check():
            with pytest.raises(LoratoolsError):
                m.delta()
            return
        d = m.delta(dtype=torch.float64)
        assert tuple(d.shape) == m.weight_shape()
        assert m.delta_norm() == pytest.approx(float(d.norm()), rel=1e-9, abs=1e-12)
        w = torch.randn(m.weight_shape(), generator=g, dtype=torch.float64) + 3
        try:
            assert m.apply(w, 0.5, dtype=torch.float64).shape == w.shape
        except LoratoolsError as e:  # DoRA on a row that W + delta makes all zero: refused, never NaN
            assert "all-zero" in str(e)
        up, down = factors(m, "cpu", torch.float64)
        torch.testing.assert_close(up @ down, m.delta_matrix(dtype=torch.float64), rtol=1e-8, atol=1e-10)

    run()
