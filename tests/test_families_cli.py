"""What users see of the family tables: inspect's base model and targets by block kind, its module names in 80
columns, and validate --for diffusers on names no loader knows."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from conftest import FIXTURES, run_cli

from loratools import load_adapter, save_adapter
from loratools.ops.validate import validate


def sdxl_kohya(path: Path) -> Path:
    """A kohya SDXL file with its usual names (SGM UNet blocks, two text encoders), no metadata."""
    g = torch.Generator().manual_seed(1)
    sd = {}
    for name, out, inp in (("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 640, 640),
                           ("lora_unet_input_blocks_4_1_transformer_blocks_1_ff_net_2", 640, 2560),
                           ("lora_unet_output_blocks_2_2_conv", 1280, 1280),
                           ("lora_unet_input_blocks_1_0_in_layers_2", 320, 320),
                           ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768),
                           ("lora_te2_text_model_encoder_layers_0_mlp_fc1", 5120, 1280)):  # fmt: skip
        conv = "conv" in name or "layers_2" in name
        sd[f"{name}.lora_down.weight"] = torch.randn(2, inp, *((3, 3) if conv else ()), generator=g) * 0.01
        sd[f"{name}.lora_up.weight"] = torch.randn(out, 2, *((1, 1) if conv else ()), generator=g) * 0.01
        sd[f"{name}.alpha"] = torch.tensor(1.0)
    safetensors.torch.save_file(sd, str(path))
    return path


def test_inspect_says_sdxl_and_groups_targets(tmp_path: Path) -> None:
    src = sdxl_kohya(tmp_path / "sdxl.safetensors")
    data = json.loads(run_cli("inspect", str(src), "--json", "--fast")[1])
    assert data["family"]["id"] == "sdxl" and data["family"]["from"] == "keys"
    assert data["target_modules"] == {"text_encoder attention": 1, "text_encoder_2 mlp": 1, "unet attention": 1,
                                      "unet conv": 2, "unet ff": 1}  # fmt: skip
    code, out, _ = run_cli("inspect", str(src), "--fast")
    assert code == 0 and "SDXL (from the module names)" in out
    # LLM adapters keep their targets by module leaf, and name their layout
    llm = json.loads(run_cli("inspect", str(FIXTURES / "peft_llama"), "--json")[1])
    assert llm["target_modules"] == {"k_proj": 2, "o_proj": 2, "q_proj": 2, "v_proj": 2}
    assert llm["family"]["id"] == "llama"


def test_inspect_module_names_fold_in_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row fits in 80 columns and every module's own part is printed whole (no "..."): names sharing a
    block print the block once, as a tree."""
    from rich.console import Console

    import loratools.cli.inspect as cli_inspect

    monkeypatch.setattr(cli_inspect, "out_console", lambda: Console(file=sys.stdout, width=80))
    code, out, _ = run_cli("inspect", str(FIXTURES / "kohya_sd" / "lora.safetensors"), "--fast")
    assert code == 0
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in out
    rows = [line.split()[0] for line in lines if " lora " in line]
    assert len(rows) == 89 and "self_attn_q_proj" in rows and "attn1_to_out_0" in rows
    assert sum("lora_te_" in line for line in lines) == 1  # the text encoder's block, once
    assert cli_inspect.folded(["a.layers.0.q", "a.layers.0.k", "a.layers.1.q"]) == [
        (["a.layers.0."], " q"), ([], " k"), (["a.layers.1."], " q")]  # fmt: skip


