"""Files loratools writes, loaded by the library that owns their format: the regression tests of "it loads there".

* PEFT folders written by ``convert`` and ``resize`` (rank_pattern / alpha_pattern, per-module ranks from
  ``--energy``, rsLoRA, DoRA, fan_in_fan_out, embeddings with modules_to_save, a PEFT adapter of a UNet) are loaded
  with ``PeftModel.from_pretrained`` on the tiny base they were made for;
* diffusers files written by ``convert --to diffusers`` and ``resize`` (from kohya, LyCORIS LoKr/LoHa turned into
  LoRA, a PEFT folder of a UNet, per-module ranks, the old diffusers layout) are loaded the way
  ``StableDiffusionPipeline.load_lora_weights`` does (``lora_state_dict``, ``load_lora_into_unet`` /
  ``load_lora_into_text_encoder``);
* kohya files written by ``convert --to kohya`` and ``resize`` are loaded by diffusers' kohya converter, and (per-module
  alphas, which diffusers 0.42.1 does not map back for attention layers) by lycoris' kohya loader.

What the owner built is then compared with loratools, module by module: the rank and the scale it took; its merged
(PEFT's ``merge_and_unload``) or fused (``merge`` of each layer, what ``fuse_lora`` runs) weights against loratools'
``apply`` of the module to the base weight; for PEFT models also the logits (the UNet's noise prediction) with the
adapter active against the base carrying loratools' weights. Then loratools' file against its source, by mapped module
name (each step's ``--json`` report: source -> name): the same delta where the conversion is exact, and where ``resize``
truncated, the energy the report states (Eckart-Young: ``|D_k|^2 = e |D|^2`` and ``|D - D_k|^2 = (1 - e) |D|^2``).

Tolerances: what the owner computes is fp32 (``peers_kit.TOL``: a few fp32 roundings of O(0.1) products; outputs
``peers_kit.OUT_TOL``). Against the source, in float64: where the factors were copied (``"copy"``) only alpha went
through a float32 ``.alpha`` tensor or a JSON float, a relative 2^-24 of the scale: rtol 1e-6; where loratools made
new factors and stored them in fp32 (``"fp32"``: LyCORIS -> LoRA by its float64 SVD, scales baked into the up factor)
each factor entry is rounded by 2^-24 and the delta's entries sum r such products: rtol 1e-5 and an atol of 1e-6 of
the delta's largest entry (entries that cancel).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import peers_kit as kit
import pytest
import torch
from conftest import FIXTURES, run_cli

from loratools import load_adapter, save_adapter
from loratools.model import Adapter

F64 = torch.float64
COPY: dict[str, Any] = dict(rtol=1e-6, atol=1e-12)
FP32_RTOL, FP32_ATOL = 1e-5, 1e-6  # atol relative to the delta's largest entry


@pytest.fixture(scope="module")
def peft() -> ModuleType:
    return pytest.importorskip("peft")


@pytest.fixture(scope="module")
def diffusers() -> ModuleType:
    pytest.importorskip("peft")
    return pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def shared(mf: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Inputs some cases start from: the UNet half of the diffusers fixture as its own file (a PEFT adapter holds
    one model), and the tiny UNet as a diffusers folder (a ``--base``)."""
    root = tmp_path_factory.mktemp("owners")
    a = load_adapter(FIXTURES / "diffusers_sd")
    a.modules = {k: v for k, v in a.modules.items() if k.startswith("unet.")}
    a.config = {"unet": a.config["unet"]}
    save_adapter(a, root / "unet_only.safetensors")
    mf.tiny_unet().save_pretrained(root / "unet")
    return {"unet_only": str(root / "unet_only.safetensors"), "unet": str(root / "unet")}


def run_steps(steps: list[list[str]], tmp_path: Path, shared: dict[str, str]) -> tuple[dict[str, str], dict[str, Any]]:
    """Run CLI steps (``{fx}`` the fixtures, ``{tmp}`` this test's folder, ``{unet_only}``/``{unet}`` the shared
    inputs); returns the first input's module names -> the last output's, composed from each step's ``--json``
    report (convert: source -> name; resize keeps names), and the last report."""
    names: dict[str, str] | None = None
    report: dict[str, Any] = {}
    for step in steps:
        argv = [a.format(fx=FIXTURES, tmp=tmp_path, **shared) for a in step]
        code, out, err = run_cli(*argv, "--json")
        assert code == 0, f"{' '.join(argv)}: {err}"
        report = json.loads(out)
        if argv[0] == "convert":
            step_names = {m["source"]: m["name"] for m in report["modules"]}
        else:
            step_names = {m["name"]: m["name"] for m in report["modules"]}
        assert len(set(step_names.values())) == len(step_names), "two modules written under one name"
        names = step_names if names is None else {k: step_names[v] for k, v in names.items()}
    assert names is not None
    return names, report


