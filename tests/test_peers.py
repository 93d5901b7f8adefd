"""loratools' delta math against what the real peer libraries compute on the committed fixtures.

Every base model is rebuilt with the seeded builders of ``fixtures/make_fixtures.py`` (the models the
fixtures were made on), the fixture is loaded by the library that owns its format (peft, diffusers,
lycoris-lora), and that library's own numbers are the truth:

* PEFT: ``LoraLayer.get_delta_weight`` per module, and the weights of ``merge_and_unload()`` (DoRA,
  GPT-2 ``Conv1D`` fan_in_fan_out, embedding LoRA, modules_to_save copy);
* diffusers: ``lora_state_dict`` + ``load_lora_into_unet`` / ``load_lora_into_text_encoder`` (which
  also converts kohya files and their alphas), then ``get_delta_weight`` and peft's ``merge``;
* lycoris: ``create_network_from_weights`` (via ``load_lycoris_kohya``), then each module's forward --
  what consumers actually run -- against the base layer computed with loratools' merged weight.
  (lycoris 4.1.3 ``get_diff_weight`` applies the scale twice for LoHa/LoKr, so it is not used.)

All comparisons are in fp32.  Deltas and merged weights are compared with ``rtol=1e-5, atol=1e-6``
(``peers_kit.TOL``); layer outputs sum a few hundred products (in_features * kh * kw) in a different order than the peer
does, so they use ``atol=1e-5`` (outputs are O(1); the worst observed difference is ~1e-6).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import peers_kit as kit
import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES

from loratools import load_adapter
from loratools.model import Module

#: PEFT fixture -> builder of its base model in make_fixtures
PEFT_FIXTURES = {
    "peft_llama": "tiny_llama",
    "peft_llama_patterns": "tiny_llama",
    "peft_llama_bin": "tiny_llama",
    "peft_gpt2": "tiny_gpt2",
    "peft_llama_embed": "tiny_llama",
    "peft_llama_dora": "tiny_llama",
}

LYCORIS_FIXTURES = [
    "kohya_sd/lora.safetensors",
    "lycoris_loha.safetensors",
    "lycoris_loha_tucker.safetensors",
    "lycoris_lokr.safetensors",
    "lycoris_lokr_full.safetensors",
    "lycoris_dora.safetensors",
]


def _check_against_peft_layer(name: str, m: Module, layer: Any) -> None:
    """rank, scale and delta of one loratools module against the peft layer diffusers/peft built."""
    assert m.rank == layer.r["default"], name
    assert m.scale == pytest.approx(layer.scaling["default"], rel=1e-6), name
    with torch.no_grad():
        want = layer.get_delta_weight("default").float()
    got = m.delta()
    assert want.abs().max() > 1e-3, f"{name}: the peer loaded an all-zero adapter"
    kit.close(got.reshape(want.shape), want, name)


# ------------------------------------------------------------------------------------------------
# PEFT
# ------------------------------------------------------------------------------------------------


def _peft_model(mf: ModuleType, fixture: str) -> tuple[dict[str, torch.Tensor], Any, dict[str, Any]]:
    from peft import PeftModel

    base = getattr(mf, PEFT_FIXTURES[fixture])()
    original = kit.snapshot(base)
    pm = PeftModel.from_pretrained(base, str(FIXTURES / fixture))
    return original, pm, kit.lora_layers(pm, strip="base_model.model.")


@pytest.mark.parametrize("fixture", sorted(PEFT_FIXTURES))
def test_peft_delta_equals_get_delta_weight(mf: ModuleType, fixture: str) -> None:
    _, _, layers = _peft_model(mf, fixture)
    a = load_adapter(FIXTURES / fixture)
    assert a.format == "peft"
    assert layers and set(a.modules) == set(layers)
    for name, layer in layers.items():
        m = a.modules[name]
        _check_against_peft_layer(name, m, layer)
        mag = getattr(layer, "lora_magnitude_vector", {})
        if "default" in mag:
            assert m.magnitude is not None and m.type == "dora", name
            torch.testing.assert_close(m.magnitude.load().float().reshape(-1), mag["default"].weight.float(), **kit.TOL)
        else:
            assert m.magnitude is None, name


@pytest.mark.parametrize("fixture", sorted(PEFT_FIXTURES))
def test_peft_apply_equals_merge_and_unload(mf: ModuleType, fixture: str) -> None:
    """Merged weights of every module (DoRA rescaling, Conv1D orientation, embedding) against peft's merge."""
    original, pm, layers = _peft_model(mf, fixture)
    a = load_adapter(FIXTURES / fixture)
    with torch.no_grad():
        merged = kit.snapshot(pm.merge_and_unload())
    assert set(a.modules) == set(layers)
    for name, m in a.modules.items():
        key = f"{name}.weight"
        w = original[key]
        want = merged[key]
        assert not torch.allclose(want, w), f"{name}: peft's merge left the weight unchanged"
        kit.close(m.apply(w), want, name)
    if fixture == "peft_llama_embed":
        # the modules_to_save copy replaces lm_head outright in peft's merged model
        torch.testing.assert_close(a.extras["lm_head.weight"].ref.load(), merged["lm_head.weight"], rtol=0, atol=0)


