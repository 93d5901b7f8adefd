"""diff: numbers against a dense float64 computation, tolerances against torch.allclose, streaming in chunks,
sharded folders, and adapters compared by their deltas across formats."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, run_cli
from safetensors.torch import load_file

from loratools import LoratoolsError, TensorRef, load_adapter, save_adapter
from loratools.cli.diff import diff_cmd
from loratools.io.safetensors import write_safetensors
from loratools.ops import diff as diff_mod
from loratools.ops.diff import DiffReport, compare_tensors, diff


def run(*args: str) -> tuple[int, str, str]:
    return run_cli("diff", *args)


def run_json(*args: str) -> tuple[int, dict[str, object]]:
    code, out, _ = run(*args, "--json")
    return code, json.loads(out)


def dense(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """max |a-b|, ||a-b|| / ||a||, cosine: the reference, dense in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    return (
        float((a - b).abs().max()),
        float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a)),
        float(a @ b / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))),
    )


def by_name(rep: DiffReport) -> dict[str, diff_mod.TensorDiff]:
    return {t.name: t for t in rep.tensors}


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """Two checkpoints that differ in `w` only: 1e-3 added to one element, -5e-4 to one row."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g)
    w2 = w.clone()
    w2[3, 5] += 1e-3
    w2[10] -= 5e-4
    v = torch.randn(16, generator=g)
    write_safetensors(tmp_path / "a.safetensors", {"w": w, "v": v, "n": torch.arange(6, dtype=torch.int64)})
    write_safetensors(tmp_path / "b.safetensors", {"w": w2, "v": v.clone(), "n": torch.arange(6, dtype=torch.int64)})
    return tmp_path / "a.safetensors", tmp_path / "b.safetensors"


def test_identical_files(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    a, _ = pair
    shutil.copy(a, tmp_path / "copy.safetensors")
    code, data = run_json(str(a), str(tmp_path / "copy.safetensors"))
    assert code == 0
    assert data["identical"] is True and data["mode"] == "tensors"
    assert (data["compared"], data["differ"]) == (3, 0)
    for t in data["tensors"]:  # type: ignore[attr-defined]
        assert (t["max_abs"], t["rel_fro"], t["cosine"], t["differs"]) == (0.0, 0.0, 1.0, False)
    code, out, _ = run(str(a), str(tmp_path / "copy.safetensors"))
    assert code == 0 and "identical: 3 tensors compared" in out and "│" not in out  # no table rows
    code, out, _ = run(str(a), str(tmp_path / "copy.safetensors"), "--all")
    assert code == 0 and out.count("same") == 3


def test_peft_safetensors_against_its_pickle() -> None:
    rep = diff(FIXTURES / "peft_llama", FIXTURES / "peft_llama_bin")
    assert rep.mode == "deltas" and rep.identical
    assert rep.compared == len(load_adapter(FIXTURES / "peft_llama").modules) == 8
    assert all(t.max_abs == 0 and t.cosine == 1 for t in rep.tensors)
    code, data = run_json(str(FIXTURES / "peft_llama"), str(FIXTURES / "peft_llama_bin"))
    assert code == 0 and data["identical"] is True


def test_perturbed_tensor_numbers(pair: tuple[Path, Path]) -> None:
    a, b = pair
    code, data = run_json(str(a), str(b))
    assert code == 1 and data["identical"] is False
    assert (data["compared"], data["differ"]) == (3, 1)
    rows = {t["name"]: t for t in data["tensors"]}  # type: ignore[attr-defined]
    assert [n for n, t in rows.items() if t["differs"]] == ["w"]
    ta, tb = load_file(a), load_file(b)  # an independent reader
    max_abs, rel, cos = dense(ta["w"], tb["w"])
    assert max_abs > 5e-4
    assert rows["w"]["max_abs"] == pytest.approx(max_abs, rel=1e-12)
    assert rows["w"]["rel_fro"] == pytest.approx(rel, rel=1e-9)
    assert rows["w"]["cosine"] == pytest.approx(cos, abs=1e-12)
    assert rows["w"]["cosine"] < 1
    assert rows["w"]["shape"] == [64, 32] and rows["w"]["dtype"] == "F32"
    code, out, _ = run(str(a), str(b))
    assert code == 1 and "differs" in out and " v " not in out  # only the differing row
    assert "3 tensors compared (tensors, exact), 1 differ," in out
    code, data = run_json(str(a), str(b), "--atol", "1e-2")
    assert code == 0 and data["identical"] is True and data["atol"] == 1e-2


@pytest.mark.parametrize("atol", [0.0, 4e-4, 9.9e-4, 1.01e-3, 2e-3])
@pytest.mark.parametrize("rtol", [0.0, 1e-4, 1e-3, 1e-1])
def test_tolerance_is_allclose(pair: tuple[Path, Path], atol: float, rtol: float) -> None:
    a, b = pair
    ta, tb = load_file(a), load_file(b)
    rep = diff(a, b, atol=atol, rtol=rtol)
    want = not torch.allclose(ta["w"].double(), tb["w"].double(), rtol=rtol, atol=atol)
    assert by_name(rep)["w"].differs is want
    assert rep.identical is not want


def test_only_in_one_side_shape_and_dtype_changes(tmp_path: Path) -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 4  # exact in fp16 too
    write_safetensors(tmp_path / "a.safetensors", {"x": x, "gone": x, "s": torch.zeros(4, 4), "dt": x})
    write_safetensors(tmp_path / "b.safetensors", {"x": x, "new": x, "s": torch.zeros(4, 5), "dt": x.half()})
    code, data = run_json(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))
    assert code == 1 and data["identical"] is False
    assert data["only_in_a"] == ["gone"] and data["only_in_b"] == ["new"]
    assert data["changed"] == [
        {"name": "dt", "a_shape": [3, 4], "b_shape": [3, 4], "a_dtype": "F32", "b_dtype": "F16"},
        {"name": "s", "a_shape": [4, 4], "b_shape": [4, 5], "a_dtype": "F32", "b_dtype": "F32"},
    ]
    rows = {t["name"]: t for t in data["tensors"]}  # type: ignore[attr-defined]
    assert sorted(rows) == ["dt", "x"]  # a shape change is not compared; a dtype change is
    assert rows["dt"]["differs"] is False and data["differ"] == 0
    code, out, _ = run(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))
    assert code == 1
    for text in ("only in A", "only in B", "4x4->4x5", "F32->F16", "1 only in A, 1 only in B, 2 shape/dtype"):
        assert text in out
    # a dtype change alone is a difference too
    write_safetensors(tmp_path / "c.safetensors", {"x": x.double()})
    write_safetensors(tmp_path / "d.safetensors", {"x": x})
    rep = diff(tmp_path / "c.safetensors", tmp_path / "d.safetensors")
    assert rep.differ == 0 and not rep.identical


def test_chunked_equals_dense(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(100, 13, generator=g)
    b = a + 1e-3 * torch.randn(100, 13, generator=g)
    b[50:] = a[50:]  # the difference lies in the first chunks only
    write_safetensors(tmp_path / "a.safetensors", {"t": a})
    write_safetensors(tmp_path / "b.safetensors", {"t": b.to(torch.bfloat16)})
    whole = by_name(diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors"))["t"]
    calls: list[int] = []
    add = diff_mod.PairStats.add

    def counting(self: diff_mod.PairStats, x: torch.Tensor, y: torch.Tensor) -> None:
        calls.append(x.numel())
        add(self, x, y)

    monkeypatch.setattr(diff_mod.PairStats, "add", counting)
    monkeypatch.setattr(diff_mod, "CHUNK_BYTES", 7 * 8)  # 7 elements a chunk
    chunked = by_name(diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors"))["t"]
    assert len(calls) == math.ceil(1300 / 7) and max(calls) == 7 and sum(calls) == 1300
    ref = dense(a, b.to(torch.bfloat16))
    for got in (whole, chunked):
        assert got.max_abs == pytest.approx(ref[0], rel=1e-12)
        assert got.rel_fro == pytest.approx(ref[1], rel=1e-9)
        assert got.cosine == pytest.approx(ref[2], abs=1e-12)
    assert chunked.differs and whole.differs
    calls.clear()
    stats = compare_tensors(a, b)  # the in-memory path (deltas) chunks the same way
    assert len(calls) == math.ceil(1300 / 7)
    assert stats.result("t", (100, 13), "F32").rel_fro == pytest.approx(dense(a, b)[1], rel=1e-9)


def test_nan_and_inf(tmp_path: Path) -> None:
    x = torch.tensor([1.0, math.nan, math.inf, -math.inf, 0.0])
    write_safetensors(tmp_path / "a.safetensors", {"t": x})
    write_safetensors(tmp_path / "b.safetensors", {"t": x.clone()})
    rep = diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert rep.identical and rep.tensors[0].max_abs == 0  # NaN and inf in the same place are equal
    y = x.clone()
    y[1] = 2.0
    write_safetensors(tmp_path / "c.safetensors", {"t": y})
    rep = diff(tmp_path / "a.safetensors", tmp_path / "c.safetensors", atol=1e9)
    assert not rep.identical and math.isnan(rep.tensors[0].max_abs)
    y = x.clone()
    y[3] = 5.0
    write_safetensors(tmp_path / "d.safetensors", {"t": y})
    rep = diff(tmp_path / "a.safetensors", tmp_path / "d.safetensors", atol=1e9, rtol=1.0)
    assert rep.tensors[0].differs  # -inf against a number is never close
    code, out, _ = run(str(tmp_path / "a.safetensors"), str(tmp_path / "c.safetensors"), "--json")
    assert code == 1 and json.loads(out)["tensors"][0]["max_abs"] == "nan"


def test_sharded_folder_against_single_file(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    tensors = {f"model.layers.{i}.w": torch.randn(8, 4, generator=g) for i in range(4)}
    tensors["model.embed.weight"] = torch.randn(10, 4, generator=g).half()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    (tmp_path / "sharded").mkdir()
    (tmp_path / "single").mkdir()
    for shard, keys in shards.items():
        write_safetensors(tmp_path / "sharded" / shard, {k: tensors[k] for k in keys})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    write_safetensors(tmp_path / "single" / "model.safetensors", tensors)
    code, data = run_json(str(tmp_path / "sharded"), str(tmp_path / "single"))
    assert code == 0 and data["identical"] is True and data["compared"] == 5
    rep = diff(tmp_path / "sharded" / "model.safetensors.index.json", tmp_path / "single" / "model.safetensors")
    assert rep.identical and rep.compared == 5
    tensors["model.layers.3.w"] = tensors["model.layers.3.w"] * 2
    write_safetensors(tmp_path / "single" / "model.safetensors", tensors, force=True)
    rep = diff(tmp_path / "sharded", tmp_path / "single")
    assert [t.name for t in rep.tensors if t.differs] == ["model.layers.3.w"]
    assert by_name(rep)["model.layers.3.w"].rel_fro == pytest.approx(1.0)  # ||a - 2a|| / ||a||
    assert by_name(rep)["model.layers.3.w"].cosine == pytest.approx(1.0)


def test_adapter_against_its_kohya_conversion(tmp_path: Path) -> None:
    src = FIXTURES / "diffusers_sd"
    adapter = load_adapter(src)
    save_adapter(adapter, tmp_path / "k.safetensors", "kohya")
    rep = diff(src, tmp_path / "k.safetensors")
    assert rep.mode == "deltas" and rep.identical
    assert rep.compared == len(adapter.modules) == 52
    assert all(t.max_abs <= 1e-6 and t.cosine == pytest.approx(1.0) for t in rep.tensors)
    assert sorted(t.name for t in rep.tensors) == sorted(adapter.modules)
    code, data = run_json(str(tmp_path / "k.safetensors"), str(src))
    assert code == 0 and data["identical"] is True and data["mode"] == "deltas"
    # one module's alpha changed: exactly that module's delta differs, and the note says why
    name = sorted(adapter.modules)[5]
    m = adapter.modules[name]
    assert m.alpha is not None
    m.alpha = m.alpha * 2
    save_adapter(adapter, tmp_path / "k2.safetensors", "kohya")
    rep = diff(src, tmp_path / "k2.safetensors")
    assert [t.name for t in rep.tensors if t.differs] == [name]
    assert by_name(rep)[name].rel_fro == pytest.approx(1.0, rel=1e-6)
    assert any(n.startswith(name + ": alpha") for n in rep.notes)


def test_adapters_modules_in_one_side_and_notes() -> None:
    rep = diff(FIXTURES / "peft_llama", FIXTURES / "peft_llama_patterns")
    assert rep.mode == "deltas" and not rep.identical
    assert rep.only_in_a == []
    assert rep.only_in_b == [f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("down_proj", "gate_proj", "up_proj")]
    assert "model.layers.0.self_attn.k_proj: rank 4 vs 2" in "\n".join(rep.notes)
    # the deltas are compared as the model defines them
    a, b = load_adapter(FIXTURES / "peft_llama"), load_adapter(FIXTURES / "peft_llama_patterns")
    name = "model.layers.0.self_attn.q_proj"
    got = by_name(rep)[name]
    ref = dense(a.modules[name].delta(), b.modules[name].delta())
    assert got.max_abs == pytest.approx(ref[0], rel=1e-6)
    assert got.rel_fro == pytest.approx(ref[1], rel=1e-6)
    assert got.cosine == pytest.approx(ref[2], abs=1e-6)


def test_dora_magnitude_is_compared(tmp_path: Path) -> None:
    src = FIXTURES / "peft_llama_dora"
    adapter = load_adapter(src)
    name = sorted(adapter.modules)[0]
    mag = adapter.modules[name].magnitude
    assert mag is not None
    adapter.modules[name].magnitude = TensorRef.of(mag.load() * 1.01)
    save_adapter(adapter, tmp_path / "dora", "peft")
    rep = diff(src, tmp_path / "dora")
    assert [t.name for t in rep.tensors if t.differs] == [f"{name}.magnitude"]
    assert len(rep.tensors) == 2 * len(adapter.modules)


def test_bad_input() -> None:
    with pytest.raises(LoratoolsError, match="only pickle weights"):
        diff(FIXTURES / "peft_llama_bin", FIXTURES / "peft_llama", mode="tensors")
    with pytest.raises(LoratoolsError):
        diff(FIXTURES / "peft_llama", FIXTURES / "nope")
    with pytest.raises(LoratoolsError, match="non-negative"):
        diff(FIXTURES / "peft_llama", FIXTURES / "peft_llama", atol=-1.0)


def test_bad_input_cli(tmp_path: Path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    code, out, err = run(str(tmp_path / "junk.safetensors"), str(FIXTURES / "peft_llama"))
    assert code == 2 and out == "" and "Error:" in err and "not valid JSON" in err
    code, _, err = run(str(FIXTURES / "peft_llama"), str(FIXTURES / "peft_llama"), "--rtol", "-1")
    assert code == 2
    code, _, err = run(str(FIXTURES / "peft_llama"), str(FIXTURES / "kohya_sd/lora.safetensors"), "--mode", "tensors")
    assert code == 1  # every tensor only on one side


def test_help_examples_run() -> None:
    help_text = diff_cmd.help or ""
    examples = [line.strip() for line in help_text.split("Example:")[1].splitlines() if line.strip()]
    assert len(examples) == 3
    for line in examples:
        args = [f"{FIXTURES}/{a[len('fixtures/') :]}" if a.startswith("fixtures/") else a for a in line.split()[2:]]
        code, out, _ = run(*args)
        assert code in (0, 1) and out
