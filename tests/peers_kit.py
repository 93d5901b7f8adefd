"""The peer libraries as oracles: load a file the way its owner does (PEFT, diffusers' pipeline loader, diffusers'
kohya converter) on the seeded tiny models of ``fixtures/make_fixtures.py``, and read back what the owner built.

Shared by test_peers.py (the committed fixtures), test_owners.py (files loratools writes) and test_mix.py. The peer
libraries are imported inside the functions, so that importing this module costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from loratools.model import Adapter

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: fp32 deltas and merged weights: a few fp32 roundings of O(0.1) products of rank <= 16
TOL: dict[str, Any] = dict(rtol=1e-5, atol=1e-6)
#: layer / model outputs: sums of a few hundred products taken in another order than the peer's (outputs are O(1))
OUT_TOL: dict[str, Any] = dict(rtol=1e-5, atol=1e-5)


def snapshot(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone() for k, v in model.state_dict().items()}


def lora_layers(
    model: torch.nn.Module, prefix: str = "", strip: str = "", adapter: str | None = None
) -> dict[str, Any]:
    """PEFT's LoRA layers of ``model`` by module path (``strip`` taken off, ``prefix`` put on); with ``adapter``,
    only the layers that hold that adapter."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for n, m in model.named_modules():
        if isinstance(m, LoraLayer) and (adapter is None or adapter in m.lora_A or adapter in m.lora_embedding_A):
            out[prefix + n.removeprefix(strip)] = m
    return out


def close(got: torch.Tensor, want: torch.Tensor, where: str, tol: dict[str, Any] = TOL) -> None:
    torch.testing.assert_close(got, want, **tol, msg=lambda s: f"{where}: {s}")


def delta_of(layer: Any, adapter: str = "default") -> torch.Tensor:
    with torch.no_grad():
        return layer.get_delta_weight(adapter).detach().float()


# ------------------------------------------------------------------------------------------------------------------
# diffusers
# ------------------------------------------------------------------------------------------------------------------


def diffusers_load(mf: ModuleType, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any, Any]:
    """Load a LoRA file (diffusers or kohya: diffusers converts kohya names and alphas) into the tiny UNet + CLIP the
    way ``StableDiffusionPipeline.load_lora_weights`` does: ``lora_state_dict`` then ``load_lora_into_unet`` and
    ``load_lora_into_text_encoder``. Returns the weights before, the LoRA layers by ``unet.``/``text_encoder.``
    path, the UNet and the text encoder."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as SD

    path = Path(path)
    unet, te = mf.tiny_unet(), mf.tiny_clip()
    original = snapshot(unet, "unet.") | snapshot(te, "text_encoder.")
    if path.is_dir():
        sd, alphas, meta = SD.lora_state_dict(str(path), return_lora_metadata=True)
    else:
        sd, alphas, meta = SD.lora_state_dict(str(path.parent), weight_name=path.name, return_lora_metadata=True)
    SD.load_lora_into_unet(sd, alphas, unet, adapter_name="default", metadata=meta)
    SD.load_lora_into_text_encoder(sd, alphas, te, adapter_name="default", metadata=meta)
    layers = lora_layers(unet, "unet.") | lora_layers(te, "text_encoder.")
    return original, layers, unet, te


def peer_name(name: str, te: Any) -> str:
    """A loratools diffusers module path as diffusers names it: transformers-4 text-encoder names
    (``text_encoder.text_model.``) are stripped by diffusers for a transformers-5 CLIP, which has no ``text_model``."""
    if name.startswith("text_encoder.text_model.") and not hasattr(te, "text_model"):
        return "text_encoder." + name.removeprefix("text_encoder.text_model.")
    return name


def kohya_candidates(peer: str) -> list[str]:
    """The kohya names (sd-scripts' convention: ``lora_unet_`` / ``lora_te_`` + the path with ``_`` for ``.``) a
    diffusers module path can be written as; the text encoder's with and without transformers-4's ``text_model``."""
    comp, _, rest = peer.partition(".")
    flat = rest.replace(".", "_")
    if comp == "unet":
        return [f"lora_unet_{flat}"]
    assert comp == "text_encoder", peer
    return [f"lora_te_{flat}", f"lora_te_text_model_{flat}"]


#: how each format spells a module's component: kohya's prefixes, diffusers' component paths (LLM modules have none)
_COMPONENTS = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lycoris_": "",
    "unet.": "unet",
    "text_encoder.": "text_encoder",
}


def kohya_spelling(name: str) -> tuple[str, str]:
    """(component, path with ``_`` for ``.``): a module name in kohya's flattened convention, whichever format
    spells it; independent of loratools' own name tables."""
    for prefix, component in _COMPONENTS.items():
        if name.startswith(prefix):
            flat = name.removeprefix(prefix).replace(".", "_")
            # a transformers 5 CLIP path has no text_model level; kohya names put it back (sd-scripts reads them so)
            return component, flat.removeprefix("text_model_") if component == "text_encoder" else flat
    return "", name.replace(".", "_")


def same_module(a: str, b: str) -> bool:
    """Two spellings of one module: the same flattened path, in the same component where both name one (a PEFT
    adapter of a UNet names none)."""
    (ca, fa), (cb, fb) = kohya_spelling(a), kohya_spelling(b)
    return fa == fb and (not ca or not cb or ca == cb)


def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]), torch.randn(1, 3, 16, generator=g)


# ------------------------------------------------------------------------------------------------------------------
# PEFT
# ------------------------------------------------------------------------------------------------------------------


def model_output(model: torch.nn.Module, builder: str) -> torch.Tensor:
    """The output of a model built by ``builder`` (or a PEFT model around one) on fixed inputs: the logits of the
    LLMs, the noise prediction of the UNet."""
    with torch.no_grad():
        if builder == "tiny_unet":
            return model(*unet_inputs()).sample
        return model(torch.arange(12).reshape(2, 6)).logits


def applied_state(base: dict[str, torch.Tensor], adapter: Adapter, prefix: str = "") -> dict[str, torch.Tensor]:
    """The base weights with loratools' own ``apply`` of every module of ``adapter`` (its delta, DoRA rescale,
    orientation), and its full replacement tensors (modules_to_save) put in place: what the adapter means."""
    out = dict(base)
    for name, m in adapter.modules.items():
        key = f"{prefix}{name}.weight"
        assert key in out, f"{name}: no such weight in the base"
        out[key] = m.apply(out[key].float()).to(out[key].dtype)
    for key, extra in adapter.extras.items():
        if extra.role == "modules_to_save":
            assert key in out, key
            out[key] = extra.ref.load().to(out[key].dtype)
    return out
