"""extract: a merged known adapter comes back exactly at its rank and optimally below it; the output loads in
PEFT and gives the tuned model's logits; norms, biases and embeddings per option; the randomized SVD against
an exact one; errors for identical and mismatched checkpoints."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import FIXTURES, run_cli

from loratools import LoratoolsError, load_adapter
from loratools.io.safetensors import write_safetensors
from loratools.ops.extract import META_KEY, extract, extract_adapter
from loratools.ops.linalg import randomized_svd
from loratools.ops.merge import merge

IDS = torch.arange(12).reshape(2, 6)


def run(*args: str) -> tuple[int, str, str]:
    return run_cli("extract", *args)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(folder / "model.safetensors"))


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(IDS).logits
    return out


@pytest.fixture(scope="module")
def pair(mf: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny Llama, and it with the committed rank-4 fixture adapter merged in."""
    root = tmp_path_factory.mktemp("pair")
    mf.tiny_llama().save_pretrained(root / "base")
    merge(root / "base", [FIXTURES / "peft_llama"], root / "tuned")
    return root / "base", root / "tuned"


def true_deltas(base: Path, tuned: Path) -> dict[str, torch.Tensor]:
    """tuned - base per changed weight, float64, keyed by module."""
    a, b = weights(base), weights(tuned)
    return {k[: -len(".weight")]: b[k].double() - a[k].double() for k in a if not torch.equal(a[k], b[k])}


