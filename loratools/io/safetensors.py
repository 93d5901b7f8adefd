"""safetensors files without the safetensors package: a header reader that trusts nothing (and needs no
torch), lazy tensor loading, and a writer that emits the header then streams tensors one by one.

Layout: 8-byte little-endian header length N, N bytes of JSON (``{name: {dtype, shape, data_offsets}}`` and an
optional ``__metadata__`` of string to string), then the data; offsets are relative to the data start.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from io import BufferedReader
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import HeaderError
from ..model import DTYPE_SIZES, TensorRef, dtype_name, torch_dtype
from .atomic import atomic_write

if TYPE_CHECKING:
    import torch

#: the reference implementation refuses headers above this size; so do we, before allocating anything
MAX_HEADER = 100 * 1024 * 1024
MAGIC_PICKLE = (b"PK\x03\x04", b"\x80")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_len: int
    file_size: int
    problems: list[str] = field(default_factory=list)

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    def ref(self, name: str) -> TensorRef:
        info = self.tensors[name]
        path = self.path
        return TensorRef(info.shape, info.dtype, lambda: read_tensor(path, info), lambda: read_scalar(path, info))


def read_header(path: str | os.PathLike[str], *, lenient: bool = False) -> Header:
    """Parse and check a safetensors header. Raises :class:`HeaderError` on the first lie, unless
    ``lenient``, in which case tensor-level lies are collected in ``Header.problems`` and the offending
    tensors left out (the header itself must still parse)."""
    p = Path(path)
    size = p.stat().st_size
    where = p.name
    if size < 8:
        raise HeaderError(f"{where}: file is {size} bytes, too short for a safetensors header", "is it truncated?")
    with open(p, "rb") as fh:
        head = fh.read(8)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            hint = "is it a safetensors file?"
            if head.startswith(MAGIC_PICKLE):
                hint = "it looks like a pickle (.bin/.pt): name it so, or pass --format"
            raise HeaderError(f"{where}: header length {n} is beyond the {MAX_HEADER} byte limit", hint)
        if n > size - 8:
            raise HeaderError(
                f"{where}: header length {n} runs past the end of the {size}-byte file", "is it truncated?"
            )
        raw = fh.read(n)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeaderError(f"{where}: header is not valid JSON ({e})", "is it a safetensors file?") from None
    if not isinstance(obj, dict):
        raise HeaderError(f"{where}: header is not a JSON object")
    meta_raw = obj.pop("__metadata__", None) or {}
    if not isinstance(meta_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta_raw.items()
    ):
        raise HeaderError(f"{where}: __metadata__ must map strings to strings")
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for name, entry in obj.items():
        try:
            info = _tensor_info(name, entry, data_start, data_len)
        except HeaderError as e:
            if not lenient:
                raise HeaderError(f"{where}: {e.message}", e.hint) from None
            problems.append(e.message)
            continue
        tensors[name] = info
    past = [m for m in problems if "data section has" in m]
    if len(past) > 1:  # a truncated file: one finding, not one per tensor
        problems = [m for m in problems if m not in past]
        problems.append(f"{len(past)} tensors run past the end of the data section ({data_len} bytes): truncated?")
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:], strict=False):
        if start_b < end_a:
            msg = f"tensors {name_a} and {name_b} overlap in the data section"
            if not lenient:
                raise HeaderError(f"{where}: {msg}")
            problems.append(msg)
    return Header(p, tensors, dict(meta_raw), n, size, problems)


def _tensor_info(name: str, entry: Any, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise HeaderError(f"tensor {name}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise HeaderError(f"tensor {name}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise HeaderError(f"tensor {name}: shape {shape!r} is not a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise HeaderError(f"tensor {name}: data_offsets {offsets!r} are not [begin, end]")
    begin, end = offsets
    if end > data_len:
        raise HeaderError(
            f"tensor {name}: data ends at byte {end} but the data section has {data_len} bytes",
            "the file is truncated, or its header lies",
        )
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise HeaderError(f"tensor {name}: shape {shape} x {dtype} needs {expected} bytes, offsets give {end - begin}")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_into(fh: BufferedReader, start: int, view: memoryview) -> None:
    """Fill ``view`` with the file's bytes from ``start``; a file that ends first is a truncated file."""
    fh.seek(start)
    got = 0
    while got < len(view):
        k = fh.readinto(view[got:])
        if not k:
            raise HeaderError(f"{Path(fh.name).name}: cut short while reading", "is the file truncated?")
        got += k


def read_bytes(fh: BufferedReader, start: int, n: int) -> bytearray:
    buf = bytearray(n)
    read_into(fh, start, memoryview(buf))
    return buf


def tensor_from_bytes(buf: bytearray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over ``buf`` (no copy)."""
    import torch

    if not buf:
        return torch.empty(shape, dtype=torch_dtype(dtype))
    return torch.frombuffer(buf, dtype=torch_dtype(dtype)).reshape(shape)


def tensor_bytes(t: torch.Tensor) -> bytes | memoryview:
    """A tensor's raw little-endian bytes, as a view where it already lies on the CPU contiguously."""
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().data


def read_tensor(path: str | os.PathLike[str], info: TensorInfo) -> torch.Tensor:
    with open(path, "rb") as fh:
        return tensor_from_bytes(read_bytes(fh, info.start, info.nbytes), info.dtype, info.shape)


#: struct codes of the dtypes a scalar is read from without torch
_STRUCT = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B"}


def read_scalar(path: str | os.PathLike[str], info: TensorInfo) -> float:
    """One number (an alpha) without importing torch."""
    buf = b"".join(iter_chunks(path, info))
    if info.dtype == "BF16":
        return float(struct.unpack("<f", b"\x00\x00" + buf)[0])
    if info.dtype in _STRUCT:
        return float(struct.unpack(_STRUCT[info.dtype], buf)[0])
    return float(read_tensor(path, info).float().reshape(()).item())


def iter_chunks(path: str | os.PathLike[str], info: TensorInfo, chunk: int = 1 << 24) -> Iterator[bytes]:
    """Raw bytes of one tensor in chunks (for scans and hashes that must not hold a whole tensor)."""
    with open(path, "rb") as fh:
        fh.seek(info.start)
        left = info.nbytes
        while left > 0:
            buf = fh.read(min(chunk, left))
            if not buf:
                raise HeaderError(f"{Path(path).name}: tensor {info.name} is cut short", "is the file truncated?")
            left -= len(buf)
            yield buf


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor | TensorRef],
    metadata: Mapping[str, str] | None = None,
    *,
    force: bool = False,
) -> None:
    """Write a safetensors file atomically: header first (all offsets known from shapes), then each tensor in
    turn, loading :class:`TensorRef` data only when its turn comes. Tensor order is sorted by name."""
    entries: dict[str, Any] = {}
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        shape = list(t.shape)
        dtype = t.dtype if isinstance(t, TensorRef) else dtype_name(t.dtype)
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)
    with atomic_write(path, force=force) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)))
        fh.write(header)
        for name in names:
            t = tensors[name]
            fh.write(tensor_bytes(t.load() if isinstance(t, TensorRef) else t))
