"""Hostile pickles (``adapter_model.bin``, ``.pt``): read with ``weights_only=True`` and checked tensor by tensor.

Payloads that would run code are refused and never run (a marker file they would create must never appear);
tensors that hold no data (meta), are not dense (sparse, nested), are quantized or complex, or claim more elements
than their storage holds are refused; so are containers that are not a flat name -> tensor dict, and files whose
storage records are shorter or longer than the pickle claims (as torch's own unmapped load, PEFT's, refuses them).
"""

from __future__ import annotations

import builtins
import collections
import io
import os
import pickle
import shutil
import subprocess
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hostile
import pytest
import readers_kit as kit
import torch
from readers_kit import FIXTURES

from loratools.errors import FileFormatError, UnsafePickleError
from loratools.io.pickle import read_pickle

MARKER = "LORATOOLS_PAYLOAD_RAN"


@dataclass(frozen=True)
class Case:
    build: Callable[[Path], None]  # writes the pickle at the given path
    says: str | None
    refused: bool = True


CASES: dict[str, Case] = {}


def case(name: str, build: Callable[[Path], None], says: str | None, refused: bool = True) -> None:
    assert name not in CASES, name
    CASES[name] = Case(build, says, refused)


def saved(obj_fn: Callable[[], Any], *, legacy: bool = False) -> Callable[[Path], None]:
    def build(p: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save(obj_fn(), p, _use_new_zipfile_serialization=not legacy)

    return build


def good() -> dict[str, torch.Tensor]:
    return dict(torch.load(FIXTURES / "peft_llama_bin" / "adapter_model.bin", weights_only=True))


def with_entry(value: Any, key: Any = "base_model.model.extra") -> Callable[[], Any]:
    def make() -> Any:
        d: dict[Any, Any] = good()
        d[key] = value
        return d

    return make


# ---- payloads that would run code --------------------------------------------------------------------------------


class _System:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.eval, (f"open({self.marker!r}, 'w')",))


class _Exec:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.exec, (f"open({self.marker!r}, 'w')",))


class _Popen:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (subprocess.Popen, (["touch", self.marker],))


class _Os:
    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.__import__, ("os",))


class _SystemFn:
    """Unpickles as ``getattr(__import__("os"), "system")``."""

    def __call__(self, *args: Any) -> None:
        raise AssertionError("only ever pickled")

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.getattr, (_Os(), "system"))


