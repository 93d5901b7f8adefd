"""Hostile safetensors headers: every lie a header can tell, built from code.

Each case is a file; ``inspect`` must refuse it with one ``Error:`` line, ``validate`` must report it as a finding
(exit 1), and whenever the reference ``safetensors`` reader refuses a file, ``validate`` must not call it sound
(stricter than the reference, never laxer). Cases marked readable must simply not break anything.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hostile
import pytest
import readers_kit as kit
from readers_kit import ALPHA, DOWN, UP, data, entries, st_bytes

from loratools.errors import LoratoolsError
from loratools.io.safetensors import MAX_HEADER, read_header

Build = Callable[[Path], None]


@dataclass(frozen=True)
class Case:
    build: Build
    says: str | None = None  # words the Error line (and a finding) must hold
    refused: bool = True  # False: a file loratools may read (it must not break, and never be laxer)


CASES: dict[str, Case] = {}


def case(name: str, content: bytes | Build, says: str | None = None, refused: bool = True) -> None:
    assert name not in CASES, name

    def build(p: Path) -> None:
        if callable(content):
            content(p)
        else:
            p.write_bytes(content)

    CASES[name] = Case(build, says, refused)


def raw_header(*pairs: str) -> bytes:
    """A header written by hand from ``"key": value`` texts (for what json.dumps cannot write: duplicates)."""
    return ("{" + ",".join(pairs) + "}").encode()


def entry(name: str, **over: object) -> str:
    e = dict(entries()[name])
    e.update(over)
    return json.dumps(name) + ":" + json.dumps(e)


def with_entry(name: str, **over: object) -> dict[str, object]:
    h: dict[str, object] = dict(entries())
    e = dict(entries()[name])
    for k, v in over.items():
        if v is ...:
            e.pop(k)
        else:
            e[k] = v
    h[name] = e
    return h


GOOD = [entry(DOWN), entry(UP), entry(ALPHA)]

# ---- the JSON itself ----------------------------------------------------------------------------------------
case("dup-tensor-identical", st_bytes(raw_header(*GOOD, entry(ALPHA))), "duplicate key")
case("dup-tensor-different", st_bytes(raw_header(*GOOD, entry(ALPHA, shape=[1]))), "duplicate key")
case("dup-metadata-key", st_bytes(raw_header('"__metadata__":{"a":"1","a":"2"}', *GOOD)), "duplicate key")
case("dup-metadata-block", st_bytes(raw_header('"__metadata__":{}', '"__metadata__":{"a":"b"}', *GOOD)), "duplicate")
case("dup-field-in-entry", st_bytes(raw_header(entry(DOWN)[:-1] + ',"dtype":"F16"}', entry(UP), entry(ALPHA))), "dup")
case("bom", st_bytes(b"\xef\xbb\xbf" + json.dumps(entries()).encode()), "byte-order mark")
case("non-utf8-ff", st_bytes(json.dumps(entries()).encode().replace(b"unet_a", b"unet\xff")), "not UTF-8")
case("non-utf8-bad-sequence", st_bytes(json.dumps(entries()).encode().replace(b"unet_a", b"une\xc3\x28")), "UTF-8")
case("non-utf8-overlong", st_bytes(json.dumps(entries()).encode().replace(b"unet_a", b"une\xc0\xaf")), "UTF-8")
case("utf16-header", st_bytes(json.dumps(entries()).encode("utf-16")), None)
case("lone-surrogate-name", st_bytes(raw_header(*GOOD, '"x\\ud800":' + json.dumps(entries()[ALPHA]))), "surrogate")
case("lone-surrogate-metadata", st_bytes(raw_header('"__metadata__":{"a":"\\udfff"}', *GOOD)), "surrogate")
case("nan-in-shape", st_bytes(raw_header(entry(DOWN)[:-1] + ',"x":NaN}', entry(UP), entry(ALPHA))), "NaN")
case("infinity-offset", st_bytes(raw_header(*GOOD[:2], entry(ALPHA).replace("[64, 68]", "[64, Infinity]"))), "Infinity")
case("minus-infinity", st_bytes(raw_header(*GOOD[:2], entry(ALPHA).replace("[64, 68]", "[-Infinity, 68]"))), "Infinity")
case("float-overflow-1e400", st_bytes(raw_header(*GOOD[:2], entry(ALPHA).replace("[]", "[1e400]"))), "out of range")
case("int-5000-digits", st_bytes(raw_header(*GOOD[:2], entry(ALPHA).replace("[]", "[" + "9" * 5000 + "]"))), "digits")
for depth in (65, 1000, 100_000):
    deep = "[" * depth + "]" * depth
    case(f"depth-{depth}", st_bytes(raw_header(entry(DOWN)[:-1] + f',"x":{deep}}}', entry(UP), entry(ALPHA))), "deeper")
case("depth-objects", st_bytes(raw_header(*GOOD, '"y":' + '{"a":' * 5000 + "1" + "}" * 5000)), "deeper")
case("trailing-garbage", st_bytes(json.dumps(entries()).encode() + b"xyz"), "not valid JSON")
case("trailing-nul", st_bytes(json.dumps(entries()).encode() + b"\0\0"), "not valid JSON")
case("two-objects", st_bytes(json.dumps(entries()).encode() + b"{}"), "not valid JSON")
case("truncated-json", st_bytes(json.dumps(entries()).encode()[:-3]), "not valid JSON")
case("single-quotes", st_bytes(json.dumps(entries()).encode().replace(b'"', b"'")), "not valid JSON")
case("comment", st_bytes(b"{/* x */" + json.dumps(entries()).encode()[1:]), "not valid JSON")
case("header-list", st_bytes([1, 2]), "not a JSON object")
case("header-string", st_bytes("tensors"), "not a JSON object")
case("header-number", st_bytes(8), "not a JSON object")
case("header-null", st_bytes(None), "not a JSON object")
case("header-true", st_bytes(True), "not a JSON object")
case("header-empty", st_bytes(b""), "not valid JSON")
case("header-spaces", st_bytes(b" " * 16), "not valid JSON")
case("header-nuls", st_bytes(b"\0" * 16), "not valid JSON")

# ---- the length -----------------------------------------------------------------------------------------------
case("length-beyond-limit", st_bytes(entries(), length=MAX_HEADER + 1), "beyond the")
case("length-u64-max", st_bytes(entries(), length=2**64 - 1), "beyond the")
case("length-past-end", st_bytes(entries(), length=len(json.dumps(entries())) + 200), "runs past the end")


def _between_mb_and_mib(p: Path) -> None:
    """A header length between 100 MB (the reference's limit) and 100 MiB (ours, once): a sparse file."""
    n = MAX_HEADER + 1000
    with open(p, "wb") as fh:
        fh.write(struct.pack("<Q", n) + b"{")
        fh.truncate(8 + n + 68)


case("length-between-100MB-and-100MiB", _between_mb_and_mib, "beyond the")
for size in (0, 1, 7):
    case(f"file-of-{size}-bytes", b"\x01" * size, "empty" if size == 0 else "too short")
case("length-zero", struct.pack("<Q", 0), "not valid JSON")
case("empty-header-with-data", st_bytes({}, b"\0" * 8), "after the last tensor")

# ---- one entry --------------------------------------------------------------------------------------------------
for name, value in [("list", [1]), ("string", "F32"), ("null", None), ("int", 3)]:
    h: dict[str, object] = dict(entries())
    h[ALPHA] = value
    case(f"entry-{name}", st_bytes(h), "not an object")
case("dtype-missing", st_bytes(with_entry(DOWN, dtype=...)), "unknown dtype")
for name, value in [("f8e8m0", "F8_E8M0"), ("lowercase", "f32"), ("int", 4), ("list", []), ("empty", "")]:
    case(f"dtype-{name}", st_bytes(with_entry(DOWN, dtype=value)), "unknown dtype")
case("shape-missing", st_bytes(with_entry(DOWN, shape=...)), "shape")
for name, value in [
    ("int", 8), ("true", [True, 4]), ("false", [False]), ("floats", [2.0, 4]), ("negative", [-2, 4]),
    ("strings", ["2", 4]), ("nested", [[2], 4]), ("null", [None]), ("u64", [2**64, 0]), ("object", {"a": 2}),
]:  # fmt: skip
    case(f"shape-{name}", st_bytes(with_entry(DOWN, shape=value)), "shape")
case("offsets-missing", st_bytes(with_entry(DOWN, data_offsets=...)), "data_offsets")
for name, value in [
    ("floats", [0.0, 32.0]), ("bools", [False, True]), ("negative", [-32, 0]), ("u64", [2**64, 2**64 + 32]),
    ("one", [0]), ("three", [0, 32, 64]), ("reversed", [32, 0]), ("strings", ["0", "32"]), ("null", None),
    ("object", {"begin": 0, "end": 32}),
]:  # fmt: skip
    case(f"offsets-{name}", st_bytes(with_entry(DOWN, data_offsets=value)), "data_offsets")

# ---- shapes whose size overflows (the reference computes in usize) --------------------------------------------
for name, shape, dtype in [
    ("2^62x2^62x0", [2**62, 2**62, 0], "F32"), ("2^32x2^32x0", [2**32, 2**32, 0], "F32"),
    ("0x2^62x2^62", [0, 2**62, 2**62], "F32"), ("2^63x2", [2**63, 2], "F32"), ("2^61-f32", [2**61], "F32"),
    ("u64max-u8", [2**64 - 1], "U8"), ("2^31x2^31-f32", [2**31, 2**31], "F32"),
]:  # fmt: skip
    case(f"overflow-{name}", st_bytes(with_entry(DOWN, shape=shape, dtype=dtype)), "more")

# ---- the data section must be covered exactly -----------------------------------------------------------------


def moved(**offsets: list[int]) -> dict[str, object]:
    h: dict[str, object] = {}
    for name, e in entries().items():
        e = dict(e)
        e["data_offsets"] = offsets.get(name.rpartition(".")[2], e["data_offsets"])
        h[name] = e
    return h


case("hole-between-tensors", st_bytes(moved(weight=[0, 32]) | {UP: {"dtype": "F32", "shape": [4, 2], "data_offsets": [36, 68]}, ALPHA: {"dtype": "F32", "shape": [], "data_offsets": [68, 72]}}, data(72)), "hole")  # fmt: skip
case("hole-at-start", st_bytes({k: {**v, "data_offsets": [v["data_offsets"][0] + 4, v["data_offsets"][1] + 4]} for k, v in entries().items()}, data(72)), "hole")  # fmt: skip
case("trailing-4-bytes", st_bytes(entries(), data(72)), "after the last tensor")
case("trailing-1-byte", st_bytes(entries(), data(69)), "after the last tensor")
case("overlap", st_bytes({**entries(), UP: {"dtype": "F32", "shape": [4, 2], "data_offsets": [28, 60]}}, data(68)), "overlap")  # fmt: skip
case("same-region-twice", st_bytes({**entries(), UP: {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}}, data(68)), None)  # fmt: skip
case("zero-size-inside-another", st_bytes({**entries(), "lora_unet_b.alpha": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}}), "overlap")  # fmt: skip
case("truncated-two-tensors", st_bytes(entries(), data(40)), "truncated")
case("truncated-one-tensor", st_bytes(entries(), data(66)), "data section")
case("no-data-at-all", st_bytes(entries(), b""), "truncated")
case("offsets-one-short", st_bytes(with_entry(DOWN, data_offsets=[0, 31])), "needs 32 bytes")
case("dtype-size-mismatch", st_bytes(with_entry(DOWN, dtype="F16")), "needs 16 bytes")

