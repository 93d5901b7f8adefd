"""The library API: one convention (``<verb>_adapter(s)`` in memory, ``<verb>`` on paths, writing atomically),
exported from ``loratools``; the one Progress type every long operation reports to; the helpers each defined once
(rank for an energy, a file's sha256)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FIXTURES

import loratools
from loratools.errors import UsageError


def test_every_operation_is_exported() -> None:
    for name in (
        "load_adapter", "save_adapter", "detect", "inspect", "inspect_adapter", "validate", "convert",
        "convert_adapter", "mix", "mix_adapters", "resize", "resize_adapter", "merge", "diff", "extract",
        "extract_adapter",
    ):  # fmt: skip
        assert name in loratools.__all__ and callable(getattr(loratools, name)), name
    for name in loratools.__all__:
        assert hasattr(loratools, name), name
    from loratools.version import __version__

    assert loratools.__version__ == __version__


def test_inspect_adapter_is_in_memory_and_inspect_reads_paths() -> None:
    adapter = loratools.load_adapter(FIXTURES / "peft_llama")
    mem = loratools.inspect_adapter(adapter)
    disk = loratools.inspect(FIXTURES / "peft_llama")
    assert mem.to_dict() == disk.to_dict()
    with pytest.raises(UsageError, match="must be an Adapter") as e:
        loratools.inspect_adapter(FIXTURES / "peft_llama")  # type: ignore[arg-type]
    assert e.value.hint and "loratools.inspect(path)" in e.value.hint
    made = loratools.Adapter("peft", modules=dict(adapter.modules))  # made in memory: no file behind it
    rep = loratools.inspect_adapter(made, norms=False)
    assert (rep.source, rep.size_on_disk, rep.num_modules) == ("", 0, len(adapter.modules))


def test_mix_adapters_defaults_as_mix_does() -> None:
    a, b = (loratools.load_adapter(FIXTURES / n) for n in ("peft_llama", "peft_llama_patterns"))
    mixed, rep = loratools.mix_adapters([a, b])
    assert (rep.method, rep.weights) == ("cat", [1.0, 1.0])
    _, rep = loratools.mix_adapters([a, b], rank=2)
    assert rep.method == "svd" and {m.rank for m in rep.modules} == {2}


class Recorder:
    """A Progress that records what the work told it."""

    def __init__(self) -> None:
        self.starts: list[tuple[int, str, int]] = []
        self.done = 0
        self.items = 0

    def __call__(self, total: int, unit: str = "items", items: int = 0) -> loratools.Tick:
        self.starts.append((total, unit, items))

        def tick(done: int = 1, items: int = 0) -> None:
            self.done += done
            self.items += items

        return tick


def test_every_long_operation_reports_to_one_progress_type(tmp_path: Path, mf: Any) -> None:
    a = loratools.load_adapter(FIXTURES / "peft_llama")
    n = len(a.modules)
    for run in (
        lambda p: loratools.mix_adapters([a, a], progress=p),
        lambda p: loratools.resize_adapter(a, rank=2, progress=p),
        lambda p: loratools.diff(FIXTURES / "peft_llama", FIXTURES / "peft_llama_bin", progress=p),
    ):
        rec = Recorder()
        run(rec)
        assert rec.starts == [(n, "items", 0)] and rec.done == n
    mf.tiny_llama().save_pretrained(tmp_path / "base")
    rec = Recorder()
    rep = loratools.merge(tmp_path / "base", [FIXTURES / "peft_llama"], tmp_path / "merged", progress=rec)
    [(total, unit, tensors)] = rec.starts
    assert unit == "bytes" and 0 < rec.done <= total and rec.items == tensors  # bytes of tensors; the total has headers
    assert rep.summary["merged"] == 8
    rec = Recorder()
    loratools.extract_adapter(tmp_path / "base", tmp_path / "merged", rank=4, progress=rec)
    [(pairs, unit, _)] = rec.starts
    assert unit == "items" and rec.done == pairs == tensors


def test_the_cli_bar_is_a_progress() -> None:
    from loratools.cli.output import progress_bar

    with progress_bar("testing") as progress:  # stderr is not a terminal here: silent, still a Progress
        tick = progress(3)
        tick()
        tick(2, 1)


@pytest.mark.parametrize("seed", range(5))
def test_rank_for_energy_is_the_smallest_rank_that_keeps_it(seed: int) -> None:
    from loratools.ops.linalg import rank_for_energy

    g = torch.Generator().manual_seed(seed)
    s = torch.rand(12, generator=g, dtype=torch.float64).sort(descending=True).values
    sq = s**2
    for energy in (0.1, 0.5, 0.9, 0.99, 1.0):
        k = rank_for_energy(s, energy)
        assert sq[:k].sum() >= (energy - 1e-12) * sq.sum()
        assert k == 1 or sq[: k - 1].sum() < (energy - 1e-12) * sq.sum()
    assert rank_for_energy(s, 1.0) == len(s)
    assert rank_for_energy(torch.zeros(3), 0.9) == 1  # a zero matrix needs rank 1
    # against a total measured apart (a sketch's leading values): len + 1 says they do not reach it
    assert rank_for_energy(s[:4], 0.99, float(sq.sum())) == 5
    assert rank_for_energy(s, 1.0, float(sq.sum()) * (1 + 1e-7)) == len(s)  # float32 rounding of the total


def test_file_sha256(tmp_path: Path) -> None:
    from loratools.io.digest import file_sha256

    p = tmp_path / "f.bin"
    data = bytes(range(256)) * 40000  # more than one chunk
    p.write_bytes(data)
    assert file_sha256(p) == hashlib.sha256(data).hexdigest()
    assert file_sha256(p, start=1000) == hashlib.sha256(data[1000:]).hexdigest()
    stop = threading.Event()
    stop.set()
    assert file_sha256(p, stop=stop) == ""
