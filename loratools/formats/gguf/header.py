"""The GGUF container, read with bounds and trusting nothing (no tensor data is read, and no torch is needed).

Layout (little-endian): ``GGUF``, a u32 version (2 or 3), u64 tensor and key/value counts, the key/value pairs
(a string key, a u32 value type, the value; an array is an element type, a u64 count, the elements), the tensor
infos (a string name, a u32 dimension count, u64 dimensions innermost first, a u32 ggml type, a u64 offset), then
the data section, aligned to ``general.alignment`` (32 by default), where each tensor starts at its offset.

Every rule of ggml's own loader (``gguf_init_from_file_impl`` in ``ggml/src/gguf.cpp``) holds here, checked before
anything is allocated or looped over: version 2 or 3 in this machine's byte order, no duplicate key or tensor name,
no nested arrays, an alignment that is a u32 power of two, tensor names under 64 bytes, at most 4 dimensions, an
element count below 2**63, a row a whole number of the type's blocks, tensors packed in order at aligned offsets.
A count (of pairs, tensors, array elements, string bytes) is checked against the bytes the file still holds before
it is used, and the header may not exceed :data:`MAX_HEADER` bytes: a file that lies costs a few reads, never a
loop over a count it claims. (``gguf.GGUFReader`` trusts its counts: an array that claims 2**60 elements keeps it
looping, which is why loratools parses the header itself and keeps the package's reader as the tests' oracle.)
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ...errors import FileFormatError, HeaderError
from ...io import jsonfile
from ...io.safetensors import shown
from .pkg import require

MAGIC = b"GGUF"
#: the most header bytes read (key/value pairs and tensor infos), as the safetensors reader's limit
MAX_HEADER = 100_000_000
#: GGML_MAX_NAME: a tensor name must be shorter (gguf.cpp)
MAX_NAME = 64
#: GGML_MAX_DIMS
MAX_DIMS = 4
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"

#: value type -> (struct code, size); 8 is a string, 9 an array
SCALARS: dict[int, tuple[str, int]] = {
    0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4), 6: ("f", 4), 7: ("?", 1),
    10: ("Q", 8), 11: ("q", 8), 12: ("d", 8),
}  # fmt: skip
STRING, ARRAY = 8, 9
#: string arrays longer than this (a model's vocabulary) are checked and skipped, not kept
MAX_KEPT = 4096
TYPE_KEY = "general.type"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's info: its shape in numpy order (outermost first, the reverse of ggml's ``ne``)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    start: int  # absolute file offset of its first byte
    nbytes: int

    @property
    def end(self) -> int:
        return self.start + self.nbytes


@dataclass
class GGUFHeader:
    path: Path
    version: int
    kv: dict[str, Any]  # value: int, float, bool, str, or a list for an array
    types: dict[str, int]  # the value type of each key (ARRAY for arrays)
    tensors: dict[str, TensorEntry]
    data_start: int
    file_size: int
    alignment: int = DEFAULT_ALIGNMENT
    bytes_read: int = 0
    problems: list[str] = field(default_factory=list)


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether a regular file starts with the GGUF magic (4 bytes read; anything else is no)."""
    p = Path(path)
    try:
        if not p.is_file():
            return False
        with open(p, "rb") as fh:
            return fh.read(4) == MAGIC
    except OSError:
        return False