# ---- __metadata__ ------------------------------------------------------------------------------------------------
for name, value in [("int", 1), ("null", None), ("list", ["a"]), ("object", {"a": "b"}), ("bool", True)]:
    case(f"metadata-value-{name}", st_bytes({"__metadata__": {"k": value}, **entries()}), "strings to strings")
for name, value in [("list", ["a"]), ("string", "a=b"), ("false", False), ("empty-list", []), ("empty-string", "")]:
    case(f"metadata-block-{name}", st_bytes({"__metadata__": value, **entries()}), "strings to strings")
case("metadata-null", st_bytes({"__metadata__": None, **entries()}), refused=False)
case("metadata-empty", st_bytes({"__metadata__": {}, **entries()}), refused=False)
case("metadata-huge-value", st_bytes({"__metadata__": {"ss_note": "x" * 1_000_000}, **entries()}), refused=False)
case("metadata-control-chars", st_bytes({"__metadata__": {"ss_\x1b": "\x07\x00\n"}, **entries()}), refused=False)

# ---- names ---------------------------------------------------------------------------------------------------


def named(extra: str, shape: list[int] | None = None) -> bytes:
    h = dict(entries())
    h[extra] = {"dtype": "F32", "shape": shape if shape is not None else [1], "data_offsets": [68, 72]}
    return st_bytes(h, data(72))


