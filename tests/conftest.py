from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"

#: every committed adapter fixture, and the format it must be detected as
ADAPTERS = {
    "peft_llama": "peft",
    "peft_llama_patterns": "peft",
    "peft_llama_dora": "peft",
    "peft_llama_embed": "peft",
    "peft_gpt2": "peft",
    "peft_llama_bin": "peft",
    "peft_llama_loha": "peft",
    "peft_llama_lokr": "peft",
    "peft_llama_adalora": "peft",
    "peft_llama_vera": "peft",
    "diffusers_sd": "diffusers",
    "diffusers_sd_old": "diffusers",
    "kohya_sd/lora.safetensors": "kohya",
    "lycoris_loha.safetensors": "kohya",
    "lycoris_loha_tucker.safetensors": "kohya",
    "lycoris_lokr.safetensors": "kohya",
    "lycoris_lokr_full.safetensors": "kohya",
    "lycoris_dora.safetensors": "kohya",
}


@pytest.fixture(params=sorted(ADAPTERS))
def adapter_fixture(request: pytest.FixtureRequest) -> tuple[Path, str]:
    return FIXTURES / request.param, ADAPTERS[request.param]


@pytest.fixture(scope="session")
def mf() -> ModuleType:
    """The fixture script, imported as a module: the seeded base-model builders the fixtures were made on."""
    sys.path.insert(0, str(FIXTURES))
    try:
        return importlib.import_module("make_fixtures")
    finally:
        sys.path.remove(str(FIXTURES))


def direct_writes_work(folder: Path) -> bool:
    """Does the file system of ``folder`` take direct (O_DIRECT) writes? (merge's output goes that way where it
    does: loratools.io.direct)"""
    import os

    from loratools.io import direct

    probe = folder / ".direct-probe"
    probe.write_bytes(b"")
    try:
        fd = direct.open_direct(str(probe))
    finally:
        probe.unlink()
    if fd is None:
        return False
    os.close(fd)
    return True


def run_cli(*args: str) -> tuple[int, str, str]:
    """``loratools ARGS`` in-process: (exit code, stdout, stderr). A bug's exception is raised, not swallowed."""
    from click.testing import CliRunner

    from loratools.cli import cli

    r = CliRunner().invoke(cli, list(args))
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def write_big_checkpoints(root: Path) -> tuple[Path, Path]:
    """A base of about 120 MB (two Llama-like layers and a filler), so that a merge is still at work when a signal
    comes, and a fine-tuned twin for extract (a rank-2 change on every projection): (base, tuned)."""
    import torch

    from loratools.io.safetensors import write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(2):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            rows = 16 if name in ("k_proj", "v_proj") else 32
            tensors[f"model.layers.{layer}.self_attn.{name}.weight"] = torch.randn(rows, 32, generator=g)
    tensors["model.filler.weight"] = torch.randn(30_000_000, generator=g)
    write_safetensors(root / "base.safetensors", tensors)
    for k, t in list(tensors.items()):
        if t.dim() == 2:
            tensors[k] = t + torch.randn(t.shape[0], 2, generator=g) @ torch.randn(2, t.shape[1], generator=g)
    write_safetensors(root / "tuned.safetensors", tensors)
    return root / "base.safetensors", root / "tuned.safetensors"
