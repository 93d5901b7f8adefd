"""``validate --for llama.cpp / ollama / vllm``: what each consumer takes, told per module. llama.cpp's rules depend
on the base's architecture (from ``--base``'s config.json): an architecture loratools has no converter rules for
is named, a module with no GGUF tensor in that architecture is named, a GGUF adapter for another architecture is
refused. vLLM: the modules it does not take LoRA on (conv layers, a multimodal model's encoders and projectors,
embeddings where the model class does not register them) are named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf_kit as kit
import pytest
import torch

from loratools.formats import save_adapter
from loratools.model import Adapter, Module, TensorRef
from loratools.ops.convert import convert
from loratools.ops.validate import validate


def _said(rep: Any, severity: str = "error") -> list[str]:
    return [f.message for f in rep.findings if f.code == "consumer" and f.severity == severity]


def _adapter(shapes: dict[str, tuple[int, ...]], layers: dict[str, str] | None = None) -> Adapter:
    a = Adapter("peft", base_model="org/tiny-base")
    for name, (out, inn, *kernel) in shapes.items():
        layer = (layers or {}).get(name, "linear")
        down = torch.randn(2, inn, *kernel)
        up = torch.randn(out, 2, *([1] * len(kernel)))
        factors = {"down": TensorRef.of(down), "up": TensorRef.of(up)}
        a.modules[name] = Module(name, "lora", factors, alpha=4.0, layer=layer)  # type: ignore[arg-type]
    return a


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("consumers")
    kit.build_base("llama", root / "llama")
    kit.build_base("qwen2", root / "qwen2")
    shapes = {
        k.removesuffix(".weight"): v for k, v in kit.base_shapes(root / "llama").items() if k.endswith("proj.weight")
    }
    save_adapter(_adapter(shapes), root / "peft", "peft")
    convert(root / "peft", "gguf", root / "a.gguf", base=root / "llama")
    return {
        "root": root,
        "llama": root / "llama",
        "qwen2": root / "qwen2",
        "peft": root / "peft",
        "gguf": root / "a.gguf",
    }


def test_an_architecture_without_converter_rules_is_named(llama: dict[str, Path], tmp_path: Path) -> None:
    base = tmp_path / "gpt"
    base.mkdir()
    (base / "model.safetensors").symlink_to(llama["llama"] / "model.safetensors")
    cfg = json.loads((llama["llama"] / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPTBigCodeForCausalLM"]}))
    for_ = ["llama.cpp", "ollama"]
    for who in for_:
        said = _said(validate(llama["peft"], base=base, for_=who, fast=True))
        assert any("the base is a GPTBigCodeForCausalLM" in m and "Llama" in m for m in said), said


def test_modules_are_checked_against_the_base_architecture(llama: dict[str, Path], tmp_path: Path) -> None:
    """Phi-3's fused qkv_proj has a GGUF tensor in some architecture (so without --base it passes), but none in
    Llama's: with a Llama base it is named."""
    a = _adapter({"model.layers.0.self_attn.qkv_proj": (64, 32), "model.layers.0.self_attn.o_proj": (32, 32)})
    save_adapter(a, tmp_path / "fused", "peft")
    alone = _said(validate(tmp_path / "fused", for_="llama.cpp", fast=True))
    assert not any("no GGUF tensor" in m for m in alone), alone
    said = _said(validate(tmp_path / "fused", base=llama["llama"], for_="llama.cpp", fast=True))
    assert any("1 module(s) have no GGUF tensor in a LlamaForCausalLM: model.layers.0.self_attn.qkv_proj" in m
               for m in said), said  # fmt: skip


def test_a_gguf_adapter_for_another_architecture_is_refused(llama: dict[str, Path]) -> None:
    assert _said(validate(llama["gguf"], base=llama["llama"], for_="llama.cpp", fast=True)) == []
    said = _said(validate(llama["gguf"], base=llama["qwen2"], for_="llama.cpp", fast=True))
    assert any("for a llama model and the base is a Qwen2ForCausalLM (qwen2)" in m for m in said), said


def test_vllm_names_the_modules_it_takes_no_lora_on(tmp_path: Path) -> None:
    shapes: dict[str, tuple[int, ...]] = {
        "model.language_model.layers.0.self_attn.q_proj": (32, 32),
        "model.visual.blocks.0.attn.qkv": (96, 32),
        "model.visual.blocks.1.mlp.fc1": (64, 32),
        "model.multi_modal_projector.linear_1": (32, 32),
        "model.visual.patch_embed.proj": (32, 3, 2, 2),
        "model.language_model.embed_tokens": (32, 64),
    }
    layers = {"model.visual.patch_embed.proj": "conv", "model.language_model.embed_tokens": "embedding"}
    save_adapter(_adapter(shapes, layers), tmp_path / "vlm", "peft")
    rep = validate(tmp_path / "vlm", for_="vllm", fast=True)
    errors, warnings = _said(rep), _said(rep, "warning")
    assert any("not on 1 conv layer(s): model.visual.patch_embed.proj" in m for m in errors), errors
    tower = next(m for m in warnings if "language model only" in m)
    for name in ("model.visual.blocks.0.attn.qkv", "model.visual.blocks.1.mlp.fc1", "model.multi_modal_projector"):
        assert name in tower
    assert "q_proj" not in tower and "4 module(s)" in tower  # the conv layer is a tower module too
    assert any("model.language_model.embed_tokens" in m for m in warnings), warnings
    assert not rep.ok