case("name-empty", named(""), "kohya")
case("name-control-chars", named("lora_unet_\x07\x1b.alpha"), refused=False)
case("name-metadata-like", named("__metadata__x"), "kohya")
case("name-nul", named("lora_unet_a\x00.bias"), refused=False)
case("name-newline", named("lora_unet_b\n.alpha"), refused=False)
case("name-5000-chars", named("lora_unet_" + "x" * 5000 + ".alpha"), refused=False)
case("name-unicode", named("lora_unet_\u00e9\u4e2d.alpha"), refused=False)
case("zero-size-tensors", st_bytes({**entries(), "lora_unet_z.lora_down.weight": {"dtype": "F32", "shape": [0, 4], "data_offsets": [68, 68]}, "lora_unet_z.lora_up.weight": {"dtype": "F32", "shape": [4, 0], "data_offsets": [68, 68]}}), "rank 0")  # fmt: skip
case("zero-size-huge-dims", st_bytes({**entries(), "lora_unet_z.lora_down.weight": {"dtype": "F32", "shape": [0, 2**40], "data_offsets": [68, 68]}, "lora_unet_z.lora_up.weight": {"dtype": "F32", "shape": [2**40, 0], "data_offsets": [68, 68]}}), "rank 0")  # fmt: skip
case("zero-size-alpha", st_bytes({**entries(), ALPHA: {"dtype": "F32", "shape": [0], "data_offsets": [64, 64]}}, data(64)), "single number")  # fmt: skip
case("valid-control", st_bytes(entries()), refused=False)


