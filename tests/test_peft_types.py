"""PEFT's other adapter types (LoHa, LoKr, AdaLoRA, VeRA) against PEFT itself: loratools' merge equals PEFT's
``merge_and_unload`` on the tiny Llama the committed fixtures were made on; inspect shows each module's type and
rank; LoHa / LoKr go PEFT -> kohya -> PEFT exactly, and LyCORIS kohya files -> PEFT load in PEFT with the
deltas LyCORIS meant; every other PEFT type is refused by name."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from types import ModuleType

import peers_kit as kit
import pytest
import torch
from conftest import FIXTURES, run_cli
from safetensors.torch import load_file

from loratools import load_adapter
from loratools.errors import FileFormatError
from loratools.formats.peft_types import factorization
from loratools.ops.convert import convert

TYPES = {
    "peft_llama_loha": "loha",
    "peft_llama_lokr": "lokr",
    "peft_llama_adalora": "adalora",
    "peft_llama_vera": "vera",
}


def peft_merged(mf: ModuleType, builder: str, folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the base's weights, PEFT's merge_and_unload of ``folder`` on it)."""
    from peft import PeftModel

    base = getattr(mf, builder)()
    before = kit.snapshot(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # target_modules matching layers the file has no factors for
        model = PeftModel.from_pretrained(base, str(folder))
    with torch.no_grad():
        return before, kit.snapshot(model.merge_and_unload())


@pytest.mark.parametrize("fixture", sorted(TYPES))
def test_merge_equals_peft_merge_and_unload(fixture: str, mf: ModuleType, tmp_path: Path) -> None:
    before, merged = peft_merged(mf, "tiny_llama", FIXTURES / fixture)
    mf.tiny_llama().save_pretrained(tmp_path / "base")
    code, _, err = run_cli("merge", str(tmp_path / "base"), str(FIXTURES / fixture), "-o", str(tmp_path / "out"))
    assert code == 0, err
    ours = load_file(tmp_path / "out" / "model.safetensors")
    changed = [k for k in merged if not torch.equal(merged[k], before[k])]
    assert changed and all(k in ours for k in changed)
    for key in changed:
        kit.close(ours[key], merged[key], key)
    # and the model's view of each module (the math a mix or a convert starts from)
    applied = kit.applied_state(before, load_adapter(FIXTURES / fixture))
    for key, w in merged.items():
        kit.close(applied[key], w, key)


def test_inspect_shows_each_modules_type_and_rank() -> None:
    for fixture, kind in TYPES.items():
        code, out, _ = run_cli("inspect", str(FIXTURES / fixture), "--json")
        assert code == 0
        rep = json.loads(out)
        assert rep["types"] == {kind: rep["num_modules"]}
        cfg = json.loads((FIXTURES / fixture / "adapter_config.json").read_text())
        ranks = {m["name"]: m["rank"] for m in rep["modules"]}
        if kind == "loha":
            assert ranks["model.layers.0.self_attn.v_proj"] == 2 and ranks["model.layers.0.self_attn.q_proj"] == 4
        if kind == "lokr":  # k_proj keeps a low-rank w2 (rank 2); the full-matrix modules have none
            assert ranks["model.layers.0.self_attn.k_proj"] == 2 and ranks["model.layers.0.self_attn.q_proj"] is None
        if kind == "adalora":  # the rank each mask keeps; a module pruned to nothing is left out
            masks = {k.removesuffix(".lora_E"): sum(v) for k, v in cfg["rank_pattern"].items()}
            assert ranks == {k: v for k, v in masks.items() if v}
        if kind == "vera":
            assert set(ranks.values()) == {cfg["r"]}


@pytest.mark.parametrize("fixture", ["peft_llama_loha", "peft_llama_lokr"])
def test_peft_to_kohya_to_peft_is_exact(fixture: str, mf: ModuleType, tmp_path: Path) -> None:
    src = FIXTURES / fixture
    convert(src, "kohya", tmp_path / "k.safetensors")
    kohya = load_adapter(tmp_path / "k.safetensors")
    assert {m.kind for m in kohya.modules.values()} == {TYPES[fixture]}
    rep = convert(tmp_path / "k.safetensors", "peft", tmp_path / "back")
    assert not any(m.note for m in rep.modules)  # no module became LoRA
    back, source = load_adapter(tmp_path / "back"), load_adapter(src)
    assert back.config["peft_type"] == source.config["peft_type"]
    a, b = load_file(src / "adapter_model.safetensors"), load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        if fixture == "peft_llama_loha" or ".lokr_w1" not in key:
            assert torch.equal(a[key], b[key]), key
    for name, m in source.modules.items():  # a full-matrix LoKr's w1 carries PEFT's alpha / r: same delta
        torch.testing.assert_close(back.modules[name].delta(), m.delta(), rtol=0, atol=0)
    _, want = peft_merged(mf, "tiny_llama", src)
    _, got = peft_merged(mf, "tiny_llama", tmp_path / "back")
    for key, w in want.items():
        kit.close(got[key], w, key)


@pytest.mark.parametrize(
    "name", ["lycoris_loha", "lycoris_lokr", pytest.param("lycoris_loha_tucker", marks=pytest.mark.slow),
             pytest.param("lycoris_lokr_full", marks=pytest.mark.slow)],
)  # fmt: skip
def test_lycoris_kohya_to_peft_loads_in_peft(name: str, mf: ModuleType, tmp_path: Path) -> None:
    """A LyCORIS file (LoHa, Tucker LoHa, LoKr, full-matrix LoKr on the tiny UNet) as a PEFT LOHA / LOKR folder:
    PEFT builds the same factors and merges the deltas LyCORIS' own rebuild gives."""
    convert(FIXTURES / f"{name}.safetensors", "peft", tmp_path / "p")
    ours = load_adapter(tmp_path / "p")
    source = load_adapter(FIXTURES / f"{name}.safetensors")
    assert {m.kind for m in ours.modules.values()} == {m.kind for m in source.modules.values()}
    before, merged = peft_merged(mf, "tiny_unet", tmp_path / "p")
    applied = kit.applied_state(before, ours)
    changed = [k for k in merged if not torch.equal(merged[k], before[k])]
    assert len(changed) == len(source.modules)
    for key, w in merged.items():
        kit.close(applied[key], w, key)
    for m in source.modules.values():  # and the kohya file's own deltas, module by module
        peer = next(n for n in ours.modules if kit.same_module(n, m.name))
        torch.testing.assert_close(
            ours.modules[peer].delta().reshape(m.delta_shape()), m.delta().reshape(m.delta_shape())
        )


def test_other_peft_types_are_refused_by_name(tmp_path: Path) -> None:
    for kind in ("IA3", "BOFT", "OFT", "PROMPT_TUNING", "FOURIERFT"):
        d = tmp_path / kind
        shutil.copytree(FIXTURES / "peft_llama", d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": kind}))
        with pytest.raises(FileFormatError, match=f"peft_type {kind} is not supported"):
            load_adapter(d)


def test_vera_without_projections_and_adalora_with_bad_masks_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    d = tmp_path / "vera"
    shutil.copytree(FIXTURES / "peft_llama_vera", d)
    t = load_file(d / "adapter_model.safetensors")
    save_file({k: v for k, v in t.items() if "vera_A" not in k and "vera_B" not in k}, d / "adapter_model.safetensors")
    with pytest.raises(FileFormatError, match="save_projection"):
        load_adapter(d)
    d = tmp_path / "ada"
    shutil.copytree(FIXTURES / "peft_llama_adalora", d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["rank_pattern"]["model.layers.0.self_attn.q_proj.lora_E"] = [True] * 6  # keeps 6, the file holds 3
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileFormatError, match="mask keeps 6"):
        load_adapter(d)
    cfg["rank_pattern"]["model.layers.0.self_attn.q_proj.lora_E"] = [True] * 5
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileFormatError, match="init_r is 6"):
        load_adapter(d)


def test_lokr_rank_that_disagrees_with_the_config_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "lokr"
    shutil.copytree(FIXTURES / "peft_llama_lokr", d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {}}))
    with pytest.raises(FileFormatError, match="rank 2.*r=4"):
        load_adapter(d)


