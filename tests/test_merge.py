"""merge against PEFT's merge_and_unload and diffusers' fuse, the merged folder in transformers, atomicity."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from conftest import FIXTURES

from loratools import load_adapter
from loratools.cli import cli
from loratools.errors import LoratoolsError, OutputExistsError, ShapeError
from loratools.io import stream
from loratools.ops import merge_engine
from loratools.ops.merge import merge

PEFT_FIXTURES = {
    "peft_llama": "tiny_llama",
    "peft_llama_patterns": "tiny_llama",
    "peft_llama_dora": "tiny_llama",
    "peft_llama_embed": "tiny_llama",
    "peft_llama_bin": "tiny_llama",
    "peft_gpt2": "tiny_gpt2",
}


def load_dir(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.rglob("*.safetensors")):
        prefix = "" if f.parent == folder else f"{f.parent.relative_to(folder)}."
        out.update({prefix + k: v for k, v in safetensors.torch.load_file(str(f)).items()})
    return out


@pytest.fixture(scope="module")
def bases(mf: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for builder in ("tiny_llama", "tiny_gpt2"):
        getattr(mf, builder)().save_pretrained(root / builder)
        out[builder] = root / builder
    return out


@pytest.mark.parametrize("fixture", sorted(PEFT_FIXTURES))
def test_merge_equals_peft_merge_and_unload(
    fixture: str, mf: ModuleType, bases: dict[str, Path], tmp_path: Path
) -> None:
    from peft import PeftModel

    builder = PEFT_FIXTURES[fixture]
    merge(bases[builder], [FIXTURES / fixture], tmp_path / "out")
    ours = load_dir(tmp_path / "out")
    model = PeftModel.from_pretrained(getattr(mf, builder)(), FIXTURES / fixture)
    ids = torch.arange(10).reshape(2, 5)
    with torch.no_grad():
        unmerged = model(ids).logits
        peft_merged = model.merge_and_unload().state_dict()
    base = load_dir(bases[builder])
    assert ours.keys() == base.keys()
    changed = 0
    for key, value in ours.items():
        want = peft_merged[key]
        torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
        changed += not torch.equal(value, base[key])
    assert changed >= len(load_adapter(FIXTURES / fixture).modules)
    # the merged folder loads in transformers as the base did, and gives the unmerged adapter's logits
    from transformers import AutoModelForCausalLM

    merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(merged_model(ids).logits, unmerged, rtol=1e-4, atol=1e-5)
    made = json.loads(safetensors.safe_open(str(tmp_path / "out" / "model.safetensors"), "pt").metadata()["loratools"])
    assert made["command"] == "merge" and made["inputs"][0]["sha256"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in bases[builder].iterdir())


def test_merge_diffusers_pipeline_equals_diffusers_fuse(mf: ModuleType, tmp_path: Path) -> None:
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as SD

    pipe = tmp_path / "pipe"
    unet, te = mf.tiny_unet(), mf.tiny_clip()
    unet.save_pretrained(pipe / "unet")
    te.save_pretrained(pipe / "text_encoder")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    report = merge(pipe, [FIXTURES / "diffusers_sd"], tmp_path / "out", device="auto")
    ours = load_dir(tmp_path / "out")
    sd, alphas, meta = SD.lora_state_dict(str(FIXTURES / "diffusers_sd"), return_lora_metadata=True)
    SD.load_lora_into_unet(sd, alphas, unet, adapter_name="default", metadata=meta)
    SD.load_lora_into_text_encoder(sd, alphas, te, adapter_name="default", metadata=meta)
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in (unet, te):
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge(adapter_names=["default"])
    fused = {f"unet.{k}": v for k, v in _plain_state(unet).items()}
    fused |= {f"text_encoder.{k}": v for k, v in _plain_state(te).items()}
    assert len(report.tensors) == len(load_adapter(FIXTURES / "diffusers_sd").modules)
    for t in report.tensors:
        torch.testing.assert_close(
            ours[t.name], fused[t.name], rtol=1e-5, atol=1e-6, msg=lambda m, n=t.name: f"{n}: {m}"
        )
    # the merged UNet loads back in diffusers
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet")
    assert (tmp_path / "out" / "model_index.json").is_file()


def _plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A model's weights with PEFT's wrapper names (base_layer) folded back to the original ones."""
    out = {}
    for k, v in model.state_dict().items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out


