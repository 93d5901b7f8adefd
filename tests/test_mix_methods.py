"""mix's task-vector methods (ties, magnitude_prune, dare_linear, dare_ties) against PEFT's own
``add_weighted_adapter`` ``_svd`` variants and PEFT's merge_utils, and DARE's statistics over fixed seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import peers_kit as kit
import pytest
import torch
from conftest import FIXTURES, run_cli

from loratools import load_adapter
from loratools.errors import UsageError
from loratools.model import Adapter, Module, TensorRef
from loratools.ops.mix import mix, mix_adapters
from loratools.ops.mix_dense import compress, drop_random, elect_and_merge, keep_largest

F64 = torch.float64


@pytest.fixture(scope="module")
def peft_pair(mf: ModuleType) -> SimpleNamespace:
    """One PEFT model on the tiny Llama holding "a" = peft_llama (r=4, alpha=8) and "b" = peft_llama_patterns
    (rsLoRA, rank and alpha patterns, MLP targets too). PEFT gives a combination the config of its first input with
    lora_alpha = r, so the plain one comes first."""
    peft = pytest.importorskip("peft")
    paths = {"a": FIXTURES / "peft_llama", "b": FIXTURES / "peft_llama_patterns"}
    model = peft.PeftModel.from_pretrained(mf.tiny_llama(), paths["a"], adapter_name="a")
    model.load_adapter(paths["b"], adapter_name="b")
    return SimpleNamespace(model=model, paths=paths)


#: (our method, PEFT's combination_type, density, majority sign, rank: None is exact, compared then with PEFT's
#: merge_utils function of the same name on PEFT's own deltas: add_weighted_adapter cannot keep a full rank when
#: its layers differ in min(out, in))
CASES = {
    "ties-4": ("ties", "ties_svd", 0.5, "total", 4),
    "ties-frequency-3": ("ties", "ties_svd", 0.3, "frequency", 3),
    "ties-exact": ("ties", "ties_svd", 0.4, "total", None),
    "magnitude_prune-4": ("magnitude_prune", "magnitude_prune_svd", 0.3, None, 4),
    "magnitude_prune-exact": ("magnitude_prune", "magnitude_prune_svd", 0.6, None, None),
    # at density 1 nothing is dropped at random (PEFT's prune returns the tensor), so DARE is deterministic there
    "dare_ties-d1": ("dare_ties", "dare_ties_svd", 1.0, "total", 5),
    "dare_linear-d1": ("dare_linear", "dare_linear_svd", 1.0, None, 5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pruning_methods_are_peft_s_svd_variants(case: str, peft_pair: SimpleNamespace, tmp_path: Path) -> None:
    """``loratools mix --method M --density D [--rank K]`` against PEFT's ``add_weighted_adapter`` with
    ``combination_type=M_svd``, the same density and sign method, ``svd_rank=K``: per module PEFT's
    ``get_delta_weight`` of its combination against loratools' delta (without a rank: PEFT's merge_utils function
    on PEFT's ``get_delta_weight`` of each input, what its ``_svd`` variant decomposes). PEFT truncates a full fp32 SVD; loratools a
    randomized one in float64 (whose leading K are exact when K plus the oversampling covers min(out, in), and
    within the sketch's accuracy otherwise): compared to 1e-4 of the delta's largest entry."""
    from peft.tuners.lora import LoraLayer

    method, combination, density, sign, rank = CASES[case]
    weights = [0.7, -0.4] if method != "ties" else [0.7, 0.5]
    model = peft_pair.model
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    extra = {"majority_sign_method": sign} if sign else {}
    if rank:
        model.add_weighted_adapter(
            ["a", "b"], weights, case, combination_type=combination, svd_rank=rank, density=density, **extra
        )
    out = tmp_path / "mixed"
    argv = ["mix", str(peft_pair.paths["a"]), str(peft_pair.paths["b"]), "--weights", ",".join(map(str, weights))]
    argv += ["--method", method, "--density", str(density), "-o", str(out), "--json"]
    argv += (["--rank", str(rank)] if rank else []) + (["--majority-sign", sign] if sign else [])
    argv += ["--seed", "3"] if method.startswith("dare") else []
    code, stdout, stderr = run_cli(*argv)
    assert code == 0, stderr
    report = json.loads(stdout)
    assert (report["method"], report["density"], report["majority_sign"]) == (method, density, sign)
    ours = load_adapter(out)
    combined = {n for n, m in layers.items() if (case if rank else "a") in m.lora_A or "b" in m.lora_A}
    assert combined == set(ours.modules)
    for name in sorted(combined):
        want = kit.delta_of(layers[name], case) if rank else _peft_dense(layers[name], method, weights, density, extra)
        assert float(want.abs().max()) > 0
        kit.close(ours.modules[name].delta(), want, name, dict(rtol=0.0, atol=1e-4 * float(want.abs().max())))
        if rank is None:
            assert ours.modules[name].rank == min(want.shape)
    if rank:
        model.delete_adapter(case)


def _peft_dense(layer: Any, method: str, weights: list[float], density: float, extra: dict[str, Any]) -> torch.Tensor:
    from peft.utils import merge_utils as mu

    have = [(n, w) for n, w in zip(("a", "b"), weights, strict=True) if n in layer.lora_A]
    deltas = [layer.get_delta_weight(n) for n, _ in have]
    with torch.no_grad():
        return getattr(mu, method)(deltas, torch.tensor([w for _, w in have]), density, **extra)  # type: ignore[no-any-return]


def _adapter(seed: int, shape: tuple[int, int] = (48, 40), rank: int = 3, names: int = 2) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for i in range(names):
        name = f"model.layers.{i}.self_attn.q_proj"
        down, up = torch.randn(rank, shape[1], generator=g), torch.randn(shape[0], rank, generator=g)
        mods[name] = Module(name, "lora", {"down": TensorRef.of(down), "up": TensorRef.of(up)}, alpha=2.0 * rank)
    return Adapter("peft", mods)


def test_pruning_steps_are_peft_s_merge_utils() -> None:
    """The pieces against PEFT's functions on the same tensors: magnitude pruning (keeps exactly k entries), the
    TIES election and disjoint mean with either sign method, and DARE's keep rate and rescaling."""
    from peft.utils import merge_utils as mu

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(64, 48, generator=g, dtype=F64) for _ in range(3)]
    w = [0.9, -0.3, 0.6]
    for d in (0.05, 0.3, 0.77, 1.0):
        kept = keep_largest(ts[0], d)
        torch.testing.assert_close(kept, mu.prune(ts[0], d, "magnitude"), rtol=0, atol=0)
        assert int((kept != 0).sum()) == (int(d * ts[0].numel()) if d < 1 else ts[0].numel())
        for sign in ("total", "frequency"):
            pruned = [keep_largest(t, d) for t in ts]
            want = mu.ties(ts, torch.tensor(w, dtype=F64), d, sign)
            torch.testing.assert_close(elect_and_merge(pruned, w, sign), want, rtol=1e-12, atol=1e-12)
    # beyond 4 x SAMPLE entries the threshold comes from a sampled bracket: still exactly PEFT's k entries, also
    # with ties at the threshold's neighbours (rounded values) and in float32
    for big in (torch.randn(1024, 1024, generator=g), torch.randn(700, 900, generator=g).round(decimals=2)):
        for d in (0.01, 0.2, 0.5, 0.93):
            want = mu.prune(big, d, "magnitude")
            got = keep_largest(big, d)
            threshold = want[want != 0].abs().min()
            assert torch.equal(got.abs() >= threshold, big.abs() >= threshold), d
            assert torch.equal(got, big.masked_fill(big.abs() < threshold, 0.0)), d
    t = torch.randn(200, 300, generator=g, dtype=F64)
    dropped = drop_random(t, 0.2, seed=5)
    kept = dropped != 0
    n, p = t.numel(), 0.2
    assert abs(int(kept.sum()) - n * p) <= 6 * math.sqrt(n * p * (1 - p))  # a binomial count, 6 sigma
    torch.testing.assert_close(dropped[kept], t[kept] / 0.2, rtol=0, atol=0)
    assert torch.equal(drop_random(t, 0.2, seed=5), dropped) and not torch.equal(drop_random(t, 0.2, seed=6), dropped)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_reproducible_with_its_seed(method: str) -> None:
    a, b = _adapter(1), _adapter(2)
    one, r1 = mix_adapters([a, b], [0.6, 0.4], method, 4, density=0.3, seed=11)  # type: ignore[arg-type]
    two, _ = mix_adapters([a, b], [0.6, 0.4], method, 4, density=0.3, seed=11)  # type: ignore[arg-type]
    other, _ = mix_adapters([a, b], [0.6, 0.4], method, 4, density=0.3, seed=12)  # type: ignore[arg-type]
    assert r1.seed == 11
    for name in one.modules:
        assert torch.equal(one.modules[name].delta(), two.modules[name].delta())
        assert not torch.equal(one.modules[name].delta(), other.modules[name].delta())
    _, drawn = mix_adapters([a, b], [0.6, 0.4], method, 4, density=0.3)  # type: ignore[arg-type]
    assert drawn.seed is not None  # drawn, and reported so that the mix can be made again


