"""Every validate finding, each from a purposely broken copy of a real fixture."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch
from conftest import FIXTURES

from loratools.io.safetensors import write_safetensors
from loratools.ops.validate import CODES, validate

PEFT = FIXTURES / "peft_llama"
KOHYA = FIXTURES / "kohya_sd" / "lora.safetensors"
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def peft_copy(tmp_path: Path, edit: Callable[[dict[str, torch.Tensor], dict], None] | None = None) -> Path:
    """A copy of the PEFT fixture, with its tensors and config passed through ``edit``."""
    out = tmp_path / "adapter"
    shutil.copytree(PEFT, out)
    if edit is not None:
        tensors = safetensors.torch.load_file(str(out / "adapter_model.safetensors"))
        cfg = json.loads((out / "adapter_config.json").read_text())
        edit(tensors, cfg)
        (out / "adapter_model.safetensors").unlink()
        safetensors.torch.save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def kohya_copy(tmp_path: Path, edit: Callable[[dict[str, torch.Tensor], dict[str, str]], None]) -> Path:
    with safetensors.safe_open(str(KOHYA), "pt") as f:
        meta = dict(f.metadata())
    tensors = safetensors.torch.load_file(str(KOHYA))
    edit(tensors, meta)
    out = tmp_path / "kohya.safetensors"
    safetensors.torch.save_file(tensors, str(out), metadata=meta)
    return out


def codes(path: Path, **kw: object) -> dict[str, str]:
    rep = validate(path, **kw)  # type: ignore[arg-type]
    return {f.code: f.severity for f in rep.findings}


def test_fixtures_are_sound(adapter_fixture: tuple[Path, str]) -> None:
    rep = validate(adapter_fixture[0])
    assert rep.ok, rep.findings
    assert [f for f in rep.findings if f.severity == "error"] == []


def test_truncated_file(tmp_path: Path) -> None:
    out = peft_copy(tmp_path)
    w = out / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    found = codes(out)
    assert found.get("header") == "error"
    assert not validate(out).ok


def test_header_length_that_lies(tmp_path: Path) -> None:
    out = peft_copy(tmp_path)
    w = out / "adapter_model.safetensors"
    raw = w.read_bytes()
    w.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    assert codes(out) == {"header": "error"}


def test_offsets_that_lie(tmp_path: Path) -> None:
    out = peft_copy(tmp_path)
    w = out / "adapter_model.safetensors"
    raw = w.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    first = sorted(k for k in header if k != "__metadata__")[0]
    header[first]["data_offsets"][1] += 4  # one more float than the shape holds
    new = json.dumps(header).encode()
    w.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])
    rep = validate(out)
    assert any(f.code == "header" and "needs" in f.message for f in rep.findings)


def test_unreadable_garbage(tmp_path: Path) -> None:
    p = tmp_path / "x.bin"
    p.write_bytes(b"not a pickle at all")
    assert codes(p) == {"unreadable": "error"}


def test_unknown_keys_are_listed(tmp_path: Path) -> None:
    def edit(t: dict[str, torch.Tensor], cfg: dict) -> None:
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_Z.weight"] = torch.ones(2)

    rep = validate(peft_copy(tmp_path, edit))
    f = [f for f in rep.findings if f.code == "structure"]
    assert f and "lora_Z" in f[0].message and not rep.ok


def test_factor_without_partner(tmp_path: Path) -> None:
    out = peft_copy(tmp_path, lambda t, c: t.pop(f"{Q}.lora_B.weight"))
    rep = validate(out)
    f = [f for f in rep.findings if f.code == "unpaired"]
    assert f and f[0].module == "model.layers.0.self_attn.q_proj" and "up" in f[0].message


def test_rank_mismatch_between_factors(tmp_path: Path) -> None:
    def edit(t: dict[str, torch.Tensor], cfg: dict) -> None:
        t[f"{Q}.lora_B.weight"] = torch.ones(32, 3)

    assert codes(peft_copy(tmp_path, edit))["rank-mismatch"] == "error"


def test_rank_disagrees_with_config(tmp_path: Path) -> None:
    def edit(t: dict[str, torch.Tensor], cfg: dict) -> None:
        cfg["rank_pattern"] = {"v_proj": 8}

    rep = validate(peft_copy(tmp_path, edit))
    f = [f for f in rep.findings if f.code == "rank-config"]
    assert len(f) == 2 and "config says 8" in f[0].message


def test_rank_pattern_that_agrees_is_fine() -> None:
    assert "rank-config" not in codes(FIXTURES / "peft_llama_patterns")


def test_missing_and_non_positive_alpha(tmp_path: Path) -> None:
    assert codes(peft_copy(tmp_path, lambda t, c: c.pop("lora_alpha")))["alpha"] == "error"
    neg = tmp_path / "neg"
    neg.mkdir()
    assert codes(peft_copy(neg, lambda t, c: c.update(lora_alpha=-4)))["alpha"] == "error"
    k = "lora_unet_conv_in.alpha"
    assert codes(kohya_copy(tmp_path, lambda t, m: t.update({k: torch.tensor(0.0)})))["alpha"] == "error"
    missing = kohya_copy(tmp_path, lambda t, m: t.pop(k))
    assert codes(missing)["alpha"] == "warning"
    assert validate(missing).ok and not validate(missing, strict=True).ok


def test_nan_and_inf(tmp_path: Path) -> None:
    def edit(t: dict[str, torch.Tensor], cfg: dict) -> None:
        t[f"{Q}.lora_A.weight"][0, 0] = float("nan")

    out = peft_copy(tmp_path, edit)
    assert codes(out)["nonfinite"] == "error"
    assert "nonfinite" not in codes(out, fast=True)  # header-only mode does not read data


def test_all_zero_up_factor_is_a_warning(tmp_path: Path) -> None:
    out = peft_copy(tmp_path, lambda t, c: t[f"{Q}.lora_B.weight"].zero_())
    assert codes(out) == {"zero-up": "warning"}
    assert validate(out).ok
    assert not validate(out, strict=True).ok


def test_mixed_dtypes_is_a_warning(tmp_path: Path) -> None:
    def edit(t: dict[str, torch.Tensor], cfg: dict) -> None:
        t[f"{Q}.lora_A.weight"] = t[f"{Q}.lora_A.weight"].half()

    assert codes(peft_copy(tmp_path, edit)) == {"mixed-dtypes": "warning"}


def test_target_modules_that_match_nothing(tmp_path: Path) -> None:
    out = peft_copy(tmp_path, lambda t, c: c["target_modules"].append("gate_proj"))
    rep = validate(out)
    assert [f.message for f in rep.findings if f.code == "target-unmatched"] == [
        "target_modules entry 'gate_proj' matches no module"
    ]
    regex = tmp_path / "re"
    regex.mkdir()
    assert "target-unmatched" in codes(peft_copy(regex, lambda t, c: c.update(target_modules=r".*\.mlp\.up_proj")))


def test_base_modifying_init(tmp_path: Path) -> None:
    assert codes(peft_copy(tmp_path, lambda t, c: c.update(init_lora_weights="pissa_niter_4"))) == {"init": "warning"}


def test_stale_kohya_hash(tmp_path: Path) -> None:
    out = kohya_copy(tmp_path, lambda t, m: m.update(sshs_model_hash="ab" * 32))
    assert codes(out) == {"stale-hash": "warning"}
    # the right hash (sha256 of the data section) is accepted
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    import hashlib

    good = kohya_copy(tmp_path, lambda t, m: m.update(sshs_model_hash=hashlib.sha256(raw[8 + n :]).hexdigest()))
    assert "stale-hash" not in codes(good)


def test_empty_adapter(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    write_safetensors(out / "adapter_model.safetensors", {}, {"format": "pt"})
    assert codes(out)["empty"] == "error"


def _base_for(tmp_path: Path, adapter: Path, change: str | None = None, drop: str | None = None) -> Path:
    """A base checkpoint with a zero weight of the right shape for every module of ``adapter``."""
    from loratools import load_adapter

    a = load_adapter(adapter)
    weights = {f"{n}.weight": torch.zeros(m.weight_shape()) for n, m in a.modules.items()}
    if change:
        weights[f"{change}.weight"] = torch.zeros(3, 3)
    if drop:
        weights.pop(f"{drop}.weight")
    path = tmp_path / "base.safetensors"
    write_safetensors(path, weights, force=True)
    return path


def test_base_fits(tmp_path: Path) -> None:
    sys_path = str(FIXTURES)
    import sys

    sys.path.insert(0, sys_path)
    try:
        from make_fixtures import tiny_gpt2, tiny_llama
    finally:
        sys.path.remove(sys_path)
    tiny_llama().save_pretrained(tmp_path / "llama")
    assert validate(PEFT, base=tmp_path / "llama").findings == []
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    assert validate(FIXTURES / "peft_gpt2", base=tmp_path / "gpt2").findings == []
    # the llama adapter does not fit gpt2
    assert codes(PEFT, base=tmp_path / "gpt2") == {"base-missing": "error"}


def test_base_missing_and_wrong_shape(tmp_path: Path) -> None:
    name = "model.layers.1.self_attn.v_proj"
    rep = validate(PEFT, base=_base_for(tmp_path, PEFT, drop=name))
    assert [(f.code, f.module) for f in rep.findings] == [("base-missing", name)]
    rep = validate(PEFT, base=_base_for(tmp_path, PEFT, change=name))
    assert [(f.code, f.module) for f in rep.findings] == [("base-shape", name)]
    assert "delta is [16, 32], base weight is [3, 3]" in rep.findings[0].message


def test_kohya_names_resolve_against_a_diffusers_base(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(FIXTURES))
    try:
        from make_fixtures import tiny_unet
    finally:
        sys.path.remove(str(FIXTURES))
    tiny_unet().save_pretrained(tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    rep = validate(FIXTURES / "lycoris_loha.safetensors", base=tmp_path / "pipe")
    assert rep.findings == [], rep.findings[:3]
    rep = validate(KOHYA, base=tmp_path / "pipe")
    # only the text encoder modules are missing from a unet-only base
    assert {f.code for f in rep.findings} == {"base-missing"}
    assert all(f.module and f.module.startswith("lora_te_") for f in rep.findings)


def test_every_code_is_exercised() -> None:
    """Each documented finding code has a test above (this file's source names it)."""
    source = Path(__file__).read_text()
    missing = [c for c in CODES if f'"{c}"' not in source]
    assert missing == []


def test_consumer_findings_come_with_a_fix() -> None:
    rep = validate(FIXTURES / "peft_llama_dora", for_="vllm")
    found = [f for f in rep.findings if f.code == "consumer"]
    assert found and all("(fix: " in f.message for f in found) and not rep.ok
    assert [f.code for f in validate(PEFT, for_="vllm").findings] == []
