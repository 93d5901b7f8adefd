"""Failing runs: writes that fail like a full disk; afterwards no output, no temp, and inputs byte for byte as they
were. (Signals: tests/test_hostile_signals.py.)"""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path
from types import ModuleType

import pytest
from conftest import FIXTURES, direct_writes_work, write_big_checkpoints

from loratools.errors import OutputError
from loratools.io import safetensors as st_io
from loratools.io import stream
from loratools.ops import merge as merge_mod


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def big_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base large enough (about 120 MB) that a full disk hits the middle of the merge."""
    return write_big_checkpoints(tmp_path_factory.mktemp("big"))[0]


class _FullDisk:
    """A file object that fails like a full disk after ``limit`` bytes."""

    def __init__(self, fh: object, limit: int) -> None:
        self.fh, self.left = fh, limit

    def write(self, data: bytes) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self.left:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= n
        return self.fh.write(data)  # type: ignore[attr-defined,no-any-return]

    def __getattr__(self, name: str) -> object:
        return getattr(self.fh, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("direct", [True, False])
def test_full_disk_during_merge_leaves_nothing(
    big_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """The disk fills after 10 MB, whichever way the bytes go: around the page cache (the direct writes of the
    blocks, the copies and the header) or through it (the file object, and the work threads' blocks)."""
    from loratools.io import direct as direct_io

    left = {"bytes": 10_000_000}

    def spend(n: int) -> None:
        if n > left["bytes"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        left["bytes"] -= n

    if direct:
        if not direct_writes_work(tmp_path):  # the output's file system
            pytest.skip("this file system takes no direct writes")
        real_write = direct_io.DirectIO.write

        def write(self: direct_io.DirectIO, fd: int, view: memoryview, pos: int) -> None:
            spend(len(view))
            real_write(self, fd, view, pos)

        monkeypatch.setattr(direct_io.DirectIO, "write", write)
    else:
        monkeypatch.setattr(direct_io, "DIRECT", False)
        real = stream.Writer.__init__

        def init(self: stream.Writer, fh: object, **kw: object) -> None:
            real(self, _FullDisk(fh, 10_000_000), **kw)  # type: ignore[arg-type]

        real_put = stream.put

        def put(fd: int, data: memoryview, pos: int) -> None:
            spend(len(data))
            real_put(fd, data, pos)

        monkeypatch.setattr(stream.Writer, "__init__", init)
        monkeypatch.setattr(stream, "put", put)
        monkeypatch.setattr(stream, "kernel_copy", lambda *a: False)  # every byte through the failing writer
    before = digest(big_base)
    with pytest.raises(OutputError, match="No space left"):
        merge_mod.merge(big_base, [FIXTURES / "peft_llama"], tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == [] and digest(big_base) == before


def test_full_disk_during_a_safetensors_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loratools.ops.resize import resize

    real_open = open

    def failing_open(path: object, mode: str = "r", *a: object, **kw: object) -> object:
        fh = real_open(path, mode, *a, **kw)  # type: ignore[call-overload]
        return _FullDisk(fh, 2000) if "w" in mode and str(path).endswith(".tmp") else fh

    monkeypatch.setattr(st_io, "open", failing_open, raising=False)
    with pytest.raises(OutputError, match="No space left"):
        resize(FIXTURES / "kohya_sd/lora.safetensors", tmp_path / "small.safetensors", rank=1)
    assert list(tmp_path.iterdir()) == []


def test_index_naming_files_outside_the_folder_is_refused(mf: ModuleType, tmp_path: Path) -> None:
    import json

    from loratools.errors import FileFormatError

    mf.tiny_llama().save_pretrained(tmp_path / "base", max_shard_size="20KB")
    index = tmp_path / "base" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "../../etc/passwd"
    index.write_text(json.dumps(data))
    with pytest.raises(FileFormatError, match="outside its folder"):
        merge_mod.merge(tmp_path / "base", [FIXTURES / "peft_llama"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_every_battery_file_is_counted_in_docs_reliability() -> None:
    """benchmarks/reliability.py makes docs/reliability.md's battery table: a hostile file it does not list would be
    run by `make test` and never counted there."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("reliability", ROOT / "benchmarks" / "reliability.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    files = {p.name for p in (ROOT / "tests").glob("test_hostile_*.py")}
    assert files == set(mod.CATEGORIES), files ^ set(mod.CATEGORIES)
    doc = (ROOT / "docs" / "reliability.md").read_text()
    assert all(f"| {label} |" in doc for label in mod.CATEGORIES.values())
