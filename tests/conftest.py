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


def run_cli(*args: str) -> tuple[int, str, str]:
    """``loratools ARGS`` in-process: (exit code, stdout, stderr). A bug's exception is raised, not swallowed."""
    from click.testing import CliRunner

    from loratools.cli import cli

    r = CliRunner().invoke(cli, list(args))
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr
