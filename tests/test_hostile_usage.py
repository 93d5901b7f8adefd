"""Hostile battery, usage: every command with every kind of bad option value.

Each case must exit 2 with click's usage message (``Usage: loratools CMD ...`` and one ``Error:`` line naming
what is wrong), print nothing on stdout, leave nothing beside the output, and be told before anything is read or
downloaded: every reader and the Hub are replaced by a trap that fails the case if it is called.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import hostile
import pytest
from conftest import FIXTURES

A = str(FIXTURES / "peft_llama")
B = str(FIXTURES / "peft_llama_patterns")
K = str(FIXTURES / "kohya_sd" / "lora.safetensors")
OUT = "{out}"  # replaced by a path in the test's tmp_path

#: the modules whose readers are trapped, and the names they read through
READER_MODULES = (
    "loratools.formats",
    "loratools.formats.common",
    "loratools.io.atomic",
    "loratools.io.checkpoint",
    "loratools.hub",
    "loratools.ops.convert",
    "loratools.ops.diff",
    "loratools.ops.extract",
    "loratools.ops.inspect",
    "loratools.ops.merge",
    "loratools.ops.mix",
    "loratools.ops.resize",
    "loratools.ops.validate",
    *(f"loratools.cli.{c}" for c in ("convert", "diff", "extract", "inspect", "mix", "resize", "validate")),
)
READERS = (
    "load_adapter", "detect", "open_raw", "read_header", "read_checkpoint", "check_output",
    "fetch_if_remote", "fetch_if_repo", "resolve", "fetch", "fetch_headers",
)  # fmt: skip


def trap_readers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace every reader (and the Hub, and the output check) by a trap; returns the list of trapped calls."""
    calls: list[str] = []

    def trap_for(name: str) -> Any:
        def trap(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name}{args!r} was called before the arguments were checked")

        return trap

    for mod_name in READER_MODULES:
        mod = importlib.import_module(mod_name)
        for name in READERS:
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, trap_for(f"{mod_name}.{name}"))
    return calls


