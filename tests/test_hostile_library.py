"""Hostile battery, library arguments: the ops functions called with wrong types and values.

Each call must raise :class:`loratools.errors.UsageError` (a LoratoolsError) with a one-line message naming the
argument, never TypeError / AttributeError / ValueError from deep inside, and do so before anything is read or
written (the readers are trapped as in test_hostile_usage).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hostile
import pytest
from conftest import FIXTURES
from test_hostile_usage import trap_readers

from loratools import load_adapter
from loratools.errors import UsageError
from loratools.ops.convert import convert, convert_adapter
from loratools.ops.diff import diff, plan_diff
from loratools.ops.extract import extract, extract_adapter
from loratools.ops.inspect import inspect
from loratools.ops.mix import mix, mix_adapters
from loratools.ops.resize import resize, resize_adapter
from loratools.ops.validate import validate

A = FIXTURES / "peft_llama"
B = FIXTURES / "peft_llama_patterns"
OUT = Path("/nonexistent-dir-for-outputs/out")  # never reached: the arguments are refused first


class _Adapter:
    """One adapter, loaded once (before the readers are trapped) for the in-memory functions."""

    value: Any = None

    def __call__(self) -> Any:
        if self.value is None:
            self.value = load_adapter(A)
        return self.value


ADAPTER = _Adapter()
ADAPTERS = object()  # stands for [the adapter]

#: id -> (function, positional args, keyword args, words the message must hold)
CASES: dict[str, tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], str]] = {
    # mix
    "mix-sources-none": (mix, (None, OUT), {}, "sources must be a list of paths, not None"),
    "mix-sources-a-string": (mix, (str(A), OUT), {}, "not a single path"),
    "mix-sources-a-path": (mix, (A, OUT), {}, "not a single path"),
    "mix-sources-empty": (mix, ([], OUT), {}, "at least 1"),
    "mix-source-none": (mix, ([A, None], OUT), {}, "sources[1] must be a path"),
    "mix-source-int": (mix, ([A, 3], OUT), {}, "not int"),
    "mix-source-nul": (mix, (["a\0b"], OUT), {}, "NUL"),
    "mix-out-none": (mix, ([A], None), {}, "out must be a path"),
    "mix-out-empty": (mix, ([A], ""), {}, "out is an empty path"),
    "mix-weights-short": (mix, ([A, B], OUT, [0.7]), {}, "1 weight(s) for 2 input(s)"),
    "mix-weights-a-string": (mix, ([A, B], OUT, "0.5,0.5"), {}, "weights must be a list of numbers, not str"),
    "mix-weights-nan": (mix, ([A], OUT, [math.nan]), {}, "weights[0] must be a finite number"),
    "mix-weights-inf": (mix, ([A], OUT, [math.inf]), {}, "finite"),
    "mix-weights-bool": (mix, ([A], OUT, [True]), {}, "weights[0] must be a number, not bool"),
    "mix-weights-str-item": (mix, ([A], OUT, ["1"]), {}, "not str"),
    "mix-weights-huge-int": (mix, ([A], OUT, [10**400]), {}, "too large"),
    "mix-method-unknown": (mix, ([A], OUT), {"method": "slerp"}, "unknown method 'slerp'"),
    "mix-method-int": (mix, ([A], OUT), {"method": 1}, "unknown method int"),
    "mix-svd-without-rank": (mix, ([A], OUT), {"method": "svd"}, "needs a rank"),
    "mix-cat-with-rank": (mix, ([A], OUT), {"method": "cat", "rank": 2}, "not cat"),
    "mix-rank-0": (mix, ([A], OUT), {"rank": 0}, "rank must be at least 1, not 0"),
    "mix-rank-negative": (mix, ([A], OUT), {"rank": -1}, "at least 1"),
    "mix-rank-float": (mix, ([A], OUT), {"rank": 2.0}, "rank must be an integer, not float"),
    "mix-rank-str": (mix, ([A], OUT), {"rank": "2"}, "not str"),
    "mix-device-unknown": (mix, ([A], OUT), {"device": "gpu"}, "unknown device 'gpu'"),
    "mix-device-int": (mix, ([A], OUT), {"device": 0}, "unknown device int"),
    "mix-dtype-unknown": (mix, ([A], OUT), {"dtype": "fp8"}, "unknown dtype"),
    "mix-to-gguf": (mix, ([A], OUT), {"to": "gguf"}, "unknown format 'gguf'"),
    "mix-force-string": (mix, ([A], OUT), {"force": "no"}, "force must be True or False, not str"),
    "mix-strict-int": (mix, ([A], OUT), {"strict": 1}, "strict must be True or False"),
    "mix-progress-not-callable": (mix, ([A], OUT), {"progress": 5}, "progress must be callable"),
    "mix-adapters-paths": (mix_adapters, ([A], [1.0]), {}, "list of Adapter objects"),
    "mix-adapters-empty": (mix_adapters, ([], []), {}, "at least one adapter"),
    "mix-adapters-weights-long": (mix_adapters, (ADAPTERS, [1.0, 2.0]), {}, "2 weight(s) for 1 adapter(s)"),
    # resize
    "resize-source-none": (resize, (None, OUT), {"rank": 2}, "source must be a path (str or os.PathLike), not None"),
    "resize-neither": (resize, (A, OUT), {}, "exactly one of rank and energy"),
    "resize-both": (resize, (A, OUT), {"rank": 2, "energy": 0.5}, "exactly one of rank and energy"),
    "resize-rank-0": (resize, (A, OUT), {"rank": 0}, "at least 1"),
    "resize-rank-bool": (resize, (A, OUT), {"rank": True}, "rank must be an integer, not bool"),
    "resize-energy-0": (resize, (A, OUT), {"energy": 0}, "fraction in (0, 1]"),
    "resize-energy-over-1": (resize, (A, OUT), {"energy": 1.5}, "fraction in (0, 1]"),
    "resize-energy-nan": (resize, (A, OUT), {"energy": math.nan}, "energy must be a finite number"),
    "resize-energy-str": (resize, (A, OUT), {"energy": "0.9"}, "energy must be a number, not str"),
    "resize-energy-huge": (resize, (A, OUT), {"energy": 10**400}, "too large"),
    "resize-adapter-a-path": (resize_adapter, (A,), {"rank": 2}, "adapter must be an Adapter"),
    # extract
    "extract-base-none": (extract, (None, B, OUT), {"rank": 2}, "base must be a path"),
    "extract-neither": (extract, (A, B, OUT), {}, "exactly one of rank and energy"),
    "extract-max-rank-with-rank": (extract, (A, B, OUT), {"rank": 2, "max_rank": 4}, "max_rank caps"),
    "extract-max-rank-0": (extract, (A, B, OUT), {"energy": 0.9, "max_rank": 0}, "max_rank must be at least 1"),
    "extract-include-a-string": (extract, (A, B, OUT), {"rank": 2, "include": "q_proj"}, "list of strings"),
    "extract-include-not-regex": (extract, (A, B, OUT), {"rank": 2, "include": ["("]}, "not a regular expression"),
    "extract-exclude-int": (extract, (A, B, OUT), {"rank": 2, "exclude": [1]}, "exclude[0] must be a string"),
    "extract-embeddings-unknown": (extract, (A, B, OUT), {"rank": 2, "embeddings": "keep"}, "unknown embeddings"),
    "extract-to-gguf": (extract, (A, B, OUT), {"rank": 2, "to": "gguf"}, "unknown format 'gguf'"),
    "extract-base-model-int": (extract, (A, B, OUT), {"rank": 2, "base_model": 7}, "base_model must be a string"),
    "extract-adapter-energy-nan": (extract_adapter, (A, B), {"energy": math.nan}, "finite"),
    # convert
    "convert-source-none": (convert, (None, "kohya", OUT), {}, "source must be a path"),
    "convert-to-none": (convert, (A, None, OUT), {}, "unknown format None"),
    "convert-to-unknown": (convert, (A, "onnx", OUT), {}, "unknown format 'onnx'"),
    "convert-rank-0": (convert, (A, "kohya", OUT), {"rank": 0}, "at least 1"),
    "convert-energy-over-1": (convert, (A, "kohya", OUT), {"energy": 2}, "fraction in (0, 1]"),
    "convert-rank-and-energy": (convert, (A, "kohya", OUT), {"rank": 2, "energy": 0.5}, "at most one"),
    "convert-alpha-mode": (convert, (A, "kohya", OUT), {"alpha_mode": "fold"}, "unknown alpha_mode"),
    "convert-base-int": (convert, (A, "kohya", OUT), {"base": 3}, "base must be a path"),
    "convert-adapter-none": (
        convert_adapter,
        (None, "kohya"),
        {},
        "adapter must be an Adapter (loratools.load_adapter gives one), not NoneType",
    ),
    "convert-adapter-base-names-str": (convert_adapter, (ADAPTER, "kohya"), {"base_names": "x"}, "list of strings"),
    # diff
    "diff-a-none": (diff, (None, B), {}, "a must be a path (str or os.PathLike), not None"),
    "diff-b-list": (diff, (A, [B]), {}, "b must be a path (str or os.PathLike), not list"),
    "diff-atol-negative": (diff, (A, B), {"atol": -1.0}, "atol must be non-negative"),
    "diff-atol-nan": (diff, (A, B), {"atol": math.nan}, "atol must be a number, not nan"),
    "diff-rtol-str": (diff, (A, B), {"rtol": "0.1"}, "rtol must be a number, not str"),
    "diff-mode-unknown": (diff, (A, B), {"mode": "bytes"}, "unknown mode 'bytes'"),
    "diff-plan-b-int": (plan_diff, (A, 5), {}, "b must be a path (str or os.PathLike), not int"),
    # validate
    "validate-source-none": (validate, (None,), {}, "source must be a path (str or os.PathLike), not None"),
    "validate-format-gguf": (validate, (A,), {"format": "gguf"}, "unknown format 'gguf'"),
    "validate-for-unknown": (validate, (A,), {"for_": "lmstudio"}, "unknown for_ 'lmstudio'"),
    "validate-strict-str": (validate, (A,), {"strict": "yes"}, "strict must be True or False"),
    "validate-base-empty": (validate, (A,), {"base": ""}, "base is an empty path"),
    # inspect
    "inspect-source-none": (inspect, (None,), {}, "source must be a path (str or os.PathLike), not None"),
    "inspect-source-bytes": (inspect, (b"fixtures/peft_llama",), {}, "not bytes"),
    "inspect-format-gguf": (inspect, (A, "gguf"), {}, "unknown format 'gguf'"),
    "inspect-norms-str": (inspect, (A,), {"norms": "no"}, "norms must be True or False"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_argument_is_a_usage_error(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fn, args, kwargs, says = CASES[case]
    args = tuple(ADAPTER() if a is ADAPTER else [ADAPTER()] if a is ADAPTERS else a for a in args)  # before the trap
    calls = trap_readers(monkeypatch)
    hostile.call(fn, *args, raises=UsageError, inputs=[A, B], says=says, seconds=5, **kwargs)
    assert calls == []
    assert not OUT.parent.exists()
