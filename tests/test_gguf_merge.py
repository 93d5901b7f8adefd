"""``merge BASE adapter.gguf``: the same weights as PEFT's ``merge_and_unload`` of the adapter the GGUF file was
converted from; and a quantized base (bitsandbytes, GPTQ, AWQ, FP8), refused before anything is written, saying
which method and which unquantized base to merge into."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf_kit as kit
import hostile
import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file, save_file

from loratools.ops.convert import convert
from loratools.ops.merge import merge


def _peft_adapter(name: str, targets: list[str], root: Path) -> tuple[Any, Path, Path]:
    """A tiny base and a PEFT adapter on it with random factors (init_lora_weights=False), rank and alpha
    patterns and rsLoRA: (the PEFT model, the base folder, the adapter folder)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    kit.build_base(name, root / "base")
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base").float()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=True, init_lora_weights=False,
                        rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 3})  # fmt: skip
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # PEFT's random init leaves lora_B of embeddings small: give every factor some weight
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(root / "adapter")
    return peft_model, root / "base", root / "adapter"


@pytest.mark.parametrize(
    ("name", "targets"),
    [
        ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]),
        ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    ],
)  # fmt: skip
def test_merge_of_the_gguf_file_is_peft_merge_and_unload(name: str, targets: list[str], tmp_path: Path) -> None:
    peft_model, base, adapter = _peft_adapter(name, targets, tmp_path)
    convert(adapter, "gguf", tmp_path / "a.gguf", base=base)
    merge(base, [tmp_path / "a.gguf"], tmp_path / "merged")
    got = load_file(tmp_path / "merged" / "model.safetensors")
    with torch.no_grad():
        want = peft_model.merge_and_unload().state_dict()
    assert got.keys() <= want.keys()
    changed = 0
    for k, t in got.items():
        torch.testing.assert_close(t, want[k], rtol=1e-5, atol=1e-5, msg=lambda s, k=k: f"{k}: {s}")
        changed += not torch.equal(t, load_file(base / "model.safetensors")[k])
    assert changed >= len(targets)  # every targeted kind of weight moved


def test_merge_of_stacked_experts(tmp_path: Path) -> None:
    """A Qwen2-MoE adapter on every expert (transformers 5 fuses experts, so PEFT cannot hold it: the oracle is
    W + scale * B @ A per expert, from the adapter's own factors)."""
    from loratools.formats import load_adapter, save_adapter

    kit.build_base("qwen2moe", tmp_path / "base")
    shapes = kit.base_shapes(tmp_path / "base")
    src = kit.random_adapter({k: v for k, v in shapes.items() if ".experts." in k}, rslora=True)
    save_adapter(src, tmp_path / "peft", "peft")
    convert(tmp_path / "peft", "gguf", tmp_path / "a.gguf", base=tmp_path / "base")
    merge(tmp_path / "base", [tmp_path / "a.gguf"], tmp_path / "merged")
    before = load_file(tmp_path / "base" / "model.safetensors")
    after = load_file(tmp_path / "merged" / "model.safetensors")
    peft = load_adapter(tmp_path / "peft")
    for name, m in peft.modules.items():
        kit.close(after[name + ".weight"], before[name + ".weight"] + m.delta(), name)


# ---- quantized bases ------------------------------------------------------------------------------------------

ADAPTER = FIXTURES / "peft_llama"
CARD = "---\nbase_model: meta-llama/Llama-3.2-1B\nlibrary_name: transformers\n---\n# a 4-bit model\n"


def _names(prefix: str = "model.layers.0.self_attn.") -> list[str]:
    return [prefix + p for p in ("q_proj", "k_proj", "v_proj", "o_proj")]


def _bnb(folder: Path) -> None:
    t: dict[str, torch.Tensor] = {}
    for n in _names():
        t[n + ".weight"] = torch.zeros(256, 1, dtype=torch.uint8)  # 4-bit packed: what "delta is [16, 32]" met
        t[n + ".weight.absmax"] = torch.ones(16)
        t[n + ".weight.quant_map"] = torch.ones(16)
        t[n + ".weight.quant_state.bitsandbytes__nf4"] = torch.zeros(8, dtype=torch.uint8)
    save_file(t, str(folder / "model.safetensors"))


