"""Reading GGUF adapters: the header parser against gguf's own GGUFReader (the owner is the oracle), llama.cpp's
rules for the scale (one alpha per file, none or 0 meaning scale 1), files without head counts (as llama.cpp's
converter writes them), quantized factors, merge-tool norms, and every command taking a GGUF file as input."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import gguf
import gguf_kit as kit
import numpy as np
import pytest
import torch
from conftest import FIXTURES, run_cli

from loratools.errors import FileFormatError, LoratoolsError
from loratools.formats import detect, load_adapter, save_adapter
from loratools.formats.gguf import read_header
from loratools.formats.gguf import reader as gguf_reader
from loratools.ops.convert import convert

SRC = FIXTURES / "peft_llama_patterns"  # rank and alpha patterns, rsLoRA: every scale differs from alpha / r


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, mf: Any) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    mf.tiny_llama().save_pretrained(root / "base")
    convert(SRC, "gguf", root / "patterns.gguf", base=root / "base")
    convert(FIXTURES / "peft_llama", "gguf", root / "plain.gguf", base=root / "base")
    return {"root": root, "base": root / "base", "patterns": root / "patterns.gguf", "plain": root / "plain.gguf"}


def rewrite(src: Path, dst: Path, *, drop: tuple[str, ...] = (), kv: dict[str, Any] | None = None,
            qtype: Any = None, extra: dict[str, np.ndarray] | None = None) -> Path:  # fmt: skip
    """``src`` written again by gguf's own writer: keys dropped or set, tensors (re)typed, tensors added."""
    r, tensors = kit.gguf_tensors(src)
    arch = kit.field(r, "general.architecture")
    w = gguf.GGUFWriter(dst, arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key in drop or key == "general.architecture" or key in (kv or {}):
            continue
        w.add_key_value(key, f.contents(), f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    for key, value in (kv or {}).items():
        w.add_key_value(key, value[0], value[1])
    for name, t in {**tensors, **(extra or {})}.items():
        if qtype is None:
            w.add_tensor(name, t)
        else:
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


# ---- the container, against gguf.GGUFReader -------------------------------------------------------------------


def test_header_agrees_with_gguf_reader(tmp_path: Path) -> None:
    """Every value type, arrays of numbers and strings, an odd alignment and tensors of several ggml types: the
    bounded parser reads what gguf's own reader reads."""
    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(64)
    w.add_type(gguf.GGUFType.ADAPTER)
    for i, vt in enumerate([gguf.GGUFValueType.UINT8, gguf.GGUFValueType.INT16, gguf.GGUFValueType.UINT64,
                            gguf.GGUFValueType.INT64, gguf.GGUFValueType.FLOAT64]):  # fmt: skip
        w.add_key_value(f"x.scalar{i}", 7, vt)
    w.add_bool("x.flag", True)
    w.add_float32("x.f", 0.5)
    w.add_array("x.ints", [1, 2, 3])
    w.add_array("x.names", ["a", "bé", ""])
    w.add_tensor("t.f32", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.add_tensor("t.f16", np.arange(64, dtype=np.float16).reshape(2, 32))
    q = gguf.quants.quantize(np.ones((2, 64), np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("t.q8", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    h = read_header(path)
    r = gguf.GGUFReader(path)
    assert h.alignment == 64 and h.data_start == r.data_offset
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        want = f.contents()
        got = h.kv[key]
        assert (
            (list(got) if isinstance(got, np.ndarray) else got) == pytest.approx(want)
            if key != "x.names"
            else got == want
        )
    assert [t.name for t in r.tensors] == list(h.tensors)
    for t in r.tensors:
        e = h.tensors[t.name]
        assert e.start == t.data_offset and e.nbytes == t.n_bytes and e.ggml_type == int(t.tensor_type)
        assert e.shape == tuple(int(x) for x in reversed(t.shape))


def test_written_files_read_by_gguf_reader_and_loratools_alike(files: dict[str, Path]) -> None:
    """The writer's output, read by the owner's reader and by loratools: the same tensors, bit for bit."""
    r, tensors = kit.gguf_tensors(files["patterns"])
    h = read_header(files["patterns"])
    assert sorted(tensors) == sorted(h.tensors)
    for name, want in tensors.items():
        e = h.tensors[name]
        got = gguf_reader._load(files["patterns"], e, None, e.shape).numpy()
        assert np.array_equal(got, want), name


# ---- llama.cpp's rules ----------------------------------------------------------------------------------------


def test_round_trip_and_keys(files: dict[str, Path]) -> None:
    src = load_adapter(SRC)
    back = load_adapter(files["patterns"])
    kit.same_deltas(src, back)
    assert back.format == "gguf" and back.base_model == src.base_model
    assert back.metadata["llama.attention.head_count"] == "4" and back.metadata["adapter.lora.alpha"] == "16.0"
    assert json.loads(back.metadata["loratools"])["command"] == "convert"  # the provenance record, carried
    assert {m.alpha for m in back.modules.values()} == {16.0} and not any(m.rslora for m in back.modules.values())


@pytest.mark.parametrize("alpha", [None, 0.0])
def test_no_alpha_or_zero_means_scale_one(files: dict[str, Path], tmp_path: Path, alpha: float | None) -> None:
    """llama-adapter.cpp: ``scale = alpha ? alpha / rank : 1``."""
    kv = {} if alpha is None else {"adapter.lora.alpha": (alpha, gguf.GGUFValueType.FLOAT32)}
    path = rewrite(files["plain"], tmp_path / "a.gguf", drop=("adapter.lora.alpha",), kv=kv)
    _, tensors = kit.gguf_tensors(path)
    a = load_adapter(path)
    m = a.modules["model.layers.0.self_attn.v_proj"]
    assert m.alpha is None and m.scale == 1.0
    want = torch.from_numpy(tensors["blk.0.attn_v.weight.lora_b"] @ tensors["blk.0.attn_v.weight.lora_a"])
    kit.close(m.delta(torch.float64), want, m.name)


def test_without_head_counts_a_config_beside_undoes_the_permutation(files: dict[str, Path], tmp_path: Path) -> None:
    """llama.cpp's converter records no head counts: the q/k factors then need the base's config.json beside the
    file (only the header-level facts are known without it); every other module reads as it is."""
    bare = rewrite(
        files["patterns"], tmp_path / "bare.gguf", drop=("llama.attention.head_count", "llama.attention.head_count_kv")
    )
    a = load_adapter(bare)  # the header: fine
    assert a.modules["model.layers.0.self_attn.q_proj"].rank == 8
    kit.close(
        a.modules["model.layers.0.mlp.up_proj"].delta(),
        load_adapter(SRC).modules["model.layers.0.mlp.up_proj"].delta(),
        "up",
    )
    with pytest.raises(LoratoolsError, match="head counts"):
        a.modules["model.layers.0.self_attn.q_proj"].delta()
    code, out, err = run_cli("inspect", str(bare), "--fast", "--json")
    assert code == 0 and json.loads(out)["num_modules"] == 14
    code, _, err = run_cli("convert", str(bare), "--to", "peft", "-o", str(tmp_path / "x"))
    assert code == 1 and "config.json beside" in err and not (tmp_path / "x").exists()
    shutil.copy(files["base"] / "config.json", tmp_path / "config.json")
    kit.same_deltas(load_adapter(SRC), load_adapter(bare))


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0"])
def test_half_and_quantized_factors(files: dict[str, Path], tmp_path: Path, qtype: str) -> None:
    """F16 / BF16 factors keep their dtype; Q8_0 is dequantized exactly as gguf dequantizes it. As
    ``convert_lora_to_gguf.py --outtype q8_0`` writes it (``prepare_tensors``: a QuantError falls back to F16), the
    factors whose rows are not whole blocks of 32 (lora_b, r wide) are F16."""
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    _, tensors = kit.gguf_tensors(files["plain"])
    path = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    types = {}
    for name, t in tensors.items():
        try:
            types[name] = qt
            w.add_tensor(name, gguf.quants.quantize(t, qt), raw_dtype=qt)
        except gguf.QuantError:
            types[name] = gguf.GGMLQuantizationType.F16
            w.add_tensor(name, t.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    h = read_header(path)
    a = load_adapter(path)
    want_dtypes = {"F32", "F16"} if qtype == "Q8_0" else {qtype}
    assert {t.dtype for m in a.modules.values() for t in m.factors.values()} == want_dtypes
    for name, e in h.tensors.items():
        assert e.ggml_type == int(types[name])
        raw = np.fromfile(path, dtype=np.uint8, count=e.nbytes, offset=e.start)
        got = gguf_reader._load(path, e, None, e.shape).float().numpy()
        if types[name] == gguf.GGMLQuantizationType.Q8_0:
            want = gguf.quants.dequantize(raw.reshape(e.shape[0], -1), types[name]).reshape(e.shape)
            assert np.array_equal(got, want), name
        else:
            assert np.allclose(got, tensors[name], rtol=1e-2, atol=1e-2), name
    ref = load_adapter(files["plain"])
    for n, m in a.modules.items():  # the scale: the file's alpha over each B's rank, whatever the dtypes
        assert torch.allclose(m.delta(torch.float64), ref.modules[n].delta(torch.float64), rtol=0.05, atol=0.05)


def test_norms_a_merge_tool_stored_are_full_tensors(tmp_path: Path, mf: Any) -> None:
    """mergekit-extract-lora puts norms in the adapter; llama.cpp's converter writes them through the class's
    rules (Gemma: + 1) and its loader skips them: read back as full tensors, the offset taken off."""
    import transformers

    base = tmp_path / "gemma"
    cfg = kit.build_base("gemma", base)
    shapes = kit.base_shapes(base)
    a = kit.random_adapter({k: v for k, v in shapes.items() if "q_proj" in k})
    save_adapter(a, tmp_path / "p", "peft")
    convert(tmp_path / "p", "gguf", tmp_path / "g.gguf", base=base)
    norm = np.full(cfg["hidden_size"], 1.25, dtype=np.float32)  # a norm weight of 0.25, stored + 1
    path = rewrite(tmp_path / "g.gguf", tmp_path / "n.gguf", extra={"blk.0.attn_norm.weight": norm})
    back = load_adapter(path)
    extra = back.extras["model.layers.0.input_layernorm.weight"]
    assert extra.role == "modules_to_save" and torch.allclose(extra.ref.load(), torch.full((32,), 0.25))
    code, out, _ = run_cli("validate", str(path), "--for", "llama.cpp")
    assert code == 0 and "skips the norm" in out
    del transformers


# ---- every command takes GGUF input -----------------------------------------------------------------------


def test_every_command_reads_gguf(files: dict[str, Path], tmp_path: Path) -> None:
    g = str(files["patterns"])
    code, out, _ = run_cli("inspect", g, "--json")
    data = json.loads(out)
    assert code == 0 and data["format"] == "gguf" and data["num_modules"] == 14 and data["made_by"]
    code, out, _ = run_cli("inspect", g, "--fast", "--json")
    assert code == 0 and json.loads(out)["modules"][0]["norm"] is None
    assert run_cli("validate", g)[0] == 0
    assert run_cli("validate", g, "--for", "llama.cpp")[0] == 0
    assert run_cli("validate", g, "--for", "ollama")[0] == 0
    code, out, _ = run_cli("validate", g, "--for", "vllm")
    assert code == 1 and f"convert {g} --to peft" in out.replace("\n", "")
    assert run_cli("validate", g, "--base", str(files["base"]))[0] == 0
    for to, name in (("peft", "peft"), ("kohya", "kohya.safetensors")):
        assert run_cli("convert", g, "--to", to, "-o", str(tmp_path / name))[0] == 0
    kit.same_deltas(load_adapter(SRC), load_adapter(tmp_path / "peft"))
    code, out, _ = run_cli("diff", g, str(SRC), "--rtol", "1e-5", "--atol", "1e-6", "--json")
    assert code == 0, out
    assert run_cli("diff", g, str(tmp_path / "peft"), "--rtol", "1e-5", "--atol", "1e-6")[0] == 0
    assert run_cli("mix", g, str(SRC), "--weights", "0.5,0.5", "--to", "peft", "-o", str(tmp_path / "mix"))[0] == 0
    kit.same_deltas(load_adapter(SRC), load_adapter(tmp_path / "mix"))
    assert run_cli("resize", g, "--rank", "2", "--to", "peft", "-o", str(tmp_path / "small"))[0] == 0
    assert {m.rank for m in load_adapter(tmp_path / "small").modules.values()} == {2}
    code, _, err = run_cli("resize", g, "--rank", "2", "-o", str(tmp_path / "small.gguf"))
    assert code == 1 and "--to gguf" in err and "convert" in err and not (tmp_path / "small.gguf").exists()
    assert run_cli("merge", str(files["base"]), g, "-o", str(tmp_path / "merged"))[0] == 0
    assert run_cli("merge", str(files["base"]), str(SRC), "-o", str(tmp_path / "merged-peft"))[0] == 0
    from safetensors.torch import load_file

    x, y = (
        load_file(tmp_path / "merged" / "model.safetensors"),
        load_file(tmp_path / "merged-peft" / "model.safetensors"),
    )
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=1e-5, atol=1e-6)


def test_a_folder_holding_one_gguf_file(files: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    shutil.copy(files["plain"], folder / "adapter.gguf")
    assert detect(folder) == "gguf" and len(load_adapter(folder).modules) == 8


def test_detected_by_magic_whatever_the_name(files: dict[str, Path], tmp_path: Path) -> None:
    odd = shutil.copy(files["plain"], tmp_path / "adapter.safetensors")
    assert detect(odd) == "gguf"


def test_a_gguf_adapter_is_written_by_convert_alone(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileFormatError, match="convert --to gguf"):
        save_adapter(load_adapter(files["plain"]), tmp_path / "x.gguf")


def test_inspect_fast_reads_the_header_only(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """No tensor data is read (the loader is never called) and only the header's bytes are."""
    from loratools.ops.inspect import inspect

    def no_data(*args: Any) -> None:
        raise AssertionError("tensor data read")

    monkeypatch.setattr(gguf_reader, "_load", no_data)
    rep = inspect(files["patterns"], norms=False)
    assert rep.num_modules == 14 and rep.format == "gguf"
    h = read_header(files["patterns"])
    assert h.bytes_read <= h.data_start < h.file_size


def test_header_only_needs_no_torch(files: dict[str, Path]) -> None:
    import subprocess

    code = (
        "import sys; from loratools.ops.inspect import inspect; "
        f"r = inspect({str(files['patterns'])!r}, norms=False); "
        "print(r.num_modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["14", "False"]
