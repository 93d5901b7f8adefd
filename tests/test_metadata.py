"""kohya header metadata kept true on every write: a .alpha per module, the sshs_* hashes recomputed (checked
against hashlib over the written bytes and against sd-scripts' / sd-webui-additional-networks' own rule, which
re-serialises with the safetensors package), the ss_network_* keys after resize, mix, LoHa -> LoRA and alpha
bake, and the options of convert honoured (--rank/--energy in every target, --alpha-mode bake, --base-model)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import FIXTURES
from hostile import run

from loratools import load_adapter, save_adapter
from loratools.errors import UsageError
from loratools.formats import kohya_meta
from loratools.model import Adapter, Module, TensorRef
from loratools.ops.convert import convert
from loratools.ops.mix import mix
from loratools.ops.resize import resize


def header(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    entries = json.loads(raw[8 : 8 + n])
    return entries.pop("__metadata__", {}), entries


def peer_hashes(path: Path) -> tuple[str, str]:
    """Both hashes computed independently: kohya's model hash is the sha256 of everything after the header
    (hashlib over the file's bytes: what A1111 computes when the header has none); the legacy hash is
    sd-webui-additional-networks' ``legacy_hash_file``: re-serialise the tensors with the ``ss_*`` keys only
    (``safetensors.torch.save``) and hash bytes 0x100000..0x110000."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    model = hashlib.sha256(raw[8 + n :]).hexdigest()
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    tensors = safetensors.torch.load_file(str(path))
    again = safetensors.torch.save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    legacy = hashlib.sha256(again[0x100000:0x110000]).hexdigest()[:8]
    # sd-scripts' precalculate_safetensors_hashes: the data section of that same serialisation
    m = int.from_bytes(again[:8], "little")
    assert hashlib.sha256(again[8 + m :]).hexdigest() == model, "the data section is not the reference writer's"
    return model, legacy


def check_kohya_file(path: Path, made: bool = True) -> dict[str, str]:
    """The hashes are true, and every module with a rank has its .alpha; ``made``: written by a loratools command,
    which records itself."""
    meta, entries = header(path)
    model, legacy = peer_hashes(path)
    assert meta["sshs_model_hash"] == model
    assert meta["sshs_legacy_hash"] == legacy
    if "modelspec.hash_sha256" in meta:
        assert meta["modelspec.hash_sha256"] == "0x" + model
    a = load_adapter(path)
    for name, m in a.modules.items():
        if m.rank is not None:
            assert name + ".alpha" in entries, f"{name}: no .alpha"
            assert m.alpha is not None
    assert "loratools" in meta or not made  # the provenance record, always
    return meta


SOURCES = [
    "peft_llama",
    "peft_llama_patterns",
    "peft_llama_dora",
    "diffusers_sd",
    "diffusers_sd_old",
    "kohya_sd/lora.safetensors",
    "lycoris_loha.safetensors",
    "lycoris_lokr.safetensors",
    "lycoris_lokr_full.safetensors",
    "lycoris_dora.safetensors",
]


@pytest.mark.parametrize("src", SOURCES)
def test_convert_from_each_format_to_kohya_writes_true_hashes_and_every_alpha(src: str, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    convert(FIXTURES / src, "kohya", out)
    meta = check_kohya_file(out)
    source, back = load_adapter(FIXTURES / src), load_adapter(out)
    assert len(back.modules) == len(source.modules)
    # every alpha written says the scale the source meant (alpha = rank where the source stored none)
    for (name, m), b in zip(
        sorted(source.modules.items()), [back.modules[n] for n in sorted(back.modules)], strict=True
    ):
        assert b.scale == pytest.approx(m.scale, rel=1e-6), name  # rsLoRA baked into alpha: the same scale
    old = source.metadata.get("sshs_model_hash")
    assert meta["sshs_model_hash"] != old  # never the source's (LyCORIS' "0x..." of its own) carried along


def test_diffusers_source_gets_alpha_in_the_factor_dtype(tmp_path: Path) -> None:
    """A diffusers file stores no alpha: the kohya file gets alpha = rank per module, in the factors' dtype (kohya
    casts its whole state dict), here fp16."""
    out = tmp_path / "k.safetensors"
    convert(FIXTURES / "diffusers_sd_old", "kohya", out, dtype="fp16")
    _, entries = header(out)
    alphas = {k: v for k, v in entries.items() if k.endswith(".alpha")}
    modules = {k.split(".")[0] for k in entries}
    assert len(alphas) == len(modules) and {v["dtype"] for v in alphas.values()} == {"F16"}
    check_kohya_file(out)


def big_kohya(tmp_path: Path, meta: dict[str, str]) -> Path:
    """A kohya file of more than 1 MiB (the legacy window holds data), fp16 factors and an alpha fp16 cannot hold
    (stored fp32: two dtypes, so the reference order is not the name order)."""
    g = torch.Generator().manual_seed(0)
    a = Adapter(format="kohya", metadata=dict(meta))
    for i, name in enumerate(("lora_unet_a_to_q", "lora_unet_b_to_k")):
        down = torch.randn(8, 40000 + i, generator=g).half()
        up = torch.randn(64, 8, generator=g).half()
        a.modules[name] = Module(name, "lora", {"down": TensorRef.of(down), "up": TensorRef.of(up)}, alpha=0.3)
    src = tmp_path / "src.safetensors"
    save_adapter(a, src)
    return src


def test_hashes_over_a_megabyte_mixed_dtypes_and_non_ascii_metadata(tmp_path: Path) -> None:
    meta = {"ss_tag_frequency": json.dumps({"猫": {"ねこ": 3}}, ensure_ascii=False), "ss_output_name": 'é\x01"x'}
    src = big_kohya(tmp_path, meta)
    m = check_kohya_file(src, made=False)
    assert m["sshs_legacy_hash"] != "e3b0c442"  # the window holds data: a real test of its place
    _, entries = header(src)
    assert {e["dtype"] for e in entries.values()} == {"F16", "F32"}
    # resize, then the hashes describe the new bytes
    out = tmp_path / "small.safetensors"
    resize(src, out, rank=4)
    m2 = check_kohya_file(out)
    assert m2["sshs_model_hash"] != m["sshs_model_hash"] and m2["ss_network_dim"] == "4"
    assert m2["ss_tag_frequency"] == meta["ss_tag_frequency"]  # the same training, re-compressed


def test_legacy_hash_dropped_when_its_window_starts_in_the_header(tmp_path: Path) -> None:
    """More than 1 MiB of ss_* metadata: the window would read the header, whose key order the reference writer
    leaves undefined: the legacy hash is dropped, never guessed; the model hash stays."""
    src = big_kohya(tmp_path, {"ss_dataset_dirs": "x" * (1 << 20)})
    meta, _ = header(src)
    assert "sshs_legacy_hash" not in meta
    model, _ = peer_hashes(src)
    assert meta["sshs_model_hash"] == model


def test_modelspec_hash_is_recomputed_when_present(tmp_path: Path) -> None:
    src = big_kohya(tmp_path, {"modelspec.hash_sha256": "0x" + "ab" * 32, "modelspec.title": "t"})
    meta = check_kohya_file(src, made=False)
    assert meta["modelspec.hash_sha256"] != "0x" + "ab" * 32 and meta["modelspec.title"] == "t"


def test_other_formats_never_carry_data_hashes(tmp_path: Path) -> None:
    a = load_adapter(FIXTURES / "diffusers_sd")
    a.metadata.update(sshs_model_hash="ab" * 32, sshs_legacy_hash="12345678")
    save_adapter(a, tmp_path / "d.safetensors")
    out = tmp_path / "r.safetensors"
    resize(tmp_path / "d.safetensors", out, rank=2)
    meta, _ = header(out)
    assert not {"sshs_model_hash", "sshs_legacy_hash"} & set(meta)


# ---- ss_network_* ----------------------------------------------------------------------------------------------


def test_resize_updates_dim_and_alpha(tmp_path: Path) -> None:
    out = tmp_path / "r.safetensors"
    resize(FIXTURES / "kohya_sd/lora.safetensors", out, rank=2)
    meta = check_kohya_file(out)
    # linear modules 4 -> 2 (alpha = rank), the 3x3 convs were rank 2 alpha 0.5 already and are kept exactly
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "2.0"
    args = json.loads(meta["ss_network_args"])
    assert args["conv_dim"] == "2" and float(args["conv_alpha"]) == 0.5
    assert meta["ss_network_module"] == "lycoris.kohya" and args["algo"] == "locon"  # a LoCon stays a LoCon
    assert meta["ss_output_name"] == "lora"  # training keys: the same training
    dyn = tmp_path / "dyn.safetensors"
    rep = resize(FIXTURES / "kohya_sd/lora.safetensors", dyn, energy=0.9)
    assert len({m.new_rank for m in rep.modules}) > 1
    meta = check_kohya_file(dyn)
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"


def test_loha_to_lora_is_networks_lora(mf: Any, tmp_path: Path) -> None:
    mf.tiny_unet().save_pretrained(tmp_path / "unet")
    out = tmp_path / "l.safetensors"
    convert(FIXTURES / "lycoris_loha.safetensors", "kohya", out, rank=2, base=tmp_path / "unet")
    meta = check_kohya_file(out)
    assert {m.kind for m in load_adapter(out).modules.values()} == {"lora"}
    assert meta["ss_network_module"] == "networks.lora"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}  # no algo any more
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "2.0"


def test_bake_of_a_kept_loha_folds_every_scale(tmp_path: Path) -> None:
    src = load_adapter(FIXTURES / "lycoris_loha.safetensors")
    out = tmp_path / "b.safetensors"
    rep = convert(FIXTURES / "lycoris_loha.safetensors", "kohya", out, alpha_mode="bake")
    assert not rep.notes
    back = load_adapter(out)
    assert {m.kind for m in back.modules.values()} == {"loha"}
    for name, m in back.modules.items():
        assert m.alpha == m.rank
        torch.testing.assert_close(m.delta(), src.modules[name].delta(), rtol=1e-6, atol=1e-7)
    meta = check_kohya_file(out)
    assert meta["ss_network_alpha"] == "4.0" and meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == "loha" and args["conv_dim"] == "4" and float(args["conv_alpha"]) == 4.0


def test_mix_keeps_only_what_stays_true(tmp_path: Path) -> None:
    src = FIXTURES / "kohya_sd/lora.safetensors"
    other = tmp_path / "other.safetensors"
    a = load_adapter(src)
    a.metadata.update(ss_learning_rate="0.0001", ss_output_name="other")
    save_adapter(a, other)
    out = tmp_path / "m.safetensors"
    mix([src, other], out, [0.5, 0.5])
    meta = check_kohya_file(out)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"  # all inputs agree
    assert "ss_output_name" not in meta and "ss_learning_rate" not in meta  # training keys of one run
    # cat: ranks add up (linear 4 + 4, conv 2 + 2), scale 1
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8.0"
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "4"
    assert json.loads(meta["loratools"])["command"] == "mix"


def test_peft_patterns_to_kohya_say_dynamic(tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    convert(FIXTURES / "peft_llama_patterns", "kohya", out)
    meta = check_kohya_file(out)
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"
    assert meta["ss_network_module"] == "networks.lora" and "ss_network_args" not in meta


def _lora(name: str, rank: int, alpha: float, shape: tuple[int, ...] = (8, 8), **kw: Any) -> Module:
    down = torch.zeros(rank, *shape[1:])
    up = torch.zeros(shape[0], rank, *([1] * (len(shape) - 2)))
    return Module(name, "lora", {"down": TensorRef.of(down), "up": TensorRef.of(up)}, alpha=alpha, **kw)


def test_network_keys_rules() -> None:
    lin, conv = _lora("lora_unet_x_to_q", 4, 2.0), _lora("lora_unet_x_conv1", 2, 1.0, (8, 8, 3, 3))
    # the source's text stays while it is true
    meta = {"ss_network_dim": "4", "ss_network_alpha": "2", "ss_network_module": "networks.lora_flux"}
    meta["ss_network_args"] = '{"conv_dim": "2", "conv_alpha": "1", "block_dims": "4,4"}'
    assert kohya_meta.network_metadata([lin, conv], meta) == meta
    # a change: derived, per-block ranks dropped, the kohya module kept (still plain LoRA)
    new = kohya_meta.network_metadata([_lora("lora_unet_x_to_q", 3, 3.0), conv], meta)
    assert new["ss_network_dim"] == "3" and new["ss_network_alpha"] == "3.0"
    assert json.loads(new["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert new["ss_network_module"] == "networks.lora_flux"
    # convs of different ranks: kohya's args have no "Dynamic": removed
    new = kohya_meta.network_metadata([lin, conv, _lora("lora_unet_y_conv2", 3, 1.0, (8, 8, 3, 3))], meta)
    assert "conv_dim" not in json.loads(new.get("ss_network_args", "{}"))
    # a LyCORIS LoKr network that became LoRA: networks.lora, LyCORIS' options gone
    ly = {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "lokr", "factor": "8", "conv_dim": "2"}'}
    new = kohya_meta.network_metadata([lin, conv], ly)
    assert new["ss_network_module"] == "networks.lora" and json.loads(new["ss_network_args"]) == {
        "conv_dim": "2",
        "conv_alpha": "1.0",
    }
    # DoRA needs LyCORIS: lycoris.kohya, algo and dora_wd set
    dora = _lora("lora_unet_x_to_k", 4, 2.0, magnitude=TensorRef.of(torch.ones(8, 1)))
    new = kohya_meta.network_metadata([dora], {})
    assert new["ss_network_module"] == "lycoris.kohya"
    assert json.loads(new["ss_network_args"]) == {"algo": "locon", "dora_wd": "True"}
    # args that cannot be read cannot be kept true: dropped
    new = kohya_meta.network_metadata([lin], {"ss_network_args": "{not json"})
    assert "ss_network_args" not in new and new["ss_network_dim"] == "4"


# ---- options honoured -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("to", ["kohya", "diffusers", "peft"])
def test_rank_turns_lokr_into_lora_in_every_target(to: str, tmp_path: Path) -> None:
    out = tmp_path / ("o" if to == "peft" else "o.safetensors")
    rep = convert(FIXTURES / "lycoris_lokr.safetensors", to, out, rank=1)
    back = load_adapter(out)
    assert {m.kind for m in back.modules.values()} == {"lora"}
    assert {m.rank for m in back.modules.values()} == {1} and min(m.energy for m in rep.modules) < 1
    e = convert(
        FIXTURES / "lycoris_lokr_full.safetensors",
        to,
        tmp_path / ("e" if to == "peft" else "e.safetensors"),
        energy=0.9,
    )
    assert all(m.note.startswith("lokr -> lora") for m in e.modules)


def test_rank_or_energy_on_plain_lora_is_refused(tmp_path: Path) -> None:
    for kw in ({"rank": 2}, {"energy": 0.9}):
        with pytest.raises(UsageError, match="only plain LoRA"):
            convert(FIXTURES / "kohya_sd/lora.safetensors", "kohya", tmp_path / "x.safetensors", **kw)
    src = FIXTURES / "peft_llama"
    run(["convert", src, "--to", "kohya", "--rank", "2", "-o", tmp_path / "y.safetensors"], inputs=[src],
        out=tmp_path / "y.safetensors", says=["plain LoRA", "resize"])  # fmt: skip


def test_bake_with_nothing_to_fold_says_so(tmp_path: Path) -> None:
    rep = convert(FIXTURES / "diffusers_sd_old", "kohya", tmp_path / "b.safetensors", alpha_mode="bake")
    assert any("nothing to fold" in n for n in rep.notes)


def test_base_model_is_honoured_in_every_target(tmp_path: Path) -> None:
    rep = convert(FIXTURES / "peft_llama", "peft", tmp_path / "p", base_model="me/other")
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["base_model_name_or_path"] == "me/other"
    assert any("base_model_name_or_path was" in n for n in rep.notes)
    rep = convert(FIXTURES / "kohya_sd/lora.safetensors", "kohya", tmp_path / "k.safetensors", base_model="sd15")
    meta, _ = header(tmp_path / "k.safetensors")
    assert meta["ss_sd_model_name"] == "sd15" and json.loads(meta["loratools"])["base_model"] == "sd15"
    convert(FIXTURES / "diffusers_sd", "diffusers", tmp_path / "d.safetensors", base_model="sd15")
    meta, _ = header(tmp_path / "d.safetensors")
    assert json.loads(meta["loratools"])["base_model"] == "sd15"


def test_unneeded_base_is_said(mf: Any, tmp_path: Path) -> None:
    mf.tiny_unet().save_pretrained(tmp_path / "unet")
    rep = convert(FIXTURES / "diffusers_sd", "kohya", tmp_path / "k.safetensors", base=tmp_path / "unet")
    assert any("--base was not needed" in n for n in rep.notes)


def test_one_input_weight_is_honoured(tmp_path: Path) -> None:
    src = FIXTURES / "peft_llama"
    mix([src], tmp_path / "half", [0.5])
    a, b = load_adapter(src), load_adapter(tmp_path / "half")
    for name, m in a.modules.items():
        torch.testing.assert_close(b.modules[name].delta(), 0.5 * m.delta(), rtol=1e-5, atol=1e-7)