def test_dare_linear_averages_to_the_weighted_sum() -> None:
    """DARE's rescaling makes each entry unbiased: E[w_i t_i M_i / d] = w_i t_i. Over N fixed seeds the mean's
    squared error has expectation sum_i w_i^2 sum(t_i^2) (1 - d) / (d N); with these seeds (fixed: the check
    cannot flake) it stays within 2x of that at N = 16 and N = 256, and so falls with N like 1 / N."""
    a, b = _adapter(3, names=1), _adapter(4, names=1)
    w, d = [0.8, -0.5], 0.25
    name = next(iter(a.modules))
    ts = [x.modules[name].delta(dtype=F64) for x in (a, b)]
    target = w[0] * ts[0] + w[1] * ts[1]
    var = sum(wi**2 * float(t.square().sum()) for wi, t in zip(w, ts, strict=True)) * (1 - d) / d
    total = torch.zeros_like(target)
    errors = {}
    for n in range(1, 257):
        mixed, _ = mix_adapters([a, b], w, "dare_linear", density=d, seed=n, dtype="fp32")
        total += mixed.modules[name].delta(dtype=F64)
        if n in (16, 256):
            errors[n] = float((total / n - target).square().sum())
            assert errors[n] <= 2 * var / n, (n, errors[n], var / n)
    assert errors[256] < errors[16] / 4
    assert errors[256] < 0.02 * float(target.square().sum())  # the mean is within 15% of the weighted sum