class _Getattr:
    """``getattr(__import__("os"), "system")("touch ...")``: a payload built from builtins alone."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (_SystemFn(), (f"touch {self.marker}",))


def payload(kind: type, where: str) -> Callable[[Path], None]:
    def build(p: Path) -> None:
        marker = str(p.parent / MARKER)
        obj: Any = good()
        bad = kind(marker)
        if where == "value":
            obj["base_model.model.x.lora_A.weight"] = bad
        elif where == "top":
            obj = bad
        elif where == "nested":
            obj = {"state_dict": {"a": [bad]}}
        if where == "raw":  # a plain pickle, no torch container
            p.write_bytes(pickle.dumps({"a": bad}, protocol=2))
        else:
            torch.save(obj, p)

    return build


for kind in (_System, _Eval, _Exec, _Popen, _Getattr):
    for where in ("value", "top", "nested", "raw"):
        case(f"payload-{kind.__name__.strip('_').lower()}-{where}", payload(kind, where), "refused to unpickle")

# ---- tensors that are not plain dense data ------------------------------------------------------------------------
with warnings.catch_warnings():  # torch's notes on its beta and deprecated layouts
    warnings.simplefilter("ignore")
    case("meta-tensor", saved(with_entry(torch.zeros(4, device="meta"))), "meta device")
    case("sparse-coo", saved(with_entry(torch.eye(4).to_sparse())), "sparse_coo")
    case("sparse-csr", saved(with_entry(torch.eye(4).to_sparse_csr())), "sparse_csr")
    case("nested-tensor", saved(with_entry(torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)]))), "nested")
    case("complex", saved(with_entry(torch.zeros(4, dtype=torch.complex64))), "complex")
    case("quantized", saved(with_entry(torch.quantize_per_tensor(torch.zeros(4), 0.1, 0, torch.qint8))), "quantized")
    case("uint16", saved(with_entry(torch.zeros(4, dtype=torch.uint16))), "dtype")

# ---- containers ----------------------------------------------------------------------------------------------------
case("nested-dict", saved(with_entry({"w": torch.zeros(2)})), "not a name -> tensor")
case("list-value", saved(with_entry([torch.zeros(2)])), "not a name -> tensor")
case("tuple-value", saved(with_entry((torch.zeros(2),))), "not a name -> tensor")
case("none-value", saved(with_entry(None)), "not a name -> tensor")
case("string-value", saved(with_entry("tensor")), "not a name -> tensor")
case("int-key", saved(with_entry(torch.zeros(2), key=1)), "not a name -> tensor")
case("tuple-key", saved(with_entry(torch.zeros(2), key=("a", 1))), "not a name -> tensor")
case("none-key", saved(with_entry(torch.zeros(2), key=None)), "not a name -> tensor")
case("bare-tensor", saved(lambda: torch.zeros(4)), "not a dict of tensors")
case("top-level-list", saved(lambda: [torch.zeros(4)]), "not a dict of tensors")
case("top-level-none", saved(lambda: None), "not a dict of tensors")
case("state-dict-with-junk", saved(lambda: {"state_dict": {**good(), "step": 3}}), "not a name -> tensor")

# ---- files that are not what they claim ------------------------------------------------------------------------------


def _bytes(data: bytes) -> Callable[[Path], None]:
    return lambda p: p.write_bytes(data)


def _zip(entries: dict[str, bytes]) -> Callable[[Path], None]:
    def build(p: Path) -> None:
        with zipfile.ZipFile(p, "w") as z:
            for name, data in entries.items():
                z.writestr(name, data)

    return build


def _truncated(p: Path) -> None:
    raw = (FIXTURES / "peft_llama_bin" / "adapter_model.bin").read_bytes()
    p.write_bytes(raw[: len(raw) // 2])


case("empty-file", _bytes(b""), "empty file")
case("random-bytes", _bytes(bytes(range(256)) * 4), "not a readable torch pickle")
case("zip-not-torch", _zip({"hello.txt": b"hi"}), "not a readable torch pickle")
case("zip-garbage-pickle", _zip({"archive/data.pkl": b"\x80\x02garbage", "archive/version": b"3\n"}), "torch pickle")
case("truncated-zip", _truncated, "not a readable torch pickle")
case("legacy-truncated", lambda p: p.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)), "torch pickle")

# ---- storages that lie about their size ------------------------------------------------------------------------------------


class _Storage:
    """Stands for a storage in a hand-made pickle (its persistent id says what torch will look for)."""


def crafted(
    size: tuple[int, ...], stride: tuple[int, ...], *, offset: int = 0, numel: int = 4, data: bytes = b"\0" * 16,
    legacy: bool = False, record: int | None = None,
) -> Callable[[Path], None]:  # fmt: skip
    """A torch file written by hand: one float tensor ``a`` over one storage, with whatever sizes it claims."""

    def build(p: Path) -> None:
        st = _Storage()

        class Tensor:
            def __reduce__(self) -> tuple[Any, ...]:
                rebuild = torch._utils._rebuild_tensor_v2
                return (rebuild, (st, offset, size, stride, False, collections.OrderedDict()))

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj: Any) -> Any:
                if obj is st:
                    pid = ("storage", torch.FloatStorage, "0", "cpu", numel)
                    return (*pid, None) if legacy else pid
                return None

        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump({"base_model.model.x.lora_A.weight": Tensor()})
        if legacy:
            with open(p, "wb") as f:
                for x in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
                    pickle.dump(x, f, protocol=2)
                f.write(buf.getvalue())
                pickle.dump(["0"], f, protocol=2)
                n = numel if record is None else record
                f.write(n.to_bytes(8, "little") + b"\0" * 4 * n)
            return
        with zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as z:
            z.writestr("archive/data.pkl", buf.getvalue())
            z.writestr("archive/byteorder", "little")
            z.writestr("archive/data/0", data)
            z.writestr("archive/version", "3\n")

    return build


case("storage-huge-size", crafted((10**12,), (1,)), "not a readable torch pickle")
case("storage-huge-numel", crafted((4,), (1,), numel=10**12), "record size")
case("storage-huge-offset", crafted((4,), (1,), offset=10**9), "not a readable torch pickle")
case("storage-negative-stride", crafted((4,), (-1,)), "not a readable torch pickle")
case("storage-negative-size", crafted((-4,), (1,)), "not a readable torch pickle")
case("storage-overflow", crafted((2**62, 2**62), (1, 1)), "not a readable torch pickle")
case("storage-record-short", crafted((4,), (1,), data=b"\0" * 4), "record size")
case("storage-record-long", crafted((4,), (1,), data=b"\0" * 64), "record size")
case("storage-zero-stride-expanded", crafted((10**12,), (0,)), "storage holds 16 bytes")
case("legacy-huge-numel", crafted((4,), (1,), numel=10**12, legacy=True, record=4), "not a readable torch pickle")
case("legacy-record-short", crafted((4,), (1,), legacy=True, record=2), "not a readable torch pickle")

# ---- readable pickles ------------------------------------------------------------------------------------------------------
case("zero-dim-factors", saved(lambda: {k: v.reshape(-1)[0] for k, v in good().items()}), "at least 2-D")
case("valid-control", saved(good), None, refused=False)
case("valid-legacy-format", saved(good, legacy=True), None, refused=False)
case("parameters-and-views", saved(lambda: {k: torch.nn.Parameter(v.t().contiguous().t()) for k, v in good().items()}), None, refused=False)  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_pickle(tmp_path: Path, name: str) -> None:
    c = CASES[name]
    folder = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "peft_llama_bin", folder)
    c.build(folder / "adapter_model.bin")
    marker = folder / MARKER
    try:
        if c.refused:
            hostile.run(["inspect", folder], inputs=[folder], code=1, says=c.says)
            kit.validate([folder], inputs=[folder], ok=False, says=c.says)
        else:
            hostile.run(["inspect", folder], inputs=[folder], code=0)
            kit.validate([folder], inputs=[folder], ok=True)
    finally:
        assert not marker.exists(), "a payload ran"
        assert not Path(MARKER).exists(), "a payload ran"


@pytest.mark.parametrize("name", ["payload-system-value", "meta-tensor", "storage-record-short", "int-key"])
def test_library_raises_one_line(tmp_path: Path, name: str) -> None:
    p = tmp_path / "x.pt"
    CASES[name].build(p)
    err = UnsafePickleError if name.startswith("payload") else FileFormatError
    hostile.call(read_pickle, p, raises=err, inputs=[p])
    assert not (tmp_path / MARKER).exists()


def test_counts() -> None:
    assert len(CASES) >= 30
