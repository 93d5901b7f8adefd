"""Every format through the canonical model and back: same modules, factors, alphas, metadata."""

from __future__ import annotations

from pathlib import Path

import peers_kit as kit
import pytest
import torch
from conftest import FIXTURES

from loratools import detect, load_adapter, save_adapter
from loratools.model import Adapter

#: PEFT types that loratools writes back as another: AdaLoRA and VeRA as LoRA (the same factors and deltas, the type
#: no longer theirs); a full-matrix PEFT LoKr module carries PEFT's alpha / r in w1 (the model's scale is 1 there),
#: so its config's alpha is rewritten
REWRITTEN = {"peft_llama_adalora": "LORA", "peft_llama_vera": "LORA", "peft_llama_lokr": "LOKR"}


def assert_same(a: Adapter, b: Adapter, origin: bool = True) -> None:
    assert a.modules.keys() == b.modules.keys()
    for name, m in a.modules.items():
        n = b.modules[name]
        assert (m.kind, m.layer, m.fan_in_fan_out) == (n.kind, n.layer, n.fan_in_fan_out), name
        assert m.type == n.type or (not origin and (m.origin, n.type) == (m.type, "lora")), name
        assert m.scale == pytest.approx(n.scale, rel=1e-6), name
        assert m.tensors().keys() == n.tensors().keys(), name
        for role, t in m.tensors().items():
            u = n.tensors()[role]
            assert t.dtype == u.dtype, (name, role)
            assert torch.equal(t.load().reshape(-1), u.load().reshape(-1)), (name, role)
        torch.testing.assert_close(m.delta(), n.delta(), rtol=0, atol=0)
    assert a.extras.keys() == b.extras.keys()
    for key, e in a.extras.items():
        assert e.role == b.extras[key].role and torch.equal(e.ref.load(), b.extras[key].ref.load())


def test_detects_each_fixture(adapter_fixture: tuple[Path, str]) -> None:
    path, fmt = adapter_fixture
    assert detect(path) == fmt
    a = load_adapter(path)
    assert a.format == fmt and a.modules
    assert all(not m.check() for m in a.modules.values())


def test_same_format_round_trip(adapter_fixture: tuple[Path, str], tmp_path: Path) -> None:
    path, fmt = adapter_fixture
    a = load_adapter(path)
    out = tmp_path / ("out" if fmt == "peft" else "out.safetensors")
    save_adapter(a, out)
    b = load_adapter(out)
    assert b.format == fmt
    rewritten = REWRITTEN.get(path.name)
    assert_same(a, b, origin=rewritten != "LORA")
    kept = {k: v for k, v in a.metadata.items() if k not in ("sshs_model_hash", "sshs_legacy_hash")}
    assert kept.items() <= b.metadata.items()
    if fmt == "peft" and rewritten:
        assert b.config["peft_type"] == rewritten
    elif fmt == "peft":
        for key in ("r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern"):
            assert a.config.get(key) == b.config.get(key), key


@pytest.mark.parametrize(
    ("src", "to"),
    [
        ("peft_llama_patterns", "diffusers"),
        ("diffusers_sd", "kohya"),
        ("diffusers_sd_old", "diffusers"),
        ("diffusers_sd", "peft"),
    ],
)
def test_cross_format_keeps_every_delta(src: str, to: str, tmp_path: Path) -> None:
    """Saved in another format and read back: every module is found under the name its format gives it (matched by
    kohya's flattening convention, ``peers_kit.same_module``, not by loratools' own name table), one to one, with
    its delta. The factors are written as they are, and alpha is re-expressed at most once through a float32 or a
    JSON float (a relative 2^-24 of the scale): in float64, rtol 1e-6 entry by entry."""
    a = load_adapter(FIXTURES / src)
    if to == "diffusers" and a.format == "peft":
        a.modules = {f"transformer.{k}": v for k, v in a.modules.items()}
    out = tmp_path / ("out" if to == "peft" else "out.safetensors")
    save_adapter(a, out, to)
    b = load_adapter(out)
    assert b.format == to
    names = {}
    for k in a.modules:
        found = [n for n in b.modules if kit.same_module(k, n)]
        assert len(found) == 1, (k, found)
        names[k] = found[0]
    assert sorted(names.values()) == sorted(b.modules)  # one to one, nothing added
    if to == "kohya":  # diffusers components become kohya's prefixes
        assert all(n.startswith(("lora_unet_", "lora_te_")) for n in b.modules)
    for k, m in a.modules.items():
        want = m.delta(dtype=torch.float64)
        torch.testing.assert_close(
            b.modules[names[k]].delta(dtype=torch.float64).reshape(want.shape), want, rtol=1e-6, atol=1e-12,
            msg=lambda s, k=k: f"{k} -> {names[k]}: {s}",
        )  # fmt: skip