def test_exact_form_and_randomized_compression() -> None:
    """Without a rank the result is exact (factors ``delta, I``); with one, the randomized SVD's rank-K error is
    within 1e-3 (relative) of the optimal (exact truncated SVD) on a 300 x 200 TIES merge, where the sketch does
    not cover the matrix."""
    g = torch.Generator().manual_seed(9)
    ts = [torch.randn(300, 4, generator=g, dtype=F64) @ torch.randn(4, 200, generator=g, dtype=F64) for _ in range(3)]
    merged = elect_and_merge([keep_largest(t, 0.3) for t in ts], [1.0, 0.5, 0.8], "total")
    up, down, energy = compress(merged, None, 0)
    assert energy is None and up.shape == (300, 200) and torch.equal(up @ down, merged)
    s = torch.linalg.svdvals(merged)
    for k in (4, 12):
        up, down, energy = compress(merged, k, 0)
        best = float(s[k:].square().sum())
        got = float((merged - up @ down).square().sum())
        assert up.shape == (300, k) and best * (1 - 1e-12) <= got <= best * (1 + 1e-3)
        assert energy == pytest.approx(float(s[:k].square().sum() / s.square().sum()), rel=1e-3)


def test_method_options_are_checked_before_reading(tmp_path: Path) -> None:
    a = str(FIXTURES / "peft_llama")
    bad = [
        (["--method", "ties"], "needs --density"),
        (["--method", "svd", "--rank", "2", "--density", "0.5"], "--density applies to"),
        (["--method", "magnitude_prune", "--density", "0.5", "--majority-sign", "total"], "--majority-sign applies"),
        (["--method", "ties", "--density", "0.5", "--seed", "1"], "--seed applies"),
        (["--method", "ties", "--density", "0"], "0<x<=1"),
        (["--method", "ties", "--density", "1.5"], "0<x<=1"),
    ]
    for extra, says in bad:
        code, _, err = run_cli("mix", a, a, "-o", str(tmp_path / "x"), *extra)
        assert code == 2 and says in err, (extra, err)
    assert not (tmp_path / "x").exists()
    for kwargs, says in (
        ({"method": "ties"}, "needs a density"),
        ({"method": "ties", "density": 0.0}, "density"),
        ({"method": "ties", "density": 0.5, "majority_sign": "most"}, "majority_sign"),
        ({"method": "dare_ties", "density": 0.5, "seed": -1}, "seed"),
        ({"method": "cat", "density": 0.5}, "density applies"),
    ):
        with pytest.raises(UsageError, match=says):
            mix([a, a], tmp_path / "y", **kwargs)  # type: ignore[arg-type]


def test_provenance_records_the_method_s_parameters(tmp_path: Path) -> None:
    a = str(FIXTURES / "peft_llama")
    code, out, err = run_cli("mix", a, a, "--method", "dare_ties", "--density", "0.5", "--seed", "9", "--rank", "2",
                             "-o", str(tmp_path / "m"), "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["seed"] == 9
    made = json.loads(load_adapter(tmp_path / "m").metadata["loratools"])
    assert (made["method"], made["density"], made["seed"], made["majority_sign"]) == ("dare_ties", 0.5, 9, "total")


def test_help_examples_of_the_new_methods_run(tmp_path: Path) -> None:
    """The ``Example:`` lines of ``mix --help`` that use a pruning method run as written (their output moved into
    tmp_path) and give what they say."""
    import shlex

    from click.testing import CliRunner

    from loratools.cli import cli

    help_text = CliRunner().invoke(cli, ["mix", "--help"]).output
    examples = [line.strip() for line in help_text.split("Example:")[1].splitlines()]
    lines = [line for line in examples if line.startswith("loratools mix") and "--density" in line]
    assert {shlex.split(line)[shlex.split(line).index("--method") + 1] for line in lines} == {"ties", "dare_ties"}
    for line in lines:
        argv = shlex.split(line)[1:]
        out = argv.index("-o") + 1
        argv[out] = str(tmp_path / argv[out])
        argv = [str(FIXTURES.parent / a) if a.startswith("fixtures/") else a for a in argv]
        code, _, err = run_cli(*argv, "--json")
        assert code == 0, (line, err)
        mixed = load_adapter(argv[out])
        assert len(mixed.modules) == 14 and all(m.delta().abs().max() > 0 for m in mixed.modules.values())
