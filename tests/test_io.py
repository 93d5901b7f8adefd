"""The safetensors reader/writer against the reference implementation, lying headers, hostile pickles."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

from loratools.errors import HeaderError, OutputExistsError, UnsafePickleError
from loratools.io.atomic import atomic_write
from loratools.io.pickle import read_pickle
from loratools.io.safetensors import MAX_HEADER, encode_header, read_header, read_tensor, write_safetensors

TENSORS = {
    "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b": torch.tensor([1.5, -2.25], dtype=torch.bfloat16),
    "c": torch.tensor(3.0, dtype=torch.float16),
    "empty": torch.zeros(0, 4),
}


def test_reads_what_the_reference_writes(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    safetensors.torch.save_file(TENSORS, str(p), metadata={"k": "v"})
    h = read_header(p)
    assert h.metadata == {"k": "v"}
    for name, t in TENSORS.items():
        got = read_tensor(p, h.tensors[name])
        assert got.dtype == t.dtype and torch.equal(got, t)
    assert h.ref("c").item() == 3.0 and h.ref("b").shape == (2,)


def test_reference_reads_what_we_write(tmp_path: Path) -> None:
    p = tmp_path / "y.safetensors"
    write_safetensors(p, TENSORS, {"m": "1"})
    back = safetensors.torch.load_file(str(p))
    assert set(back) == set(TENSORS)
    for name, t in TENSORS.items():
        assert torch.equal(back[name], t)
    with safetensors.safe_open(str(p), "pt") as f:
        assert f.metadata() == {"m": "1"}
    # golden bytes: the header is 8-byte aligned JSON and the data follows in name order
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    assert raw[8 + n : 8 + n + 48] == TENSORS["a"].numpy().tobytes()


def test_the_one_header_encoder_golden_bytes() -> None:
    """The header every safetensors file loratools writes starts with (write_safetensors, merge's files): compact
    JSON, the tensors in the order given, padded with spaces so that the data starts 8-byte aligned."""
    head, size = encode_header([("b", "BF16", (2,)), ("a", "F32", (3, 4))], {"k": "v"})
    text = (
        b'{"__metadata__":{"k":"v"},"b":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},'
        b'"a":{"dtype":"F32","shape":[3,4],"data_offsets":[4,52]}}'
    )
    text += b" " * (-len(text) % 8)
    assert head == struct.pack("<Q", len(text)) + text and size == 52 and len(head) % 8 == 0
    assert encode_header([], {}) == (struct.pack("<Q", 8) + b"{}      ", 0)  # empty metadata is left out


def test_write_refuses_to_overwrite_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    p = tmp_path / "z.safetensors"
    write_safetensors(p, {"a": torch.ones(2)})
    with pytest.raises(OutputExistsError, match="already exists"):
        write_safetensors(p, {"a": torch.zeros(2)})
    write_safetensors(p, {"a": torch.zeros(2)}, force=True)
    assert torch.equal(safetensors.torch.load_file(str(p))["a"], torch.zeros(2))
    with pytest.raises(RuntimeError), atomic_write(tmp_path / "never.bin") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["z.safetensors"]


def _with_header(tmp_path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return p


@pytest.mark.parametrize(
    ("header", "data", "length", "match"),
    [
        ({}, b"", MAX_HEADER + 1, "beyond the"),
        ({}, b"", 10_000, "runs past the end"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "data section has 4"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12 bytes"),
        ({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "not a list of sizes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "not \\[begin, end\\]"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12, None, "overlap",
        ),
        ({"__metadata__": {"k": 1}}, b"", None, "strings to strings"),
        ([1, 2], b"", None, "not a JSON object"),
    ],
)  # fmt: skip
def test_lying_headers_are_refused(tmp_path: Path, header: object, data: bytes, length: int | None, match: str) -> None:
    with pytest.raises(HeaderError, match=match):
        read_header(_with_header(tmp_path, header, data, length))


def test_lenient_reading_collects_tensor_lies(tmp_path: Path) -> None:
    header = {
        "good": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "bad": {"dtype": "F32", "shape": [9], "data_offsets": [4, 8]},
    }
    h = read_header(_with_header(tmp_path, header, b"\0" * 8), lenient=True)
    assert list(h.tensors) == ["good"] and "needs 36 bytes" in h.problems[0]


def test_not_json_and_too_short(tmp_path: Path) -> None:
    p = tmp_path / "j.safetensors"
    p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]")
    with pytest.raises(HeaderError, match="not valid JSON"):
        read_header(p)
    p.write_bytes(b"abc")
    with pytest.raises(HeaderError, match="too short"):
        read_header(p)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_pickle_that_runs_code_is_refused_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "adapter_model.bin"
    torch.save({"x.lora_A.weight": torch.ones(1), "evil": _Evil()}, p)
    with pytest.raises(UnsafePickleError, match="refused"):
        read_pickle(p)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    # a plain (non-zip) pickle stream too
    q = tmp_path / "plain.pt"
    q.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(UnsafePickleError):
        read_pickle(q)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_pickle_of_tensors_reads(tmp_path: Path) -> None:
    p = tmp_path / "w.bin"
    torch.save({"a": torch.ones(2, 2)}, p)
    assert torch.equal(read_pickle(p)["a"], torch.ones(2, 2))
