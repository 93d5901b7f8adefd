"""The delta math of every module kind against independent dense computations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.errors import ShapeError
from loratools.model import Module, TensorRef


def ref(t: torch.Tensor) -> TensorRef:
    return TensorRef.of(t)


def lora(down: torch.Tensor, up: torch.Tensor, **kw: object) -> Module:
    return Module("m", "lora", {"down": ref(down), "up": ref(up)}, **kw)  # type: ignore[arg-type]


def test_linear_lora_scale_alpha_over_r() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 10, generator=g), torch.randn(6, 4, generator=g)
    m = lora(a, b, alpha=2.0)
    torch.testing.assert_close(m.delta(), 0.5 * b @ a)
    assert m.scale == 0.5 and m.rank == 4 and m.weight_shape() == (6, 10)


def test_rslora_scale_alpha_over_sqrt_r() -> None:
    a, b = torch.randn(9, 5), torch.randn(3, 9)
    m = lora(a, b, alpha=6.0, rslora=True)
    assert m.scale == pytest.approx(2.0)
    torch.testing.assert_close(m.delta(), 2.0 * b @ a)


def test_missing_alpha_means_scale_one() -> None:
    a, b = torch.randn(3, 5), torch.randn(4, 3)
    torch.testing.assert_close(lora(a, b).delta(), b @ a)


def test_conv_lora_reshapes_to_kernel() -> None:
    a, b = torch.randn(2, 3, 3, 3), torch.randn(5, 2, 1, 1)
    m = lora(a, b, alpha=1.0)
    want = (b.flatten(1) @ a.flatten(1)).reshape(5, 3, 3, 3) * 0.5
    torch.testing.assert_close(m.delta(), want)
    # against what the conv layers themselves compute: conv(x, delta) == 0.5 * conv(conv(x, A), B)
    x = torch.randn(1, 3, 8, 8)
    y_chain = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, a), b) * 0.5
    torch.testing.assert_close(torch.nn.functional.conv2d(x, m.delta()), y_chain, rtol=1e-4, atol=1e-4)


def test_tucker_locon_matches_layer_chain() -> None:
    down, mid, up = torch.randn(2, 4, 1, 1), torch.randn(2, 2, 3, 3), torch.randn(6, 2, 1, 1)
    m = Module("m", "lora", {"down": ref(down), "mid": ref(mid), "up": ref(up)}, alpha=2.0)
    x = torch.randn(1, 4, 7, 7)
    F = torch.nn.functional
    chain = F.conv2d(F.conv2d(F.conv2d(x, down), mid), up)
    torch.testing.assert_close(F.conv2d(x, m.delta()), chain, rtol=1e-4, atol=1e-4)


def test_embedding_delta_is_transposed() -> None:
    a, b = torch.randn(4, 50), torch.randn(8, 4)  # lora_embedding_A r x vocab, B hidden x r
    m = Module("e", "lora", {"down": ref(a), "up": ref(b)}, alpha=4.0, layer="embedding")
    torch.testing.assert_close(m.delta(), (b @ a).T)
    assert m.weight_shape() == (50, 8)


def test_fan_in_fan_out_delta_is_transposed() -> None:
    a, b = torch.randn(2, 6), torch.randn(12, 2)
    m = lora(a, b, alpha=2.0, fan_in_fan_out=True)
    torch.testing.assert_close(m.delta(), (b @ a).T)
    assert m.weight_shape() == (6, 12)


def test_loha_hadamard() -> None:
    w = {k: torch.randn(*s) for k, s in {"w1a": (6, 2), "w1b": (2, 5), "w2a": (6, 2), "w2b": (2, 5)}.items()}
    m = Module("h", "loha", {k: ref(v) for k, v in w.items()}, alpha=1.0)
    torch.testing.assert_close(m.delta(), (w["w1a"] @ w["w1b"]) * (w["w2a"] @ w["w2b"]) * 0.5)


def test_loha_tucker_conv() -> None:
    r, o, i = 2, 4, 3
    t1, t2 = torch.randn(r, r, 3, 3), torch.randn(r, r, 3, 3)
    a1, b1, a2, b2 = torch.randn(r, o), torch.randn(r, i), torch.randn(r, o), torch.randn(r, i)
    f = {"t1": t1, "t2": t2, "w1a": a1, "w1b": b1, "w2a": a2, "w2b": b2}
    m = Module("h", "loha", {k: ref(v) for k, v in f.items()}, alpha=4.0)

    def rebuild(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(o, i, 3, 3)
        for p in range(o):
            for q in range(i):
                for x in range(r):
                    for y in range(r):
                        out[p, q] += a[x, p] * t[x, y] * b[y, q]
        return out

    torch.testing.assert_close(m.delta(), rebuild(t1, a1, b1) * rebuild(t2, a2, b2) * 2.0)


def test_lokr_low_rank_and_full() -> None:
    w1, w2a, w2b = torch.randn(2, 3), torch.randn(4, 2), torch.randn(2, 5)
    m = Module("k", "lokr", {"w1": ref(w1), "w2a": ref(w2a), "w2b": ref(w2b)}, alpha=1.0)
    torch.testing.assert_close(m.delta(), torch.kron(w1, w2a @ w2b) * 0.5)
    assert m.weight_shape() == (8, 15)
    full = Module("k", "lokr", {"w1": ref(w1), "w2": ref(w2a @ w2b)}, alpha=123.0)
    assert full.rank is None and full.scale == 1.0
    torch.testing.assert_close(full.delta(), torch.kron(w1, w2a @ w2b))


def test_lokr_conv_kernel() -> None:
    w1, w2 = torch.randn(2, 2), torch.randn(3, 4, 3, 3)
    m = Module("k", "lokr", {"w1": ref(w1), "w2": ref(w2)})
    d = m.delta()
    assert d.shape == (6, 8, 3, 3)
    torch.testing.assert_close(d[3:6, 0:4], w1[1, 0] * w2)


def test_rank_mismatch_is_a_shape_error() -> None:
    m = lora(torch.randn(3, 5), torch.randn(4, 2))
    assert m.check() and "rank mismatch" in m.check()[0]
    with pytest.raises(ShapeError, match="rank mismatch"):
        m.delta()


def test_dora_apply_matches_formula() -> None:
    g = torch.Generator().manual_seed(1)
    w, a, b = torch.randn(6, 5, generator=g), torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)
    mag = torch.rand(6, generator=g) + 0.5
    m = lora(a, b, alpha=2.0)
    m.magnitude = ref(mag)
    merged = w + b @ a
    want = mag[:, None] * merged / merged.norm(dim=1, keepdim=True)
    torch.testing.assert_close(m.apply(w), want)
    # per input column (A1111 convention): magnitude of shape (1, in)
    m.magnitude, m.dora_axis = ref(torch.rand(1, 5) + 0.5), "in"
    want_in = m.magnitude.load() * merged / merged.norm(dim=0, keepdim=True)
    torch.testing.assert_close(m.apply(w), want_in)


@settings(max_examples=40, deadline=None)
@given(
    r=st.integers(1, 6), o=st.integers(1, 12), i=st.integers(1, 12),
    alpha=st.floats(0.1, 64), rslora=st.booleans(), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_norm_from_gram_equals_dense_norm(r: int, o: int, i: int, alpha: float, rslora: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    m = lora(torch.randn(r, i, generator=g), torch.randn(o, r, generator=g), alpha=alpha, rslora=rslora)
    dense = float(m.delta(dtype=torch.float64).norm())
    assert m.delta_norm() == pytest.approx(dense, rel=1e-9, abs=1e-12)
    assert m.scale == pytest.approx(alpha / (math.sqrt(r) if rslora else r))


def test_header_only_shape_rules_need_no_tensors() -> None:
    """The shape rules work on shapes alone (no TensorRef, no data): what Module.check and delta_shape use."""
    from loratools.model.shapes import delta_shape, factor_problems

    assert factor_problems("lora", {"down": (4, 10), "up": (6, 4)}) == []
    assert delta_shape("lora", {"down": (4, 10), "up": (6, 4)}) == (6, 10)
    assert delta_shape("lokr", {"w1": (2, 3), "w2a": (4, 2), "w2b": (2, 5)}) == (8, 15)
    assert factor_problems("loha", {"w1a": (6, 2)})[0].startswith("missing factor(s)")
    assert "rank mismatch" in factor_problems("lora", {"down": (3, 5), "up": (4, 2)})[0]
    # the same answer as the module built on those shapes
    m = lora(torch.randn(3, 5), torch.randn(4, 2))
    assert m.check() == factor_problems("lora", {"down": (3, 5), "up": (4, 2)})


def test_the_model_package_keeps_its_names() -> None:
    """``from loratools.model import ...`` gives what the readers, writers and operations import, each defined once
    in the module of its job; the package root re-exports the public types."""
    import loratools
    import loratools.model as model
    from loratools.model import adapter, delta, module, shapes, tensors

    for name, home in [
        ("Adapter", adapter), ("Extra", adapter), ("target_kind", adapter), ("PROVENANCE_KEY", adapter),
        ("Module", module), ("Layer", module), ("ModuleKind", shapes), ("FACTORS", shapes), ("LOKR_KEYS", shapes),
        ("TensorRef", tensors), ("DTYPE_SIZES", tensors), ("dtype_name", tensors), ("torch_dtype", tensors),
        ("rows", delta), ("max_delta", delta), ("MAX_DELTA_ENV", delta),
    ]:  # fmt: skip
        assert getattr(model, name) is getattr(home, name), name
    assert loratools.Module is model.Module and loratools.Adapter is model.Adapter
    assert not hasattr(loratools, "LoraModule")  # one type, one name


def test_component_tables_agree() -> None:
    """One table of diffusers components and kohya prefixes: the writer's prefix of each component is the first
    kohya prefix that names it, and every kohya component is a diffusers component."""
    from loratools.model.components import COMPONENT_KOHYA, COMPONENT_RE, COMPONENTS, KOHYA_COMPONENTS

    assert COMPONENT_KOHYA == {
        "unet": "lora_unet_", "transformer": "lora_transformer_", "text_encoder": "lora_te_",
        "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_", "": "lycoris_",
    }  # fmt: skip
    assert {c for c in KOHYA_COMPONENTS.values() if c} <= set(COMPONENTS)
    assert all(COMPONENT_RE.match(f"{c}.x") for c in COMPONENTS)
    assert not COMPONENT_RE.match("text_encoder_22.x") and not COMPONENT_RE.match("unetx.y")