def test_kohya_and_lycoris_resolve_against_a_unet_folder(mf: ModuleType, tmp_path: Path) -> None:
    mf.tiny_unet().save_pretrained(tmp_path / "unet")
    for i, fx in enumerate(("lycoris_loha.safetensors", "lycoris_lokr.safetensors", "lycoris_dora.safetensors")):
        out = tmp_path / f"out{i}"
        report = merge(tmp_path / "unet", [FIXTURES / fx], out)
        a = load_adapter(FIXTURES / fx)
        assert len(report.tensors) == len(a.modules)
        base, merged = load_dir(tmp_path / "unet"), load_dir(out)
        flat = {("lora_unet_" + n[: -len(".weight")].replace(".", "_")): n for n in base}
        for name, m in a.modules.items():
            key = flat[name]
            torch.testing.assert_close(merged[key], m.apply(base[key]), rtol=1e-5, atol=1e-6)


def test_bf16_output_is_the_fp32_sum_cast_once(mf: ModuleType, tmp_path: Path) -> None:
    mf.tiny_llama().to(torch.bfloat16).save_pretrained(tmp_path / "base")
    weights = [0.8, -0.5]
    adapters = [FIXTURES / "peft_llama", FIXTURES / "peft_llama_patterns"]
    report = merge(tmp_path / "base", adapters, tmp_path / "out", weights)
    base, ours = load_dir(tmp_path / "base"), load_dir(tmp_path / "out")
    loaded = [load_adapter(a) for a in adapters]
    twice = 0
    for key, w in base.items():
        exact = w.double()
        rounded_delta = torch.zeros_like(w)
        for a, k in zip(loaded, weights, strict=True):
            m = a.modules.get(key.removesuffix(".weight"))
            if m is not None:
                exact = exact + k * m.delta(dtype=torch.float64)
                rounded_delta = rounded_delta + (k * m.delta()).to(torch.bfloat16)
        assert ours[key].dtype == torch.bfloat16
        # cast once: every element is the bf16 nearest to the exact sum (within half a bf16 step; the float32
        # arithmetic before the cast only decides exact ties)
        half_ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 8)
        err = (ours[key].double() - exact).abs()
        assert bool((err <= half_ulp * (1 + 1e-5)).all()), key
        # rounding the delta to bf16 before adding (PEFT's half-precision path) is measurably worse
        double = (w.float() + rounded_delta.float()).to(torch.bfloat16).double()
        twice += int(((double - exact).abs() > half_ulp * (1 + 1e-5)).sum())
    assert twice > 0
    # what storage did: a bf16 cast rounds part of the delta away, and the report says how much
    kept = [t.retained for t in report.tensors]
    assert all(0.9 < r < 1.0 for r in kept)
    assert report.summary["overflow"] == 0


def test_fp16_overflow_is_reported(mf: ModuleType, tmp_path: Path) -> None:
    from loratools.io.safetensors import write_safetensors

    base = tmp_path / "base.safetensors"
    write_safetensors(
        base, {"model.layers.0.self_attn.q_proj.weight": torch.full((32, 32), 65000.0, dtype=torch.float16)}
    )
    adapter = load_adapter(FIXTURES / "peft_llama")
    adapter.modules = {"model.layers.0.self_attn.q_proj": adapter.modules["model.layers.0.self_attn.q_proj"]}
    from loratools import save_adapter

    save_adapter(adapter, tmp_path / "one")
    report = merge(base, [tmp_path / "one"], tmp_path / "out.safetensors", [1e4])
    assert report.tensors[0].overflow > 0