def test_factorization_is_peft_and_lycoris_rule() -> None:
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in (1, 2, 7, 12, 16, 30, 32, 64, 96, 127, 128, 320, 4096, 11008):
        for factor in (-1, 1, 2, 3, 4, 8, 16):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize("fixture", ["peft_llama_adalora", "peft_llama_vera"])
def test_adalora_and_vera_as_lora_merge_like_peft(fixture: str, mf: ModuleType, tmp_path: Path) -> None:
    """AdaLoRA and VeRA are written as LoRA: PEFT loads the result and merges it to what it merges from the
    original. VeRA's shared projection is as wide as the widest layer and the folder does not record each layer's
    width: without --base the conversion (and a mix, which needs the same) is refused, with it each module is cut
    to its layer."""
    mf.tiny_llama().save_pretrained(tmp_path / "base")
    argv = ["convert", str(FIXTURES / fixture), "--to", "peft", "-o", str(tmp_path / "lora")]
    if fixture.endswith("vera"):
        code, _, err = run_cli(*argv)
        assert code == 1 and "--base" in err and not (tmp_path / "lora").exists()
        code, _, err = run_cli("mix", str(FIXTURES / fixture), str(FIXTURES / "peft_llama"), "-o", str(tmp_path / "m"))
        assert code == 1 and "VeRA" in err and not (tmp_path / "m").exists()
        argv += ["--base", str(tmp_path / "base")]
    code, _, err = run_cli(*argv)
    assert code == 0, err
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    _, want = peft_merged(mf, "tiny_llama", FIXTURES / fixture)
    _, got = peft_merged(mf, "tiny_llama", tmp_path / "lora")
    for key in want:
        kit.close(got[key], want[key], key)