def test_randomized_svd_against_exact() -> None:
    g = torch.Generator().manual_seed(1)
    m, n, r = 300, 200, 12
    low = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)
    # exactly low rank: the rank-r truncation reproduces the matrix to float32 rounding
    svd = randomized_svd(low, r, generator=torch.Generator().manual_seed(0))
    rebuilt = svd.left[:, :r] * svd.s[:r] @ svd.right[:r]
    assert float((rebuilt - low).norm() / low.norm()) < 1e-5
    exact = torch.linalg.svdvals(low.double())
    torch.testing.assert_close(svd.s[:r].double(), exact[:r], rtol=1e-5, atol=0)
    # low rank + noise: the leading values and the rank-k error are the exact SVD's, to a small tolerance
    noisy = low + 0.05 * torch.randn(m, n, generator=g)
    exact = torch.linalg.svdvals(noisy.double())
    for k in (4, 12):
        svd = randomized_svd(noisy, k, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(svd.s[:k].double(), exact[:k], rtol=1e-3, atol=0)
        err = float((noisy - svd.left[:, :k] * svd.s[:k] @ svd.right[:k]).norm())
        optimal = float(exact[k:].pow(2).sum().sqrt())
        assert optimal <= err * (1 + 1e-5) and err <= optimal * (1 + 1e-3)
        # the columns are orthonormal: the energy identity that the report's numbers rely on
        q = svd.left
        torch.testing.assert_close(q.T @ q, torch.eye(q.shape[1]), atol=1e-5, rtol=0)
    # deterministic for a seed; an exact SVD once the sketch would be as wide as the matrix
    again = randomized_svd(noisy, 12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.s, svd.s)
    wide = randomized_svd(noisy[:, :20], 12)
    torch.testing.assert_close(wide.s.double(), torch.linalg.svdvals(noisy[:, :20].double()), rtol=1e-5, atol=1e-6)


def test_rank_r_gives_back_the_merged_adapter(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = pair
    code, out, err = run(str(base), str(tuned), "--rank", "4", "-o", str(tmp_path / "out"), "--json")
    assert code == 0, err
    report = json.loads(out)
    fixture = load_adapter(FIXTURES / "peft_llama")
    got = load_adapter(tmp_path / "out")
    assert sorted(got.modules) == sorted(fixture.modules) == [m["name"] for m in report["modules"]]
    for name, m in fixture.modules.items():
        assert got.modules[name].rank == 4
        torch.testing.assert_close(got.modules[name].delta(), m.delta(), rtol=1e-5, atol=1e-6)
    for row in report["modules"]:
        assert row["error"] < 1e-5 and row["energy"] > 1 - 1e-5 and row["rank"] == 4
    # the 13 other tensors (norms, embeddings, mlp) did not change
    assert report["unchanged"] == len(weights(base)) - 8 and report["saved"] == [] and report["skipped"] == []
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (4, 4, {}, {})
    assert cfg["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == str(base)
    meta = safetensors.safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt").metadata()
    saved = json.loads(meta[META_KEY])
    assert [(r["name"], r["rank"]) for r in saved["modules"]] == [(r["name"], r["rank"]) for r in report["modules"]]
    made = json.loads(meta["loratools"])
    assert made["command"] == "extract" and made["rank"] == 4
    want = hashlib.sha256((tuned / "model.safetensors").read_bytes()).hexdigest()
    assert made["inputs"][1]["files"] == [{"file": "model.safetensors", "sha256": want}]
    listing = f"{want}  model.safetensors\n".encode()
    assert made["inputs"][1]["sha256"] == hashlib.sha256(listing).hexdigest()


def test_a_rank_above_the_difference_is_exact_at_its_rank(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """--rank 16 on rank-4 differences: the randomized SVD is exact, and the numerically zero rest is dropped."""
    base, tuned = pair
    adapter, report = extract_adapter(base, tuned, rank=16)
    fixture = load_adapter(FIXTURES / "peft_llama")
    assert {m.rank for m in adapter.modules.values()} == {4}
    for name, m in fixture.modules.items():
        torch.testing.assert_close(adapter.modules[name].delta(), m.delta(), rtol=1e-5, atol=1e-6)
    assert max(r.error for r in report.modules) < 1e-5


def test_lower_rank_is_the_optimal_truncation(pair: tuple[Path, Path]) -> None:
    base, tuned = pair
    truth = true_deltas(base, tuned)
    adapter, report = extract_adapter(base, tuned, rank=2)
    assert len(report.modules) == len(truth) == 8
    for row in report.modules:
        d = truth[row.name]
        s = torch.linalg.svdvals(d)
        optimal = float(s[2:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
        assert row.rank == 2 and optimal > 0.1  # a real truncation
        assert math.isclose(row.error, optimal, rel_tol=1e-4), (row.name, row.error, optimal)
        assert math.isclose(row.energy, 1 - optimal**2, rel_tol=1e-4)
        # the reported error is the stored adapter's own
        actual = float((adapter.modules[row.name].delta().double() - d).norm() / d.norm())
        assert math.isclose(row.error, actual, rel_tol=1e-5)


def test_energy_picks_the_smallest_rank(pair: tuple[Path, Path]) -> None:
    base, tuned = pair
    truth = true_deltas(base, tuned)
    for energy in (0.5, 0.9):
        adapter, report = extract_adapter(base, tuned, energy=energy)
        for row in report.modules:
            s2 = torch.linalg.svdvals(truth[row.name]).pow(2)
            cum = s2.cumsum(0) / s2.sum()
            want = int((cum < energy).sum()) + 1
            assert not torch.isclose(cum, torch.tensor(energy, dtype=cum.dtype), atol=1e-4).any()  # no ties
            assert row.rank == want, (row.name, row.rank, want)
            assert row.energy >= energy and math.isclose(row.energy, float(cum[want - 1]), rel_tol=1e-5)
            assert adapter.modules[row.name].rank == want
    assert len({r.rank for r in report.modules}) > 1  # ranks differ per module: rank_pattern is needed
    _, capped = extract_adapter(base, tuned, energy=0.99, max_rank=2)
    assert {r.rank for r in capped.modules} == {2} and all(r.energy < 0.99 for r in capped.modules)


def test_peft_loads_it_and_gives_the_tuned_logits(mf: ModuleType, pair: tuple[Path, Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, tuned = pair
    extract(base, tuned, tmp_path / "out", energy=0.999)  # per-module ranks: rank_pattern in the config
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    want = logits(AutoModelForCausalLM.from_pretrained(tuned))
    assert not torch.allclose(want, logits(mf.tiny_llama()), atol=1e-3)  # the adapter matters
    model = PeftModel.from_pretrained(mf.tiny_llama(), tmp_path / "out")
    torch.testing.assert_close(logits(model), want, rtol=1e-4, atol=1e-4)
    ranks = {n: m.rank for n, m in load_adapter(tmp_path / "out").modules.items()}
    for name, r in ranks.items():  # PEFT built each module at its own rank
        layer = model.get_submodule("base_model.model." + name)
        assert layer.r["default"] == r
    assert cfg["rank_pattern"] or len(set(ranks.values())) == 1


def changed_llama(mf: ModuleType, root: Path, bias: bool = False) -> tuple[Path, Path, Any]:
    """A tiny Llama (optionally with attention biases) and a tuned copy whose norms, embeddings, lm_head,
    attention weights and biases changed; returns (base, tuned, tuned model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**mf.LLAMA_CONFIG, attention_bias=bias)).eval()
    model.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(3)
    sd = model.state_dict()
    with torch.no_grad():
        sd["model.layers.0.input_layernorm.weight"] += 0.1 * torch.randn(32, generator=g)
        sd["model.norm.weight"] += 0.1 * torch.randn(32, generator=g)
        sd["model.embed_tokens.weight"] += 0.05 * torch.randn(128, 3, generator=g) @ torch.randn(3, 32, generator=g)
        sd["lm_head.weight"] += 0.05 * torch.randn(128, 2, generator=g) @ torch.randn(2, 32, generator=g)
        sd["model.layers.0.self_attn.q_proj.weight"] += 0.05 * torch.randn(32, 32, generator=g)
        if bias:
            sd["model.layers.0.self_attn.q_proj.bias"] += 0.1 * torch.randn(32, generator=g)
            sd["model.layers.1.self_attn.o_proj.bias"] += 0.1 * torch.randn(32, generator=g)  # weight unchanged
    model.load_state_dict(sd)
    model.save_pretrained(root / "tuned")
    return root / "base", root / "tuned", model


def test_norms_and_embeddings_kept_whole(mf: ModuleType, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    base, tuned, model = changed_llama(mf, tmp_path)
    code, out, err = run(str(base), str(tuned), "--rank", "32", "-o", str(tmp_path / "out"), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["saved"] == sorted(
        ["lm_head.weight", "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight"]
    )
    assert [m["name"] for m in report["modules"]] == ["model.layers.0.self_attn.q_proj"]
    adapter = load_adapter(tmp_path / "out")
    assert {k: e.role for k, e in adapter.extras.items()} == dict.fromkeys(report["saved"], "modules_to_save")
    torch.testing.assert_close(adapter.extras["model.norm.weight"].ref.load(), weights(tuned)["model.norm.weight"])
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["lm_head", "model.embed_tokens", "model.layers.0.input_layernorm", "model.norm"]
    # q_proj changed in layer 0 only: the targets name it exactly, so PEFT puts no LoRA on layer 1's q_proj
    assert cfg["target_modules"] == r"(model\.layers\.0\.self_attn\.q_proj)"
    torch.manual_seed(0)
    fresh = LlamaForCausalLM(LlamaConfig(**mf.LLAMA_CONFIG)).eval()
    peft_model = PeftModel.from_pretrained(fresh, tmp_path / "out")
    torch.testing.assert_close(logits(peft_model), logits(model), rtol=1e-4, atol=1e-4)
    assert not hasattr(peft_model.get_submodule("base_model.model.model.layers.1.self_attn.q_proj"), "lora_A")

    # skip: the embeddings are left out with a warning that names them
    code, out, err = run(
        str(base), str(tuned), "--rank", "32", "--embeddings", "skip", "-o", str(tmp_path / "skip"), "--json"
    )
    assert code == 0 and "Warning:" in err and "model.embed_tokens.weight" in err and "lm_head.weight" in err
    skipped = json.loads(out)["skipped"]
    assert [s["name"] for s in skipped] == ["lm_head.weight", "model.embed_tokens.weight"]
    assert "model.embed_tokens.weight" not in load_adapter(tmp_path / "skip").extras

    # lora: embed_tokens as a PEFT embedding LoRA, lm_head as a linear one, at their true ranks
    adapter, rep = extract_adapter(base, tuned, rank=8, embeddings="lora")
    emb, head = adapter.modules["model.embed_tokens"], adapter.modules["lm_head"]
    assert (emb.layer, emb.rank, head.layer, head.rank) == ("embedding", 3, "linear", 2)
    truth = weights(tuned)["model.embed_tokens.weight"] - weights(base)["model.embed_tokens.weight"]
    torch.testing.assert_close(emb.delta(), truth, rtol=1e-5, atol=1e-6)
    extract(base, tuned, tmp_path / "lora", rank=32, embeddings="lora")
    torch.manual_seed(0)
    fresh = LlamaForCausalLM(LlamaConfig(**mf.LLAMA_CONFIG)).eval()
    torch.testing.assert_close(
        logits(PeftModel.from_pretrained(fresh, tmp_path / "lora")), logits(model), rtol=1e-4, atol=1e-4
    )


def test_biases(mf: ModuleType, tmp_path: Path) -> None:
    """A changed bias of a LoRA module becomes its LoRA bias (PEFT lora_bias); the bias of an unchanged linear
    is kept whole (PEFT's modules_to_save needs the module's weight too)."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    base, tuned, model = changed_llama(mf, tmp_path, bias=True)
    report = extract(base, tuned, tmp_path / "out", rank=32)
    assert report.biases == ["model.layers.0.self_attn.q_proj.bias"]
    o_proj = "model.layers.1.self_attn.o_proj"
    assert {o_proj + ".bias", o_proj + ".weight"} <= set(report.saved)
    adapter = load_adapter(tmp_path / "out")
    q = adapter.modules["model.layers.0.self_attn.q_proj"]
    assert q.bias is not None
    w = weights(tuned)["model.layers.0.self_attn.q_proj.bias"] - weights(base)["model.layers.0.self_attn.q_proj.bias"]
    torch.testing.assert_close(q.bias.load(), w)
    torch.testing.assert_close(adapter.extras[o_proj + ".weight"].ref.load(), weights(base)[o_proj + ".weight"])
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["lora_bias"] is True and "model.layers.1.self_attn.o_proj" in cfg["modules_to_save"]
    torch.manual_seed(0)
    fresh = LlamaForCausalLM(LlamaConfig(**mf.LLAMA_CONFIG, attention_bias=True)).eval()
    torch.testing.assert_close(
        logits(PeftModel.from_pretrained(fresh, tmp_path / "out")), logits(model), rtol=1e-4, atol=1e-4
    )
    # PEFT has no bias on an embedding LoRA: both in one adapter is refused, and nothing is written
    with pytest.raises(LoratoolsError, match="LoRA biases"):
        extract(base, tuned, tmp_path / "both", rank=32, embeddings="lora")
    assert not (tmp_path / "both").exists()


def test_include_exclude(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = pair
    _, rep = extract_adapter(base, tuned, rank=4, include=[r"q_proj", r"v_proj"], exclude=[r"layers\.1\."])
    assert [m.name for m in rep.modules] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert rep.excluded == len(weights(base)) - 2 and rep.unchanged == 0
    report = extract(base, tuned, tmp_path / "out", rank=4, exclude=[r"layers\.1\."])
    assert len(report.modules) == 4
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert "layers\\.0\\.self_attn\\.k_proj" in cfg["target_modules"] and "layers\\.1" not in cfg["target_modules"]
    code, _, err = run(str(base), str(tuned), "--rank", "4", "--include", "(", "-o", str(tmp_path / "x"))
    assert code == 2 and "Error: Invalid value for '--include': '('" in err  # a usage error, before reading


def test_conv_and_dtype(tmp_path: Path) -> None:
    """A 3x3 conv kernel's difference of rank 2 becomes a conv LoRA; --dtype bf16 rounds the factors, and the
    reported error is the rounded adapter's."""
    g = torch.Generator().manual_seed(5)
    conv = torch.randn(8, 4, 3, 3, generator=g)
    change = (torch.randn(8, 2, generator=g) @ torch.randn(2, 36, generator=g)).reshape(8, 4, 3, 3)
    norm = torch.randn(8, generator=g)
    write_safetensors(tmp_path / "a.safetensors", {"conv.weight": conv, "norm.weight": norm})
    write_safetensors(tmp_path / "b.safetensors", {"conv.weight": conv + change, "norm.weight": norm})
    adapter, rep = extract_adapter(tmp_path / "a.safetensors", tmp_path / "b.safetensors", rank=4)
    m = adapter.modules["conv"]
    assert (m.layer, m.rank, m.factors["down"].shape, m.factors["up"].shape) == ("conv", 2, (2, 4, 3, 3), (8, 2, 1, 1))
    torch.testing.assert_close(m.delta(), change, rtol=1e-5, atol=1e-5)
    assert rep.unchanged == 1
    adapter, rep = extract_adapter(tmp_path / "a.safetensors", tmp_path / "b.safetensors", rank=4, dtype="bf16")
    m = adapter.modules["conv"]
    actual = float((m.delta().double() - change.double()).norm() / change.double().norm())
    assert m.factors["up"].dtype == "BF16" and 1e-4 < actual < 1e-2
    assert math.isclose(rep.modules[0].error, actual, rel_tol=1e-3)


def test_diffusers_pipeline_to_diffusers(tmp_path: Path) -> None:
    """A pipeline folder: names carry the component; --to diffusers writes them as diffusers does, with the
    report in the header; a changed norm, kept whole in PEFT, has no diffusers form and is left out, named."""
    g = torch.Generator().manual_seed(7)
    base = {"conv_in.weight": torch.randn(8, 4, 3, 3, generator=g), "attn.to_q.weight": torch.randn(16, 16, generator=g),
            "norm.weight": torch.ones(16)}  # fmt: skip
    change = {"conv_in.weight": torch.randn(8, 1, generator=g) @ torch.randn(1, 36, generator=g),
              "attn.to_q.weight": torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g)}  # fmt: skip
    for name, folder in (("base", base), ("tuned", {k: v + change[k].reshape(v.shape) if k in change else v + 0.5
                                                    for k, v in base.items()})):  # fmt: skip
        (tmp_path / name / "unet").mkdir(parents=True)
        (tmp_path / name / "model_index.json").write_text("{}")
        write_safetensors(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors", folder)
    code, out, err = run(str(tmp_path / "base"), str(tmp_path / "tuned"), "--rank", "4", "--to", "diffusers",
                         "-o", str(tmp_path / "lora.safetensors"), "--json")  # fmt: skip
    assert code == 0, err
    assert "unet.norm.weight" in err and [s["name"] for s in json.loads(out)["skipped"]] == ["unet.norm.weight"]
    adapter = load_adapter(tmp_path / "lora.safetensors")
    assert adapter.format == "diffusers" and sorted(adapter.modules) == ["unet.attn.to_q", "unet.conv_in"]
    assert (adapter.modules["unet.conv_in"].rank, adapter.modules["unet.attn.to_q"].rank) == (1, 2)
    for name, d in change.items():
        m = adapter.modules["unet." + name.rpartition(".")[0]]
        torch.testing.assert_close(m.delta(), d.reshape(base[name].shape), rtol=1e-4, atol=1e-5)
    assert META_KEY in adapter.metadata and "loratools" in adapter.metadata


def test_identical_checkpoints_are_an_error(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, _ = pair
    code, _, err = run(str(base), str(base), "--rank", "4", "-o", str(tmp_path / "out"))
    assert code == 1 and "Error: no changed weights" in err and not (tmp_path / "out").exists()


def test_mismatched_checkpoints_name_the_tensors(tmp_path: Path) -> None:
    a = {"x.weight": torch.zeros(4, 4), "y.weight": torch.zeros(4, 4), "z.weight": torch.zeros(2, 3)}
    b = {"x.weight": torch.ones(4, 4), "w.weight": torch.zeros(4, 4), "z.weight": torch.zeros(3, 2)}
    write_safetensors(tmp_path / "a.safetensors", a)
    write_safetensors(tmp_path / "b.safetensors", b)
    code, _, err = run(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--rank", "2", "-o",
                       str(tmp_path / "out"))  # fmt: skip
    assert code == 1
    assert "only in BASE: y.weight" in err and "only in TUNED: w.weight" in err and "z.weight [2, 3] vs [3, 2]" in err
    # leaving the odd ones out makes the rest extractable
    code, out, err = run(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--rank", "2", "-o",
                         str(tmp_path / "out"), "--exclude", "^[yzw]", "--json")  # fmt: skip
    assert code == 0, err
    assert [m["rank"] for m in json.loads(out)["modules"]] == [1]


def test_nan_in_the_difference_is_an_error(tmp_path: Path) -> None:
    w = torch.ones(4, 4)
    bad = w.clone()
    bad[1, 2] = float("nan")
    write_safetensors(tmp_path / "a.safetensors", {"x.weight": w})
    write_safetensors(tmp_path / "b.safetensors", {"x.weight": bad})
    with pytest.raises(LoratoolsError, match="x.weight: the difference holds inf or NaN"):
        extract_adapter(tmp_path / "a.safetensors", tmp_path / "b.safetensors", rank=2)


def test_cli_table_and_usage(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = pair
    code, out, err = run(str(base), str(tuned), "--energy", "0.9", "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert "model.layers.1.self_attn.v_proj" in out and "32x32" in out and "rel. error" in out
    assert f"wrote {tmp_path / 'out'} (peft" in out and "8 modules, rank" in out and "unchanged" in out
    code, _, err = run(str(base), str(tuned), "--energy", "0.9", "-o", str(tmp_path / "out"))
    assert code == 1 and "already exists" in err
    code, _, err = run(str(base), str(tuned), "--rank", "2", "--energy", "0.9", "-o", str(tmp_path / "y"))
    assert code == 2 and "exactly one of --rank and --energy" in err
    code, _, err = run(str(base), str(tuned), "--rank", "2", "--to", "kohya", "-o", str(tmp_path / "k"))
    assert code == 1 and "not a diffusers pipeline" in err and not (tmp_path / "k").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = pair
    code, _, err = run(str(base), str(tuned), "--rank", "2", "--device", "cuda", "-o", str(tmp_path / "x"))
    assert code == 1 and "no CUDA device" in err and not (tmp_path / "x").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(pair: tuple[Path, Path]) -> None:
    base, tuned = pair
    cpu, _ = extract_adapter(base, tuned, rank=2)
    gpu, _ = extract_adapter(base, tuned, rank=2, device="cuda")
    for name, m in cpu.modules.items():
        torch.testing.assert_close(gpu.modules[name].delta(), m.delta(), rtol=1e-4, atol=1e-5)