def test_sharded_base_keeps_its_shards_and_index(mf: ModuleType, tmp_path: Path) -> None:
    mf.tiny_llama().save_pretrained(tmp_path / "base", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "base").glob("*.safetensors"))
    assert len(shards) > 2
    merge(tmp_path / "base", [FIXTURES / "peft_llama"], tmp_path / "out", dtype="bf16")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == shards
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    sizes = 0
    for shard in shards:
        h = safetensors.safe_open(str(tmp_path / "out" / shard), "pt")
        for k in h.keys():  # noqa: SIM118
            assert index["weight_map"][k] == shard
            sizes += h.get_tensor(k).numel() * 2
    assert index["metadata"]["total_size"] == sizes
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_failure_half_way_leaves_nothing(
    bases: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = merge_engine._merge_tensor

    def failing(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a shard
        return real(*args, **kw)

    monkeypatch.setattr(merge_engine, "_merge_tensor", failing)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        merge(bases["tiny_llama"], [FIXTURES / "peft_llama"], tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temp folder
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        merge(bases["tiny_llama"] / "model.safetensors", [FIXTURES / "peft_llama"], tmp_path / "out.safetensors")
    assert sorted(os.listdir(tmp_path)) == before


def test_refuses_to_overwrite_and_never_touches_inputs(bases: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match="already exists"):
        merge(bases["tiny_llama"], [FIXTURES / "peft_llama"], tmp_path / "out")
    merge(bases["tiny_llama"], [FIXTURES / "peft_llama"], tmp_path / "out", force=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(OutputExistsError, match="one of the inputs"):
        merge(bases["tiny_llama"], [FIXTURES / "peft_llama"], bases["tiny_llama"], force=True)
    r = CliRunner().invoke(
        cli, ["merge", str(bases["tiny_llama"]), str(FIXTURES / "peft_llama"), "-o", str(tmp_path / "out")]
    )
    assert r.exit_code == 1 and "already exists" in r.stderr and "--force" in r.stderr


def test_modules_that_do_not_resolve_are_an_error_listing_them(bases: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ShapeError, match="8 module\\(s\\) match no base tensor: model.layers.0"):
        merge(bases["tiny_gpt2"], [FIXTURES / "peft_llama"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(LoratoolsError, match="weight"):
        merge(bases["tiny_llama"], [FIXTURES / "peft_llama"], tmp_path / "x", [1.0, 2.0])


def test_cli_report_json_and_html(bases: dict[str, Path], tmp_path: Path) -> None:
    args = ["merge", str(bases["tiny_llama"]), str(FIXTURES / "peft_llama"), "--dtype", "bf16"]
    r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "a"), "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["summary"]["merged"] == 8 and len(data["tensors"]) == 8
    t = data["tensors"][0]
    assert {"name", "delta_norm", "base_norm", "relative_change", "max_abs_delta", "retained", "overflow"} <= t.keys()
    assert "delta retained min" in r.stdout
    r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "b"), "--report", str(tmp_path / "r.html")])
    page = (tmp_path / "r.html").read_text()
    assert r.exit_code == 0 and "<svg" in page and "model.layers.1.self_attn.q_proj.weight" in page


@pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape")  # PEFT mistakes lora_B.bias for a ZeRO shard
def test_lora_bias_is_merged_like_peft(mf: ModuleType, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base = mf.tiny_llama()
    for layer in base.model.layers:  # give q_proj a bias so lora_bias has somewhere to go
        layer.self_attn.q_proj.bias = torch.nn.Parameter(torch.randn(layer.self_attn.q_proj.out_features) * 0.1)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], lora_bias=True))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "adapter")
    report = merge(tmp_path / "base", [tmp_path / "adapter"], tmp_path / "out")
    ours = load_dir(tmp_path / "out")
    want = model.merge_and_unload().state_dict()
    biases = [t.name for t in report.tensors if t.name.endswith(".bias")]
    assert len(biases) == 2
    for key, value in ours.items():
        torch.testing.assert_close(value, want[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_chunking_does_not_change_the_result(
    mf: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    """Rows are merged a few at a time and handed to the writer in groups: chunk and group boundaries (a
    chunk of one row, groups of three chunks, a last group cut short) give the tensors and the report of one
    pass."""
    mf.tiny_llama().to(torch.bfloat16).save_pretrained(tmp_path / "base")
    adapters = [FIXTURES / "peft_llama", FIXTURES / "peft_llama_patterns"]
    whole = merge(tmp_path / "base", adapters, tmp_path / "whole", [0.7, 0.4])
    row = 64 * 4  # the widest tiny_llama row in float32 bytes
    monkeypatch.setattr(merge_engine, "CHUNK_BYTES", row)
    monkeypatch.setattr(stream, "IO_BYTES", 3 * 64 * 2)
    # the compiled loop: jobs of four rows, written in blocks of three (rows left over from its four-row tiles)
    monkeypatch.setattr(merge_engine, "JOB_BYTES", 1)
    monkeypatch.setattr(stream, "BLOCK_BYTES", 3 * 64 * 2)
    chunked = merge(tmp_path / "base", adapters, tmp_path / "chunked", [0.7, 0.4])
    if merge_engine.KERNEL is not None:  # each element's sum is the same in any block: the same bytes
        a, b = load_dir(tmp_path / "whole"), load_dir(tmp_path / "chunked")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        monkeypatch.setattr(merge_engine, "KERNEL", None)  # and the torch engine's chunks, against the loop
        chunked = merge(tmp_path / "base", adapters, tmp_path / "chunked_torch", [0.7, 0.4])
        tmp_path.joinpath("chunked").rename(tmp_path / "loop")
        tmp_path.joinpath("chunked_torch").rename(tmp_path / "chunked")
    a, b = load_dir(tmp_path / "whole"), load_dir(tmp_path / "chunked")
    assert a.keys() == b.keys()
    differ = 0
    for k in a:
        # the float32 matmul may sum a few rows in another order for another row count, which can only move a
        # rounding tie: one bf16 step at most, in a handful of elements
        step = 2.0 ** (torch.floor(torch.log2(a[k].double().abs().clamp_min(1e-30))) - 7)
        assert bool(((a[k].double() - b[k].double()).abs() <= step).all()), k
        differ += int((a[k] != b[k]).sum())
    assert differ <= sum(t.numel() for t in a.values()) // 1000
    for x, y in zip(whole.tensors, chunked.tensors, strict=True):
        assert x.name == y.name
        for field in ("delta_norm", "base_norm", "retained", "max_abs_delta"):
            assert getattr(x, field) == pytest.approx(getattr(y, field), rel=1e-6), (x.name, field)


def test_unaligned_tensor_data_is_read_rather_than_mapped(
    mf: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    """A file whose data section starts at an odd offset (a header not padded to 8 bytes, which some writers
    produce) cannot be viewed in place as bf16: the same result comes from reading it."""
    mf.tiny_llama().to(torch.bfloat16).save_pretrained(tmp_path / "base")
    src = tmp_path / "base" / "model.safetensors"
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + n]), separators=(",", ":")).encode()
    header += b" " * ((len(header) % 2 == 0) + 0)  # an odd header length: every tensor at an odd offset
    assert (8 + len(header)) % 2 == 1
    odd = tmp_path / "odd.safetensors"
    odd.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n :])
    reads: list[int] = []
    real_read = merge_engine.read_into
    monkeypatch.setattr(
        merge_engine, "read_into", lambda fh, start, view: reads.append(start) or real_read(fh, start, view)
    )
    merge(src, [FIXTURES / "peft_llama"], tmp_path / "aligned.safetensors")
    assert reads == []  # aligned: every LoRA target viewed in place through the memory map
    merge(odd, [FIXTURES / "peft_llama"], tmp_path / "unaligned.safetensors")
    assert reads and all(start % 2 for start in reads)
    a = safetensors.torch.load_file(str(tmp_path / "aligned.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "unaligned.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- DoRA with a weight: W' = W + w * (W_dora - W) (ComfyUI's rule), and what has no defined meaning ------------


def _dora(axis: str = "out", fan_in_fan_out: bool = False, seed: int = 0) -> tuple[Any, torch.Tensor]:
    """A DoRA module (in memory) on a 6 x 5 weight, and that weight in its stored layout, all float64."""
    from loratools.model import Module, TensorRef

    g = torch.Generator().manual_seed(seed)
    up, down = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    mag = torch.rand(6 if axis == "out" else 5, generator=g, dtype=torch.float64) + 0.5
    m = Module(
        "x", "lora", {"down": TensorRef.of(down), "up": TensorRef.of(up)}, alpha=3.0,
        fan_in_fan_out=fan_in_fan_out, magnitude=TensorRef.of(mag), dora_axis=axis,  # type: ignore[arg-type]
    )  # fmt: skip
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    return m, (w.T.contiguous() if fan_in_fan_out else w)


@pytest.mark.parametrize(("axis", "fan_in_fan_out"), [("out", False), ("in", False), ("out", True)])
def test_dora_weight_rule_by_hand_in_float64(axis: str, fan_in_fan_out: bool) -> None:
    m, stored = _dora(axis, fan_in_fan_out)
    w = stored.T if fan_in_fan_out else stored  # (out, in)
    up, down = m.factors["up"].load(), m.factors["down"].load()
    v = w + 1.5 * up @ down  # alpha 3 / rank 2
    norm = v.norm(dim=1, keepdim=True) if axis == "out" else v.norm(dim=0, keepdim=True)
    w_dora = m.magnitude.load().reshape(norm.shape) * v / norm  # type: ignore[union-attr]
    for weight in (1.0, 0.0, 0.5, -0.7, 2.0):
        want = w + weight * (w_dora - w)
        got = m.apply(stored, weight, dtype=torch.float64)
        torch.testing.assert_close(got.T if fan_in_fan_out else got, want, rtol=1e-13, atol=1e-13)
    assert torch.equal(m.apply(stored, 0.0, dtype=torch.float64), stored)  # w = 0: the base, exactly


def test_dora_zero_norm_row_is_refused() -> None:
    m, w = _dora()
    zero = -(m.delta(dtype=torch.float64))  # W + delta = 0
    with pytest.raises(ShapeError, match="all-zero row"):
        m.apply(zero, 1.0, dtype=torch.float64)


def test_dora_weights_1_0_half_against_peft(mf: ModuleType, bases: dict[str, Path], tmp_path: Path) -> None:
    """w = 1 is PEFT's merge_and_unload, w = 0 the base exactly, w = 0.5 halfway between the two."""
    from peft import PeftModel

    base = load_dir(bases["tiny_llama"])
    with torch.no_grad():
        peft_merged = PeftModel.from_pretrained(mf.tiny_llama(), FIXTURES / "peft_llama_dora").merge_and_unload()
        peft = peft_merged.state_dict()
    got = {}
    for w in (1.0, 0.0, 0.5):
        merge(bases["tiny_llama"], [FIXTURES / "peft_llama_dora"], tmp_path / f"w{w}", [w])
        got[w] = load_dir(tmp_path / f"w{w}")
    targets = [k for k in base if not torch.equal(got[1.0][k], base[k])]
    assert len(targets) >= len(load_adapter(FIXTURES / "peft_llama_dora").modules)
    for k in base:
        torch.testing.assert_close(got[1.0][k], peft[k], rtol=1e-5, atol=1e-6)
        assert torch.equal(got[0.0][k], base[k]), k
        torch.testing.assert_close(got[0.5][k], (base[k] + peft[k]) / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "adapters", [["peft_llama_dora", "peft_llama"], ["peft_llama", "peft_llama_dora"], ["peft_llama_dora"] * 2]
)
def test_several_adapters_on_a_dora_weight_are_refused(
    adapters: list[str], bases: dict[str, Path], tmp_path: Path
) -> None:
    import hostile

    paths = [FIXTURES / a for a in adapters]
    out = tmp_path / "out"
    r = hostile.run(
        ["merge", bases["tiny_llama"], *paths, "-o", out], inputs=[bases["tiny_llama"], *paths], out=out,
        says=["model.layers.0.self_attn.q_proj.weight", "DoRA", "order"],
    )  # fmt: skip
    assert "Hint: merge them one at a time" in r.stderr and "mix" in r.stderr


@pytest.mark.parametrize("weights", ["1", "0.5", "1,1", "1,0"])
def test_mix_refuses_dora_inputs_at_any_weight(weights: str, tmp_path: Path) -> None:
    import hostile

    inputs = [FIXTURES / "peft_llama_dora"] if "," not in weights else [FIXTURES / "peft_llama", FIXTURES / "peft_llama_dora"]  # fmt: skip
    out = tmp_path / "mixed"
    hostile.run(["mix", *inputs, "--weights", weights, "-o", out], inputs=inputs, out=out, says="DoRA")
