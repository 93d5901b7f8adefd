"""convert: every pair of formats on the peer-made fixtures (deltas compared by mapped module name), LyCORIS to LoRA
against LyCORIS itself, GGUF against llama.cpp's rules, dtype reports, and validate --for. The converted files loaded by
their owners (PEFT, diffusers and its kohya converter) are in test_owners.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import peers_kit as kit
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import FIXTURES, run_cli

from loratools import load_adapter, save_adapter
from loratools.cli import cli
from loratools.errors import IncompatibleAdaptersError, ShapeError
from loratools.model import Adapter
from loratools.ops.convert import convert
from loratools.ops.validate import validate

#: a transformers 5 CLIP path (no `text_model.` level) of a diffusers text encoder
TEXT_MODEL = re.compile(r"^(text_encoder(?:_\d)?\.)(?=encoder\.layers\.)")


def same_deltas(a: Adapter, b: Adapter, names: dict[str, str] | None = None, tol: float = 0.0) -> None:
    names = names or {k: k for k in a.modules}
    assert set(names.values()) == set(b.modules), set(names.values()) ^ set(b.modules)
    for src, dst in names.items():
        x, y = a.modules[src].delta(), b.modules[dst].delta()
        torch.testing.assert_close(y.reshape(x.shape), x, rtol=tol, atol=tol, msg=lambda m, n=src: f"{n}: {m}")


def unet_only(tmp_path: Path) -> Path:
    """The UNet half of the diffusers fixture, as its own diffusers file (PEFT holds one model)."""
    a = load_adapter(FIXTURES / "diffusers_sd")
    a.modules = {k: v for k, v in a.modules.items() if k.startswith("unet.")}
    a.config = {"unet": a.config["unet"]}
    out = tmp_path / "unet_only.safetensors"
    save_adapter(a, out)
    return out


@pytest.mark.parametrize(
    ("src", "chain"),
    [
        ("peft_llama_patterns", ["kohya", "peft"]),
        ("peft_llama", ["kohya", "peft", "kohya"]),
        ("peft_llama_bin", ["peft"]),
        ("peft_llama_dora", ["kohya", "peft"]),
        ("diffusers_sd", ["kohya", "diffusers"]),
        ("diffusers_sd_old", ["kohya", "diffusers"]),
        ("kohya_sd/lora.safetensors", ["diffusers", "kohya"]),
        ("lycoris_dora.safetensors", ["kohya"]),
        ("UNET_ONLY", ["peft", "diffusers", "peft", "kohya", "diffusers"]),
    ],
)
def test_round_trips_keep_every_delta(src: str, chain: list[str], tmp_path: Path) -> None:
    """Each step's ``--json`` report says where each module went (source -> name); every name is checked against
    kohya's flattening convention (``peers_kit.same_module``), and every module's delta is compared with its
    source's by that mapped name.

    Tolerance: a conversion copies the factors; only alpha may be re-expressed (rsLoRA alpha / sqrt(r) as kohya's
    per-module alpha, stored as a float32 ``.alpha`` tensor or a JSON float), a relative 2^-24 of the scale. In
    float64 the deltas then differ by at most that relative amount entry by entry: rtol 1e-6."""
    path = unet_only(tmp_path) if src == "UNET_ONLY" else FIXTURES / src
    first = load_adapter(path)
    names = {n: n for n in first.modules}
    current = path
    for i, fmt in enumerate(chain):
        out = tmp_path / (f"step{i}" if fmt == "peft" else f"step{i}.safetensors")
        code, stdout, stderr = run_cli("convert", str(current), "--to", fmt, "-o", str(out), "--json")
        assert code == 0, stderr
        step = {m["source"]: m["name"] for m in json.loads(stdout)["modules"]}
        assert set(step) == set(names.values()) and len(set(step.values())) == len(step)
        bad = [(a, b) for a, b in step.items() if not kit.same_module(a, b)]
        assert not bad, f"step {i} ({fmt}) renamed modules into other modules: {bad[:3]}"
        names = {k: step[v] for k, v in names.items()}
        current = out
    last = load_adapter(current)
    assert last.format == chain[-1]
    assert set(names.values()) == set(last.modules)
    for name, dst in names.items():
        m, n = first.modules[name], last.modules[dst]
        want = m.delta(dtype=torch.float64)
        torch.testing.assert_close(
            n.delta(dtype=torch.float64).reshape(want.shape), want, rtol=1e-6, atol=1e-12,
            msg=lambda s, a=name, b=dst: f"{a} -> {b}: {s}",
        )  # fmt: skip
        assert (m.magnitude is None) == (n.magnitude is None), name
        if m.magnitude is not None and n.magnitude is not None:
            assert torch.equal(m.magnitude.load().reshape(-1), n.magnitude.load().reshape(-1)), name
    if first.format == last.format:
        # back under its own names; a transformers 5 text-encoder path comes back with transformers 4's
        # `text_model.` level, as diffusers' own kohya converter writes it (and its loader reads both)
        assert names == {n: TEXT_MODEL.sub(r"\1text_model.", n) if n not in last.modules else n for n in first.modules}
        same_deltas(first, last, names)  # bit for bit: no tensor was recomputed on the way
        for name, m in first.modules.items():
            n = last.modules[names[name]]
            for role, t in m.tensors().items():
                assert t.dtype == n.tensors()[role].dtype
                assert torch.equal(t.load().reshape(-1), n.tensors()[role].load().reshape(-1)), (name, role)


def test_peft_to_kohya_keeps_patterns_rslora_and_dora(tmp_path: Path) -> None:
    convert(FIXTURES / "peft_llama_patterns", "kohya", tmp_path / "k.safetensors")
    k = load_adapter(tmp_path / "k.safetensors")
    p = load_adapter(FIXTURES / "peft_llama_patterns")
    for name, m in p.modules.items():
        km = k.modules["lycoris_" + name.replace(".", "_")]
        assert km.rank == m.rank and km.scale == pytest.approx(m.scale, rel=1e-6)  # alpha / sqrt(r) baked
        # the factors as they were; the scale through kohya's float32 .alpha: a relative 2^-24
        want = m.delta(dtype=torch.float64)
        torch.testing.assert_close(km.delta(dtype=torch.float64), want, rtol=1e-6, atol=1e-12)
    meta = safetensors.safe_open(str(tmp_path / "k.safetensors"), "pt").metadata()
    assert meta["ss_network_dim"] == "Dynamic" and json.loads(meta["loratools"])["command"] == "convert"
    convert(FIXTURES / "peft_llama_dora", "kohya", tmp_path / "d.safetensors")
    d = load_adapter(tmp_path / "d.safetensors")
    w = torch.randn(32, 32)
    for name, m in load_adapter(FIXTURES / "peft_llama_dora").modules.items():
        km = d.modules["lycoris_" + name.replace(".", "_")]
        assert km.magnitude is not None and km.magnitude.shape == (m.weight_shape()[0], 1)
        ww = w[: m.weight_shape()[0]]
        torch.testing.assert_close(km.apply(ww), m.apply(ww))


def test_refusals_name_what_would_be_lost(tmp_path: Path) -> None:
    with pytest.raises(IncompatibleAdaptersError, match="modules_to_save"):
        convert(FIXTURES / "peft_llama_embed", "kohya", tmp_path / "a.safetensors")
    with pytest.raises(IncompatibleAdaptersError, match="one model"):
        convert(FIXTURES / "diffusers_sd", "peft", tmp_path / "b")
    with pytest.raises(IncompatibleAdaptersError, match="diffusers component"):
        convert(FIXTURES / "peft_llama", "diffusers", tmp_path / "c.safetensors")
    with pytest.raises(IncompatibleAdaptersError, match="fan_in_fan_out"):
        convert(FIXTURES / "peft_gpt2", "kohya", tmp_path / "d.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_kohya_names_resolve_by_table_or_against_the_base(mf: ModuleType, tmp_path: Path) -> None:
    # a name the table does not know is not guessed
    a = load_adapter(FIXTURES / "peft_llama")
    a.modules = {f"custom_block.{k}": v for k, v in a.modules.items()}
    for k, v in a.modules.items():
        v.name = k
    save_adapter(a, tmp_path / "odd", "peft")
    convert(tmp_path / "odd", "kohya", tmp_path / "odd.safetensors")
    with pytest.raises(ShapeError, match="cannot be turned back") as e:
        convert(tmp_path / "odd.safetensors", "peft", tmp_path / "back")
    assert "--base" in (e.value.hint or "")
    # against a base checkpoint with those names it resolves
    base = {
        f"custom_block.{n}.weight": torch.zeros(m.weight_shape())
        for n, m in load_adapter(FIXTURES / "peft_llama").modules.items()
    }
    safetensors.torch.save_file(base, str(tmp_path / "base.safetensors"))
    convert(tmp_path / "odd.safetensors", "peft", tmp_path / "back", base=tmp_path / "base.safetensors")
    same_deltas(load_adapter(tmp_path / "odd"), load_adapter(tmp_path / "back"))
    # LyCORIS names against a diffusers UNet folder: each resolves to that UNet's module of the same flattened name,
    # and keeps its delta (LoKr -> LoRA through a float64 SVD stored in fp32: 1e-6 of the largest entry)
    unet = mf.tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    rep = convert(
        FIXTURES / "lycoris_lokr.safetensors", "diffusers", tmp_path / "lokr.safetensors", base=tmp_path / "unet"
    )
    real = {f"unet.{n}" for n, _ in unet.named_modules()}
    src, lokr = load_adapter(FIXTURES / "lycoris_lokr.safetensors"), load_adapter(tmp_path / "lokr.safetensors")
    assert {r.source for r in rep.modules} == set(src.modules) and {r.name for r in rep.modules} == set(lokr.modules)
    for r in rep.modules:
        assert r.name in real and kit.same_module(r.source, r.name), (r.source, r.name)
        want = src.modules[r.source].delta(dtype=torch.float64)
        got = lokr.modules[r.name].delta(dtype=torch.float64).reshape(want.shape)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize(
    "fixture",
    [
        "lycoris_loha.safetensors",
        "lycoris_lokr.safetensors",
        "lycoris_loha_tucker.safetensors",
        "lycoris_lokr_full.safetensors",
    ],
)
def test_lycoris_to_lora_matches_lycoris_own_weights(fixture: str, mf: ModuleType, tmp_path: Path) -> None:
    """The converted LoRA changes each layer's output exactly as LyCORIS' own module does (the base gives the
    kernels of conv layers whose LoHa/LoKr factors are stored flattened)."""
    mf.tiny_unet().save_pretrained(tmp_path / "unet")
    rep = convert(FIXTURES / fixture, "diffusers", tmp_path / "out.safetensors", base=tmp_path / "unet")
    assert all(m.energy == pytest.approx(1.0, abs=1e-9) for m in rep.modules)  # exact: no --rank given
    lora = load_adapter(tmp_path / "out.safetensors")
    assert {m.kind for m in lora.modules.values()} == {"lora"}
    unet = mf.tiny_unet()
    original = {id(mod): mod.weight.detach().clone() for mod in unet.modules() if hasattr(mod, "weight")}
    net = mf.load_lycoris_kohya(FIXTURES / fixture, unet)
    names = {r.source: r.name for r in rep.modules}
    g = torch.Generator().manual_seed(1)
    for lm in net.unet_loras:
        org = lm.org_module[0]
        m = lora.modules[names[lm.lora_name]]
        w = original[id(org)]
        if isinstance(org, torch.nn.Linear):
            x = torch.randn(3, org.in_features, generator=g)
            out = F.linear(x, m.apply(w), org.bias)
        else:
            x = torch.randn(2, org.in_channels, 6, 6, generator=g)
            out = F.conv2d(x, m.apply(w), org.bias, org.stride, org.padding, org.dilation, org.groups)
        with torch.no_grad():
            want = lm(x)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5, msg=lambda s, n=lm.lora_name: f"{n}: {s}")
    # with --rank the SVD truncation keeps the optimal part and says how much
    small = convert(FIXTURES / fixture, "diffusers", tmp_path / "small.safetensors", rank=1, base=tmp_path / "unet")
    assert all(m.rank == 1 for m in small.modules) and min(m.energy for m in small.modules) < 1


def _gguf_base(mf: ModuleType, tmp_path: Path) -> Path:
    mf.tiny_llama().save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_gguf_follows_llama_cpp_rules(mf: ModuleType, tmp_path: Path) -> None:
    import gguf

    base = _gguf_base(mf, tmp_path)
    cfg = json.loads((base / "config.json").read_text())
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    convert(FIXTURES / "peft_llama_patterns", "gguf", tmp_path / "a.gguf", base=base)
    r = gguf.GGUFReader(tmp_path / "a.gguf")
    # keys: convert_lora_to_gguf.py set_type / set_gguf_parameters; architecture from convert_hf_to_gguf.py
    assert r.get_field("general.type").contents() == "adapter"
    assert r.get_field("adapter.type").contents() == "lora"
    assert r.get_field("general.architecture").contents() == "llama"
    alpha = r.get_field("adapter.lora.alpha").contents()
    tensors = {t.name: np.array(t.data).reshape([int(x) for x in reversed(t.shape)]) for t in r.tensors}
    src = load_adapter(FIXTURES / "peft_llama_patterns")
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    assert len(tensors) == 2 * len(src.modules)
    for name, m in src.modules.items():
        gname = tmap.get_name(name + ".weight", try_suffixes=(".weight",))  # names: gguf's tensor name map
        a, b = tensors[gname + ".lora_a"], tensors[gname + ".lora_b"]
        r_ = m.rank
        assert a.shape == (r_, m.weight_shape()[1]) and b.shape == (m.weight_shape()[0], r_)  # numpy r x in, out x r
        # llama-adapter.cpp / llama-graph.cpp: delta = (alpha / rank) * B @ A with rank from lora_b
        delta = torch.from_numpy((alpha / b.shape[1]) * (b @ a)).float()
        want = m.delta()
        leaf = name.rsplit(".", 1)[1]
        # convert_hf_to_gguf.py LlamaModel.modify_tensors: q_proj permuted with (n_head, n_head), k_proj (n_head, n_kv)
        heads = {"q_proj": n_head, "k_proj": n_kv}.get(leaf)
        if heads is not None:
            want = want.reshape(heads, 2, want.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(want.shape)
        torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-6, msg=lambda s, n=name: f"{n}: {s}")


def test_gguf_embeddings_and_refusals(mf: ModuleType, tmp_path: Path) -> None:
    import gguf

    base = _gguf_base(mf, tmp_path)
    adapter = tmp_path / "embed"
    shutil.copytree(FIXTURES / "peft_llama_embed", adapter)
    with pytest.raises(IncompatibleAdaptersError, match="full tensors"):
        convert(adapter, "gguf", tmp_path / "x.gguf", base=base)  # lm_head is a trained modules_to_save copy
    a = load_adapter(adapter)
    del a.extras["lm_head.weight"]
    cfg = dict(a.config)
    cfg["modules_to_save"] = None
    a.config = cfg
    save_adapter(a, tmp_path / "embed2")
    rep = convert(tmp_path / "embed2", "gguf", tmp_path / "e.gguf", base=base)
    assert any("unchanged copy" in n for n in rep.notes)  # the saved base embedding equals the base's
    r = gguf.GGUFReader(tmp_path / "e.gguf")
    t = {x.name: x for x in r.tensors}
    # convert_lora_to_gguf.py: token_embd.lora_a is transposed (llm_build_inp_embd reads vocab x r)
    m = a.modules["model.embed_tokens"]
    assert [int(x) for x in reversed(t["token_embd.weight.lora_a"].shape)] == [128, m.rank]
    with pytest.raises(IncompatibleAdaptersError, match="DoRA"):
        convert(FIXTURES / "peft_llama_dora", "gguf", tmp_path / "d.gguf", base=base)
    from loratools.errors import LoratoolsError

    with pytest.raises(LoratoolsError, match="config.json"):
        convert(FIXTURES / "peft_llama", "gguf", tmp_path / "n.gguf")


def test_dtype_conversion_reports_overflow_and_underflow(tmp_path: Path) -> None:
    a = load_adapter(FIXTURES / "peft_llama")
    m = a.modules["model.layers.0.self_attn.q_proj"]
    up = m.factors["up"].load().clone()
    up[0, 0], up[0, 1], up[0, 2] = 1e6, 1e-9, -3e5
    from loratools.model import TensorRef

    m.factors["up"] = TensorRef.of(up)
    save_adapter(a, tmp_path / "src")
    rep = convert(tmp_path / "src", "peft", tmp_path / "half", dtype="fp16")
    assert (rep.overflow, rep.underflow) == (2, 1)
    assert {t.dtype for m in load_adapter(tmp_path / "half").modules.values() for t in m.factors.values()} == {"F16"}


def test_alpha_bake_keeps_deltas_with_scale_one(tmp_path: Path) -> None:
    convert(FIXTURES / "peft_llama_patterns", "peft", tmp_path / "b", alpha_mode="bake")
    b, p = load_adapter(tmp_path / "b"), load_adapter(FIXTURES / "peft_llama_patterns")
    assert {m.scale for m in b.modules.values()} == {1.0}
    same_deltas(p, b, tol=1e-5)


def test_validate_for_consumers() -> None:
    def codes(src: str, consumer: str) -> list[str]:
        return [f.message for f in validate(FIXTURES / src, for_=consumer).findings if f.code == "consumer"]

    assert any("DoRA" in m for m in codes("peft_llama_dora", "vllm"))
    assert any("full tensors" in m for m in codes("peft_llama_embed", "tgi"))
    assert any("rsLoRA" in m for m in codes("peft_llama_patterns", "llama.cpp"))
    assert any("one alpha" in m for m in codes("peft_llama_patterns", "ollama"))
    assert any("LoRA only" in m for m in codes("lycoris_loha.safetensors", "diffusers"))
    assert any("PEFT folder" in m for m in codes("peft_llama", "comfyui"))
    assert codes("peft_llama", "vllm") == [] and codes("kohya_sd/lora.safetensors", "comfyui") == []
    r = CliRunner().invoke(cli, ["validate", str(FIXTURES / "peft_llama_patterns"), "--for", "llama.cpp"])
    assert r.exit_code == 1 and "loratools convert" in r.stdout


def test_cli_convert(tmp_path: Path, mf: ModuleType) -> None:
    loha = str(FIXTURES / "lycoris_loha.safetensors")
    r = CliRunner().invoke(cli, ["convert", loha, "--to", "diffusers", "-o", str(tmp_path / "x.safetensors")])
    # a LoHa stores conv factors flattened: LoRA needs the kernel, which only the base can give (never guessed)
    assert r.exit_code == 1 and "--base" in r.stderr and not (tmp_path / "x.safetensors").exists()
    mf.tiny_unet().save_pretrained(tmp_path / "unet")
    r = CliRunner().invoke(
        cli,
        [
            "convert",
            loha,
            "--to",
            "diffusers",
            "--base",
            str(tmp_path / "unet"),
            "-o",
            str(tmp_path / "x.safetensors"),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["format"] == "diffusers" and all(m["note"].startswith("loha -> lora") for m in data["modules"])
    r = CliRunner().invoke(
        cli, ["convert", str(FIXTURES / "peft_llama"), "--to", "diffusers", "-o", str(tmp_path / "y.safetensors")]
    )
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and not (tmp_path / "y.safetensors").exists()


def test_gguf_writer_inputs_fuzzed(tmp_path: Path) -> None:
    """Random adapters (ranks, alphas, rsLoRA) and broken base configs: a correct file or one clean error."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from loratools.errors import LoratoolsError
    from loratools.formats import gguf as gguf_format
    from loratools.model import Module, TensorRef

    good = {
        "architectures": ["LlamaForCausalLM"],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
    }
    shapes = {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "o_proj": (32, 32)}

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        mods=st.lists(st.tuples(st.sampled_from(sorted(shapes)), st.integers(0, 1), st.integers(1, 6),
                                st.floats(0.5, 64), st.booleans()), min_size=1, max_size=5),
        cfg=st.fixed_dictionaries({}, optional={k: st.none() | st.integers(-2, 8) | st.text(max_size=3) | st.just(v)
                                                for k, v in good.items()}),
    )  # fmt: skip
    def run(mods: list, cfg: dict) -> None:
        a = Adapter("peft")
        g = torch.Generator().manual_seed(len(mods))
        for leaf, layer, r, alpha, rs in mods:
            out, inn = shapes[leaf]
            name = f"model.layers.{layer}.self_attn.{leaf}"
            a.modules[name] = Module(name, "lora", {"down": TensorRef.of(torch.randn(r, inn, generator=g)),
                                                    "up": TensorRef.of(torch.randn(out, r, generator=g))},
                                     alpha=alpha, rslora=rs)  # fmt: skip
        try:
            arch, file_alpha, tensors = gguf_format.plan(a, cfg)
        except LoratoolsError:
            return
        assert arch == "llama" and len(tensors) == len(a.modules)
        for (_, la, lb), m in zip(tensors, a.modules.values(), strict=True):
            got = (file_alpha / lb.shape[1]) * (lb @ la)
            assert float(got.norm()) == pytest.approx(
                float(m.delta().norm()), rel=1e-4
            )  # scale kept (q/k rows permuted)

    run()


