"""kohya files of SDXL, Flux.1 and SD3 against the peers: loratools writes them from a diffusers LoRA of a tiny
model (its inverse rules), diffusers' own kohya converters and loaders read them back onto exactly the modules the
LoRA was made on with the same deltas, ``convert --to diffusers`` of them loads in diffusers the same way, and
kohya -> diffusers -> kohya gives back the same keys and tensors. Where diffusers' converter hard-codes Flux.1-dev's
widths (linear1), it reads a file of those widths with no model behind it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import families_kit as fk
import peers_kit as kit
import pytest
import safetensors.torch
import torch
from conftest import run_cli

from loratools import load_adapter
from loratools.errors import LoratoolsError
from loratools.ops.convert import convert


def convert_json(*args: str) -> dict[str, Any]:
    code, out, err = run_cli("convert", *args, "--json")
    assert code == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def same_file(a: Path, b: Path) -> None:
    x, y = tensors(a), tensors(b)
    assert set(x) == set(y), sorted(set(x) ^ set(y))[:6]
    for k in x:
        assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


def same_deltas(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """The LoRA layers a peer made: on exactly the modules of ``want``, with its deltas."""
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:6]
    for name, d in want.items():
        kit.close(got[name], d, name)


# ---- SDXL -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl(mf: Any, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("sdxl")
    base, lora, want = fk.sdxl_lora(mf, root, (31, 32, 33))
    return SimpleNamespace(root=root, base=base, diffusers=lora, deltas=want)


def sdxl_load(mf: Any, path: Path) -> dict[str, torch.Tensor]:
    """What diffusers' SDXL loader makes of a file (kohya's SGM names mapped with the UNet's config)."""
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin as XL

    unet, te, te2 = fk.sdxl_models(mf)
    with kit.loads_cleanly():
        sd, alphas, meta = XL.lora_state_dict(str(path.parent), weight_name=path.name, unet_config=unet.config,
                                              return_lora_metadata=True)  # fmt: skip
        XL.load_lora_into_unet(sd, alphas, unet, adapter_name="default", metadata=meta)
        XL.load_lora_into_text_encoder(sd, alphas, te, prefix="text_encoder", adapter_name="default", metadata=meta)
        XL.load_lora_into_text_encoder(sd, alphas, te2, prefix="text_encoder_2", adapter_name="default", metadata=meta)
    return fk.deltas(unet, "unet.") | fk.deltas(te, "text_encoder.") | fk.deltas(te2, "text_encoder_2.")


def test_sdxl_kohya_is_read_by_diffusers_and_converts_back(mf: Any, sdxl: SimpleNamespace) -> None:
    kohya, back, again = (sdxl.root / n for n in ("k.safetensors", "d.safetensors", "k2.safetensors"))
    convert_json(str(sdxl.diffusers), "--to", "kohya", "--base", str(sdxl.base), "-o", str(kohya))
    names = {k.split(".")[0] for k in tensors(kohya)}
    # kohya's SDXL names: SGM blocks for the UNet, transformers 4 CLIP paths for both text encoders
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in names  # down_blocks.1.attentions.0
    assert "lora_unet_output_blocks_0_1_transformer_blocks_1_ff_net_2" in names  # up_blocks.0.attentions.0, 2nd
    assert "lora_unet_output_blocks_1_2_conv" in names  # up_blocks.0.upsamplers.0
    assert "lora_unet_label_emb_0_0" in names and "lora_unet_input_blocks_0_0" in names  # add_embedding, conv_in
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc2" in names
    assert not [n for n in names if n.startswith("lora_unet_down_blocks")]
    same_deltas(sdxl_load(mf, kohya), sdxl.deltas)  # diffusers' own SGM block map and kohya converter
    convert_json(str(kohya), "--to", "diffusers", "--base", str(sdxl.base), "-o", str(back))
    assert all(k.startswith(("unet.down_blocks", "unet.up_blocks", "unet.mid_block", "unet.conv", "unet.time",
                             "unet.add_embedding", "text_encoder.text_model.", "text_encoder_2.text_model."))
               for k in tensors(back))  # fmt: skip
    same_deltas(sdxl_load(mf, back), sdxl.deltas)
    convert_json(str(back), "--to", "kohya", "--base", str(sdxl.base), "-o", str(again))
    same_file(kohya, again)  # kohya -> diffusers -> kohya: the same keys and tensors


def test_sdxl_kohya_with_another_unet_layout_is_refused_not_guessed(sdxl: SimpleNamespace, tmp_path: Path) -> None:
    """Without --base, SDXL's own block numbering applies; this tiny UNet's blocks are numbered otherwise, so its
    names are refused (naming them), never written as ``unet.input.blocks...``."""
    kohya = tmp_path / "k.safetensors"
    convert(sdxl.diffusers, "kohya", kohya, base=sdxl.base)
    with pytest.raises(LoratoolsError, match="not modules of SDXL") as e:
        convert(kohya, "diffusers", tmp_path / "d.safetensors")
    assert "lora_unet_input_blocks_2_0_op" in str(e.value) and "--base" in (e.value.hint or "")
    assert not (tmp_path / "d.safetensors").exists()


# ---- Flux.1 -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux(mf: Any, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin as F

    root = tmp_path_factory.mktemp("flux")
    model = fk.flux_model(mf)
    meta = fk.add_lora(mf, model, fk.FLUX_TARGETS, 41)
    with mf._quiet():
        F.save_lora_weights(str(root / "diffusers"), transformer_lora_layers=fk.lora_state(model),
                            transformer_lora_adapter_metadata=meta)  # fmt: skip
    return SimpleNamespace(root=root, diffusers=root / "diffusers" / "pytorch_lora_weights.safetensors",
                           deltas=fk.deltas(model, "transformer."))  # fmt: skip


def transformer_load(mf: Any, path: Path, build: Any, loader: Any) -> dict[str, torch.Tensor]:
    model = build(mf)
    with kit.loads_cleanly():
        sd, meta = loader.lora_state_dict(str(path.parent), weight_name=path.name, return_lora_metadata=True)
        model.load_lora_adapter(sd, prefix="transformer", adapter_name="default", metadata=meta)
    return fk.deltas(model, "transformer.")