def check_source(
    source: Adapter, ours: Adapter, names: dict[str, str], report: dict[str, Any], exact: str | None
) -> None:
    """loratools' output (by output name; already checked equal to what the owner built) against its source, by
    mapped name, in float64: the full tensors it carries, the same delta and DoRA magnitude (``exact`` = "copy" or "fp32", see the module doc), or
    (``None``: resize) the truncation the report states, per module."""
    assert set(names) == set(source.modules)
    assert set(names.values()) == set(ours.modules)
    assert ours.extras.keys() == source.extras.keys()  # modules_to_save copies and saved embeddings carried over
    for key, extra in source.extras.items():
        assert extra.role == ours.extras[key].role and torch.equal(extra.ref.load(), ours.extras[key].ref.load()), key
    stated = {m["name"]: m for m in report["modules"]} if exact is None else {}
    for src, out in names.items():
        s, o = source.modules[src], ours.modules[out]
        want = s.delta(dtype=F64)
        got = o.delta(dtype=F64).reshape(want.shape)
        where = f"{src} -> {out}"
        if exact == "copy":
            kit.close(got, want, where, COPY)
            assert (s.magnitude is None) == (o.magnitude is None), where
            if s.magnitude is not None and o.magnitude is not None:
                torch.testing.assert_close(
                    o.magnitude.load().reshape(-1), s.magnitude.load().reshape(-1), rtol=0, atol=0
                )
        elif exact == "fp32":
            kit.close(got, want, where, dict(rtol=FP32_RTOL, atol=FP32_ATOL * float(want.abs().max())))
        else:
            e, n2 = stated[out]["energy"], float(want.pow(2).sum())
            assert float(got.pow(2).sum()) == pytest.approx(e * n2, rel=1e-6), where
            assert float((got - want).pow(2).sum()) == pytest.approx((1 - e) * n2, rel=1e-5, abs=1e-12 * n2), where
            assert o.rank == stated[out]["new_rank"], where


# ------------------------------------------------------------------------------------------------------------------
# PEFT folders, loaded by PEFT
# ------------------------------------------------------------------------------------------------------------------

_PATTERNS_VIA_KOHYA = [
    ["convert", "{fx}/peft_llama_patterns", "--to", "kohya", "-o", "{tmp}/k.safetensors"],
    ["convert", "{tmp}/k.safetensors", "--to", "peft", "-o", "{tmp}/out"],
]