def test_peft_embed_extras(mf: ModuleType) -> None:
    original, pm, _ = _peft_model(mf, "peft_llama_embed")
    a = load_adapter(FIXTURES / "peft_llama_embed")
    assert a.modules["model.embed_tokens"].layer == "embedding"
    assert {k: e.role for k, e in a.extras.items()} == {
        "lm_head.weight": "modules_to_save",
        "model.embed_tokens.base_layer.weight": "base_layer",
    }
    lm_head = pm.base_model.model.lm_head
    want = lm_head.modules_to_save["default"].weight
    got = a.extras["lm_head.weight"].ref.load()
    assert not torch.allclose(want, original["lm_head.weight"])  # really a trained copy
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    emb = a.extras["model.embed_tokens.base_layer.weight"].ref.load()
    torch.testing.assert_close(emb, original["model.embed_tokens.weight"], rtol=0, atol=0)
    base_layer = pm.base_model.model.model.embed_tokens.get_base_layer().weight
    torch.testing.assert_close(emb, base_layer.detach(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# diffusers (its own files, and its kohya converter)
# ------------------------------------------------------------------------------------------------


def _check_merge(name: str, m: Module, layer: Any, w: torch.Tensor) -> None:
    with torch.no_grad():
        layer.merge(adapter_names=["default"])
        want = layer.get_base_layer().weight.detach()
    kit.close(m.apply(w), want, f"{name} (merged)")


@pytest.mark.parametrize("fixture", ["diffusers_sd", "diffusers_sd_old"])
def test_diffusers_files_match_diffusers(mf: ModuleType, fixture: str) -> None:
    original, layers, _, te = kit.diffusers_load(mf, FIXTURES / fixture)
    a = load_adapter(FIXTURES / fixture)
    assert a.format == "diffusers"

    # transformers-4 names (text_model.) are stripped by diffusers for a transformers-5 CLIP
    mapped = {kit.peer_name(n, te): m for n, m in a.modules.items()}
    assert len(mapped) == len(a.modules)
    assert any(n.startswith("text_encoder.") for n in layers) and any(n.startswith("unet.") for n in layers)
    assert set(mapped) == set(layers)
    for name, layer in layers.items():
        _check_against_peft_layer(name, mapped[name], layer)
        _check_merge(name, mapped[name], layer, original[f"{name}.weight"])


def test_kohya_matches_diffusers_converter(mf: ModuleType) -> None:
    path = FIXTURES / "kohya_sd" / "lora.safetensors"
    original, layers, _, te = kit.diffusers_load(mf, path)
    a = load_adapter(path)
    assert a.format == "kohya"
    assert not hasattr(te, "text_model")  # kohya TE names carry text_model_, the transformers-5 CLIP not

    def kohya_name(name: str) -> str:
        comp, _, rest = name.partition(".")
        flat = rest.replace(".", "_")
        return f"lora_unet_{flat}" if comp == "unet" else f"lora_te_text_model_{flat}"

    by_kohya = {kohya_name(n): n for n in layers}
    assert len(by_kohya) == len(layers) == 89
    assert set(by_kohya) == set(a.modules)
    for kname, name in by_kohya.items():
        m = a.modules[kname]
        _check_against_peft_layer(kname, m, layers[name])
        _check_merge(kname, m, layers[name], original[f"{name}.weight"])


# ------------------------------------------------------------------------------------------------
# lycoris (kohya LoRA/LoCon, LoHa, LoHa-Tucker, LoKr, full LoKr, DoRA)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", LYCORIS_FIXTURES)
def test_lycoris_forward_matches_merged_weight(mf: ModuleType, fixture: str) -> None:
    path = FIXTURES / fixture
    unet = mf.tiny_unet()
    te = mf.LegacyCLIPTextModel(mf.tiny_clip()) if fixture.startswith("kohya") else None
    original = {id(mod): mod.weight.detach().clone() for mod in unet.modules() if hasattr(mod, "weight")}
    if te is not None:
        original |= {id(mod): mod.weight.detach().clone() for mod in te.modules() if hasattr(mod, "weight")}
    net = mf.load_lycoris_kohya(path, unet, te)
    loras = list(net.unet_loras) + list(net.text_encoder_loras)
    a = load_adapter(path)
    assert a.format == "kohya"
    assert loras and {lm.lora_name for lm in loras} == set(a.modules)

    g = torch.Generator().manual_seed(0)
    checked = 0
    for lm in loras:
        org = lm.org_module[0]
        m = a.modules[lm.lora_name]
        w = original[id(org)]
        if isinstance(org, torch.nn.Linear):
            x = torch.randn(3, org.in_features, generator=g)

            def op(x: torch.Tensor, w: torch.Tensor, org: Any = org) -> torch.Tensor:
                return F.linear(x, w, org.bias)
        else:
            assert isinstance(org, torch.nn.Conv2d), type(org)
            x = torch.randn(2, org.in_channels, 6, 6, generator=g)

            def op(x: torch.Tensor, w: torch.Tensor, org: Any = org) -> torch.Tensor:
                return F.conv2d(x, w, org.bias, org.stride, org.padding, org.dilation, org.groups)

        with torch.no_grad():
            got = op(x, m.apply(w))
            base = op(x, w)
            # lycoris' default (rebuild) forward, and for non-DoRA modules also its bypass forward
            # (x -> factors chain, never building the dense delta)
            modes = [lm.bypass_mode] + ([] if getattr(lm, "wd", False) else [True])
            for mode in modes:
                lm.bypass_mode = mode
                want = lm(x)
                assert not torch.allclose(want, base), f"{lm.lora_name}: lycoris applied no change"
                kit.close(got, want, f"{lm.lora_name} (bypass={mode}, {m.kind})", kit.OUT_TOL)
                checked += 1
        assert (m.magnitude is not None) == bool(getattr(lm, "wd", False)), lm.lora_name
    assert checked >= len(loras)