#: cases that take over a second (hashing a 100 MB sparse input before and after each run)
SLOW = {"length-between-100MB-and-100MiB"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(CASES)])
def test_hostile_header(tmp_path: Path, name: str) -> None:
    c = CASES[name]
    p = tmp_path / "lora.safetensors"
    c.build(p)
    refused_by_reference = kit.reference_refuses(p)
    if c.refused:
        hostile.run(["inspect", p], inputs=[p], code=1, says=c.says)
        kit.validate([p], inputs=[p], ok=False, codes={"header", "unreadable", "structure"}, says=c.says)
    else:
        out = hostile.run(["inspect", p], inputs=[p], code=(0, 1))
        rep = kit.validate([p], inputs=[p], ok=None)
        if out.code == 0:
            assert rep and rep["num_modules"] >= 1
    if refused_by_reference:  # never laxer than the reference
        kit.validate([p], inputs=[p], ok=False)


def test_every_kind_is_covered() -> None:
    """The battery holds about a hundred headers, readable controls among them."""
    assert len(CASES) >= 100
    assert sum(not c.refused for c in CASES.values()) >= 8


@pytest.mark.parametrize("name", ["name-control-chars", "name-nul", "name-newline", "name-5000-chars", "name-unicode"])
def test_odd_names_read_as_they_are(tmp_path: Path, name: str) -> None:
    """The library reads odd names exactly (no crash, nothing renamed); messages show them escaped."""
    p = tmp_path / "lora.safetensors"
    CASES[name].build(p)
    h = hostile.call(read_header, p, inputs=[p])
    assert len(h.tensors) == 4 and not h.problems


def test_messages_escape_control_characters(tmp_path: Path) -> None:
    p = tmp_path / "lora.safetensors"
    p.write_bytes(
        st_bytes({**entries(), "a\x1b[2J": {"dtype": "F32", "shape": [3], "data_offsets": [68, 72]}}, data(72))
    )
    with pytest.raises(LoratoolsError) as e:
        read_header(p)
    assert "\x1b" not in e.value.message and "\\x1b" in e.value.message