def _gptq(folder: Path) -> None:
    t: dict[str, torch.Tensor] = {}
    for n in _names():
        t[n + ".qweight"] = torch.zeros(4, 32, dtype=torch.int32)
        t[n + ".qzeros"] = torch.zeros(1, 4, dtype=torch.int32)
        t[n + ".scales"] = torch.ones(1, 32, dtype=torch.float16)
        t[n + ".g_idx"] = torch.zeros(32, dtype=torch.int32)
    save_file(t, str(folder / "model.safetensors"))


def _awq(folder: Path) -> None:
    t: dict[str, torch.Tensor] = {}
    for n in _names():
        t[n + ".qweight"] = torch.zeros(32, 4, dtype=torch.int32)
        t[n + ".qzeros"] = torch.zeros(1, 4, dtype=torch.int32)
        t[n + ".scales"] = torch.ones(1, 32, dtype=torch.float16)
    save_file(t, str(folder / "model.safetensors"))


def _fp8(folder: Path) -> None:
    t: dict[str, torch.Tensor] = {}
    for n, rows in zip(_names(), (32, 16, 16, 32), strict=True):
        t[n + ".weight"] = torch.zeros(rows, 32).to(torch.float8_e4m3fn)
        t[n + ".weight_scale_inv"] = torch.ones(1, 1)
    save_file(t, str(folder / "model.safetensors"))


#: id -> (weights builder, config.json quantization_config or None, README, words of the Error and its Hint)
QUANTIZED: dict[str, tuple[Any, Any, str | None, list[str]]] = {
    "bnb-4bit-config-and-card": (
        _bnb, {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, CARD,
        ["quantized (bitsandbytes 4-bit nf4)", "unquantized base (meta-llama/Llama-3.2-1B)"],
    ),
    "bnb-tensors-only": (_bnb, None, None, ["quantized (bitsandbytes)", "unquantized base"]),
    "gptq-config": (_gptq, {"quant_method": "gptq", "bits": 4}, None, ["quantized (GPTQ 4-bit)", "(org/llama-fp16)"]),
    "gptq-tensors-only": (_gptq, None, None, ["quantized (GPTQ)"]),
    "awq-tensors-only": (_awq, None, None, ["quantized (AWQ or GPTQ)"]),
    "awq-config": (_awq, {"quant_method": "awq", "bits": 4, "version": "gemm"}, None, ["quantized (AWQ 4-bit)"]),
    "fp8": (_fp8, {"quant_method": "fp8", "weight_block_size": [128, 128]}, None, ["quantized (FP8)"]),
    "fp8-tensors-only": (_fp8, None, None, ["quantized (FP8)"]),
    "card-base-model-list": (
        _bnb, None, "---\nbase_model:\n- Qwen/Qwen2.5-0.5B\n---\n", ["(Qwen/Qwen2.5-0.5B)"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(QUANTIZED))
@pytest.mark.parametrize("as_gguf", [False, True], ids=["peft", "gguf"])
def test_a_quantized_base_is_refused_up_front(case: str, as_gguf: bool, tmp_path: Path, mf: Any) -> None:
    build, qc, card, says = QUANTIZED[case]
    base = tmp_path / "base"
    base.mkdir()
    build(base)
    cfg: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "_name_or_path": "org/llama-fp16"}
    if qc is not None:
        cfg["quantization_config"] = qc
    (base / "config.json").write_text(json.dumps(cfg))
    if card is not None:
        (base / "README.md").write_text(card)
    adapter = ADAPTER
    if as_gguf:
        mf.tiny_llama().save_pretrained(tmp_path / "llama")
        adapter = tmp_path / "a.gguf"
        convert(ADAPTER, "gguf", adapter, base=tmp_path / "llama")
    out = tmp_path / "merged"
    r = hostile.run(["merge", base, adapter, "-o", out], inputs=[base, adapter], out=out, says=says)
    assert "delta is" not in r.stderr and "Hint: merge into the unquantized base" in r.stderr


def test_an_unquantized_base_with_a_broken_card_merges(tmp_path: Path, mf: Any) -> None:
    """The card and the config only name things: a card that is not YAML changes nothing for a float base."""
    mf.tiny_llama().save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "README.md").write_text("---\nbase_model: [unclosed\n---\n")
    hostile.run(["merge", tmp_path / "base", ADAPTER, "-o", tmp_path / "out"], inputs=[ADAPTER], code=0)
