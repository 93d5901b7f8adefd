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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from io import BufferedReader
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ..errors import FileFormatError, HeaderError
from ..model import DTYPE_SIZES, TensorRef, dtype_name, torch_dtype
from . import jsonfile
from .atomic import atomic_write

if TYPE_CHECKING:
    import torch

#: the reference implementation (``MAX_HEADER_SIZE``) refuses headers above 100 MB; so do we, before allocating
MAX_HEADER = 100_000_000
#: sizes and offsets are ``usize`` in the reference reader: a shape or an offset that does not fit is refused
USIZE = 2**64
MAGIC_GGUF = b"GGUF"


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


def shown(name: str, limit: int = 120) -> str:
    """A tensor name for a message: as it is when printable, else escaped (a name is data from the file: control
    characters must not reach a terminal)."""
    text = name if name.isprintable() and name else repr(name)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_header(path: str | os.PathLike[str], *, lenient: bool = False) -> Header:
    """Parse and check a safetensors header, at least as strictly as the reference reader: the header's JSON
    (no duplicate keys, bounded nesting), every entry (dtype, shape, offsets as unsigned integers that fit), and
    the data section, which the tensors must cover exactly (no hole, no overlap, no trailing bytes).

    Raises :class:`HeaderError` on the first lie, unless ``lenient``, in which case tensor-level lies are
    collected in ``Header.problems`` and the offending tensors left out (the header itself must still parse).
    A file that is not safetensors at all (a JSON config, a text file, a GGUF file, a pickle, an empty file) is
    refused with :class:`FileFormatError` saying what it is."""
    p = Path(path)
    where = p.name
    size = jsonfile.regular_size(p, "safetensors file")
    try:
        with open(p, "rb") as fh:
            head = fh.read(8)
            if size < 8:
                raise HeaderError(
                    f"{where}: file is {size} bytes, too short for a safetensors header", "is it truncated?"
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise HeaderError(
                    f"{where}: header length {n} is beyond the {MAX_HEADER} byte limit", "is it a safetensors file?"
                )
            if n > size - 8:
                raise HeaderError(
                    f"{where}: header length {n} runs past the end of the {size}-byte file", "is it truncated?"
                )
            raw = fh.read(n)
        obj = jsonfile.loads(raw, where=f"{where}: header", error=HeaderError)
        if not isinstance(obj, dict):
            raise HeaderError(f"{where}: header is {jsonfile.kind(obj)}, not a JSON object")
    except HeaderError:
        sniffed = sniff(p)
        if sniffed is not None:
            raise sniffed from None
        raise
    except OSError as e:
        raise FileFormatError(f"{p}: cannot read ({e.strerror or e})") from None
    meta_raw = obj.pop("__metadata__", None)
    if meta_raw is None:
        meta_raw = {}
    if not isinstance(meta_raw, dict) or not all(isinstance(v, str) for v in meta_raw.values()):
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
    if not problems:  # with tensors left out, the gaps they leave say nothing more
        for msg in _coverage(tensors, data_start, data_len):
            if not lenient:
                raise HeaderError(f"{where}: {msg}", "the reference safetensors reader refuses this file too")
            problems.append(msg)
    return Header(p, tensors, dict(meta_raw), n, size, problems)


def _coverage(tensors: dict[str, TensorInfo], data_start: int, data_len: int) -> list[str]:
    """The reference reader's rule: sorted by offsets, each tensor starts where the previous one ended, the
    first at 0, and the last ends at the end of the file."""
    at = 0
    prev = ""
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        begin, end = t.start - data_start, t.end - data_start
        if begin < at:
            return [f"tensors {shown(prev)} and {shown(t.name)} overlap in the data section"]
        if begin > at:
            return [f"a hole of {begin - at} bytes in the data section before tensor {shown(t.name)}"]
        at, prev = end, t.name
    if at != data_len:
        return [
            f"{data_len - at} bytes in the data section after the last tensor (the data section is {data_len} bytes)"
        ]
    return []


def _uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < USIZE


def _tensor_info(name: str, entry: Any, data_start: int, data_len: int) -> TensorInfo:
    what = f"tensor {shown(name)}"
    if not isinstance(entry, dict):
        raise HeaderError(f"{what}: header entry is {jsonfile.kind(entry)}, not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise HeaderError(f"{what}: unknown dtype {_preview(dtype)}")
    if not isinstance(shape, list) or not all(_uint(s) for s in shape):
        raise HeaderError(f"{what}: shape {_preview(shape)} is not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_uint(o) for o in offsets):
        raise HeaderError(f"{what}: data_offsets {_preview(offsets)} are not [begin, end]")
    begin, end = offsets
    if begin > end:
        raise HeaderError(f"{what}: data_offsets {_preview(offsets)} are not [begin, end]: they end before they begin")
    # the element count and byte size must fit the reference's usize: checked before each multiplication,
    # zero dimensions aside (a [0, 2**62, 2**62] tensor holds nothing but its shape is still not a shape)
    count = 1
    for s in shape:
        if s and count > (USIZE - 1) // s:
            raise HeaderError(f"{what}: shape {_preview(shape)} has more elements than a file can address")
        count *= s or 1
    if count > (USIZE - 1) // (8 * DTYPE_SIZES[dtype]):
        raise HeaderError(f"{what}: shape {_preview(shape)} x {dtype} has more bytes than a file can address")
    if end > data_len:
        raise HeaderError(
            f"{what}: data ends at byte {end} but the data section has {data_len} bytes",
            "the file is truncated, or its header lies",
        )
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise HeaderError(f"{what}: shape {shape} x {dtype} needs {expected} bytes, offsets give {end - begin}")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _preview(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- what a file is when it is not safetensors --------------------------------------------------------------


def sniff(path: str | os.PathLike[str]) -> FileFormatError | None:
    """What a file that is not safetensors is, as the error to raise (``None``: nothing recognisable)."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return None
    where = p.name
    if not head:
        return FileFormatError(
            f"{where}: an empty file (0 bytes), too short to be an adapter", "is the download incomplete?"
        )
    if head.startswith(MAGIC_GGUF):
        return FileFormatError(
            f"{where}: GGUF adapter: not readable yet",
            "read its source adapter (safetensors) instead; loratools writes GGUF with `convert --to gguf`",
        )
    pickle_hint = (
        "name it .bin or .pt to read it as a torch pickle (tensors only, no code is run), or re-save it as safetensors"
    )
    if head.startswith(b"PK\x03\x04"):
        torch_zip = b"data.pkl" in head
        what = "a torch pickle (zip)" if torch_zip else "a zip archive"
        return FileFormatError(f"{where}: {what}, not a safetensors file", pickle_hint if torch_zip else None)
    if len(head) > 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[2] != 0:
        return FileFormatError(f"{where}: a pickle, not a safetensors file", pickle_hint)
    text = _text(head)
    if text is None:
        return None
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        hint = "point at the folder that holds it instead"
        if p.name == "adapter_config.json":
            hint = f"this is a PEFT config: point at its folder ({p.parent}) instead"
        elif p.name.endswith(".index.json"):
            hint = f"this is a checkpoint index: point at its folder ({p.parent}) instead"
        return FileFormatError(f"{where}: a JSON file, not safetensors weights", hint)
    if stripped.startswith("version https://git-lfs"):
        return FileFormatError(f"{where}: a Git LFS pointer, not the file itself", "fetch the real file (git lfs pull)")
    if len(head) < 8:  # a few bytes of anything: "too short" says it better
        return None
    return FileFormatError(
        f"{where}: a text file, not an adapter (no safetensors header)",
        "point at the adapter's .safetensors file or its folder",
    )


def _text(head: bytes) -> str | None:
    """``head`` as text when it looks like text: UTF-8 (a character cut at the end aside), no NUL."""
    if b"\x00" in head:
        return None
    for cut in range(4):
        try:
            return head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


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


def encode_header(
    tensors: Iterable[tuple[str, str, Sequence[int]]],
    metadata: Mapping[str, str] | None = None,
    *,
    ensure_ascii: bool = True,
) -> tuple[bytes, int]:
    """The bytes before a safetensors file's data: the 8-byte length and the JSON header, padded with spaces to a
    multiple of 8 so that the data is aligned; ``tensors`` (name, dtype, shape) lie one after the other in the
    order given, and ``metadata``, when not empty, is the header's ``__metadata__``. Returns them and the size
    of the data section. ``ensure_ascii=False`` writes text as UTF-8, as the reference writer does (its serde_json
    escapes only quotes, backslashes and control characters)."""
    entries: dict[str, Any] = {}
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(entries, separators=(",", ":"), ensure_ascii=ensure_ascii).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


#: the reference writer's layout of the data section (``safetensors.torch.save``, the Rust ``prepare``): tensors
#: by dtype, largest alignment first in this order, then by name; hashes that peers compute on its output (kohya's
#: ``sshs_*``) hold for a file written in the same order
REFERENCE_DTYPE_ORDER = (
    "U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8",
    "BOOL",
)  # fmt: skip


def reference_order(specs: Iterable[tuple[str, str, Sequence[int]]]) -> list[tuple[str, str, Sequence[int]]]:
    """(name, dtype, shape) specs in the reference writer's order (see :data:`REFERENCE_DTYPE_ORDER`)."""
    rank = {d: i for i, d in enumerate(REFERENCE_DTYPE_ORDER)}
    return sorted(specs, key=lambda s: (rank.get(s[1], len(rank)), s[0]))


class Seal(Protocol):
    """Header metadata computed from the data section as it is written (digests of it): the metadata given to
    :func:`write_safetensors` holds placeholders as long as the final values; the writer feeds every data byte to
    :meth:`update`, in order, then writes :meth:`values` over the placeholders."""

    def update(self, chunk: bytes | memoryview) -> None: ...

    def values(self) -> Mapping[str, str]: ...


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor | TensorRef],
    metadata: Mapping[str, str] | None = None,
    *,
    force: bool = False,
    order: Literal["name", "reference"] = "name",
    seal: Seal | None = None,
) -> None:
    """Write a safetensors file atomically: header first (all offsets known from shapes), then each tensor in
    turn, loading :class:`TensorRef` data only when its turn comes. Tensor order is sorted by name, or with
    ``order="reference"`` the reference writer's (:func:`reference_order`). ``seal``: metadata values computed
    from the data as it is written (:class:`Seal`), put in place of their placeholders in the header before the
    file is committed (one pass over the data; the header is rewritten in place, at the same length)."""
    specs: list[tuple[str, str, Sequence[int]]] = []
    for name in sorted(tensors):
        t = tensors[name]
        specs.append((name, t.dtype if isinstance(t, TensorRef) else dtype_name(t.dtype), tuple(t.shape)))
    if order == "reference":
        specs = reference_order(specs)
    head, _ = encode_header(specs, metadata)
    with atomic_write(path, force=force) as tmp, open(tmp, "wb") as fh:
        fh.write(head)
        for name, _dtype, _shape in specs:
            t = tensors[name]
            data = tensor_bytes(t.load() if isinstance(t, TensorRef) else t)
            fh.write(data)
            if seal is not None:
                seal.update(data)
        if seal is not None:
            sealed, _ = encode_header(specs, {**(metadata or {}), **seal.values()})
            if len(sealed) != len(head):  # a bug in the seal: its values must be as long as their placeholders
                raise RuntimeError(f"sealed header is {len(sealed)} bytes, its placeholder {len(head)}")
            fh.seek(0)
            fh.write(sealed)
