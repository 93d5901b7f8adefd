"""Damaged files: whatever the damage, inspect and validate answer with a finding or one Error line, never a
traceback."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FIXTURES

from loratools.cli import cli

SOURCES = ["kohya_sd/lora.safetensors", "peft_llama/adapter_model.safetensors", "lycoris_lokr.safetensors"]


def damaged(data: bytes, rng: random.Random) -> bytes:
    n = int.from_bytes(data[:8], "little")
    kind = rng.randrange(5)
    b = bytearray(data)
    if kind == 0:  # cut anywhere
        return bytes(b[: rng.randrange(len(b))])
    if kind == 1:  # flip bytes in the header
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(8, 8 + n)] = rng.randrange(256)
        return bytes(b)
    if kind == 2:  # lie about the header length
        b[:8] = rng.choice([0, 1, n - 1, n + 1, len(b), 2**63]).to_bytes(8, "little")
        return bytes(b)
    if kind == 3:  # swap a digit in the header (shapes, offsets, alphas stay syntactically valid)
        digits = [i for i in range(8, 8 + n) if 48 <= b[i] <= 57]
        for i in rng.sample(digits, k=min(3, len(digits))):
            b[i] = rng.randrange(48, 58)
        return bytes(b)
    for _ in range(rng.randint(1, 8)):  # scribble over the data (NaNs, huge values)
        b[rng.randrange(8 + n, len(b))] = rng.choice([0xFF, 0x7F, 0x00])
    return bytes(b)


@pytest.mark.parametrize("source", SOURCES)
def test_damaged_files_never_raise(source: str, tmp_path: Path) -> None:
    rng = random.Random(source)
    original = (FIXTURES / source).read_bytes()
    runner = CliRunner()
    for i in range(40):
        case = tmp_path / f"case{i}"
        if source.startswith("peft_llama/"):
            shutil.copytree(FIXTURES / "peft_llama", case)
            target = case / "adapter_model.safetensors"
        else:
            case.mkdir()
            target = case / "lora.safetensors"
        target.write_bytes(damaged(original, rng))
        for args in (["inspect", "--fast", "--json"], ["inspect", "--json"], ["validate", "--json"]):
            r = runner.invoke(cli, [*args, str(case)])
            assert r.exception is None or isinstance(r.exception, SystemExit), (i, args, r.exception)
            assert r.exit_code in (0, 1), (i, args, r.output)
            if r.exit_code == 1 and args[0] == "inspect":
                assert r.stderr.startswith("Error: "), (i, r.stderr)