class _Cursor:
    """Bounded reads from the start of a file: every read is checked against the file's size and the header limit
    first, so a count from the file is never trusted before the bytes it claims are known to exist."""

    def __init__(self, fh: IO[bytes], size: int, where: str) -> None:
        self.fh, self.size, self.where, self.pos = fh, size, where, 0

    def fail(self, msg: str, hint: str | None = None) -> HeaderError:
        return HeaderError(f"{self.where}: {msg}", hint)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(
                f"{what} needs {n} bytes at byte {self.pos}, past the end of the {self.size}-byte file",
                "the file is truncated, or its header lies",
            )
        if self.pos + n > MAX_HEADER:
            raise self.fail(f"{what} takes the header beyond the {MAX_HEADER} byte limit", "is it a GGUF adapter?")

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        data = self.fh.read(n)
        if len(data) != n:
            raise self.fail(f"{what}: the file ended early (read {len(data)} of {n} bytes)")
        self.pos += n
        return data

    def scalar(self, code: str, size: int, what: str) -> Any:
        return struct.unpack("<" + code, self.take(size, what))[0]

    def skip_string(self, what: str) -> None:
        n = self.scalar("Q", 8, f"{what} length")
        self.need(n, what)
        self.fh.seek(n, os.SEEK_CUR)
        self.pos += n

    def string(self, what: str, *, strict: bool = True) -> str:
        n = self.scalar("Q", 8, f"{what} length")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            if strict:
                raise self.fail(f"{what} is not UTF-8 text ({shown(repr(raw[:40]))})") from None
            return raw.decode("utf-8", errors="replace")


def read_header(path: str | os.PathLike[str], *, adapter_only: bool = False) -> GGUFHeader:
    """Parse and check a GGUF file's header (see the module's docstring); raises :class:`HeaderError` on the first
    lie, :class:`FileFormatError` for what is not a GGUF file at all. ``adapter_only``: stop as soon as
    ``general.type`` says the file is something else (a model's vocabulary is then never walked)."""
    p = Path(path)
    where = p.name
    size = jsonfile.regular_size(p, "GGUF file")
    try:
        with open(p, "rb") as fh:
            c = _Cursor(fh, size, where)
            header = _parse(c, p, adapter_only)
            header.bytes_read = c.pos
            return header
    except PermissionError:
        raise FileFormatError(f"{p}: permission denied") from None
    except OSError as e:
        raise FileFormatError(f"{p}: cannot read ({e.strerror or e})") from None