def test_flux_kohya_fuses_qkv_and_linear1_and_converts_back(mf: Any, flux: SimpleNamespace) -> None:
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin as F

    kohya, back, again = (flux.root / n for n in ("k.safetensors", "d.safetensors", "k2.safetensors"))
    rep = convert_json(str(flux.diffusers), "--to", "kohya", "-o", str(kohya))
    t = tensors(kohya)
    # q, k, v (rank 2 each) fused block-diagonally at rank 6; linear1 = q, k, v + the MLP input at rank 8
    assert t["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (6, 16)
    assert t["lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight"].shape == (48, 6)
    assert t["lora_unet_single_blocks_1_linear1.lora_up.weight"].shape == (16 * 3 + 64, 8)
    assert {
        "lora_unet_final_layer_adaLN_modulation_1.alpha",
        "lora_unet_img_in.alpha",
        "lora_unet_guidance_in_out_layer.alpha",
        "lora_unet_double_blocks_0_txt_mod_lin.alpha",
    } <= set(t)
    assert any("fused" in n for n in rep["notes"])
    convert_json(str(kohya), "--to", "diffusers", "-o", str(back))
    same_deltas(transformer_load(mf, back, fk.flux_model, F), flux.deltas)
    got, want = load_adapter(back), load_adapter(flux.diffusers)  # split back exactly: the same factors
    assert set(got.modules) == set(want.modules)
    for name, m in want.modules.items():
        assert torch.equal(got.modules[name].factors["up"].load(), m.factors["up"].load()), name
        assert torch.equal(got.modules[name].factors["down"].load(), m.factors["down"].load()), name
        assert got.modules[name].scale == m.scale, name
    convert_json(str(back), "--to", "kohya", "-o", str(again))
    same_file(kohya, again)
    # diffusers' own kohya Flux converter reads what it can on this tiny model (it splits linear1 at Flux.1-dev's
    # widths, and writes the embedders without their `transformer.` prefix: those are left out here)
    skip = ("linear1", "_in_", "img_in", "txt_in", "final_layer")
    part = {k: v for k, v in t.items() if not any(s in k.split(".")[0] for s in skip)}
    model = fk.flux_model(mf)
    with kit.loads_cleanly():
        sd = F.lora_state_dict(part)
        model.load_lora_adapter(sd, prefix="transformer", adapter_name="default")
    ref = fk.deltas(model, "transformer.")
    assert ref and all(name in flux.deltas for name in ref)
    for name, d in ref.items():
        kit.close(d, flux.deltas[name], name)


def _lora(g: torch.Generator, out: int, inp: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(r, inp, generator=g) * 0.1, torch.randn(out, r, generator=g) * 0.1


def test_flux_kohya_of_flux1_dev_widths_reads_as_diffusers_reads_it(tmp_path: Path) -> None:
    """A kohya Flux file at Flux.1-dev's widths (linear1 = 3 x 3072 + 12288 rows, as diffusers' converter splits it),
    no model behind it: ``convert --to diffusers`` gives the modules and deltas diffusers'
    ``_convert_kohya_flux_lora_to_diffusers`` gives (alpha baked there), for a shared-down qkv, a block-diagonal
    (split-qkv) one, linear1, the modulations, the embedders and the final layer (its halves swapped)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    g = torch.Generator().manual_seed(9)
    h, r = 3072, 2
    sd: dict[str, torch.Tensor] = {}

    def put(name: str, out: int, inp: int, alpha: float | None, rank: int = r) -> None:
        down, up = _lora(g, out, inp, rank)
        sd[f"lora_unet_{name}.lora_down.weight"], sd[f"lora_unet_{name}.lora_up.weight"] = down, up
        if alpha is not None:
            sd[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)

    put("double_blocks_0_img_attn_qkv", 3 * 8, 8, 3.0)
    down, up = _lora(g, 8, 8, 2)
    blocks = [_lora(g, 8, 8, 2) for _ in range(3)]  # split-qkv training: block-diagonal up, stacked downs
    sd["lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight"] = torch.cat([d for d, _ in blocks])
    sd["lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight"] = torch.block_diag(*[u for _, u in blocks])
    sd["lora_unet_double_blocks_0_txt_attn_qkv.alpha"] = torch.tensor(6.0)
    for name, out, inp in (("double_blocks_0_img_attn_proj", 8, 8), ("double_blocks_0_img_mlp_0", 32, 8),
                           ("double_blocks_0_txt_mlp_2", 8, 32), ("double_blocks_0_img_mod_lin", 48, 8),
                           ("double_blocks_0_txt_mod_lin", 48, 8), ("single_blocks_0_linear2", 8, 40),
                           ("single_blocks_0_modulation_lin", 24, 8), ("img_in", 8, 4), ("txt_in", 8, 16),
                           ("time_in_in_layer", 8, 4), ("guidance_in_out_layer", 8, 8)):  # fmt: skip
        put(name, out, inp, 1.0)
    put("single_blocks_0_linear1", 3 * h + 4 * h, h, 4.0)
    put("final_layer_adaLN_modulation_1", 16, 8, None)  # diffusers ignores this alpha: none here
    put("final_layer_linear", 4, 8, None)
    path = tmp_path / "flux.safetensors"
    safetensors.torch.save_file(sd, str(path))
    ref = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in sd.items()})
    want: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in ref.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            name = module if module.startswith("transformer.") else "transformer." + module  # diffusers drops it
            want[name] = ref[module + ".lora_B.weight"], a
    convert(path, "diffusers", tmp_path / "d.safetensors")
    got = load_adapter(tmp_path / "d.safetensors")
    assert set(got.modules) == set(want), sorted(set(got.modules) ^ set(want))
    for name, (up, down) in want.items():
        same_product(got.modules[name], up, down, name)
    assert got.modules["transformer.transformer_blocks.0.attn.add_q_proj"].rank == 2  # the diagonal block alone
    assert got.modules["transformer.single_transformer_blocks.0.proj_mlp"].factors["up"].shape == (4 * h, r)
    convert(tmp_path / "d.safetensors", "kohya", tmp_path / "k.safetensors")
    back = tensors(tmp_path / "k.safetensors")
    for k, v in sd.items():  # the fused modules come back as they were; alphas as floats
        assert torch.equal(back[k].to(v.dtype), v) if not k.endswith(".alpha") else float(back[k]) == float(v), k
    assert set(back) - set(sd) == {
        "lora_unet_final_layer_adaLN_modulation_1.alpha",
        "lora_unet_final_layer_linear.alpha",
    }


def same_product(m: Any, up: torch.Tensor, down: torch.Tensor, name: str) -> None:
    """A plain LoRA module's delta (up @ down * scale) equals ``up @ down``, seen through random probes (the deltas
    of Flux.1-dev's widths are too big to build in a fast test; a product that differs shows on a random probe)."""
    assert m.kind == "lora", name
    x = torch.randn(down.shape[1], 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = m.factors["up"].load().double() @ (m.factors["down"].load().double() @ x) * m.scale
    # diffusers bakes alpha into fp32 factors: a few fp32 roundings, summed over thousands of columns
    kit.close(got, up.double() @ (down.double() @ x), name)


#: Flux.1-dev's real widths: hidden 3072, MLP 4 x 3072, modulation 6 (double) / 3 (single) x hidden, CLIP-L 768
FLUX_DEV_MODULES: tuple[tuple[str, int, int], ...] = tuple(
    (f"double_blocks_{i}_{s}_{name}", out, inp)
    for i in (0, 7) for s in ("img", "txt")
    for name, out, inp in (("attn_qkv", 3 * 3072, 3072), ("attn_proj", 3072, 3072), ("mlp_0", 12288, 3072),
                           ("mlp_2", 3072, 12288), ("mod_lin", 6 * 3072, 3072))
) + tuple(
    (f"single_blocks_{i}_{name}", out, inp)
    for i in (0, 37)
    for name, out, inp in (("linear1", 3 * 3072 + 12288, 3072), ("linear2", 3072, 3072 + 12288),
                           ("modulation_lin", 3 * 3072, 3072))
) + (("img_in", 3072, 64), ("txt_in", 3072, 4096), ("time_in_in_layer", 3072, 256), ("time_in_out_layer", 3072, 3072),
     ("vector_in_in_layer", 3072, 768), ("vector_in_out_layer", 3072, 3072), ("guidance_in_in_layer", 3072, 256),
     ("guidance_in_out_layer", 3072, 3072), ("final_layer_linear", 64, 3072),
     ("final_layer_adaLN_modulation_1", 2 * 3072, 3072))  # fmt: skip


def test_flux_kohya_at_flux1_dev_widths_every_module_as_diffusers_converts_it(tmp_path: Path) -> None:
    """Every kind of module of a kohya/BFL Flux.1 LoRA (two double blocks, two single blocks, the embedders, the
    final layer) and CLIP-L's (``lora_te1_``), all at Flux.1-dev's real widths (no model behind them: LoRA factors
    are small at any width), ranks 2 to 4, each its own alpha: diffusers' own ``_convert_kohya_flux_lora_to_diffusers``
    and ``convert --to diffusers`` give the same modules with the same deltas (up @ down * alpha / rank; diffusers
    bakes alpha into the factors), and ``convert --to kohya`` gives the file back exactly.

    Names: diffusers' converter writes the text encoder under ``text_encoder.`` as loratools does, and the
    transformer's modules without ``transformer.`` (its loader puts it on when none of the keys have it):
    loratools names them with it. Where they differ: diffusers 0.42.1 reads the final layer's ``.alpha`` and drops
    it (scale 1 there; sd-scripts and loratools scale by alpha / rank). BFL-named files with PEFT suffixes
    (``double_blocks.0.img_attn.qkv.lora_A``: diffusers' ``_convert_bfl_flux_control_lora_to_diffusers`` and
    ``_convert_fal_kontext_lora_to_diffusers``) are Control / Kontext LoRAs with full norm weights, which loratools
    does not read. There is no kohya SD3 converter in diffusers 0.42 (``lora_conversion_utils`` has no
    ``joint_blocks``): SD3's oracle is the single-file converter (test_families.py) and the loader."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    g = torch.Generator().manual_seed(19)
    sd: dict[str, torch.Tensor] = {}
    te = [(f"lora_te1_text_model_encoder_layers_{i}_{n}", o, k) for i in (0, 11)
          for n, o, k in (("self_attn_q_proj", 768, 768), ("self_attn_out_proj", 768, 768), ("mlp_fc1", 3072, 768),
                          ("mlp_fc2", 768, 3072))]  # fmt: skip
    for n, (name, out, inp) in enumerate([("lora_unet_" + m, o, i) for m, o, i in FLUX_DEV_MODULES] + te):
        r = 2 + n % 3
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = _lora(g, out, inp, r)
        sd[f"{name}.alpha"] = torch.tensor(float(1 + n % 5))
    path = tmp_path / "flux_dev.safetensors"
    safetensors.torch.save_file(sd, str(path))
    ref = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in sd.items()})
    te_ref = {k: v for k, v in ref.items() if k.startswith("text_encoder.")}  # `self_attn.to_q_lora.down`: as
    ref = {k: v for k, v in ref.items() if k not in te_ref}  # diffusers' text-encoder loader reads it, to PEFT names
    ref |= convert_state_dict_to_peft(convert_state_dict_to_diffusers(te_ref))
    want: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in ref.items():
        assert key.endswith((".lora_A.weight", ".lora_B.weight")), key  # no alpha, no other key left
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            name = module if module.startswith(("transformer.", "text_encoder.")) else "transformer." + module
            want[name] = ref[module + ".lora_B.weight"], a
    # diffusers 0.42.1 drops the final layer's alphas (assign_remaining_weights pops them unread), so it loads those
    # two modules at scale 1; sd-scripts scales every module by alpha / rank, and so does loratools
    for k in ("final_layer_linear", "final_layer_adaLN_modulation_1"):
        name = {"final_layer_linear": "transformer.proj_out"}.get(k, "transformer.norm_out.linear")
        up, down = want[name]
        want[name] = up * (float(sd[f"lora_unet_{k}.alpha"]) / down.shape[0]), down
    assert len(want) == 2 * 2 * 7 + 2 * 6 + 10 + 8  # qkv -> q, k, v; linear1 -> q, k, v, proj_mlp
    convert(path, "diffusers", tmp_path / "d.safetensors")
    got = load_adapter(tmp_path / "d.safetensors")
    assert set(got.modules) == set(want), sorted(set(got.modules) ^ set(want))[:6]
    for name, (up, down) in want.items():
        same_product(got.modules[name], up, down, name)
    convert(tmp_path / "d.safetensors", "kohya", tmp_path / "k.safetensors")
    back = tensors(tmp_path / "k.safetensors")
    assert set(back) == set(sd), sorted(set(back) ^ set(sd))[:6]
    for k, v in sd.items():
        assert torch.equal(back[k].to(v.dtype), v), k


def xlabs_file(path: Path, h: int, r: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(10)
    sd: dict[str, torch.Tensor] = {}
    for name, out, inp in (("double_blocks.0.processor.qkv_lora1", 3 * h, h), ("double_blocks.0.processor.proj_lora1", h, h),
                           ("double_blocks.0.processor.qkv_lora2", 3 * h, h), ("double_blocks.0.processor.proj_lora2", h, h),
                           ("single_blocks.1.processor.qkv_lora", 3 * h, h),
                           ("single_blocks.1.processor.proj_lora", h, 5 * h)):  # fmt: skip
        sd[f"{name}.down.weight"], sd[f"{name}.up.weight"] = _lora(g, out, inp, r)
    safetensors.torch.save_file(sd, str(path))
    return sd


def test_xlabs_flux_reads_as_diffusers_reads_it(mf: Any, tmp_path: Path) -> None:
    """XLabs' processor names (``double_blocks.0.processor.qkv_lora1``): read as the BFL modules they add to,
    converted to the modules and deltas of diffusers' ``_convert_xlabs_flux_lora_to_diffusers``, and loaded by
    diffusers into a tiny Flux with no key left over."""
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin as F

    path = tmp_path / "xlabs.safetensors"
    sd = xlabs_file(path, 16)
    a = load_adapter(path)
    assert a.format == "kohya" and "lora_unet_single_blocks_1_linear1" in a.modules
    ref = _convert_xlabs_flux_lora_to_diffusers({k: v.clone() for k, v in sd.items()})
    want = {k.removesuffix(".lora_A.weight"): ref[k.replace("lora_A", "lora_B")].double() @ v.double()
            for k, v in ref.items() if k.endswith(".lora_A.weight")}  # fmt: skip
    out = tmp_path / "d.safetensors"
    convert(path, "diffusers", out)
    got = load_adapter(out)
    assert set(got.modules) == set(want)  # linear1's padded MLP rows are all zero: no proj_mlp module
    for name, d in want.items():
        torch.testing.assert_close(got.modules[name].delta(torch.float64), d, rtol=1e-6, atol=1e-9, msg=name)
    loaded = transformer_load(mf, out, fk.flux_model, F)
    same_deltas(loaded, {n: d.float() for n, d in want.items()})


def test_fusing_a_missing_part_and_recompressing(flux: SimpleNamespace, tmp_path: Path) -> None:
    """q and v without k fuse with zero rows for k (and split back without it); --rank re-compresses a fused
    module to the optimal rank, the energy kept reported."""
    from loratools import save_adapter

    a = load_adapter(flux.diffusers)
    a.modules = {n: m for n, m in a.modules.items() if n.startswith("transformer.transformer_blocks.0.attn.to_")
                 and not n.endswith("to_k")}  # fmt: skip
    a.config = {"transformer": a.config["transformer"]}
    src = tmp_path / "qv.safetensors"
    save_adapter(a, src)
    # these names are Flux's and SD3's alike, and their kohya names differ: refused unless something tells
    with pytest.raises(LoratoolsError, match="Flux.1 or SD3") as e:
        convert(src, "kohya", tmp_path / "k.safetensors")
    assert "--base" in (e.value.hint or "")
    a.metadata["modelspec.architecture"] = "flux-1-dev/lora"
    src.unlink()
    save_adapter(a, src)
    convert(src, "kohya", tmp_path / "k.safetensors")
    k = load_adapter(tmp_path / "k.safetensors")
    qkv = k.modules["lora_unet_double_blocks_0_img_attn_qkv"].delta(torch.float64)
    assert not qkv[16:32].any()  # k's rows
    torch.testing.assert_close(qkv[:16], a.modules["transformer.transformer_blocks.0.attn.to_q"].delta(torch.float64))
    convert(tmp_path / "k.safetensors", "diffusers", tmp_path / "d.safetensors")
    back = load_adapter(tmp_path / "d.safetensors")
    assert set(back.modules) == set(a.modules) and "transformer.transformer_blocks.0.attn.to_k" not in back.modules
    rep = convert(src, "kohya", tmp_path / "k2.safetensors", rank=3)
    fused = [m for m in rep.modules if m.name == "lora_unet_double_blocks_0_img_attn_qkv"]
    assert len(fused) == 1 and fused[0].rank == 3 and 0 < fused[0].energy < 1 and "re-compressed" in fused[0].note
    s = torch.linalg.svdvals(qkv)
    got = load_adapter(tmp_path / "k2.safetensors").modules["lora_unet_double_blocks_0_img_attn_qkv"]
    err = float((got.delta(torch.float64) - qkv).norm())
    assert err == pytest.approx(float(s[3:].norm()), rel=1e-4)  # Eckart-Young: the optimal rank-3 error
    assert fused[0].energy == pytest.approx(float((s[:3] ** 2).sum() / (s**2).sum()), rel=1e-6)


# ---- SD3 / SD3.5 ------------------------------------------------------------------------------------------------


def test_sd3_kohya_joint_blocks_and_back(mf: Any, tmp_path: Path) -> None:
    """SD3 (with SD3.5 Medium's attn2 and qk norms): diffusers -> kohya (sd-scripts' ``lora_unet_joint_blocks_N_
    x_block_attn_qkv``, q/k/v fused; the last context block's modulation, a 2 x hidden AdaLayerNormContinuous,
    with its halves swapped as single files store it) -> diffusers, which diffusers loads onto the same modules
    with the same deltas; kohya -> diffusers -> kohya gives the same tensors."""
    from diffusers.loaders.lora_pipeline import SD3LoraLoaderMixin as S

    model = fk.sd3_model(mf)
    meta = fk.add_lora(mf, model, fk.SD3_TARGETS, 51)
    with mf._quiet():
        S.save_lora_weights(str(tmp_path / "diffusers"), transformer_lora_layers=fk.lora_state(model),
                            transformer_lora_adapter_metadata=meta)  # fmt: skip
    want = fk.deltas(model, "transformer.")
    src = tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"
    kohya, back, again = (tmp_path / n for n in ("k.safetensors", "d.safetensors", "k2.safetensors"))
    convert_json(str(src), "--to", "kohya", "-o", str(kohya))  # pos_embed.proj tells SD3 from Flux
    t = tensors(kohya)
    assert t["lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_up.weight"].shape == (48, 6)
    assert "lora_unet_joint_blocks_1_context_block_attn_qkv.lora_down.weight" in t
    assert "lora_unet_x_embedder_proj.lora_down.weight" in t and "lora_unet_t_embedder_mlp_0.alpha" in t
    last = "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_up.weight"
    up = load_adapter(src).modules["transformer.transformer_blocks.1.norm1_context.linear"].factors["up"].load()
    assert torch.equal(t[last], torch.cat(up.chunk(2)[::-1]))  # (shift, scale) in the original
    convert_json(str(kohya), "--to", "diffusers", "-o", str(back))
    same_deltas(transformer_load(mf, back, fk.sd3_model, S), want)
    convert_json(str(back), "--to", "kohya", "-o", str(again))
    same_file(kohya, again)


# ---- SD 1.x: what sd-scripts reads ------------------------------------------------------------------------------


def test_sd_kohya_names_are_those_sd_scripts_creates(mf: Any, tmp_path: Path) -> None:
    """sd-scripts' networks/lora.py names each LoRA module ``lora_unet_`` / ``lora_te_`` + the module's path with
    ``_`` for ``.``, its text encoder a transformers 4 CLIP (``text_model.encoder...``): a module written under any
    other name is skipped there without a word. A diffusers file written with transformers 5 (no ``text_model.``)
    converts to exactly those names."""
    from conftest import FIXTURES

    known = {"lora_unet_" + n.replace(".", "_") for n, m in mf.tiny_unet().named_modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}  # fmt: skip
    known |= {"lora_te_" + n.replace(".", "_") for n, m in mf.LegacyCLIPTextModel(mf.tiny_clip()).named_modules()
              if isinstance(m, torch.nn.Linear)}  # fmt: skip
    src = FIXTURES / "diffusers_sd"
    assert any(k.startswith("text_encoder.encoder.layers.") for k in load_adapter(src).modules)
    convert(src, "kohya", tmp_path / "k.safetensors")
    names = set(load_adapter(tmp_path / "k.safetensors").modules)
    assert names <= known, sorted(names - known)[:5]
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names


def test_a_key_diffusers_leaves_unloaded_fails_the_load_check(mf: Any, flux: SimpleNamespace, tmp_path: Path) -> None:
    """The check every peer load here runs under (:func:`peers_kit.loads_cleanly`) fails on what diffusers says of
    a file with a module the model does not have (``transformer_blocks.5``: this Flux has one double block)."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin as F

    sd = tensors(flux.diffusers)
    for ab in ("A", "B"):
        sd[f"transformer.transformer_blocks.5.attn.to_q.lora_{ab}.weight"] = sd[
            f"transformer.transformer_blocks.0.attn.to_q.lora_{ab}.weight"
        ].clone()
    path = tmp_path / "extra.safetensors"
    safetensors.torch.save_file(sd, str(path))
    with pytest.raises(AssertionError, match="unexpected keys"):
        transformer_load(mf, path, fk.flux_model, F)
