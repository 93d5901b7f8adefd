"""The peer libraries as oracles: load a file the way its owner does (PEFT, diffusers' pipeline loader, diffusers'
kohya converter) on the seeded tiny models of ``fixtures/make_fixtures.py``, and read back what the owner built.

Shared by test_peers.py (the committed fixtures), test_owners.py (files loratools writes) and test_mix.py. The peer
libraries are imported inside the functions, so that importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from collections.abc import Iterator
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


#: what the peers say when a file's keys and the model's modules disagree: diffusers' ``_maybe_warn_for_unhandled_keys``
#: ("led to unexpected keys found in the model", "led to missing keys in the model"), its kohya Flux converter's
#: leftovers ("Unsupported keys for ai-toolkit"), its Flux loader's "Found unexpected modules ... These will be
#: ignored" (DEBUG), PEFT's injection ("an inconsistency was discovered between the PEFT config and the provided
#: state_dict", "were set but no module was matched", "did not match any targeted module"), transformers' loading
#: report for a text encoder (``log_state_dict_report``: unexpected / missing keys) and "were not initialized"
KEY_TROUBLE = re.compile(r"unexpected|missing|were not|not found|unsupported|inconsisten|no module was matched"
                         r"|did not match|ignored", re.IGNORECASE)  # fmt: skip
#: diffusers' loaders say this of each component a file has no keys for (a UNet-only LoRA, a pipeline without
#: text encoders); its boilerplate ("... if you think it's unexpected") is no finding
NO_KEYS_FOR = re.compile(r"^WARNING diffusers\.loaders\.lora_base: No LoRA keys associated to \w+ found with the "
                         r"prefix='\w+'\. This is safe to ignore")  # fmt: skip


class _Record(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(f"{record.levelname} {record.name}: {record.getMessage()}")


@contextlib.contextmanager
def loads_cleanly() -> Iterator[list[str]]:
    """Around a peer's load of a LoRA: fails when diffusers, PEFT or transformers say (a log line of any level, or
    ``warnings.warn``) that keys were unexpected, missing, unsupported or left unmatched, i.e. that the load dropped
    part of the file or left part of the model's adapter empty. Their loggers are opened to every level meanwhile
    (make_fixtures sets ``DIFFUSERS_VERBOSITY=error``, and diffusers' Flux loader says "Found unexpected modules ...
    These will be ignored" at DEBUG) and their own handlers kept quiet; the messages seen are yielded (a list filled
    on exit)."""
    seen: list[str] = []
    handler = _Record(seen)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    saved = [(lg.level, lg.handlers, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.handlers, lg.propagate = [handler], False
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("always")
            yield seen
    finally:
        for lg, (level, handlers, propagate) in zip(loggers, saved, strict=True):
            lg.setLevel(level)
            lg.handlers, lg.propagate = handlers, propagate
    seen += [f"{w.category.__name__}: {w.message}" for w in caught]
    trouble = [m for m in seen if KEY_TROUBLE.search(m) and not NO_KEYS_FOR.match(m)]
    assert not trouble, "\n".join(m[:600] for m in trouble)


def diffusers_load(mf: ModuleType, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any, Any]:
    """Load a LoRA file (diffusers or kohya: diffusers converts kohya names and alphas) into the tiny UNet + CLIP the
    way ``StableDiffusionPipeline.load_lora_weights`` does: ``lora_state_dict`` then ``load_lora_into_unet`` and
    ``load_lora_into_text_encoder``. Returns the weights before, the LoRA layers by ``unet.``/``text_encoder.``
    path, the UNet and the text encoder."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as SD

    path = Path(path)
    unet, te = mf.tiny_unet(), mf.tiny_clip()
    original = snapshot(unet, "unet.") | snapshot(te, "text_encoder.")
    where = {"pretrained_model_name_or_path_or_dict": str(path)} if path.is_dir() else {
        "pretrained_model_name_or_path_or_dict": str(path.parent), "weight_name": path.name}  # fmt: skip
    with loads_cleanly():
        sd, alphas, meta = SD.lora_state_dict(**where, return_lora_metadata=True)
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
