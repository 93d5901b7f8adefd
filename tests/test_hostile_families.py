"""Hostile image-model files: kohya / diffusers names that look like a family's but are not (block numbers with
leading zeros, unicode digits, twenty digits, negative; dots and underscores in odd places; nothing after the
prefix; two families in one file), single-file checkpoints whose layout lies (a fused ``qkv`` / ``linear1`` /
``in_proj_weight`` whose rows do not split into its parts, a part of the wrong size, a 0-D weight, block numbers
that are not numbers), report files with NaN / Infinity and hostile names, and output names that are only a
suffix or end in a slash. Each is one Error line (or a refusal inside one), never a guess, a traceback or invalid
JSON; inputs untouched, nothing left behind.

Everything is built from code: tiny BFL (Flux.1) and SDXL single-file checkpoints, kohya and diffusers adapters.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import hostile
import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import save_file

from loratools.formats.families import UNetLayout, detect, family, from_kohya

H = 8  # the hidden size of the tiny checkpoints


def kohya(path: Path, mods: dict[str, tuple[int, int]], r: int = 2) -> Path:
    """A kohya LoRA file: module -> (out, in) of its weight."""
    g = torch.Generator().manual_seed(len(mods))
    t: dict[str, torch.Tensor] = {}
    for name, (o, i) in mods.items():
        t[f"{name}.lora_down.weight"] = torch.randn(r, i, generator=g)
        t[f"{name}.lora_up.weight"] = torch.randn(o, r, generator=g)
        t[f"{name}.alpha"] = torch.tensor(float(r))
    save_file(t, str(path))
    return path


def diffusers(path: Path, mods: dict[str, tuple[int, int]], r: int = 2) -> Path:
    """A diffusers LoRA file (``transformer.…lora_A/B``): module -> (out, in)."""
    g = torch.Generator().manual_seed(len(mods) + 7)
    t = {}
    for name, (o, i) in mods.items():
        t[f"{name}.lora_A.weight"] = torch.randn(r, i, generator=g)
        t[f"{name}.lora_B.weight"] = torch.randn(o, r, generator=g)
    save_file(t, str(path))
    return path


def base(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    return path


FLUX = {
    "double_blocks.0.img_attn.qkv.weight": (3 * H, H),
    "double_blocks.0.img_attn.proj.weight": (H, H),
    "single_blocks.0.linear1.weight": (7 * H, H),
    "final_layer.adaLN_modulation.1.weight": (2 * H, H),
    "img_in.weight": (H, 4),
}
SDXL = {
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (3 * H, H),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.out_proj.weight": (H, H),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (H, H),
    "model.diffusion_model.input_blocks.0.0.weight": (H, 4, 3, 3),
}
QKV = "double_blocks.0.img_attn.qkv.weight"
IN_PROJ = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"

# ---------------------------------------------------------------------------------------------------------------
# kohya names that look like a family's but are not: refused by convert, never written under a guessed name

NOT_BLOCKS = {
    "leading zero": "lora_unet_double_blocks_01_img_attn_qkv",
    "unicode digit": "lora_unet_double_blocks_\u0661_img_attn_qkv",
    "superscript digit": "lora_unet_double_blocks_\u00b2_img_attn_qkv",
    "twenty digits": "lora_unet_double_blocks_99999999999999999999_img_attn_qkv",
    "negative": "lora_unet_double_blocks_-1_img_attn_qkv",
    "dots": "lora_unet_double_blocks.0.img_attn_qkv",
    "double underscore": "lora_unet__double_blocks_0_img_attn_qkv",
    "trailing underscore": "lora_unet_double_blocks_0_img_attn_qkv_",
}


@pytest.mark.parametrize("name", NOT_BLOCKS.values(), ids=NOT_BLOCKS.keys())
def test_a_name_that_is_no_block_of_the_family_is_refused_by_convert(tmp_path: Path, name: str) -> None:
    src = kohya(tmp_path / "a.safetensors", {name: (3 * H, H)})
    out = tmp_path / "out.safetensors"
    hostile.run(["convert", src, "--to", "diffusers", "-o", out], inputs=[src], out=out, says="never guessed")


@pytest.mark.parametrize("name", NOT_BLOCKS.values(), ids=NOT_BLOCKS.keys())
def test_the_tables_leave_a_number_that_is_no_block_unresolved(name: str) -> None:
    plan = from_kohya(family("flux1"), [name], {})
    assert plan.unresolved == [name] and not plan.steps


@pytest.mark.parametrize("block", ["0", "7", "18", "37", "12345"])
def test_a_real_block_number_still_resolves(block: str) -> None:
    plan = from_kohya(family("flux1"), [f"lora_unet_single_blocks_{block}_linear2"], {})
    assert [s.targets for s in plan.steps] == [(f"transformer.single_transformer_blocks.{block}.proj_out",)]


@pytest.mark.parametrize(
    "mods, says",
    [
        ({"lora_unet_": (H, H)}, "cannot be turned back"),
        ({"lora_unet_double_blocks_0_img_attn_qkv": (3 * H + 1, H)}, "do not split"),
        ({"lora_unet_single_blocks_0_linear1": (7 * H + 2, H)}, "do not split"),
        (
            {
                "lora_unet_double_blocks_0_img_attn_qkv": (3 * H, H),
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (H, H),
            },
            "cannot be turned back",
        ),  # fmt: skip
    ],
    ids=["prefix only", "qkv rows not 3x", "linear1 wrong width", "two families"],
)
def test_kohya_files_that_do_not_fit_a_family_are_refused(tmp_path: Path, mods: dict[str, Any], says: str) -> None:
    src = kohya(tmp_path / "a.safetensors", mods)
    out = tmp_path / "out.safetensors"
    hostile.run(["convert", src, "--to", "diffusers", "-o", out], inputs=[src], out=out, says=says)


def test_lora_te1_on_an_sd1_file_is_read_as_diffusers_kohya_writer_names_it(tmp_path: Path) -> None:
    """diffusers' kohya writer calls SD 1.x's text encoder lora_te1_: it is SD 1.x's, not SDXL's."""
    src = kohya(
        tmp_path / "a.safetensors",
        {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768)},
    )  # fmt: skip
    r = hostile.run(["inspect", "--json", src], inputs=[src], code=0)
    assert json.loads(r.stdout)["family"]["id"] == "sd1"


@pytest.mark.parametrize("names", [[], ["lora_unet_double_blocks_0_img_attn_proj"], ["x"], ["lora_unet_"]])
def test_family_detection_on_empty_or_one_module_adapters(names: list[str]) -> None:
    det = detect(names, {}, {"modelspec.architecture": "flux-1-dev", "ss_base_model_version": "sdxl_base"})
    assert det is None or det.family in (None, "flux1", "sdxl")


# ---------------------------------------------------------------------------------------------------------------
# single-file checkpoints whose layout lies


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("families")
    out = {
        "flux": base(d / "flux.safetensors", FLUX),
        "flux_qkv_97": base(d / "flux_qkv_97.safetensors", FLUX | {QKV: (3 * H + 1, H)}),
        "flux_qkv_1d": base(d / "flux_qkv_1d.safetensors", FLUX | {QKV: (3 * H,)}),
        "flux_qkv_0d": base(d / "flux_qkv_0d.safetensors", FLUX | {QKV: ()}),
        "flux_linear1_5x": base(d / "flux_linear1_5x.safetensors", FLUX | {"single_blocks.0.linear1.weight": (5 * H, H)}),
        "sdxl": base(d / "sdxl.safetensors", SDXL),
        "sdxl_in_proj_97": base(d / "sdxl_in_proj_97.safetensors", SDXL | {IN_PROJ: (3 * H + 1, H)}),
        "sdxl_in_proj_1d": base(d / "sdxl_in_proj_1d.safetensors", SDXL | {IN_PROJ: (3 * H,)}),
        "unet_superscript": base(d / "unet_superscript.safetensors", {
            "model.diffusion_model.input_blocks.\u00b2.0.in_layers.2.weight": (H, H, 3, 3),
            "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (H, H, 3, 3),
            "model.diffusion_model.out.2.weight": (4, H, 3, 3)}),
        "d_q_k": diffusers(d / "d_q_k.safetensors", {"transformer.transformer_blocks.0.attn.to_q": (H, H),
                                                     "transformer.transformer_blocks.0.attn.to_k": (H, H)}),
        "d_q_wide": diffusers(d / "d_q_wide.safetensors", {"transformer.transformer_blocks.0.attn.to_q": (H + 5, H)}),
        "d_mlp": diffusers(d / "d_mlp.safetensors", {"transformer.single_transformer_blocks.0.proj_mlp": (4 * H, H)}),
        "k_qkv": kohya(d / "k_qkv.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv": (3 * H, H)}),
        "k_te2_q": kohya(d / "k_te2_q.safetensors", {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (H, H)}),
        "k_te2_q_wide": kohya(d / "k_te2_q_wide.safetensors",
                              {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (H + 1, H)}),
        "k_sd1": kohya(d / "k_sd1.safetensors",
                       {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (H, H)}),
    }  # fmt: skip
    return out


MERGES = [
    ("flux_qkv_97", "d_q_k", "do not split into its 3 parts"),
    ("flux_qkv_97", "k_qkv", "is [25, 8]"),
    ("flux", "d_q_wide", "it has 13 output rows, its part of double_blocks.0.img_attn.qkv.weight has 8"),
    ("flux_linear1_5x", "d_mlp", "do not split into its 4 parts"),
    ("flux_qkv_1d", "d_q_k", "not a weight matrix"),
    ("flux_qkv_1d", "k_qkv", "is [24]"),
    ("flux_qkv_0d", "d_q_k", "not a weight matrix"),
    ("flux_qkv_0d", "k_qkv", "is []"),
    ("sdxl", "k_te2_q_wide", "it has 9 output rows"),
    ("sdxl_in_proj_97", "k_te2_q", "do not split into its 3 parts"),
    ("sdxl_in_proj_1d", "k_te2_q", "not a weight matrix"),
    ("sdxl", "k_qkv", "not a module of SDXL"),
    ("flux", "k_te2_q", "not a module of Flux.1"),
    ("unet_superscript", "k_sd1", "not in the base"),
]


@pytest.mark.parametrize("b, a, says", MERGES, ids=[f"{b}+{a}" for b, a, _ in MERGES])
def test_a_single_file_merge_that_does_not_fit_is_refused(
    files: dict[str, Path], tmp_path: Path, b: str, a: str, says: str
) -> None:
    out = tmp_path / "merged.safetensors"
    hostile.run(["merge", files[b], files[a], "-o", out], inputs=[files[b], files[a]], out=out, says=says)


@pytest.mark.parametrize("b, a", [("flux", "d_q_k"), ("flux", "d_mlp"), ("flux", "k_qkv"), ("sdxl", "k_te2_q")])
def test_a_single_file_merge_that_fits_still_merges(files: dict[str, Path], tmp_path: Path, b: str, a: str) -> None:
    out = tmp_path / "merged.safetensors"
    r = hostile.run(["merge", files[b], files[a], "-o", out, "--json"], inputs=[files[b], files[a]], out=out, code=0)
    merged = {
        "flux": {"d_q_k": QKV, "d_mlp": "single_blocks.0.linear1.weight", "k_qkv": QKV},
        "sdxl": {"k_te2_q": IN_PROJ},
    }
    assert [t["name"] for t in json.loads(r.stdout)["tensors"]] == [merged[b][a]]


def test_block_numbers_that_are_not_numbers_do_not_number_a_unet() -> None:
    assert UNetLayout.from_sgm(["input_blocks.\u00b2.0.in_layers.2", "input_blocks.1.0.in_layers.2"]) is None
    assert UNetLayout.from_sgm(["input_blocks.01.0.in_layers.2"]) is None


def test_inspect_of_a_single_file_with_odd_block_numbers(files: dict[str, Path]) -> None:
    hostile.run(["inspect", files["unet_superscript"]], inputs=[files["unet_superscript"]], says="not a LoRA adapter")


# ---------------------------------------------------------------------------------------------------------------
# reports with NaN / Infinity / huge numbers and hostile names


def _strict(text: str) -> Any:
    def refuse(token: str) -> None:
        raise AssertionError(f"{token} in a JSON report")

    return json.loads(text, parse_constant=refuse)


HOSTILE = ["a.</script><script>alert(1)</script>.weight", "b.<!--<x>.weight", "c.\u2028\u2029.weight",
           "d.]]>&amp;\"'`${x}.weight", "e.\x1b[31m\u202e.weight", "f.[bold]x[/].weight"]  # fmt: skip


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("twins")
    g = torch.Generator().manual_seed(3)
    a = {n: torch.randn(4, 4, generator=g) for n in HOSTILE}
    b = {n: t.clone() for n, t in a.items()}
    b[HOSTILE[0]][0, 0] = float("nan")
    b[HOSTILE[1]][0, 0] = float("inf")
    b[HOSTILE[2]] *= 1e38
    b[HOSTILE[3]][1, 1] = -float("inf")
    a["g.huge.weight"], b["g.huge.weight"] = torch.full((2, 2), 3e38), torch.full((2, 2), -3e38)
    save_file(a, str(d / "a.safetensors"))
    save_file(b, str(d / "b.safetensors"))
    return d / "a.safetensors", d / "b.safetensors"


def test_a_json_report_with_nan_and_inf_is_json(twins: tuple[Path, Path], tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    hostile.run(["diff", *twins, "--report", report], inputs=twins, code=1, findings=True)  # findings: written
    data = _strict(report.read_text(encoding="utf-8"))
    assert "nan" in json.dumps(data) and "inf" in json.dumps(data)


def test_diff_json_on_stdout_with_nan_and_inf_is_json(twins: tuple[Path, Path]) -> None:
    r = hostile.run(["diff", *twins, "--json"], inputs=twins, code=1, findings=True)
    _strict(r.stdout)


def test_an_html_report_escapes_hostile_names(twins: tuple[Path, Path], tmp_path: Path) -> None:
    report = tmp_path / "r.html"
    hostile.run(["diff", *twins, "--report", report], inputs=twins, code=1, findings=True)
    page = report.read_text(encoding="utf-8")
    assert len(re.findall(r"<script", page)) == 1 and page.count("</script") == 1  # the page's own, only
    assert "alert(1)</" not in page and "<!--" not in page and "<x>" not in page
    assert "&lt;/script&gt;&lt;script&gt;alert(1)" in page


# ---------------------------------------------------------------------------------------------------------------
# output names

OUT_NAMES = [
    (".safetensors", "kohya", "a suffix with no name"),
    (".safetensors", "peft", "a suffix with no name"),
    (".GGUF", "peft", "a suffix with no name"),
    ("x.gguf/", "kohya", "ends in a slash"),
    ("x.safetensors/", "kohya", "ends in a slash"),
    ("x/", "diffusers", "ends in a slash"),
    ("x.gguf/", "peft", "names a .gguf file"),
]


@pytest.mark.parametrize("name, to, says", OUT_NAMES, ids=[f"{n}->{t}" for n, t, _ in OUT_NAMES])
def test_an_output_name_that_is_only_a_suffix_or_a_folder_is_a_usage_error(
    tmp_path: Path, name: str, to: str, says: str
) -> None:
    src = FIXTURES / "peft_llama"
    out = tmp_path / name
    hostile.run(["convert", src, "--to", to, "-o", str(tmp_path) + "/" + name], inputs=[src], out=out, code=2,
                says=says)  # fmt: skip
    assert not any(tmp_path.iterdir())


def test_an_upper_case_suffix_is_a_suffix(tmp_path: Path) -> None:
    src, out = FIXTURES / "peft_llama", tmp_path / "x.SAFETENSORS"
    hostile.run(["convert", src, "--to", "kohya", "-o", out], inputs=[src], out=out, code=0)


def test_a_folder_named_like_a_file_is_replaced_only_with_force(tmp_path: Path) -> None:
    src, out = FIXTURES / "peft_llama", tmp_path / "x.safetensors"
    out.mkdir()
    (out / "keep").write_text("mine")
    hostile.run(["convert", src, "--to", "kohya", "-o", out], inputs=[src, out], out=out, says="already exists")
    # --force replaces a folder (never a special file) with the file, whole
    hostile.run(["convert", src, "--to", "kohya", "-o", out, "--force"], inputs=[src], out=out, code=0)
    assert out.is_file()
