"""GGUF export and import per architecture, on tiny models built from transformers configs: the written tensor
names, shapes and values against llama.cpp's converter rules (written out in gguf_kit, names from the gguf package,
the file read by gguf's own GGUFReader), and PEFT -> GGUF -> PEFT round trips exact to float tolerance with rank and
alpha patterns, rsLoRA, embeddings, lm_head and MoE experts.

One architecture of each surgery kind (q/k permutation, plain, fused tensors kept, norm offset without a head,
experts stacked) runs by default; every other architecture runs under ``-m slow``.
"""

from __future__ import annotations

from typing import Any

import gguf_kit as kit
import pytest
import torch

from loratools.formats import detect, load_adapter, save_adapter
from loratools.ops.convert import convert


def _arches(names: list[str]) -> list[Any]:
    return [pytest.param(n, marks=() if n in kit.DEFAULT else pytest.mark.slow) for n in sorted(names)]


@pytest.fixture(scope="module", params=_arches(list(kit.ORACLES)))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny base, and per variant (plain, rsLoRA) a random PEFT adapter on every matrix and its GGUF export."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    cfg = kit.build_base(name, root / "base")
    shapes = kit.base_shapes(root / "base")
    out: dict[str, Any] = {"name": name, "oracle": kit.ORACLES[name], "cfg": cfg, "root": root, "base": root / "base"}
    for variant, rslora in (("plain", False), ("rslora", True)):
        adapter = kit.random_adapter(shapes, seed=len(variant), rslora=rslora)
        save_adapter(adapter, root / variant, "peft")
        convert(root / variant, "gguf", root / f"{variant}.gguf", base=root / "base")
        out[variant] = (load_adapter(root / variant), root / f"{variant}.gguf")
    return out


@pytest.mark.parametrize("variant", ["plain", "rslora"])
def test_names_shapes_and_surgery_follow_llama_cpp(case: dict[str, Any], variant: str) -> None:
    """Read by gguf.GGUFReader: llama.cpp's keys, gguf's tensor names, r x in / out x r factors (vocab x r for
    token_embd, n_expert x ... for a stack), and the deltas llama.cpp computes from them (alpha / rank with the
    file's one alpha) equal to the adapter's, permuted and stacked as the converter does."""
    import gguf

    o, cfg = case["oracle"], case["cfg"]
    adapter, path = case[variant]
    reader, tensors = kit.gguf_tensors(path)
    assert kit.field(reader, "general.architecture") == gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, o.arch)]
    assert kit.field(reader, "general.type") == "adapter" and kit.field(reader, "adapter.type") == "lora"
    assert kit.field(reader, "general.base_model.count") == 1
    assert kit.field(reader, "general.base_model.0.repo_url") == "https://huggingface.co/org/tiny-base"
    alpha = float(kit.field(reader, "adapter.lora.alpha"))
    want = kit.expected_tensors(o, adapter, cfg)
    assert sorted(tensors) == sorted(f"{g}.lora_{x}" for g in want for x in "ab")
    vocab, hidden = cfg["vocab_size"], cfg["hidden_size"]
    for gname, delta in want.items():
        a, b = tensors[gname + ".lora_a"], tensors[gname + ".lora_b"]
        if gname == "token_embd.weight":
            assert a.shape[0] == vocab and b.shape[0] == hidden and a.shape[1] == b.shape[1]
            kit.close(kit.llama_cpp_delta(alpha, a, b, embedding=True), delta, gname)
            continue
        assert a.shape[:-2] == b.shape[:-2] == delta.shape[:-2]  # n_expert for a stack
        assert a.shape[-1] == delta.shape[-1] and b.shape[-2] == delta.shape[-2] and a.shape[-2] == b.shape[-1]
        kit.close(kit.llama_cpp_delta(alpha, a, b), delta, gname)
    if o.experts is not None:
        assert any(t.ndim == 3 for t in tensors.values())
    if not o.head:
        assert not any(t.startswith("output.") for t in tensors)