#: case -> (CLI steps writing {tmp}/out, the builder of its base, the source it is compared with, how exactly)
PEFT_CASES: dict[str, tuple[list[list[str]], str, str, str | None]] = {
    # rsLoRA with rank_pattern/alpha_pattern through kohya's per-module alphas and back: patterns rebuilt
    "patterns-via-kohya": (_PATTERNS_VIA_KOHYA, "tiny_llama", "{fx}/peft_llama_patterns", "copy"),
    # per-module ranks chosen by --energy: a rank_pattern PEFT must honour module by module
    "resize-energy": (
        [["resize", "{fx}/peft_llama_patterns", "--energy", "0.9", "-o", "{tmp}/out"]],
        "tiny_llama", "{fx}/peft_llama_patterns", None,
    ),
    # DoRA magnitudes through kohya's dora_scale and back
    "dora-via-kohya": (
        [["convert", "{fx}/peft_llama_dora", "--to", "kohya", "-o", "{tmp}/k.safetensors"],
         ["convert", "{tmp}/k.safetensors", "--to", "peft", "-o", "{tmp}/out"]],
        "tiny_llama", "{fx}/peft_llama_dora", "copy",
    ),
    # an embedding LoRA and a modules_to_save copy of lm_head, carried by resize
    "resize-embedding-modules-to-save": (
        [["resize", "{fx}/peft_llama_embed", "--rank", "2", "-o", "{tmp}/out"]],
        "tiny_llama", "{fx}/peft_llama_embed", None,
    ),
    # a PEFT adapter of a diffusers UNet (conv LoRA, to_out.0 targets), from a diffusers file
    "unet-from-diffusers": (
        [["convert", "{unet_only}", "--to", "peft", "-o", "{tmp}/out"]], "tiny_unet", "{unet_only}", "copy",
    ),
}  # fmt: skip
SLOW_PEFT_CASES: dict[str, tuple[list[list[str]], str, str, str | None]] = {
    "alpha-bake": (
        [["convert", "{fx}/peft_llama_patterns", "--to", "peft", "--alpha-mode", "bake", "-o", "{tmp}/out"]],
        "tiny_llama", "{fx}/peft_llama_patterns", "fp32",
    ),
    "resize-rank": (
        [["resize", "{fx}/peft_llama_patterns", "--rank", "4", "-o", "{tmp}/out"]],
        "tiny_llama", "{fx}/peft_llama_patterns", None,
    ),
    "resize-gpt2-fan-in-fan-out": (
        [["resize", "{fx}/peft_gpt2", "--rank", "2", "-o", "{tmp}/out"]], "tiny_gpt2", "{fx}/peft_gpt2", None,
    ),
    "resize-dora-kept": (
        [["resize", "{fx}/peft_llama_dora", "--rank", "8", "-o", "{tmp}/out"]],
        "tiny_llama", "{fx}/peft_llama_dora", "copy",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", [*PEFT_CASES, *(pytest.param(c, marks=pytest.mark.slow) for c in SLOW_PEFT_CASES)])
def test_peft_loads_what_convert_and_resize_write(
    case: str, peft: ModuleType, mf: ModuleType, shared: dict[str, str], tmp_path: Path
) -> None:
    steps, builder, source, exact = (PEFT_CASES | SLOW_PEFT_CASES)[case]
    names, report = run_steps(steps, tmp_path, shared)
    out = tmp_path / "out"
    ours = load_adapter(out)
    base = getattr(mf, builder)()
    before = kit.snapshot(base)
    model = peft.PeftModel.from_pretrained(base, out)
    layers = kit.lora_layers(model, strip="base_model.model.")
    assert layers and set(layers) == set(ours.modules)
    for name, layer in layers.items():
        m = ours.modules[name]
        assert m.rank == layer.r["default"], name
        assert m.scale == pytest.approx(layer.scaling["default"], rel=1e-6), name
        assert (m.magnitude is not None) == ("default" in getattr(layer, "lora_magnitude_vector", {})), name
    if case == "resize-energy":
        assert len({m.rank for m in ours.modules.values()}) > 2  # really per-module ranks
    # the base with loratools' own weights: every targeted weight changed
    applied = kit.applied_state(before, ours)
    assert all(not torch.allclose(applied[f"{n}.weight"], before[f"{n}.weight"]) for n in ours.modules)
    # the model's output with the adapter active (PEFT's forward), and PEFT's merged weights
    reference = getattr(mf, builder)()
    reference.load_state_dict(applied, strict=True)
    kit.close(kit.model_output(model, builder), kit.model_output(reference, builder), "output", kit.OUT_TOL)
    with torch.no_grad():
        merged = kit.snapshot(model.merge_and_unload())
    assert merged.keys() == applied.keys()
    for key, w in applied.items():
        kit.close(merged[key], w, key)
    check_source(load_adapter(source.format(fx=FIXTURES, **shared)), ours, names, report, exact)


# ------------------------------------------------------------------------------------------------------------------
# diffusers and kohya files, loaded by diffusers
# ------------------------------------------------------------------------------------------------------------------

#: case -> (CLI steps writing {tmp}/out.safetensors, the source it is compared with, how exactly)
DIFFUSERS_CASES: dict[str, Any] = {
    # kohya names (UNet and text encoder, transformers-4 text_model names) and per-module alphas into diffusers'
    "kohya-to-diffusers": (
        [["convert", "{fx}/kohya_sd/lora.safetensors", "--to", "diffusers", "-o", "{tmp}/out.safetensors"]],
        "{fx}/kohya_sd/lora.safetensors", "copy",
    ),
    # LyCORIS LoKr -> LoRA through the dense delta (conv kernels known from LoKr's w2)
    "lokr-to-diffusers": (
        [["convert", "{fx}/lycoris_lokr.safetensors", "--to", "diffusers", "-o", "{tmp}/out.safetensors"]],
        "{fx}/lycoris_lokr.safetensors", "fp32",
    ),
    # a PEFT adapter of a UNet (no component prefix) back into diffusers' unet.-prefixed file
    "unet-peft-to-diffusers": (
        [["convert", "{unet_only}", "--to", "peft", "-o", "{tmp}/p"],
         ["convert", "{tmp}/p", "--to", "diffusers", "-o", "{tmp}/out.safetensors"]],
        "{unet_only}", "copy",
    ),
    # per-module ranks in diffusers' lora_adapter_metadata (rank_pattern / alpha_pattern per component)
    "resize-energy-diffusers": (
        [["resize", "{fx}/diffusers_sd", "--energy", "0.8", "-o", "{tmp}/out.safetensors"]], "{fx}/diffusers_sd", None,
    ),
    # kohya files through diffusers' kohya converter: UNet and the text encoder (moved from test_convert.py's
    # test_kohya_written_by_loratools_loads_in_diffusers, which checked the UNet half only)
    "diffusers-to-kohya": (
        [["convert", "{fx}/diffusers_sd", "--to", "kohya", "-o", "{tmp}/out.safetensors"]], "{fx}/diffusers_sd", "copy",
    ),
    "loha-to-diffusers-with-base": pytest.param(
        [["convert", "{fx}/lycoris_loha.safetensors", "--to", "diffusers", "--base", "{unet}",
          "-o", "{tmp}/out.safetensors"]],
        "{fx}/lycoris_loha.safetensors", "fp32",
    ),
}  # fmt: skip
SLOW_DIFFUSERS_CASES: dict[str, Any] = {
    "old-layout-to-diffusers": (
        [["convert", "{fx}/diffusers_sd_old", "--to", "diffusers", "-o", "{tmp}/out.safetensors"]],
        "{fx}/diffusers_sd_old", "copy",
    ),
    "lokr-full-to-diffusers": (
        [["convert", "{fx}/lycoris_lokr_full.safetensors", "--to", "diffusers", "-o", "{tmp}/out.safetensors"]],
        "{fx}/lycoris_lokr_full.safetensors", "fp32",
    ),
    "loha-tucker-to-diffusers-with-base": pytest.param(
        [["convert", "{fx}/lycoris_loha_tucker.safetensors", "--to", "diffusers", "--base", "{unet}",
          "-o", "{tmp}/out.safetensors"]],
        "{fx}/lycoris_loha_tucker.safetensors", "fp32",
    ),
    # one alpha: diffusers 0.42.1's kohya converter keeps per-module alphas of attention layers only when they all
    # agree (its alpha_pattern keys come out in the old attn-processor spelling), so a per-module --energy resize of
    # a kohya file is checked against lycoris' loader instead (test_lycoris_loads_a_resized_kohya_file)
    "resize-kohya-rank": (
        [["resize", "{fx}/kohya_sd/lora.safetensors", "--rank", "1", "-o", "{tmp}/out.safetensors"]],
        "{fx}/kohya_sd/lora.safetensors", None,
    ),
}  # fmt: skip


def _params(cases: dict[str, Any], *marks: Any) -> list[Any]:
    out = []
    for case, value in cases.items():
        if hasattr(value, "marks"):  # a pytest.param (a NamedTuple itself)
            out.append(pytest.param(case, *value.values, id=case, marks=(*value.marks, *marks)))
        else:
            out.append(pytest.param(case, *value, id=case, marks=marks))
    return out


@pytest.mark.parametrize(
    ("case", "steps", "source", "exact"),
    _params(DIFFUSERS_CASES) + _params(SLOW_DIFFUSERS_CASES, pytest.mark.slow),
)
def test_diffusers_loads_what_convert_and_resize_write(
    case: str, steps: list[list[str]], source: str, exact: str | None,
    diffusers: ModuleType, mf: ModuleType, shared: dict[str, str], tmp_path: Path,
) -> None:  # fmt: skip
    """Loaded as StableDiffusionPipeline.load_lora_weights loads it, fused layer by layer (PEFT's merge, what
    diffusers' fuse_lora runs), against loratools' own apply of the module."""
    names, report = run_steps(steps, tmp_path, shared)
    out = tmp_path / "out.safetensors"
    ours = load_adapter(out)
    original, layers, _, te = kit.diffusers_load(mf, out)
    # loratools' output names -> diffusers' module paths
    if ours.format == "kohya":
        peer = {}
        for p in layers:
            found = [k for k in kit.kohya_candidates(p) if k in ours.modules]
            assert len(found) == 1, (p, found)
            peer[found[0]] = p
    else:
        peer = {n: kit.peer_name(n, te) for n in ours.modules}
    assert set(peer.values()) == set(layers) and len(peer) == len(ours.modules)
    assert any(p.startswith("unet.") for p in layers)
    for name, m in ours.modules.items():
        layer = layers[peer[name]]
        assert m.rank == layer.r["default"], name
        assert m.scale == pytest.approx(layer.scaling["default"], rel=1e-6), name
        with torch.no_grad():
            layer.merge(adapter_names=["default"])
        kit.close(layer.get_base_layer().weight.detach(), m.apply(original[f"{peer[name]}.weight"]), f"{name} fused")
    if case == "resize-energy-diffusers":
        assert len({m.rank for m in ours.modules.values()}) > 1  # really per-module ranks
    check_source(load_adapter(source.format(fx=FIXTURES, **shared)), ours, names, report, exact)


@pytest.mark.slow
def test_lycoris_loads_a_resized_kohya_file(mf: ModuleType, tmp_path: Path) -> None:
    """A kohya file with per-module ranks and alphas (resize --energy) through lycoris' kohya loader (what
    sd-scripts-style consumers run): each layer's output against the base layer with loratools' merged weight."""
    pytest.importorskip("lycoris")
    names, report = run_steps(
        [["resize", "{fx}/kohya_sd/lora.safetensors", "--energy", "0.8", "-o", "{tmp}/out.safetensors"]], tmp_path, {}
    )
    ours = load_adapter(tmp_path / "out.safetensors")
    assert len({m.rank for m in ours.modules.values()}) > 1 and len({m.alpha for m in ours.modules.values()}) > 1
    unet, te = mf.tiny_unet(), mf.LegacyCLIPTextModel(mf.tiny_clip())
    original = {
        id(mod): mod.weight.detach().clone() for net in (unet, te) for mod in net.modules() if hasattr(mod, "weight")
    }
    net = mf.load_lycoris_kohya(tmp_path / "out.safetensors", unet, te)
    loras = list(net.unet_loras) + list(net.text_encoder_loras)
    assert {lm.lora_name for lm in loras} == set(ours.modules)
    g = torch.Generator().manual_seed(0)
    for lm in loras:
        org, m = lm.org_module[0], ours.modules[lm.lora_name]
        w = original[id(org)]
        with torch.no_grad():
            if isinstance(org, torch.nn.Linear):
                x = torch.randn(3, org.in_features, generator=g)
                want = torch.nn.functional.linear(x, m.apply(w), org.bias)
            else:
                x = torch.randn(1, org.in_channels, 4, 4, generator=g)
                want = torch.nn.functional.conv2d(
                    x, m.apply(w), org.bias, org.stride, org.padding, org.dilation, org.groups
                )
            kit.close(lm(x), want, lm.lora_name, kit.OUT_TOL)
    check_source(load_adapter(FIXTURES / "kohya_sd" / "lora.safetensors"), ours, names, report, None)


def test_loha_to_diffusers_without_base_loads_or_asks_for_base(
    diffusers: ModuleType, mf: ModuleType, tmp_path: Path
) -> None:
    out = tmp_path / "out.safetensors"
    src = FIXTURES / "lycoris_loha.safetensors"
    code, stdout, err = run_cli("convert", str(src), "--to", "diffusers", "-o", str(out), "--json")
    if code != 0:
        assert code == 1 and "--base" in err and not out.exists(), err
        return
    _, layers, _, _ = kit.diffusers_load(mf, out)
    ours = load_adapter(out)
    assert set(layers) == set(ours.modules)
    names = {m["source"]: m["name"] for m in json.loads(stdout)["modules"]}
    check_source(load_adapter(src), ours, names, {}, "fp32")
