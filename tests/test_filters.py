"""Module filters on convert, mix and merge: --include / --exclude (regex searched in module names as the adapter
names them), --unet-only and --text-encoders-only; applied before any work; an empty selection is an error; what
was left out is reported (--json: the names); a shorthand on an adapter without pipeline components is refused."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import safetensors.torch
import torch
from conftest import FIXTURES
from hostile import run

from loratools import load_adapter, save_adapter
from loratools.errors import IncompatibleAdaptersError, LoratoolsError, UsageError
from loratools.model import TensorRef
from loratools.ops.convert import convert
from loratools.ops.merge import merge
from loratools.ops.mix import mix

KOHYA = FIXTURES / "kohya_sd/lora.safetensors"
DIFFUSERS = FIXTURES / "diffusers_sd"


@pytest.mark.parametrize(
    ("src", "flag", "kept"),
    [
        (KOHYA, "--unet-only", "lora_unet_"),
        (KOHYA, "--text-encoders-only", "lora_te_"),
        (DIFFUSERS, "--unet-only", "unet."),
        (DIFFUSERS, "--text-encoders-only", "text_encoder."),
    ],
)
def test_convert_shorthands(src: Path, flag: str, kept: str, tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    fmt = "kohya" if src == KOHYA else "diffusers"
    r = run(["convert", src, "--to", fmt, flag, "-o", out, "--json"], inputs=[src], out=out, code=0)
    rep = json.loads(r.stdout)
    names = set(load_adapter(out).modules)
    every = set(load_adapter(src).modules)
    assert names and all(n.startswith(kept) for n in names)
    assert names == {n for n in every if n.startswith(kept)}
    [left] = rep["left_out"]
    assert set(left["modules"]) == every - names and left["source"] == str(src)
    assert f"Note: left out {len(every - names)} module(s)" in r.stderr


def test_include_and_exclude_are_searched_in_the_adapters_own_names(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    rep = convert(KOHYA, "kohya", out, include=["attn1", "attn2"], exclude=["mid_block"])
    names = set(load_adapter(out).modules)
    assert names and all(("attn1" in n or "attn2" in n) and "mid_block" not in n for n in names)
    assert len(names) + len(rep.left_out[0].modules) == len(load_adapter(KOHYA).modules)
    # a PEFT adapter: its module paths
    peft = convert(FIXTURES / "peft_llama", "peft", tmp_path / "p", include=[r"q_proj$"])
    assert {m.name.rsplit(".", 1)[-1] for m in peft.modules} == {"q_proj"}
    with safetensors.safe_open(str(tmp_path / "p" / "adapter_model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["loratools"])["include"] == ["q_proj$"]  # the provenance record says so


def test_empty_selection_and_llm_shorthands_are_errors(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    llm = FIXTURES / "peft_llama"
    run(["convert", llm, "--to", "kohya", "--unet-only", "-o", out], inputs=[llm], out=out, says="no UNet")
    run(["convert", llm, "--to", "kohya", "--text-encoders-only", "-o", out], inputs=[llm], out=out, says="an LLM")
    run(["convert", KOHYA, "--to", "kohya", "--include", "nothing", "-o", out], inputs=[KOHYA], out=out,
        says="selects none")  # fmt: skip
    run(["convert", KOHYA, "--to", "kohya", "--unet-only", "--text-encoders-only", "-o", out], inputs=[KOHYA],
        out=out, code=2, says="at most one")  # fmt: skip
    run(["convert", KOHYA, "--to", "kohya", "--include", "(", "-o", out], inputs=[KOHYA], out=out, code=2,
        says="not a regular expression")  # fmt: skip
    with pytest.raises(UsageError):
        convert(KOHYA, "kohya", out, only="vae")
    with pytest.raises(UsageError, match="include"):
        convert(KOHYA, "kohya", out, include="attn")  # a string is not a list of patterns


def test_mix_filters_each_input(tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    r = run(["mix", KOHYA, DIFFUSERS, "--unet-only", "-o", out, "--json"], inputs=[KOHYA, DIFFUSERS], out=out, code=0)
    rep = json.loads(r.stdout)
    assert all(n.startswith("lora_unet_") for n in load_adapter(out).modules)
    assert [len(x["modules"]) for x in rep["left_out"]] == [6, 4]  # the text encoders of each input
    # an input the filter empties takes no part silently: refused, naming it
    te = tmp_path / "te.safetensors"
    convert(KOHYA, "kohya", te, only="text_encoders")
    run(
        ["mix", KOHYA, te, "--unet-only", "-o", tmp_path / "m2.safetensors"],
        inputs=[KOHYA, te],
        out=tmp_path / "m2.safetensors",
        says=["selects none", "te.safetensors"],
    )
    with pytest.raises(IncompatibleAdaptersError, match="no UNet"):
        mix([FIXTURES / "peft_llama", FIXTURES / "peft_llama_patterns"], tmp_path / "x", only="unet")


def test_filters_apply_before_any_work(tmp_path: Path) -> None:
    """A text-encoder module that mix would refuse (NaN) is left out by --unet-only before anything is computed."""
    a = load_adapter(KOHYA)
    name = next(n for n in a.modules if n.startswith("lora_te_"))
    bad = a.modules[name].factors["up"].load().clone()
    bad[0, 0] = float("nan")
    a.modules[name].factors["up"] = TensorRef.of(bad)
    src = tmp_path / "nan.safetensors"
    save_adapter(a, src)
    with pytest.raises(LoratoolsError, match="NaN"):
        mix([src], tmp_path / "x.safetensors")
    rep = mix([src], tmp_path / "ok.safetensors", only="unet")
    assert len(rep.modules) == len([n for n in a.modules if n.startswith("lora_unet_")])


@pytest.fixture(scope="module")
def pipe(mf: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pipe")
    mf.tiny_unet().save_pretrained(root / "unet")
    mf.tiny_clip().save_pretrained(root / "text_encoder")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.rglob("*.safetensors")):
        out.update({f"{f.parent.name}.{k}": v for k, v in safetensors.torch.load_file(str(f)).items()})
    return out


@pytest.mark.parametrize(("flag", "changed"), [("--unet-only", "unet."), ("--text-encoders-only", "text_encoder.")])
def test_merge_shorthands(flag: str, changed: str, pipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run(["merge", pipe, DIFFUSERS, flag, "-o", out, "--json"], inputs=[pipe, DIFFUSERS], out=out, code=0)
    rep = json.loads(r.stdout)
    assert rep["tensors"] and all(t["name"].startswith(changed) for t in rep["tensors"])
    base, merged = _tensors(pipe), _tensors(out)
    for k, v in base.items():
        if not k.startswith(changed):
            assert torch.equal(merged[k], v), k  # the other component is the base's, untouched
    every = set(load_adapter(DIFFUSERS).modules)
    assert set(rep["left_out"][0]["modules"]) == {n for n in every if not n.startswith(changed)}
    assert json.loads(safetensors.safe_open(str(out / "unet/diffusion_pytorch_model.safetensors"), "pt").metadata()
                      ["loratools"])["only"] == flag.strip("-").removesuffix("-only").replace("-", "_")  # fmt: skip


def test_merge_include_and_errors(pipe: Path, tmp_path: Path) -> None:
    rep = merge(pipe, [DIFFUSERS], tmp_path / "o", include=["attn1"])
    assert rep.tensors and all("attn1" in t.name for t in rep.tensors)
    out = tmp_path / "o2"
    llm = FIXTURES / "peft_llama"
    run(["merge", pipe, llm, "--unet-only", "-o", out], inputs=[pipe, llm], out=out, says="no UNet")
    run(["merge", pipe, DIFFUSERS, "--exclude", ".", "-o", out], inputs=[pipe, DIFFUSERS], out=out,
        says="selects none")  # fmt: skip


def test_a_filtered_peft_adapter_targets_only_what_it_keeps(mf: ModuleType, tmp_path: Path) -> None:
    """PEFT builds a layer for every module its config targets: after a filter the config names exactly the
    modules kept, so PEFT (the oracle) loads the file with no layer lacking its weights."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    convert(FIXTURES / "peft_llama", "peft", tmp_path / "p", include=[r"layers\.0\.self_attn\.[qv]_proj"])
    model = PeftModel.from_pretrained(mf.tiny_llama(), tmp_path / "p")
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))
    assert [n.split("layers.", 1)[-1] for n in wrapped] == ["0.self_attn.q_proj", "0.self_attn.v_proj"]
    a, b = load_adapter(FIXTURES / "peft_llama"), load_adapter(tmp_path / "p")
    for name, m in b.modules.items():
        torch.testing.assert_close(m.delta(), a.modules[name].delta())


@pytest.mark.parametrize("command", ["convert", "mix", "merge"])
def test_a_pattern_that_backtracks_is_answered_in_bounded_time(
    command: str, pipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The filters use extract's bounded matcher: a pattern on which Python's re would hang is refused (a tenth of
    a CPU second here instead of two), naming it."""
    from loratools.formats import patterns

    monkeypatch.setattr(patterns, "BUDGET", 0.1)
    patterns._SETS.clear()
    out = tmp_path / "o.safetensors"
    head = {"convert": ["convert", KOHYA, "--to", "kohya"], "mix": ["mix", KOHYA], "merge": ["merge", pipe, KOHYA]}
    run([*head[command], "--include", "(.|.)*[XY]", "-o", out], inputs=[KOHYA], out=out, says=["--include", "too long"],
        seconds=10)  # fmt: skip
