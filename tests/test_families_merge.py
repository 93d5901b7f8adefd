"""``loratools merge`` of image-model LoRAs, whatever their naming, into the tiny models' single-file checkpoints (SD
1.x; SDXL with OpenCLIP's fused ``in_proj_weight``; Flux in BFL names with fused ``qkv`` and ``linear1``; SD3) and
diffusers folders, against diffusers' own ``load_lora_weights`` + ``fuse_lora`` on the same tiny models.

diffusers' fused weights are compared with the merged single file tensor by tensor, each diffusers tensor at the
place the family's single-file table gives it (a table that test_families.py checks against diffusers' own
single-file converters). Where diffusers cannot read a kohya file of a tiny model (its kohya Flux converter splits
``linear1`` at Flux.1-dev's widths; it has no kohya SD3 reader), diffusers fuses the diffusers file the kohya file
was converted from (test_families_kohya.py shows the two carry the same deltas, through diffusers' own loaders).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import families_kit as fk
import pytest
import safetensors.torch
import torch
from test_families_kohya import xlabs_file

from loratools.errors import LoratoolsError
from loratools.formats.families import family
from loratools.ops.convert import convert
from loratools.ops.merge import merge

TOL = {"rtol": 1e-4, "atol": 1e-5}


def save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def merged_file(base: Path, lora: Path, out: Path) -> dict[str, torch.Tensor]:
    merge(base, [lora], out)
    return safetensors.torch.load_file(str(out))


def same_as_fused(got: dict[str, torch.Tensor], base: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Every tensor of the merged file equals diffusers' fused one at its place; the LoRA changed the same ones."""
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:6]
    changed = {k for k in want if not torch.equal(want[k], base[k])}
    assert changed, "the LoRA changed nothing: no test"
    assert {k for k in got if not torch.equal(got[k], base[k])} == changed
    for k in changed:
        torch.testing.assert_close(got[k], want[k], **TOL, msg=k)


def test_sd1_single_file_merge_is_diffusers_fuse(mf: Any, tmp_path: Path) -> None:
    """An sd-scripts LoRA of SD 1.x (``lora_unet_down_blocks_...`` in diffusers' UNet names, ``lora_te_text_model_``,
    3x3 conv LoCon) and a diffusers file of transformers 5 names, each merged into an A1111 checkpoint
    (``model.diffusion_model.`` SGM blocks, ``cond_stage_model.transformer.``)."""
    from conftest import FIXTURES
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as SD

    fam = family("sd1", dict(mf.tiny_unet().config))
    base = fk.single_file(fam, unet=mf.tiny_unet(), text_encoder=mf.tiny_clip())
    path = save(tmp_path / "sd15.safetensors", base)
    for i, lora in enumerate((FIXTURES / "kohya_sd" / "lora.safetensors",
                              FIXTURES / "diffusers_sd" / "pytorch_lora_weights.safetensors")):  # fmt: skip
        fused = fk.diffusers_fused(SD, mf, lora, unet=mf.tiny_unet(), text_encoder=mf.tiny_clip())
        want = fk.single_file(fam, **{c: _Loaded(s) for c, s in fused.items()})
        same_as_fused(merged_file(path, lora, tmp_path / f"m{i}.safetensors"), base, want)


class _Loaded:
    """A state dict standing in for a model (what :func:`families_kit.single_file` reads)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state


@pytest.fixture(scope="module")
def sdxl(mf: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny SDXL as a diffusers folder, its LoRA on all three components (diffusers' save) and the same LoRA in
    kohya's SDXL names (SGM blocks, ``lora_te1_`` / ``lora_te2_``)."""
    root = tmp_path_factory.mktemp("sdxl_merge")
    base, lora, _ = fk.sdxl_lora(mf, root, (61, 62, 63))
    kohya = root / "kohya.safetensors"
    convert(lora, "kohya", kohya, base=base)
    return base, lora, kohya


def _sdxl_fused(mf: Any, lora: Path) -> dict[str, dict[str, torch.Tensor]]:
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin as XL

    unet, te, te2 = fk.sdxl_models(mf)
    return fk.diffusers_fused(XL, mf, lora, unet=unet, text_encoder=te, text_encoder_2=te2)


