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
from conftest import direct_writes_work

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


# ---- the merge's writing thread: around the page cache (O_DIRECT) and through it ---------------------------------


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_the_writer_puts_every_byte_in_its_place(tmp_path: Path, direct: bool, seed: int) -> None:
    """A file made as merge makes it, in random pieces: a header, copies of ranges of another file, whole tensors
    written in order, and ranges filled by work threads as blocks at any offset (out of order, some smaller than a
    page, some spanning many, meeting inside pages): the same bytes as the plan, in either mode."""
    import random
    import threading

    from loratools.io import direct as direct_io
    from loratools.io import stream

    if direct and not direct_writes_work(tmp_path):
        pytest.skip("this file system takes no direct writes")
    rng = random.Random(seed)
    src = tmp_path / "src.bin"
    src.write_bytes(rng.randbytes(1 << 20))
    size = rng.randrange(50_000, 400_000)
    want = bytearray(rng.randbytes(size))
    # the plan: consecutive pieces, each a write, a copy of src (want takes src's bytes there) or a filled range
    pieces, pos = [], 0
    while pos < size:
        n = min(size - pos, rng.choice([1, 7, 100, 4095, 4096, 4097, 9000, 70_000]))
        kind = rng.choice(["write", "copy", "fill"]) if pos else "write"
        if kind == "copy":
            at = rng.randrange(0, (1 << 20) - n)
            want[pos : pos + n] = src.read_bytes()[at : at + n]
            pieces.append(("copy", pos, n, at))
        else:
            pieces.append((kind, pos, n, 0))
        pos += n
    out = tmp_path / "out.bin"
    fills = []
    with open(src, "rb") as sf, open(out, "wb") as fh:
        w = stream.Writer(fh, direct=direct, size=size)
        assert w.direct == direct
        for kind, pos, n, at in pieces:
            if kind == "write":
                w.write(bytes(want[pos : pos + n]))
            elif kind == "copy":
                w.copy(sf.fileno(), at, n, None)
            else:
                fills.append((pos, n))
                w.skip_to(pos + n)
        rng.shuffle(fills)

        def fill(part: list[tuple[int, int]]) -> None:  # two work threads, each its share, out of order
            for pos, n in part:
                block, off = w.block(n), pos % direct_io.ALIGN
                block[off : off + n] = want[pos : pos + n]
                w.put(block, off, n, pos)

        threads = [threading.Thread(target=fill, args=(fills[i::2],)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        w.close()
    assert out.read_bytes() == bytes(want)


def test_a_block_off_its_place_in_the_page_is_refused(tmp_path: Path) -> None:
    from loratools.io import stream

    with open(tmp_path / "out.bin", "wb") as fh:
        w = stream.Writer(fh, direct=True)
        block = w.block()
        with pytest.raises(ValueError, match="offset within a page"):
            w.put(block, 0, 10, 5)
        w.close()


def test_merge_writes_the_same_bytes_around_the_page_cache_and_through_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loratools.io import direct as direct_io
    from loratools.ops.merge import merge

    if not direct_writes_work(tmp_path):
        pytest.skip("this file system takes no direct writes")
    from test_rows_kernel import _adapter, _checkpoint  # odd widths: blocks meet inside pages

    _checkpoint(tmp_path / "base", torch.bfloat16)
    _adapter(tmp_path / "ad")
    adapter = tmp_path / "ad"
    merge(tmp_path / "base", [adapter], tmp_path / "direct")
    monkeypatch.setattr(direct_io, "DIRECT", False)
    merge(tmp_path / "base", [adapter], tmp_path / "cached")
    a = (tmp_path / "direct" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "cached" / "model.safetensors").read_bytes()
    merged = safetensors.torch.load_file(str(tmp_path / "direct" / "model.safetensors"))
    assert merged.keys() == safetensors.torch.load_file(str(tmp_path / "base" / "model.safetensors")).keys()


def test_a_direct_merge_leaves_its_output_out_of_the_page_cache(tmp_path: Path) -> None:
    """docs/merge.md: a merge's output goes to the disk around the page cache, so merging a big model does not
    push other files out of memory: after the merge almost none of the output's pages are in memory (mincore)."""
    import ctypes
    import mmap

    from test_rows_kernel import _adapter, _checkpoint

    from loratools.ops.merge import merge

    if not direct_writes_work(tmp_path):
        pytest.skip("this file system takes no direct writes")
    _checkpoint(tmp_path / "base", torch.float32)
    _adapter(tmp_path / "ad")
    merge(tmp_path / "base", [tmp_path / "ad"], tmp_path / "out")
    path = tmp_path / "out" / "model.safetensors"
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    with open(path, "rb") as fh:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fh.fileno(), 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
            resident = sum(b & 1 for b in vec.raw)
        finally:
            libc.munmap(addr, size)
    assert pages >= 8 and resident <= pages // 4, (resident, pages)
