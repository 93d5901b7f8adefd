"""mlx-lm adapter folders: the documented layout (mlx_lm/tuner/lora.py, dora.py, utils.py), and mlx-lm itself as
the oracle where it runs (``mlx`` + ``mlx-lm`` importable here, or a Python that has them in
$LORATOOLS_MLX_PYTHON): an adapter made by mlx-lm's own LoRA code converts to PEFT and merges (PEFT's
``merge_and_unload``) to the weights mlx-lm's fuse gives, and a PEFT adapter converted to mlx loads in mlx-lm and
fuses to PEFT's merged weights."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import peers_kit as kit
import pytest
import torch
from conftest import FIXTURES, ROOT, run_cli
from safetensors.torch import load_file, save_file

from loratools import detect, load_adapter, save_adapter
from loratools.errors import FileFormatError, IncompatibleAdaptersError
from loratools.model import Adapter, Module, TensorRef
from loratools.ops.convert import convert
from loratools.ops.mix import mix

F64 = torch.float64


def mlx_python() -> str | None:
    """An interpreter with mlx-lm: $LORATOOLS_MLX_PYTHON, or this one when it has mlx_lm."""
    env = os.environ.get("LORATOOLS_MLX_PYTHON")
    if env:
        return env
    return sys.executable if importlib.util.find_spec("mlx_lm") and importlib.util.find_spec("mlx") else None


needs_mlx = pytest.mark.skipif(
    mlx_python() is None,
    reason="mlx-lm is not installed: the test extra installs it on Linux and macOS with Python 3.11 or later "
    "(mlx-lm[cpu]); elsewhere set LORATOOLS_MLX_PYTHON to a Python that has it",
)


def oracle(*args: str) -> None:
    python = mlx_python()
    assert python is not None
    r = subprocess.run([python, str(ROOT / "tests" / "mlx_oracle.py"), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def write_mlx(folder: Path, tensors: dict[str, torch.Tensor], **config: object) -> Path:
    """An mlx-lm folder as mlx_lm.lora writes it (its layout, written here by hand)."""
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapters.safetensors")
    cfg = {"fine_tune_type": "lora", "num_layers": 16, "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0}}
    cfg.update(config)  # type: ignore[arg-type]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def peft_merged(mf: ModuleType, folder: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(mf.tiny_llama(), str(folder))
    with torch.no_grad():
        return kit.snapshot(model.merge_and_unload())


# ---- the documented layout -------------------------------------------------------------------------------


def test_reads_the_layout_mlx_lm_writes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 4, generator=g), torch.randn(4, 16, generator=g)  # lora_a in x r, lora_b r x out
    ea, eb = torch.randn(128, 4, generator=g), torch.randn(4, 32, generator=g)  # an embedding: vocab x r, r x dim
    folder = write_mlx(
        tmp_path / "m",
        {"model.layers.3.self_attn.v_proj.lora_a": a, "model.layers.3.self_attn.v_proj.lora_b": b,
         "model.embed_tokens.lora_a": ea, "model.embed_tokens.lora_b": eb},
        lora_parameters={"rank": 4, "scale": 2.5, "dropout": 0.05, "keys": ["self_attn.v_proj", "model.embed_tokens"]},
    )  # fmt: skip
    for src in (folder, folder / "adapters.safetensors"):
        assert detect(src) == "mlx"
        ad = load_adapter(src)
        m = ad.modules["model.layers.3.self_attn.v_proj"]
        assert (m.rank, m.scale, m.weight_shape()) == (4, 2.5, (16, 32))
        torch.testing.assert_close(m.delta(dtype=F64), 2.5 * (b.double().T @ a.double().T))  # mlx-lm's fuse
        e = ad.modules["model.embed_tokens"]
        assert e.layer == "embedding" and e.weight_shape() == (128, 32)
        torch.testing.assert_close(e.delta(dtype=F64), 2.5 * (ea.double() @ eb.double()))  # LoRAEmbedding's fuse


def test_dora_magnitude_as_mlx_lm_applies_it(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 32, generator=g)
    a, b, mag = torch.randn(32, 4, generator=g), torch.randn(4, 16, generator=g), torch.rand(16, generator=g) + 0.5
    folder = write_mlx(
        tmp_path / "d", {"model.layers.0.self_attn.v_proj.lora_a": a, "model.layers.0.self_attn.v_proj.lora_b": b,
                         "model.layers.0.self_attn.v_proj.m": mag}, fine_tune_type="dora",
    )  # fmt: skip
    m = load_adapter(folder).modules["model.layers.0.self_attn.v_proj"]
    adapted = w + 20.0 * b.T @ a.T  # DoRALinear.fuse: m / ||W + scale B A||_row * (W + scale B A)
    torch.testing.assert_close(m.apply(w), (mag / adapted.norm(dim=1))[:, None] * adapted)


@pytest.mark.parametrize("src", ["peft_llama", "peft_llama_patterns", "peft_llama_dora", "peft_gpt2"])
def test_peft_to_mlx_keeps_every_delta(src: str, tmp_path: Path) -> None:
    """One rank and one scale per folder: ranks padded with zeros, other scales folded into the up factor."""
    convert(FIXTURES / src, "mlx", tmp_path / "m")
    source, ours = load_adapter(FIXTURES / src), load_adapter(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    params = cfg["lora_parameters"]
    assert cfg["fine_tune_type"] == ("dora" if src.endswith("dora") else "lora") and cfg["num_layers"] == -1
    assert params["rank"] == max(m.rank or 0 for m in source.modules.values())
    assert set(params["keys"]) == {n.split(".", 3)[3] if n.startswith("model.layers.") else n.split(".", 3)[3]
                                   for n in source.modules}  # fmt: skip
    assert {m.rank for m in ours.modules.values()} == {params["rank"]}
    for name, m in source.modules.items():
        got = ours.modules[name]
        want = m.delta(dtype=F64)
        if m.fan_in_fan_out:  # mlx-lm's models hold GPT-2's Conv1D weights as Linear ones: (out, in)
            want = want.T
        torch.testing.assert_close(got.delta(dtype=F64), want, rtol=1e-6, atol=1e-7)
        if m.magnitude is not None:
            assert torch.equal(got.magnitude.load().reshape(-1), m.magnitude.load().reshape(-1))  # type: ignore[union-attr]


def test_mlx_round_trip_is_identical(tmp_path: Path) -> None:
    convert(FIXTURES / "peft_llama_patterns", "mlx", tmp_path / "a")
    a = load_adapter(tmp_path / "a")
    save_adapter(a, tmp_path / "b")
    ta, tb = load_file(tmp_path / "a" / "adapters.safetensors"), load_file(tmp_path / "b" / "adapters.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    ca = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cb = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert ca == cb


def test_num_layers_kept_where_it_still_reaches_every_layer(tmp_path: Path) -> None:
    t = {f"model.layers.{i}.self_attn.q_proj.{k}": torch.ones(*s) for i in (6, 7) for k, s in
         (("lora_a", (32, 4)), ("lora_b", (4, 32)))}  # fmt: skip
    folder = write_mlx(tmp_path / "m", t, num_layers=2)
    save_adapter(load_adapter(folder), tmp_path / "same")
    assert json.loads((tmp_path / "same" / "adapter_config.json").read_text())["num_layers"] == 2
    a = load_adapter(folder)
    del a.modules["model.layers.7.self_attn.q_proj"]  # the last layer gone: which is last is no longer known
    save_adapter(a, tmp_path / "all")
    assert json.loads((tmp_path / "all" / "adapter_config.json").read_text())["num_layers"] == -1


def test_what_mlx_cannot_hold_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IncompatibleAdaptersError, match="no full tensors"):
        convert(FIXTURES / "peft_llama_embed", "mlx", tmp_path / "e")
    with pytest.raises(IncompatibleAdaptersError, match="LoRA only"):
        save_adapter(load_adapter(FIXTURES / "peft_llama_loha"), tmp_path / "h", "mlx")
    conv = Module(
        "model.conv", "lora", {"down": TensorRef.of(torch.ones(2, 4, 3, 3)), "up": TensorRef.of(torch.ones(8, 2, 1, 1))}
    )
    with pytest.raises(IncompatibleAdaptersError, match="conv"):
        save_adapter(Adapter("peft", {"model.conv": conv}), tmp_path / "c", "mlx")
    t = {
        "model.layers.0.mlp.experts.lora_a": torch.ones(4, 2, 32),
        "model.layers.0.mlp.experts.lora_b": torch.ones(4, 64, 2),
    }
    with pytest.raises(FileFormatError, match="SwitchLinear"):
        load_adapter(write_mlx(tmp_path / "moe", t))
    ok = {
        "model.layers.0.self_attn.q_proj.lora_a": torch.ones(32, 4),
        "model.layers.0.self_attn.q_proj.lora_b": torch.ones(4, 32),
    }
    with pytest.raises(FileFormatError, match="fine_tune_type full"):
        load_adapter(write_mlx(tmp_path / "full", ok, fine_tune_type="full"))
    with pytest.raises(FileFormatError, match="scale, not alpha"):
        load_adapter(write_mlx(tmp_path / "alpha", ok, lora_parameters={"rank": 4, "alpha": 16}))
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(ok, bare / "adapters.safetensors")
    with pytest.raises(FileFormatError, match="scale mlx-lm applies"):
        load_adapter(bare / "adapters.safetensors", "mlx")


def test_mix_merge_inspect_and_validate_for_mlx(mf: ModuleType, tmp_path: Path) -> None:
    convert(FIXTURES / "peft_llama", "mlx", tmp_path / "a")
    convert(FIXTURES / "peft_llama_patterns", "mlx", tmp_path / "b")
    rep = mix([tmp_path / "a", tmp_path / "b"], tmp_path / "mixed", [0.7, 0.3])
    assert rep.format == "mlx"
    ins = [load_adapter(FIXTURES / "peft_llama"), load_adapter(FIXTURES / "peft_llama_patterns")]
    mixed = load_adapter(tmp_path / "mixed")
    for name, m in mixed.modules.items():
        want = sum(
            w * a.modules[name].delta(dtype=F64) for a, w in zip(ins, (0.7, 0.3), strict=True) if name in a.modules
        )
        torch.testing.assert_close(m.delta(dtype=F64), want, rtol=1e-5, atol=1e-6)
    code, out, _ = run_cli("inspect", str(tmp_path / "mixed"), "--json")
    assert code == 0 and json.loads(out)["format"] == "mlx"
    code, out, _ = run_cli("validate", str(tmp_path / "mixed"), "--for", "mlx", "--json")
    assert code == 0, out
    code, out, _ = run_cli("validate", str(FIXTURES / "peft_llama"), "--for", "mlx", "--json")
    assert code == 1 and f"convert {FIXTURES / 'peft_llama'} --to mlx" in out
    mf.tiny_llama().save_pretrained(tmp_path / "base")
    code, _, err = run_cli("merge", str(tmp_path / "base"), str(tmp_path / "a"), "-o", str(tmp_path / "merged"))
    assert code == 0, err
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    want = peft_merged(mf, FIXTURES / "peft_llama")
    for key in want:
        kit.close(merged[key], want[key], key)


# ---- mlx-lm as the oracle ------------------------------------------------------------------------------------


@needs_mlx
@pytest.mark.parametrize("kind", ["lora", pytest.param("dora", marks=pytest.mark.slow)])
def test_mlx_lm_adapter_to_peft_merges_to_mlx_lm_fuse(kind: str, mf: ModuleType, tmp_path: Path) -> None:
    base = tmp_path / "base"
    mf.tiny_llama().save_pretrained(base)
    keys = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
    oracle("make", str(base), str(tmp_path / "mlx"), "4", "3.5", "1", kind, "0", *keys)
    oracle("fuse", str(base), str(tmp_path / "mlx"), str(tmp_path / "fused.safetensors"))
    fused = load_file(tmp_path / "fused.safetensors")
    assert detect(tmp_path / "mlx") == "mlx"
    convert(tmp_path / "mlx", "peft", tmp_path / "peft")
    merged = peft_merged(mf, tmp_path / "peft")
    changed = [k for k in fused if not torch.equal(fused[k], kit.snapshot(mf.tiny_llama())[k])]
    assert len(changed) == len(keys)  # num_layers 1: the last layer only
    for key in fused:
        kit.close(merged[key], fused[key], key)


@needs_mlx  # DoRA both ways: mlx-lm -> PEFT is slow-marked (5 s: two mlx-lm processes), PEFT -> mlx-lm is not
@pytest.mark.parametrize("src", [pytest.param("peft_llama_patterns", marks=pytest.mark.slow), "peft_llama_dora"])
def test_peft_adapter_as_mlx_fuses_to_peft_merge(src: str, mf: ModuleType, tmp_path: Path) -> None:
    base = tmp_path / "base"
    mf.tiny_llama().save_pretrained(base)
    convert(FIXTURES / src, "mlx", tmp_path / "mlx")
    oracle("fuse", str(base), str(tmp_path / "mlx"), str(tmp_path / "fused.safetensors"))
    fused = load_file(tmp_path / "fused.safetensors")
    merged = peft_merged(mf, FIXTURES / src)
    for key in fused:
        kit.close(fused[key], merged[key], key)