@pytest.mark.parametrize("variant", ["plain", "rslora"])
def test_peft_gguf_peft_round_trip_is_exact(case: dict[str, Any], variant: str) -> None:
    """The GGUF file read back is the adapter (every module, its delta to float tolerance), and so is the PEFT
    folder converted from it; converted to GGUF again it holds the same tensors."""
    adapter, path = case[variant]
    assert detect(path) == "gguf"
    back = load_adapter(path)
    assert back.base_model == "org/tiny-base"
    kit.same_deltas(adapter, back)
    assert {m.layer for n, m in back.modules.items() if n.endswith("embed_tokens")} == {"embedding"}
    peft_again = case["root"] / f"{variant}-back"
    convert(path, "peft", peft_again)
    kit.same_deltas(adapter, load_adapter(peft_again))
    again = case["root"] / f"{variant}-again.gguf"
    convert(peft_again, "gguf", again, base=case["base"])
    _, first = kit.gguf_tensors(path)
    _, second = kit.gguf_tensors(again)
    assert sorted(first) == sorted(second)
    for k in first:
        ab = "lora_b" if k.endswith("lora_b") else "lora_a"
        assert first[k].shape == second[k].shape, (k, ab)


@pytest.mark.parametrize("case", _arches([n for n, o in kit.ORACLES.items() if o.experts]), indirect=True)
def test_stacked_experts_split_back_with_a_common_rank(case: dict[str, Any]) -> None:
    """Experts of one layer with different ranks share the stack's rank (the smaller ones padded with zeros,
    which add nothing); each expert comes back as its own module with its own delta."""
    o = case["oracle"]
    assert o.experts is not None
    adapter, path = case["plain"]
    back = load_adapter(path)
    pattern = o.experts[0]
    for w in o.experts[2]:
        names = [pattern.format(bid=0, xid=x, w=w) for x in range(4)]
        assert len({adapter.modules[n].rank for n in names}) > 1  # the adapter's experts differ in rank
        assert {back.modules[n].rank for n in names} == {max(adapter.modules[n].rank or 0 for n in names)}
        for n in names:
            kit.close(back.modules[n].delta(torch.float64), adapter.modules[n].delta(torch.float64), n)


def test_every_module_of_the_base_is_named(case: dict[str, Any]) -> None:
    """The names the reader gives back are the base checkpoint's own (with .weight), so merge and validate --base
    find every module."""
    shapes = kit.base_shapes(case["base"])
    back = load_adapter(case["plain"][1])
    missing = [n for n in back.modules if n + ".weight" not in shapes]
    assert not missing


def test_architectures_table_cites_the_converter() -> None:
    """Every supported transformers architecture has an oracle here, and its row cites llama.cpp's class."""
    import gguf

    from loratools.formats.gguf import SURGERY

    covered = {kit.ORACLES[n].arch for n in kit.ORACLES}
    assert {s.arch for s in SURGERY.values()} <= covered
    for arch, s in SURGERY.items():
        assert "Model" in s.converter and getattr(gguf.MODEL_ARCH, s.arch), arch


def test_validate_for_llama_cpp_knows_the_architecture(case: dict[str, Any]) -> None:
    """With --base, validate --for llama.cpp checks the adapter against the base's own architecture: its GGUF file
    is clean, and its PEFT folder is told it needs converting (and why) but has no module without a GGUF tensor."""
    from loratools.ops.validate import validate

    rep = validate(case["plain"][1], base=case["base"], for_="llama.cpp", fast=True)
    assert [f.message for f in rep.findings if f.severity == "error"] == []
    peft = validate(case["root"] / "plain", base=case["base"], for_="llama.cpp", fast=True)
    said = [f.message for f in peft.findings if f.code == "consumer"]
    assert any("llama.cpp loads GGUF adapters, this is a peft adapter" in m for m in said), said
    assert not any("no GGUF tensor" in m or "the base is a" in m for m in said), said
