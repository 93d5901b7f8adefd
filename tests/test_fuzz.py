"""Damaged files: whatever the damage, inspect and validate answer with a finding or one Error line, never a
traceback."""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratools.cli import cli

SOURCES = ["kohya_sd/lora.safetensors", "peft_llama/adapter_model.safetensors", "lycoris_lokr.safetensors"]


def damaged(data: bytes, rng: random.Random) -> bytes:
    # the header length of a safetensors file; for anything else (a zip pickle) some span of the file
    n = max(1, min(int.from_bytes(data[:8], "little"), len(data) - 9))
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
            assert r.exit_code in ((0, 1, 2) if args[0] == "validate" else (0, 1)), (i, args, r.output)
            if r.exit_code == 2 or r.exit_code == 1 and args[0] == "inspect":
                assert r.stderr.startswith("Error: "), (i, r.stderr)


#: hypothesis examples per property (LORATOOLS_FUZZ_EXAMPLES=2000 for a longer run)
EXAMPLES = int(__import__("os").environ.get("LORATOOLS_FUZZ_EXAMPLES", "60"))

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "Q4", "", "f32"]) | JSONISH,
        "shape": st.lists(st.integers(-3, 2**40), max_size=4) | JSONISH,
        "data_offsets": st.lists(st.integers(-10, 2**40), max_size=3) | JSONISH,
    },
)
NAMES = st.sampled_from(
    [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        "lora_unet_conv_in.lora_down.weight",
        "lora_unet_conv_in.alpha",
        "unet.a.lora_A.weight",
        "x" * 3,
        "__metadata__",
        "\udcff",
    ]
)


def _check(path: Path) -> None:
    runner = CliRunner()
    for args in (["inspect", "--fast", "--json"], ["inspect", "--json"], ["validate", "--json"]):
        r = runner.invoke(cli, [*args, str(path)])
        assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception))
        # validate: 2 when the bytes are readable weights but no adapter (nothing to judge), with one Error line
        assert r.exit_code in ((0, 1, 2) if args[0] == "validate" else (0, 1)), (args, r.output)
        assert r.exit_code != 2 or r.stderr.startswith("Error: "), (args, r.stderr)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(header=st.dictionaries(NAMES, ENTRY | JSONISH, max_size=4), data=st.binary(max_size=64))
def test_lying_headers_end_in_a_clean_error(
    tmp_path_factory: pytest.TempPathFactory, header: dict, data: bytes
) -> None:
    d = tmp_path_factory.mktemp("h")
    try:
        raw = json.dumps(header).encode("utf-8", "surrogatepass")
    except (ValueError, TypeError):
        return
    (d / "x.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    _check(d / "x.safetensors")


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(cfg=st.dictionaries(st.sampled_from(
    ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "use_rslora", "fan_in_fan_out",
     "modules_to_save", "peft_type", "use_dora", "init_lora_weights", "base_model_name_or_path"]), JSONISH, max_size=6))  # fmt: skip
def test_configs_with_wrong_types_end_in_a_clean_error(tmp_path_factory: pytest.TempPathFactory, cfg: dict) -> None:
    d = tmp_path_factory.mktemp("c")
    shutil.copy(FIXTURES / "peft_llama" / "adapter_model.safetensors", d)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    _check(d)


def test_regression_corpus(tmp_path: Path) -> None:
    """Every header that once produced a traceback, kept as a case (tests/corpus/headers.json)."""
    cases = json.loads((Path(__file__).parent / "corpus" / "headers.json").read_text())
    assert cases
    for i, case in enumerate(cases):
        raw = json.dumps(case["header"]).encode()
        path = tmp_path / f"case{i}.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + case.get("data", "").encode())
        _check(path)


def test_config_regression_corpus(tmp_path: Path) -> None:
    cases = json.loads((Path(__file__).parent / "corpus" / "configs.json").read_text())
    for i, case in enumerate(cases):
        d = tmp_path / f"case{i}"
        d.mkdir()
        shutil.copy(FIXTURES / "peft_llama" / "adapter_model.safetensors", d)
        (d / "adapter_config.json").write_text(json.dumps(case["config"]))
        _check(d)
        r = CliRunner().invoke(cli, ["inspect", str(d)])
        assert r.exit_code == 1 and r.stderr.startswith("Error: ") and "must be" in r.stderr, case["why"]