@pytest.fixture
def nothing_read(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return trap_readers(monkeypatch)


MIX = ["mix", A, B, "-o", OUT]
RESIZE = ["resize", A, "-o", OUT]
EXTRACT = ["extract", A, B, "-o", OUT]  # nothing is read: any two paths do
CONVERT = ["convert", A, "--to", "kohya", "-o", OUT]
DIFF = ["diff", A, B]
VALIDATE = ["validate", A]
INSPECT = ["inspect", A]

#: id -> (command line, words the Error line must hold)
CASES: dict[str, tuple[list[str], str]] = {
    # mix: --weights
    "mix-weights-one-for-two": ([*MIX, "--weights", "0.7"], "'--weights': 1 weight(s) for 2 input(s)"),
    "mix-weights-three-for-two": ([*MIX, "--weights", "1,2,3"], "3 weight(s) for 2 input(s)"),
    "mix-weights-word": ([*MIX, "--weights", "x"], "'x' is not a number"),
    "mix-weights-empty-item": ([*MIX, "--weights", "1,,2"], "weight 2 is empty"),
    "mix-weights-trailing-comma": ([*MIX, "--weights", "1,"], "weight 2 is empty"),
    "mix-weights-empty": ([*MIX, "--weights", ""], "weight 1 is empty"),
    "mix-weights-nan": ([*MIX, "--weights", "nan,1"], "not a finite number"),
    "mix-weights-inf": ([*MIX, "--weights", "1,inf"], "not a finite number"),
    "mix-weights-minus-inf": ([*MIX, "--weights", "-inf,1"], "not a finite number"),
    "mix-weights-overflow": ([*MIX, "--weights", "1e400,1"], "not a finite number"),
    "mix-weights-semicolons": ([*MIX, "--weights", "0.5;0.5"], "not a number"),
    "mix-weights-hex": ([*MIX, "--weights", "0x1,1"], "not a number"),
    # mix: method and rank
    "mix-svd-without-rank": ([*MIX, "--method", "svd"], "--method svd needs --rank"),
    "mix-cat-with-rank": ([*MIX, "--method", "cat", "--rank", "2"], "--rank applies to --method svd, not cat"),
    "mix-linear-with-rank": ([*MIX, "--method", "linear", "--rank", "2"], "not linear"),
    "mix-rank-0": ([*MIX, "--rank", "0"], "'--rank'"),
    "mix-rank-negative": ([*MIX, "--rank", "-1"], "'--rank'"),
    "mix-rank-word": ([*MIX, "--rank", "four"], "'--rank'"),
    "mix-rank-float": ([*MIX, "--rank", "2.5"], "'--rank'"),
    "mix-method-unknown": ([*MIX, "--method", "slerp"], "'--method'"),
    "mix-energy-unknown-option": ([*MIX, "--energy", "0.5"], "No such option"),
    # mix: the rest
    "mix-device-unknown": ([*MIX, "--device", "gpu"], "'--device'"),
    "mix-device-bad-index": ([*MIX, "--device", "cuda:x"], "'--device'"),
    "mix-dtype-unknown": ([*MIX, "--dtype", "fp8"], "'--dtype'"),
    "mix-to-gguf": ([*MIX, "--to", "gguf"], "'--to'"),
    "mix-no-output": (["mix", A, B], "Missing option '-o'"),
    "mix-no-input": (["mix", "-o", OUT], "Missing argument"),
    "mix-empty-source": (["mix", A, "", "-o", OUT], "empty path"),
    "mix-empty-output": (["mix", A, B, "-o", ""], "empty path"),
    # resize
    "resize-neither-rank-nor-energy": (RESIZE, "exactly one of --rank and --energy"),
    "resize-rank-and-energy": ([*RESIZE, "--rank", "2", "--energy", "0.5"], "exactly one of --rank and --energy"),
    "resize-rank-0": ([*RESIZE, "--rank", "0"], "'--rank'"),
    "resize-rank-negative": ([*RESIZE, "--rank", "-1"], "'--rank'"),
    "resize-energy-0": ([*RESIZE, "--energy", "0"], "'--energy'"),
    "resize-energy-over-1": ([*RESIZE, "--energy", "1.5"], "'--energy'"),
    "resize-energy-negative": ([*RESIZE, "--energy", "-0.1"], "'--energy'"),
    "resize-energy-nan": ([*RESIZE, "--energy", "nan"], "'--energy'"),
    "resize-energy-inf": ([*RESIZE, "--energy", "inf"], "'--energy'"),
    "resize-energy-word": ([*RESIZE, "--energy", "most"], "'--energy'"),
    "resize-device-unknown": ([*RESIZE, "--rank", "2", "--device", "tpu"], "'--device'"),
    "resize-to-unknown": ([*RESIZE, "--rank", "2", "--to", "onnx"], "'--to'"),
    "resize-empty-source": (["resize", "", "--rank", "2", "-o", OUT], "empty path"),
    # extract
    "extract-neither-rank-nor-energy": (EXTRACT, "exactly one of --rank and --energy"),
    "extract-rank-and-energy": ([*EXTRACT, "--rank", "2", "--energy", "0.9"], "exactly one of --rank and --energy"),
    "extract-rank-0": ([*EXTRACT, "--rank", "0"], "'--rank'"),
    "extract-energy-0": ([*EXTRACT, "--energy", "0"], "'--energy'"),
    "extract-energy-over-1": ([*EXTRACT, "--energy", "2"], "'--energy'"),
    "extract-energy-nan": ([*EXTRACT, "--energy", "nan"], "'--energy'"),
    "extract-max-rank-with-rank": ([*EXTRACT, "--rank", "2", "--max-rank", "4"], "--max-rank caps"),
    "extract-max-rank-0": ([*EXTRACT, "--energy", "0.9", "--max-rank", "0"], "'--max-rank'"),
    "extract-include-not-regex": ([*EXTRACT, "--rank", "2", "--include", "("], "'--include'"),
    "extract-exclude-not-regex": ([*EXTRACT, "--rank", "2", "--exclude", "[a-"], "'--exclude'"),
    "extract-embeddings-unknown": ([*EXTRACT, "--rank", "2", "--embeddings", "keep"], "'--embeddings'"),
    "extract-to-gguf": ([*EXTRACT, "--rank", "2", "--to", "gguf"], "'--to'"),
    "extract-device-unknown": ([*EXTRACT, "--rank", "2", "--device", "metal"], "'--device'"),
    "extract-no-tuned": (["extract", A, "--rank", "2", "-o", OUT], "Missing argument 'TUNED'"),
    # convert
    "convert-no-to": (["convert", A, "-o", OUT], "Missing option '--to'"),
    "convert-to-unknown": (["convert", A, "--to", "onnx", "-o", OUT], "'--to'"),
    "convert-rank-0": ([*CONVERT, "--rank", "0"], "'--rank'"),
    "convert-rank-negative": ([*CONVERT, "--rank", "-3"], "'--rank'"),
    "convert-energy-0": ([*CONVERT, "--energy", "0"], "'--energy'"),
    "convert-energy-over-1": ([*CONVERT, "--energy", "1.5"], "'--energy'"),
    "convert-energy-nan": ([*CONVERT, "--energy", "nan"], "'--energy'"),
    "convert-rank-and-energy": ([*CONVERT, "--rank", "2", "--energy", "0.5"], "at most one of --rank and --energy"),
    "convert-alpha-mode-unknown": ([*CONVERT, "--alpha-mode", "fold"], "'--alpha-mode'"),
    "convert-dtype-unknown": ([*CONVERT, "--dtype", "fp64"], "'--dtype'"),
    "convert-empty-base": ([*CONVERT, "--base", ""], "empty path"),
    # diff
    "diff-atol-negative": ([*DIFF, "--atol", "-1"], "'--atol'"),
    "diff-atol-nan": ([*DIFF, "--atol", "nan"], "'--atol'"),
    "diff-atol-word": ([*DIFF, "--atol", "tiny"], "'--atol'"),
    "diff-rtol-negative": ([*DIFF, "--rtol", "-1e-3"], "'--rtol'"),
    "diff-rtol-nan": ([*DIFF, "--rtol", "nan"], "'--rtol'"),
    "diff-mode-unknown": ([*DIFF, "--mode", "bytes"], "'--mode'"),
    "diff-json-atol-negative": ([*DIFF, "--json", "--atol", "-1"], "'--atol'"),
    "diff-one-input": (["diff", A], "Missing argument 'B'"),
    "diff-empty-input": (["diff", A, ""], "empty path"),
    # validate
    "validate-for-unknown": ([*VALIDATE, "--for", "lmstudio"], "'--for'"),
    "validate-format-gguf": ([*VALIDATE, "--format", "gguf"], "'--format'"),
    "validate-empty-base": ([*VALIDATE, "--base", ""], "empty path"),
    "validate-empty-source": (["validate", ""], "empty path"),
    "validate-no-source": (["validate"], "Missing argument 'SOURCE'"),
    "validate-json-unknown-option": ([*VALIDATE, "--json", "--deep"], "No such option"),
    # inspect
    "inspect-fast-and-spectrum": ([*INSPECT, "--fast", "--spectrum"], "--spectrum reads the tensors"),
    "inspect-format-unknown": ([*INSPECT, "--format", "onnx"], "'--format'"),
    "inspect-empty-source": (["inspect", ""], "empty path"),
    "inspect-no-source": (["inspect"], "Missing argument 'SOURCE'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_usage_error_exits_2_before_reading(case: str, nothing_read: list[str], tmp_path: Path) -> None:
    args, says = CASES[case]
    out = tmp_path / "out"
    args = [a.replace(OUT, str(out)) for a in args]
    r = hostile.run(args, inputs=[A, B, K], code=2, out=out, says=says, seconds=3)
    assert nothing_read == []
    assert r.stdout == "", r.stdout
    assert f"Usage: cli {args[0]} " in r.stderr, r.stderr  # click's usage style (CliRunner names the group cli)
    assert not out.exists()


def test_the_trap_springs(nothing_read: list[str], tmp_path: Path) -> None:
    """The trap is real: a valid command line does reach a reader (and fails the run)."""
    with pytest.raises(AssertionError, match="was called before the arguments were checked"):
        hostile.run(["resize", A, "--rank", "2", "-o", str(tmp_path / "out")], code=0)
    assert nothing_read