def test_sdxl_single_file_merge_is_diffusers_fuse(mf: Any, sdxl: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """kohya's SDXL file (read by diffusers with the UNet's config) and the diffusers file, merged into a single
    file with both text encoders: the OpenCLIP one's q, k and v each go to their rows of ``in_proj_weight``."""
    _, diffusers_file, kohya = sdxl
    unet, te, te2 = fk.sdxl_models(mf)
    fam = family("sdxl", dict(unet.config))
    base = fk.single_file(fam, unet=unet, text_encoder=te, text_encoder_2=te2)
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in base
    path = save(tmp_path / "sdxl.safetensors", base)
    for i, lora in enumerate((kohya, diffusers_file)):
        want = fk.single_file(fam, **{c: _Loaded(s) for c, s in _sdxl_fused(mf, lora).items()})
        same_as_fused(merged_file(path, lora, tmp_path / f"m{i}.safetensors"), base, want)


def test_sdxl_kohya_merge_into_diffusers_folder_is_diffusers_fuse(
    mf: Any, sdxl: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """The kohya SDXL file (SGM names) merged into the diffusers folder of the same model: the UNet's config numbers
    the blocks."""
    base, _, kohya = sdxl
    fused = _sdxl_fused(mf, kohya)
    merge(base, [kohya], tmp_path / "out")
    for component, want in fused.items():
        folder = tmp_path / "out" / component
        got = safetensors.torch.load_file(str(next(folder.glob("*.safetensors"))))
        before = safetensors.torch.load_file(str(next((base / component).glob("*.safetensors"))))
        same_as_fused({k: v for k, v in got.items() if k in want}, before, want)


@pytest.fixture(scope="module")
def flux(mf: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A tiny Flux's LoRA (diffusers' save), the same in kohya's BFL names (fused qkv, linear1), and the weights
    diffusers fuses from the diffusers file."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin as F

    root = tmp_path_factory.mktemp("flux_merge")
    model = fk.flux_model(mf)
    meta = fk.add_lora(mf, model, fk.FLUX_TARGETS, 71)
    with mf._quiet():
        F.save_lora_weights(str(root / "diffusers"), transformer_lora_layers=fk.lora_state(model),
                            transformer_lora_adapter_metadata=meta)  # fmt: skip
    src = root / "diffusers" / "pytorch_lora_weights.safetensors"
    convert(src, "kohya", root / "kohya.safetensors")
    fused = fk.diffusers_fused(F, mf, src, transformer=fk.flux_model(mf))["transformer"]
    return src, root / "kohya.safetensors", fused


@pytest.mark.parametrize("root", ["", "model.diffusion_model."])
def test_flux_single_file_merge_is_diffusers_fuse(
    mf: Any, flux: tuple[Path, Path, dict[str, torch.Tensor]], tmp_path: Path, root: str
) -> None:
    """Into BFL's own single file (bare names, or ComfyUI's ``model.diffusion_model.``): the kohya file's fused
    qkv / linear1 go to their tensors as they are, the diffusers file's q, k, v and MLP input to their rows, the
    final modulation's halves swapped."""
    fam = family("flux1")
    base = fk.to_single_file(fam, "transformer", dict(fk.flux_model(mf).state_dict()), root=root)
    assert f"{root}single_blocks.0.linear1.weight" in base
    path = save(tmp_path / "flux.safetensors", base)
    want = fk.to_single_file(fam, "transformer", flux[2], root=root)
    for i, lora in enumerate(flux[:2]):
        same_as_fused(merged_file(path, lora, tmp_path / f"m{i}.safetensors"), base, want)


def test_flux_kohya_and_xlabs_merge_into_diffusers_folder_is_diffusers_fuse(
    mf: Any, flux: tuple[Path, Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    """kohya's BFL file merged into the diffusers transformer folder (qkv and linear1 split by rows) equals
    diffusers' fuse of the diffusers file; an XLabs file, which diffusers loads itself (``load_lora_weights``),
    merged into the folder and into the BFL single file equals diffusers' fuse of it."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin as F

    base = fk.save_base(tmp_path / "base", "FluxPipeline", transformer=fk.flux_model(mf))
    before = safetensors.torch.load_file(str(base / "transformer" / "diffusion_pytorch_model.safetensors"))
    merge(base, [flux[1]], tmp_path / "out")
    got = safetensors.torch.load_file(str(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors"))
    same_as_fused(got, before, flux[2])
    xlabs = tmp_path / "xlabs.safetensors"
    xlabs_file(xlabs, fk.FLUX["attention_head_dim"] * fk.FLUX["num_attention_heads"])
    fused = fk.diffusers_fused(F, mf, xlabs, transformer=fk.flux_model(mf))["transformer"]
    merge(base, [xlabs], tmp_path / "out2")
    got = safetensors.torch.load_file(str(tmp_path / "out2" / "transformer" / "diffusion_pytorch_model.safetensors"))
    same_as_fused(got, before, fused)
    single = fk.to_single_file(family("flux1"), "transformer", before)
    path = save(tmp_path / "flux.safetensors", single)
    want = fk.to_single_file(family("flux1"), "transformer", fused)
    same_as_fused(merged_file(path, xlabs, tmp_path / "m.safetensors"), single, want)


def test_sd3_kohya_merge_is_diffusers_fuse(mf: Any, tmp_path: Path) -> None:
    """kohya's SD3 file (``lora_unet_joint_blocks_N_x_block_attn_qkv``, q/k/v fused) merged into the diffusers
    folder and into the single file of a tiny SD3.5-style model equals diffusers' fuse of the diffusers file it
    was converted from (diffusers has no kohya SD3 reader)."""
    from diffusers.loaders.lora_pipeline import SD3LoraLoaderMixin as S

    model = fk.sd3_model(mf)
    meta = fk.add_lora(mf, model, fk.SD3_TARGETS, 81)
    with mf._quiet():
        S.save_lora_weights(str(tmp_path / "diffusers"), transformer_lora_layers=fk.lora_state(model),
                            transformer_lora_adapter_metadata=meta)  # fmt: skip
    src = tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"
    kohya = tmp_path / "kohya.safetensors"
    convert(src, "kohya", kohya)
    fused = fk.diffusers_fused(S, mf, src, transformer=fk.sd3_model(mf))["transformer"]
    base = fk.save_base(tmp_path / "base", "StableDiffusion3Pipeline", transformer=fk.sd3_model(mf))
    before = safetensors.torch.load_file(str(base / "transformer" / "diffusion_pytorch_model.safetensors"))
    merge(base, [kohya], tmp_path / "out")
    got = safetensors.torch.load_file(str(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors"))
    same_as_fused(got, before, fused)
    extra = {"pos_embed.pos_embed": "pos_embed"}
    single = fk.to_single_file(family("sd3"), "transformer", before, extra=extra)
    path = save(tmp_path / "sd3.safetensors", single)
    want = fk.to_single_file(family("sd3"), "transformer", fused, extra=extra)
    for i, lora in enumerate((kohya, src)):
        same_as_fused(merged_file(path, lora, tmp_path / f"m{i}.safetensors"), single, want)


def test_merge_refuses_what_has_no_place(mf: Any, sdxl: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A module with no place in the checkpoint is refused, naming what is missing, and nothing is written: text
    encoder modules into a UNet-only SDXL file, a module no table knows."""
    _, _, kohya = sdxl
    unet, _, _ = fk.sdxl_models(mf)
    path = save(tmp_path / "unet_only.safetensors", fk.single_file(family("sdxl", dict(unet.config)), unet=unet))
    with pytest.raises(LoratoolsError, match="have no place in the base") as e:
        merge(path, [kohya], tmp_path / "out.safetensors")
    assert "holds no text_encoder" in str(e.value) and "lora_te1_text_model_encoder_layers_0" in str(e.value)
    assert "SDXL single-file checkpoint (unet at model.diffusion_model.)" in (e.value.hint or "")
    assert not (tmp_path / "out.safetensors").exists()
    odd = tmp_path / "odd.safetensors"
    save(odd, {"lora_unet_input_blocks_1_0_no_such_layer.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_input_blocks_1_0_no_such_layer.lora_up.weight": torch.zeros(8, 2)})  # fmt: skip
    with pytest.raises(
        LoratoolsError, match="lora_unet_input_blocks_1_0_no_such_layer: not a module of SD 1.x or SD 2.x or SDXL"
    ):
        merge(path, [odd], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