def test_validate_for_diffusers_refuses_names_no_loader_knows(tmp_path: Path) -> None:
    """The names the old convert wrote for SDXL (``unet.input.blocks.4.1...``) load nowhere: an error, not OK."""

    def consumer(path: Path) -> list[str]:
        return [f.message for f in validate(path, for_="diffusers").findings if f.code == "consumer"]

    a = load_adapter(FIXTURES / "diffusers_sd")
    a.modules = {n.replace("unet.down_blocks.0", "unet.input.blocks.1").replace("unet.mid_block", "unet.middle.block"):
                 m for n, m in a.modules.items()}  # fmt: skip
    for n, m in a.modules.items():
        m.name = n
    save_adapter(a, tmp_path / "bad.safetensors")
    found = consumer(tmp_path / "bad.safetensors")
    assert any("unet.input.blocks.1" in m and "no module of" in m for m in found), found
    assert consumer(FIXTURES / "diffusers_sd") == [] and consumer(FIXTURES / "kohya_sd" / "lora.safetensors") == []
    bad = tmp_path / "bad_kohya.safetensors"
    sd = safetensors.torch.load_file(str(sdxl_kohya(tmp_path / "k.safetensors")))
    sd = {k.replace("input_blocks_4_1", "input_blocks_0_1"): v for k, v in sd.items()}  # conv_in has no attention
    safetensors.torch.save_file(sd, str(bad))
    assert any("lora_unet_input_blocks_0_1" in m for m in consumer(bad))
    assert consumer(tmp_path / "k.safetensors") == []


def test_sdxl_kohya_converts_with_sdxl_s_own_numbering(tmp_path: Path) -> None:
    """The issue's case: an SDXL kohya file converted --to diffusers without --base gets diffusers' names from
    SDXL's own config, never ``unet.input.blocks...``."""
    src = sdxl_kohya(tmp_path / "sdxl.safetensors")
    code, out, err = run_cli("convert", str(src), "--to", "diffusers", "-o", str(tmp_path / "d.safetensors"), "--json")
    assert code == 0, err
    names = {m["source"]: m["name"] for m in json.loads(out)["modules"]}
    assert names == {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "lora_unet_input_blocks_4_1_transformer_blocks_1_ff_net_2":
            "unet.down_blocks.1.attentions.0.transformer_blocks.1.ff.net.2",
        "lora_unet_output_blocks_2_2_conv": "unet.up_blocks.0.upsamplers.0.conv",
        "lora_unet_input_blocks_1_0_in_layers_2": "unet.down_blocks.0.resnets.0.conv1",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1": "text_encoder_2.text_model.encoder.layers.0.mlp.fc1",
    }  # fmt: skip
    back: Any = tmp_path / "k.safetensors"
    assert run_cli("convert", str(tmp_path / "d.safetensors"), "--to", "kohya", "-o", str(back))[0] == 0
    a, b = safetensors.torch.load_file(str(src)), safetensors.torch.load_file(str(back))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_text_encoder_only_lora_needs_to_know_its_model(tmp_path: Path) -> None:
    """A diffusers LoRA of a CLIP text encoder alone fits SD 1.x (kohya: ``lora_te_``) and SDXL / Flux / SD3
    (``lora_te1_``) alike: refused rather than guessed, and written as the metadata says once it says."""
    from loratools.errors import LoratoolsError
    from loratools.ops.convert import convert

    a = load_adapter(FIXTURES / "diffusers_sd")
    a.modules = {n: m for n, m in a.modules.items() if n.startswith("text_encoder.")}
    a.config = {"text_encoder": a.config["text_encoder"]}
    save_adapter(a, tmp_path / "te.safetensors")
    with pytest.raises(LoratoolsError, match="CLIP text encoder") as e:
        convert(tmp_path / "te.safetensors", "kohya", tmp_path / "k.safetensors")
    assert "--base" in (e.value.hint or "") and not (tmp_path / "k.safetensors").exists()
    for arch, prefix in (("stable-diffusion-xl-v1-base/lora", "lora_te1_"), ("stable-diffusion-v1/lora", "lora_te_")):
        a.metadata["modelspec.architecture"] = arch
        src, out = tmp_path / f"{prefix}.safetensors", tmp_path / f"{prefix}k.safetensors"
        save_adapter(a, src)
        convert(src, "kohya", out)
        assert {n.split("text_model")[0] for n in load_adapter(out).modules} == {prefix}
