"""mix and resize against independent dense computations, and mix against PEFT's own add_weighted_adapter (cat,
linear, svd)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType, SimpleNamespace

import peers_kit as kit
import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools import load_adapter
from loratools.cli import cli
from loratools.errors import IncompatibleAdaptersError, LoratoolsError, ShapeError
from loratools.formats.names import is_linear_leaf
from loratools.model import Adapter, Module, TensorRef
from loratools.ops.mix import mix, mix_adapters
from loratools.ops.resize import resize, resize_adapter

F64 = torch.float64


def dense_sum(adapters: list[Adapter], weights: list[float], name: str, key: str | None = None) -> torch.Tensor:
    """The weighted sum of the deltas of one module, computed densely (the reference)."""
    total = None
    for a, w in zip(adapters, weights, strict=True):
        m = a.modules.get(key or name) or a.modules.get(name)
        if m is None:
            continue
        d = m.delta(dtype=F64) * w
        total = d if total is None else total + d.reshape(total.shape)
    assert total is not None
    return total


def optimal_error(d: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(d.reshape(d.shape[0], -1) if d.dim() > 2 else d)
    return float(s[k:].pow(2).sum().sqrt())


def test_cat_is_the_exact_weighted_sum_across_ranks_alphas_rslora_and_targets() -> None:
    a, b = load_adapter(FIXTURES / "peft_llama"), load_adapter(FIXTURES / "peft_llama_patterns")
    weights = [0.7, -0.3]
    mixed, rep = mix_adapters([a, b], weights, "cat", dtype="fp32")
    assert set(mixed.modules) == set(a.modules) | set(b.modules)
    for name, m in mixed.modules.items():
        want = dense_sum([a, b], weights, name)
        torch.testing.assert_close(m.delta(dtype=F64), want, rtol=1e-6, atol=1e-6)
        ranks = sum(x.modules[name].rank for x in (a, b) if name in x.modules)  # type: ignore[misc]
        assert m.rank == ranks and m.scale == 1.0


def test_cat_written_and_read_back_in_every_format(tmp_path: Path) -> None:
    a, b = FIXTURES / "peft_llama", FIXTURES / "peft_llama_patterns"
    rep = mix([a, b], tmp_path / "mixed", [0.5, 0.5])
    assert rep.method == "cat" and rep.format == "peft"
    back = load_adapter(tmp_path / "mixed")
    ins = [load_adapter(a), load_adapter(b)]
    for name, m in back.modules.items():
        torch.testing.assert_close(m.delta(dtype=F64), dense_sum(ins, [0.5, 0.5], name), rtol=1e-5, atol=1e-6)
    made = json.loads(back.metadata["loratools"])
    assert made["command"] == "mix" and made["weights"] == [0.5, 0.5] and len(made["inputs"]) == 2
    assert all(len(i["sha256"]) == 64 for i in made["inputs"])


def test_mix_across_formats_and_module_kinds(tmp_path: Path) -> None:
    """A kohya LoCon file and a LyCORIS LoHa file (same naming): the LoHa takes part through its dense delta."""
    k, h = FIXTURES / "kohya_sd" / "lora.safetensors", FIXTURES / "lycoris_loha.safetensors"
    mix([k, h], tmp_path / "m.safetensors", [1.0, 0.5])
    ka, ha, m = load_adapter(k), load_adapter(h), load_adapter(tmp_path / "m.safetensors")
    assert set(m.modules) == set(ka.modules) | set(ha.modules)
    for name in ha.modules:
        want = dense_sum([ka, ha], [1.0, 0.5], name)
        got = m.modules[name].delta(dtype=F64)
        torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-5, atol=1e-6)
    # and into diffusers' format, from a diffusers input and a PEFT-named one
    d = FIXTURES / "diffusers_sd"
    mix([d, d], tmp_path / "dd.safetensors", [1.0, -1.0], to="diffusers")
    zero = load_adapter(tmp_path / "dd.safetensors")
    assert max(float(x.delta().abs().max()) for x in zero.modules.values()) < 1e-6


def test_mix_keeps_conv_kernels_whatever_input_comes_first(tmp_path: Path) -> None:
    k, h = FIXTURES / "kohya_sd" / "lora.safetensors", FIXTURES / "lycoris_loha.safetensors"
    mix([h, k], tmp_path / "m.safetensors", [0.5, 1.0])
    kohya, mixed = load_adapter(k), load_adapter(tmp_path / "m.safetensors")
    convs = [n for n in load_adapter(h).modules if kohya.modules[n].factors["down"].load().dim() == 4]
    assert convs  # conv_in, resnet convs, proj_in/proj_out, the downsampler
    for name in convs:
        down, up = mixed.modules[name].factors["down"], mixed.modules[name].factors["up"]
        assert len(down.shape) == 4 and tuple(down.shape[1:]) == tuple(kohya.modules[name].factors["down"].shape[1:])
        assert tuple(up.shape[2:]) == (1, 1), name


@pytest.mark.parametrize("k", [1, 3, 6])
def test_svd_error_is_the_optimal_rank_k_error(k: int) -> None:
    a, b = load_adapter(FIXTURES / "peft_llama"), load_adapter(FIXTURES / "peft_llama_patterns")
    mixed, rep = mix_adapters([a, b], [0.7, 0.3], "svd", k, dtype="fp32")
    for mm in rep.modules:
        want = dense_sum([a, b], [0.7, 0.3], mm.name)
        got = mixed.modules[mm.name].delta(dtype=F64)
        err = float((got - want).norm())
        best = optimal_error(want, k)
        assert err == pytest.approx(best, rel=1e-4, abs=1e-5), mm.name
        assert mixed.modules[mm.name].rank == min(k, mm.rank)
        total = float(want.norm() ** 2)
        assert mm.energy == pytest.approx(1 - best**2 / total, abs=1e-6)


def test_resize_rank_is_optimal_and_keeps_small_modules_exactly(tmp_path: Path) -> None:
    src = load_adapter(FIXTURES / "peft_llama_patterns")
    out, rep = resize_adapter(src, rank=4)
    for r in rep.modules:
        m, orig = out.modules[r.name], src.modules[r.name]
        if orig.rank <= 4:  # type: ignore[operator]
            assert r.kept and m is orig
        else:
            d = orig.delta(dtype=F64)
            assert float((m.delta(dtype=F64) - d).norm()) == pytest.approx(optimal_error(d, 4), rel=1e-5)
            assert m.rank == 4 and not r.kept
    # through the CLI and a file
    code = CliRunner().invoke(
        cli, ["resize", str(FIXTURES / "peft_llama_patterns"), "--rank", "4", "-o", str(tmp_path / "r"), "--json"]
    )
    data = json.loads(code.stdout)
    assert code.exit_code == 0 and {m["new_rank"] for m in data["modules"]} == {2, 4}
    back = load_adapter(tmp_path / "r")
    for name, m in back.modules.items():
        torch.testing.assert_close(m.delta(), out.modules[name].delta(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("f", [0.5, 0.9, 0.99])
def test_resize_energy_keeps_at_least_f_with_minimal_rank(f: float) -> None:
    src = load_adapter(FIXTURES / "peft_llama_patterns")
    _, rep = resize_adapter(src, energy=f)
    for r in rep.modules:
        d = src.modules[r.name].delta(dtype=F64)
        s2 = torch.linalg.svdvals(d).pow(2)
        cum = s2.cumsum(0) / s2.sum()
        assert cum[r.new_rank - 1] >= f - 1e-9
        if r.new_rank > 1:
            assert cum[r.new_rank - 2] < f  # one less would not do
        assert r.energy >= f - 1e-9


def test_resize_lycoris_to_lora(tmp_path: Path) -> None:
    for name in ("lycoris_loha.safetensors", "lycoris_lokr.safetensors", "lycoris_loha_tucker.safetensors"):
        src = load_adapter(FIXTURES / name)
        flat = [n for n, m in src.modules.items() if m.flattened and not is_linear_leaf(n)]
        if flat:  # conv layers stored flattened: the kernel LoRA needs is unknown without the base, never guessed
            with pytest.raises(ShapeError, match="flattened"):
                resize_adapter(src, rank=2)
            src.modules = {n: m for n, m in src.modules.items() if n not in flat}
        out, rep = resize_adapter(src, rank=2)
        for r in rep.modules:
            d = src.modules[r.name].delta_matrix(dtype=F64)
            got = out.modules[r.name].delta_matrix(dtype=F64)
            assert out.modules[r.name].kind == "lora"
            assert float((got - d).norm()) == pytest.approx(optimal_error(d, 2), rel=1e-4, abs=1e-6), (name, r.name)


def test_dora_is_refused_not_dropped(tmp_path: Path) -> None:
    dora = FIXTURES / "peft_llama_dora"
    with pytest.raises(IncompatibleAdaptersError, match="DoRA"):
        mix([dora, FIXTURES / "peft_llama"], tmp_path / "x")
    with pytest.raises(IncompatibleAdaptersError, match="DoRA"):
        resize(dora, tmp_path / "y", rank=2)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # a DoRA module that needs no truncation is carried over exactly, magnitude included
    out, rep = resize_adapter(load_adapter(dora), rank=8)
    assert all(r.kept for r in rep.modules) and all(m.magnitude is not None for m in out.modules.values())


def test_mix_errors(tmp_path: Path) -> None:
    llama = FIXTURES / "peft_llama"
    with pytest.raises(LoratoolsError, match="2 weight"):
        mix([llama], tmp_path / "a", [1.0, 2.0])
    with pytest.raises(LoratoolsError, match="full replacement"):
        mix([FIXTURES / "peft_llama_embed", llama], tmp_path / "b")
    with pytest.raises(LoratoolsError, match="linear needs plain LoRA modules of one rank"):
        mix([llama, FIXTURES / "peft_llama_patterns"], tmp_path / "c", method="linear")
    r = CliRunner().invoke(cli, ["mix", str(llama), "-o", str(llama)])
    assert r.exit_code == 1 and "is one of the inputs" in r.stderr
    r = CliRunner().invoke(cli, ["mix", str(llama), "--weights", "a,b", "-o", str(tmp_path / "e")])
    assert r.exit_code == 2


def test_different_base_models_warn_and_only_one_input_keeps_its_module(tmp_path: Path) -> None:
    llama = FIXTURES / "peft_llama"
    other = tmp_path / "other"
    shutil.copytree(FIXTURES / "peft_llama_patterns", other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "some-other-model"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(cli, ["mix", str(llama), str(other), "-o", str(tmp_path / "m"), "--json"])
    assert r.exit_code == 0 and "Warning: the inputs were made for different base models" in r.stderr
    out, o = load_adapter(tmp_path / "m"), load_adapter(other)
    name = "model.layers.0.mlp.up_proj"  # only in the second input
    torch.testing.assert_close(out.modules[name].delta(), o.modules[name].delta(), rtol=1e-6, atol=1e-7)
    r = CliRunner().invoke(cli, ["mix", str(llama), str(other), "-o", str(tmp_path / "n"), "--strict"])
    assert r.exit_code == 1 and "different base models" in r.stderr and not (tmp_path / "n").exists()
    # GPT-2's Conv1D modules and Llama's Linear ones cannot share one PEFT adapter: a clear error, no output
    r = CliRunner().invoke(cli, ["mix", str(llama), str(FIXTURES / "peft_gpt2"), "-o", str(tmp_path / "g")])
    assert r.exit_code == 1 and "fan_in_fan_out" in r.stderr and not (tmp_path / "g").exists()


def _lora(r: int, o: int, i: int, alpha: float, seed: int, rslora: bool = False) -> Module:
    g = torch.Generator().manual_seed(seed)
    return Module(
        "m", "lora",
        {"down": TensorRef.of(torch.randn(r, i, generator=g)), "up": TensorRef.of(torch.randn(o, r, generator=g))},
        alpha=alpha, rslora=rslora,
    )  # fmt: skip


@settings(max_examples=30, deadline=None)
@given(
    o=st.integers(1, 24), i=st.integers(1, 24), ranks=st.lists(st.integers(1, 8), min_size=1, max_size=4),
    weights=st.lists(st.floats(-2, 2), min_size=4, max_size=4), k=st.integers(1, 10), seed=st.integers(0, 999),
)  # fmt: skip
def test_properties_cat_exact_svd_optimal(
    o: int, i: int, ranks: list[int], weights: list[float], k: int, seed: int
) -> None:
    adapters = [
        Adapter("peft", modules={"m": _lora(r, o, i, alpha=float(j + 1), seed=seed + j, rslora=j % 2 == 1)})
        for j, r in enumerate(ranks)
    ]
    w = weights[: len(ranks)]
    want = dense_sum(adapters, w, "m")
    cat, _ = mix_adapters(adapters, w, "cat", dtype="fp32")
    torch.testing.assert_close(cat.modules["m"].delta(dtype=F64), want, rtol=1e-5, atol=1e-5)
    svd, _ = mix_adapters(adapters, w, "svd", k, dtype="fp32")
    err = float((svd.modules["m"].delta(dtype=F64) - want).norm())
    assert err <= optimal_error(want, k) * (1 + 1e-4) + 1e-4 * float(want.norm()) + 1e-6


@pytest.fixture(scope="module")
def peft_mixer(mf: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One PEFT model on the tiny Llama holding the adapters the mixes start from, for PEFT's own
    ``add_weighted_adapter``: "a" = peft_llama (r=4, alpha=8), "b" = peft_llama_patterns (rsLoRA, rank/alpha
    patterns, MLP targets too), "c" = a plain r=4 alpha=6 adapter on q/v/up_proj made here by PEFT (linear needs
    the ranks of "a")."""
    peft = pytest.importorskip("peft")
    c = tmp_path_factory.mktemp("peft_mix") / "c"
    made = peft.get_peft_model(
        mf.tiny_llama(), peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in sorted(made.named_parameters()):
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    made.save_pretrained(c)
    paths = {"a": FIXTURES / "peft_llama", "b": FIXTURES / "peft_llama_patterns", "c": c}
    model = peft.PeftModel.from_pretrained(mf.tiny_llama(), paths["a"], adapter_name="a")
    for name in ("b", "c"):
        model.load_adapter(paths[name], adapter_name=name)
    return SimpleNamespace(model=model, paths=paths, base=kit.model_output(mf.tiny_llama(), "tiny_llama"))


#: (PEFT's combination_type, its adapters, weights, svd rank). PEFT gives the combined adapter the config of its
#: first input with lora_alpha = r, so an rsLoRA first input would scale it by sqrt(r): "a" (plain) comes first.
MIXES = {
    "cat": ("cat", ["a", "b"], [0.7, -0.4], None),
    "linear": ("linear", ["a", "c"], [0.7, -0.4], None),
    "linear-same-twice": ("linear", ["a", "a"], [0.25, 0.25], None),
    "svd": ("svd", ["a", "b"], [0.7, -0.4], 3),
}
SLOW_MIXES = {
    "cat-three": ("cat", ["a", "b", "c"], [1.0, 0.5, -2.0], None),
    "linear-one-negative": ("linear", ["c", "a"], [-1.5, 0.3], None),
    "svd-1": ("svd", ["a", "b"], [0.7, 0.3], 1),
    "svd-6": ("svd", ["a", "b", "c"], [0.7, 0.3, -0.5], 6),
}


@pytest.mark.parametrize("mix_id", [*MIXES, *(pytest.param(m, marks=pytest.mark.slow) for m in SLOW_MIXES)])
def test_cat_linear_svd_are_peft_s_add_weighted_adapter(
    mix_id: str, peft_mixer: SimpleNamespace, tmp_path: Path
) -> None:
    """``loratools mix`` against PEFT's ``add_weighted_adapter`` with the same inputs, weights and method, loaded
    side by side in one PEFT model: per module PEFT's ``get_delta_weight`` of its combination against loratools'
    delta (as loratools reads its file, and as PEFT reads it), and the logits of the two combinations.

    Tolerances: cat and linear are the same fp32 products summed in another order (``peers_kit.TOL``); PEFT's svd
    runs ``torch.linalg.svd`` on the fp32 dense sum, whose rank-k truncation moves by about eps32 * |D| / gap (the
    gap to the next singular value), so it is compared to 2e-5 of the delta's largest entry."""
    from peft.tuners.lora import LoraLayer

    combination, inputs, weights, rank = (MIXES | SLOW_MIXES)[mix_id]
    model = peft_mixer.model
    theirs = f"peft_{mix_id}"
    model.add_weighted_adapter(inputs, weights, theirs, combination_type=combination, svd_rank=rank)
    out = tmp_path / "mixed"
    argv = ["mix", *(str(peft_mixer.paths[i]) for i in inputs), "--weights", ",".join(map(str, weights))]
    argv += ["--method", combination, "-o", str(out), "--json"] + (["--rank", str(rank)] if rank else [])
    code, stdout, stderr = run_cli(*argv)
    assert code == 0, stderr
    assert json.loads(stdout)["method"] == combination
    ours = load_adapter(out)
    mine = f"ours_{mix_id}"
    model.load_adapter(out, adapter_name=mine)
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    combined = {n for n, m in layers.items() if theirs in m.lora_A}
    assert combined == set(ours.modules) == {n for n, m in layers.items() if mine in m.lora_A}
    for name in sorted(combined):
        want = kit.delta_of(layers[name], theirs)
        tol = kit.TOL if combination != "svd" else dict(rtol=0.0, atol=2e-5 * float(want.abs().max()))
        kit.close(ours.modules[name].delta(), want, f"{name} (loratools)", tol)
        kit.close(kit.delta_of(layers[name], mine), want, f"{name} (loratools' file, read by PEFT)", tol)
    if mix_id == "linear-same-twice":  # A and B each get 2 * sqrt(0.25 * s): the delta is the adapter's own
        a = load_adapter(peft_mixer.paths["a"])
        for name, m in ours.modules.items():
            torch.testing.assert_close(m.delta(), a.modules[name].delta(), rtol=1e-5, atol=1e-6)
    model.set_adapter(theirs)
    want_logits = kit.model_output(model, "tiny_llama")
    model.set_adapter(mine)
    got_logits = kit.model_output(model, "tiny_llama")
    assert not torch.allclose(want_logits, peft_mixer.base, atol=1e-3)  # the mix changes the model
    kit.close(got_logits, want_logits, "logits", kit.OUT_TOL)
    model.delete_adapter(theirs)
    model.delete_adapter(mine)


def test_inspect_spectrum_matches_dense_singular_values() -> None:
    from loratools.ops.inspect import inspect

    for fx in ("peft_llama_patterns", "lycoris_lokr.safetensors", "kohya_sd/lora.safetensors"):
        rep = inspect(FIXTURES / fx, spectra=True)
        a = load_adapter(FIXTURES / fx)
        for mi in rep.modules:
            assert mi.spectrum is not None
            want = torch.linalg.svdvals(a.modules[mi.name].delta_matrix(dtype=F64))
            got = torch.tensor(mi.spectrum.singular_values, dtype=F64)
            n = got.shape[0]
            torch.testing.assert_close(got, want[:n], rtol=1e-7, atol=1e-9)
            beyond = want[n:]  # nothing beyond the rank
            assert beyond.numel() == 0 or float(beyond.max()) <= 1e-9 * float(want[0])
            cum = (want**2).cumsum(0) / (want**2).sum()
            assert cum[mi.spectrum.rank_90 - 1] >= 0.9 - 1e-9 and 1 <= mi.spectrum.effective_rank <= n


def test_zero_rank_and_rank_beyond_the_matrix() -> None:
    """A rank-0 module adds nothing and goes through every operation; a rank above min(out, in) still gives the
    exact SVD (its singular values stop at min(out, in))."""
    from loratools.ops.inspect import spectrum

    zero = _lora(0, 6, 8, alpha=1.0, seed=0)
    wide = _lora(40, 6, 8, alpha=40.0, seed=1)
    assert zero.rank == 0 and not zero.check() and zero.delta_norm() == 0.0
    assert torch.equal(zero.delta(), torch.zeros(6, 8))
    assert spectrum(zero).singular_values == []
    for m in (zero, wide):
        a = Adapter("peft", modules={"m": m})
        want = m.delta(dtype=F64)
        cat, _ = mix_adapters([a, a], [1.0, -0.5], "cat")
        torch.testing.assert_close(cat.modules["m"].delta(dtype=F64), 0.5 * want, rtol=1e-6, atol=1e-6)
        small, rep = resize_adapter(a, rank=2)
        err = float((small.modules["m"].delta(dtype=F64) - want).norm())
        assert err == pytest.approx(optimal_error(want, 2) if m.rank else 0.0, rel=1e-6, abs=1e-9)
    s = spectrum(wide)
    assert len(s.singular_values) == 6
    torch.testing.assert_close(torch.tensor(s.singular_values, dtype=F64), torch.linalg.svdvals(wide.delta(dtype=F64)))