def test_sai_single_file_names_are_not_passed_off_as_diffusers(tmp_path: Path) -> None:
    """kohya names resolved against a single-file SD checkpoint are SAI paths, not diffusers paths: refused."""
    a = load_adapter(FIXTURES / "kohya_sd" / "lora.safetensors")
    base = {}
    for name in a.modules:
        if name.startswith("lora_unet_"):
            base["model.diffusion_model." + name.removeprefix("lora_unet_").replace("_", ".") + ".weight"] = (
                torch.zeros(1)
            )
    safetensors.torch.save_file(base, str(tmp_path / "sd.safetensors"))
    one = load_adapter(FIXTURES / "kohya_sd" / "lora.safetensors")
    one.modules = {"lora_unet_conv_in": one.modules["lora_unet_conv_in"]}
    save_adapter(one, tmp_path / "one.safetensors")
    with pytest.raises(IncompatibleAdaptersError, match="SAI"):
        convert(tmp_path / "one.safetensors", "diffusers", tmp_path / "x.safetensors", base=tmp_path / "sd.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_peft_target_modules_name_whole_leaves(tmp_path: Path) -> None:
    """`to_out.0` stays `to_out.0`: a bare `0` would make PEFT wrap every module whose path ends in `.0`."""
    convert(unet_only(tmp_path), "peft", tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert "to_out.0" in cfg["target_modules"] and "0" not in cfg["target_modules"]