def _parse(c: _Cursor, p: Path, adapter_only: bool) -> GGUFHeader:
    if c.size < 4 or c.take(4, "the magic") != MAGIC:
        raise FileFormatError(f"{c.where}: not a GGUF file (no GGUF magic)")
    version = c.scalar("I", 4, "the version")
    if version and not version & 0xFFFF:
        raise c.fail(
            f"version {version:#x}: a GGUF file written for the other byte order",
            "llama.cpp refuses it on this machine too; convert the file on a machine of its byte order",
        )
    if version not in VERSIONS:
        raise c.fail(f"GGUF version {version} is not supported (2 or 3 are)", "GGUF v1 files predate llama.cpp's own")
    n_tensors = c.scalar("Q", 8, "the tensor count")
    n_kv = c.scalar("Q", 8, "the key/value count")
    # the smallest pair: an empty key (8), a type (4), a one-byte value; the smallest tensor info: an empty name (8),
    # no dimensions (4), a type (4), an offset (8)
    c.need(min(n_kv, 2**40) * 13 + min(n_tensors, 2**40) * 24, f"{n_kv} key/value pair(s) and {n_tensors} tensor(s)")
    kv: dict[str, Any] = {}
    types: dict[str, int] = {}
    for i in range(n_kv):
        key = c.string(f"key {i}")
        if key in kv:
            raise c.fail(f"duplicate key {shown(key)}", "ggml's loader refuses it too")
        vtype = c.scalar("I", 4, f"the type of {shown(key)}")
        kv[key] = _value(c, vtype, shown(key))
        types[key] = vtype
        if adapter_only and key == TYPE_KEY and kv[key] != "adapter":
            raise FileFormatError(
                f"{c.where}: a GGUF {shown(str(kv[key]), 40)} (general.type), not an adapter",
                "loratools reads GGUF LoRA adapters (general.type = adapter); give the adapter's .gguf file",
            )
    alignment = DEFAULT_ALIGNMENT
    if ALIGNMENT_KEY in kv:
        value = kv[ALIGNMENT_KEY]
        if types[ALIGNMENT_KEY] != 4 or value == 0 or value & (value - 1):
            raise c.fail(f"{ALIGNMENT_KEY} must be a u32 power of two, not {shown(repr(value), 40)}")
        alignment = value
    infos = [_tensor_info(c, i) for i in range(n_tensors)]
    names: set[str] = set()
    for name, *_ in infos:
        if name in names:
            raise c.fail(f"duplicate tensor name {shown(name)}", "ggml's loader refuses it too")
        names.add(name)
    data_start = -(-c.pos // alignment) * alignment
    tensors: dict[str, TensorEntry] = {}
    expected = 0
    for name, shape, ggml_type, offset, nbytes in infos:
        if offset != expected:
            raise c.fail(
                f"tensor {shown(name)} is at offset {offset}, expected {expected}",
                "tensors are packed in order, each at an aligned offset (ggml's loader refuses this file too)",
            )
        start = data_start + offset
        if start + nbytes > c.size:
            raise c.fail(
                f"tensor {shown(name)} ends at byte {start + nbytes}, past the end of the {c.size}-byte file",
                "the file is truncated",
            )
        tensors[name] = TensorEntry(name, shape, ggml_type, start, nbytes)
        expected = offset + -(-nbytes // alignment) * alignment
    return GGUFHeader(p, version, kv, types, tensors, data_start, c.size, alignment)


def _value(c: _Cursor, vtype: int, key: str) -> Any:
    if vtype in SCALARS:
        code, size = SCALARS[vtype]
        return c.scalar(code, size, f"the value of {key}")
    if vtype == STRING:
        return c.string(f"the value of {key}", strict=False)
    if vtype != ARRAY:
        raise c.fail(f"key {key} has unknown value type {vtype}")
    etype = c.scalar("I", 4, f"the element type of {key}")
    count = c.scalar("Q", 8, f"the length of {key}")
    if etype in SCALARS:
        import numpy as np

        code, size = SCALARS[etype]
        c.need(min(count, 2**60) * size, f"the {count} elements of {key}")
        return np.frombuffer(c.take(count * size, f"the elements of {key}"), dtype="<" + code)
    if etype == STRING:
        c.need(min(count, 2**60) * 8, f"the {count} strings of {key}")
        if count > MAX_KEPT:  # a vocabulary: walked over, not kept (an adapter has none)
            for _ in range(count):
                c.skip_string(f"an element of {key}")
            return None
        return [c.string(f"an element of {key}", strict=False) for _ in range(count)]
    what = "arrays of arrays" if etype == ARRAY else f"element type {etype}"
    raise c.fail(f"key {key} holds {what}, which GGUF does not allow")


def _tensor_info(c: _Cursor, i: int) -> tuple[str, tuple[int, ...], int, int, int]:
    name = c.string(f"the name of tensor {i}")
    if len(name.encode("utf-8")) >= MAX_NAME:
        raise c.fail(f"tensor name {shown(name)} is {len(name.encode())} bytes: ggml allows at most {MAX_NAME - 1}")
    what = f"tensor {shown(name)}"
    n_dims = c.scalar("I", 4, f"the dimension count of {what}")
    if n_dims > MAX_DIMS:
        raise c.fail(f"{what} has {n_dims} dimensions: ggml allows at most {MAX_DIMS}")
    ne = [c.scalar("Q", 8, f"a dimension of {what}") for _ in range(n_dims)]
    if any(d >= 2**63 for d in ne) or math.prod(ne) >= 2**63 - 1:
        raise c.fail(f"{what}: shape {ne} has more elements than ggml can count (2**63)")
    ggml_type = c.scalar("I", 4, f"the type of {what}")
    offset = c.scalar("Q", 8, f"the offset of {what}")
    sizes = require().GGML_QUANT_SIZES
    qtypes = {t.value: t for t in require().GGMLQuantizationType}
    if ggml_type not in qtypes or qtypes[ggml_type] not in sizes:
        raise c.fail(f"{what} has unknown ggml type {ggml_type}")
    block, type_size = sizes[qtypes[ggml_type]]
    row = ne[0] if ne else 1
    if row % block:
        raise c.fail(f"{what}: rows of {row} elements are not a whole number of {qtypes[ggml_type].name} blocks")
    nbytes = math.prod(ne) // block * type_size
    return name, tuple(reversed(ne)), ggml_type, offset, nbytes
