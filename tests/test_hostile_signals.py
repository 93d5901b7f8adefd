"""Ctrl-C, SIGTERM, SIGHUP and SIGKILL during the work. A stopped run ends with exit 130 / 143 / 129 and one Error
line, its threads finished and joined, its temp removed, the inputs untouched; a killed one (SIGKILL) leaves a
temp that the next run removes and names. Nothing here depends on timing: in-process cases stop the work at a
chosen call; the real-signal cases send the signal once the output's temp exists, and check the same outcome
whether the run was caught mid-work or had just finished."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import hostile
import pytest
import torch
from conftest import FIXTURES, write_big_checkpoints

from loratools.cli import Interrupted
from loratools.io import atomic


@pytest.fixture(scope="module")
def world(mf: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from safetensors.torch import load_file

    from loratools.io.safetensors import write_safetensors

    root = tmp_path_factory.mktemp("signals")
    mf.tiny_llama().save_pretrained(root / "base")
    tensors = load_file(str(root / "base" / "model.safetensors"))
    g = torch.Generator().manual_seed(2)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v for k, v in tensors.items()}
    (root / "tuned").mkdir()
    write_safetensors(root / "tuned" / "model.safetensors", tuned)
    shutil.copytree(FIXTURES / "peft_llama", root / "peft")
    shutil.copy(FIXTURES / "lycoris_lokr.safetensors", root / "lokr.safetensors")
    return {p.name: p for p in root.iterdir()}


def commands(w: dict[str, Path]) -> dict[str, list[str]]:
    return {
        "merge": ["merge", str(w["base"]), str(w["peft"])],
        "convert": ["convert", str(w["lokr.safetensors"]), "--to", "diffusers"],
        "resize": ["resize", str(w["peft"]), "--rank", "2"],
        "mix": ["mix", str(w["peft"]), str(w["peft"]), "--rank", "2"],
        "extract": ["extract", str(w["base"]), str(w["tuned"]), "--rank", "2"],
    }


#: where the work is stopped: (module attribute to wrap, which call raises)
POINTS: dict[str, tuple[str, str, int]] = {
    "in-a-merge-thread": ("loratools.ops.merge_engine", "_rows_job", 2),  # the compiled loop's jobs
    "in-a-torch-merge-thread": ("loratools.ops.merge_engine", "_chunk", 2),  # the same without it
    "while-writing": ("loratools.io.safetensors", "tensor_bytes", 2),
    "before-the-rename": ("loratools.io.atomic", "fsync_tree", 1),
    "at-the-rename": ("loratools.io.atomic", "_rename_noreplace", 1),
}
APPLIES = {
    "in-a-merge-thread": ["merge"],
    "in-a-torch-merge-thread": ["merge"],
    "while-writing": ["merge", "convert", "resize", "mix", "extract"],
    "before-the-rename": ["merge", "convert", "resize", "mix", "extract"],
    "at-the-rename": ["merge", "convert", "resize", "mix", "extract"],
}
STOPS: dict[str, tuple[Callable[[], BaseException], int]] = {
    "ctrl-c": (KeyboardInterrupt, 130),
    "sigterm": (lambda: Interrupted(signal.SIGTERM), 143),
    "sighup": (lambda: Interrupted(signal.SIGHUP), 129),
}


def _cases() -> list[Any]:
    out = []
    for point, cmds in APPLIES.items():
        for cmd in cmds:
            for stop in STOPS:
                keep = stop == "ctrl-c" or (cmd == "merge" and point == "while-writing")
                out.append(pytest.param(cmd, point, stop, id=f"{cmd}-{point}-{stop}",
                                        marks=[] if keep else [pytest.mark.slow]))  # fmt: skip
    return out


@pytest.mark.parametrize(("cmd", "point", "stop"), _cases())
def test_a_stopped_run_cleans_up_and_says_so(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cmd: str, point: str, stop: str
) -> None:
    import importlib

    module, name, nth = POINTS[point]
    if point == "while-writing" and cmd == "merge":
        # the writing thread's write of a merged block (the compiled loop: around the page cache where the file
        # system allows it, else through it), or the torch engine's own name for the helper that hands the writer
        # its bytes
        from loratools.ops import merge_engine

        if merge_engine.KERNEL is None:
            module = "loratools.ops.merge_engine"
        else:
            from conftest import direct_writes_work

            module, name = ("Pages", "write") if direct_writes_work(tmp_path) else ("", "put")
    mod: Any
    if module == "Pages":
        from loratools.io.direct import Pages as mod
    else:
        mod = importlib.import_module(module or "loratools.io.stream")
    if point == "in-a-merge-thread" and getattr(mod, "KERNEL", None) is None:
        pytest.skip("the compiled loop is not built here (no C compiler): the torch case covers the threads")
    if point == "in-a-torch-merge-thread":
        monkeypatch.setattr(mod, "KERNEL", None)
    real = getattr(mod, name)
    calls = {"n": 0}
    make, code = STOPS[stop]

    def wrapped(*a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == nth:
            raise make()
        return real(*a, **k)

    monkeypatch.setattr(mod, name, wrapped)
    threads = threading.active_count()
    out = tmp_path / ("out.safetensors" if cmd == "convert" else "out")  # convert writes one diffusers file
    hostile.run([*commands(world)[cmd], "-o", out], inputs=list(world.values()), code=code, out=out,
                says="no output was left behind")  # fmt: skip
    assert calls["n"] >= nth, f"{point} was never reached by {cmd}"
    assert os.listdir(tmp_path) == []
    assert threading.active_count() <= threads, "a worker thread outlived the stopped run"


def test_a_second_signal_does_not_cut_the_clean_up_short(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first signal starts the clean-up; the handler ignores the next ones until it is done."""
    from loratools.cli import _stop

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        with pytest.raises(KeyboardInterrupt):
            _stop(signal.SIGINT, None)
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in saved)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


# ---- real signals, in a real process ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base of about 120 MB, so that a merge is still at work when the signal comes, and a tuned twin."""
    root = tmp_path_factory.mktemp("big")
    write_big_checkpoints(root)
    shutil.copytree(FIXTURES / "peft_llama", root / "peft")
    shutil.copy(FIXTURES / "kohya_sd/lora.safetensors", root / "kohya.safetensors")
    shutil.copy(FIXTURES / "lycoris_loha.safetensors", root / "loha.safetensors")
    shutil.copy(FIXTURES / "lycoris_lokr.safetensors", root / "lokr.safetensors")
    return {p.name: p for p in root.iterdir()}


def real_commands(b: dict[str, Path], out: Path) -> dict[str, list[str]]:
    exe = [sys.executable, "-m", "loratools"]
    return {
        "merge": [*exe, "merge", str(b["base.safetensors"]), str(b["peft"]), "-o", str(out / "merged.safetensors")],
        "mix": [*exe, "mix", str(b["kohya.safetensors"]), str(b["loha.safetensors"]), "--rank", "2",
                "-o", str(out / "mixed.safetensors")],
        "resize": [*exe, "resize", str(b["peft"]), "--rank", "2", "-o", str(out / "small")],
        "convert": [*exe, "convert", str(b["lokr.safetensors"]), "--to", "diffusers",
                    "-o", str(out / "conv.safetensors")],
        "extract": [*exe, "extract", str(b["base.safetensors"]), str(b["tuned.safetensors"]), "--rank", "2",
                    "-o", str(out / "extracted")],
    }  # fmt: skip


#: extra kill points per command and signal (LORATOOLS_KILL_POINTS=20 in `make reliability`)
KILL_POINTS = int(os.environ.get("LORATOOLS_KILL_POINTS", "1"))
SIGNALS = {"sigint": (signal.SIGINT, 130), "sigterm": (signal.SIGTERM, 143), "sigkill": (signal.SIGKILL, -9)}


def _signal_cases() -> list[Any]:
    return [
        pytest.param(cmd, sig, id=f"{cmd}-{sig}", marks=[] if cmd == "merge" else [pytest.mark.slow])
        for cmd in ("merge", "mix", "resize", "convert", "extract")
        for sig in SIGNALS
    ]


def _whole(p: Path) -> None:
    """An output that exists is whole (the signal came after its rename)."""
    if p.suffix == ".safetensors":
        from loratools.io.safetensors import read_header

        assert read_header(p).tensors
    else:
        from loratools import load_adapter

        assert load_adapter(p).modules


@pytest.mark.parametrize(("cmd", "sig"), _signal_cases())
def test_real_signals_stop_the_work_cleanly(big: dict[str, Path], tmp_path: Path, cmd: str, sig: str) -> None:
    signum, code = SIGNALS[sig]
    before = hostile.snapshot(big.values())
    out = tmp_path / "out"
    out.mkdir()
    argv = real_commands(big, out)[cmd]
    for point in range(KILL_POINTS):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t = time.perf_counter()  # the signal comes once the work has started (its temp exists)
        while proc.poll() is None and time.perf_counter() - t < 60:
            if any(p.name.startswith(".") for p in out.iterdir()):
                break
            time.sleep(0.002)
        time.sleep(0.05 * point)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        text = err.decode(errors="replace")
        assert "Traceback" not in text, text[-2000:]
        assert proc.returncode in (0, code), (proc.returncode, text[-2000:])  # never a crash (-11, -6)
        outputs = [p for p in out.iterdir() if not p.name.startswith(".")]
        temps = [p for p in out.iterdir() if p.name.startswith(".")]
        if proc.returncode == 0:
            assert len(outputs) == 1
        elif signum == signal.SIGKILL or "it had already written" in text:
            assert len(outputs) <= 1  # stopped after the rename: the output is whole (checked below)
        else:
            assert outputs == [], (outputs, text)
        if signum != signal.SIGKILL:
            assert temps == [], (temps, proc.returncode, text)  # a caught signal never leaves a temp
            if proc.returncode:
                assert text.count("Error:") == 1, text
                assert ("no output was left behind" in text) != bool(outputs), text
        for p in outputs:
            _whole(p)
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if signum == signal.SIGKILL and temps:  # the next run removes what the killed one left, and says so
            r = subprocess.run(argv, capture_output=True, timeout=120)
            assert r.returncode == 0, r.stderr[-1000:]
            assert b"left by an interrupted run" in r.stderr
            assert [p for p in out.iterdir() if p.name.startswith(".")] == []
            for p in list(out.iterdir()):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert hostile.snapshot(big.values()) == before


def test_stale_temps_of_live_and_dead_runs(tmp_path: Path) -> None:
    target = tmp_path / "out.safetensors"
    live = tmp_path / f".out.safetensors.{os.getpid()}.a.tmp"
    live.write_text("mine")
    assert atomic.clean_stale(target) == [] and live.exists()


def test_a_stop_after_the_rename_says_what_was_written(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal that lands once the output has its name: the output stays (it is whole), and the message says so
    instead of claiming nothing was written."""
    real = atomic._fsync

    def fsync(p: Path) -> None:
        if p == tmp_path:  # the parent's fsync: the rename is done
            raise KeyboardInterrupt
        real(p)

    monkeypatch.setattr(atomic, "_fsync", fsync)
    out = tmp_path / "out.safetensors"
    r = hostile.run([*commands(world)["convert"], "-o", out], inputs=list(world.values()), code=130,
                    says="it had already written")  # fmt: skip
    assert str(out) in r.stderr and os.listdir(tmp_path) == [out.name]
    from loratools import load_adapter

    assert load_adapter(out).modules


@pytest.mark.parametrize("where", ["submit", "writer", "skip", "copy"])
def test_a_signal_inside_a_hand_off_waits_for_the_next_checkpoint(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The handler runs while the main thread is inside a queue hand-off (where an exception would lose a
    wake-up and hang a join): the stop is deferred to the next chunk boundary, and the run ends cleanly. "writer":
    the torch engine's buffers; "skip": the compiled loop's tensors, written by the work threads."""
    from loratools.io import interrupts, stream
    from loratools.ops import merge_engine

    if where == "writer":
        monkeypatch.setattr(merge_engine, "KERNEL", None)
    elif where == "skip" and merge_engine.KERNEL is None:
        pytest.skip("the compiled loop is not built here (no C compiler)")
    cls, name = {
        "submit": (stream.Pool, "submit"), "writer": (stream.Writer, "write"), "skip": (stream.Writer, "skip_to"),
        "copy": (stream.Writer, "copy"),
    }[where]  # fmt: skip
    real = getattr(cls, name)
    calls = {"n": 0, "raised": False}

    def handoff(self: Any, *a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            interrupts.interrupt(KeyboardInterrupt())  # as the signal handler would, mid hand-off
            calls["raised"] = True  # (it did not raise here: deferred)
        return real(self, *a, **k)

    monkeypatch.setattr(cls, name, handoff)
    threads = threading.active_count()
    out = tmp_path / "out"
    hostile.run([*commands(world)["merge"], "-o", out], inputs=list(world.values()), code=130, out=out,
                says="no output was left behind", seconds=20)  # fmt: skip
    assert calls["raised"] and os.listdir(tmp_path) == []
    assert threading.active_count() <= threads


def test_a_stop_inside_a_folder_output_names_nothing_written(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PEFT folder's weights file is committed inside the folder's temp; a stop right after it must still say
    that nothing was left behind (the folder never got its name)."""
    from loratools.io import safetensors as st

    real = st.write_safetensors

    def write(*a: Any, **k: Any) -> None:
        real(*a, **k)
        raise KeyboardInterrupt  # after the inner file's commit, before the folder's

    monkeypatch.setattr(st, "write_safetensors", write)
    import loratools.formats.peft as peft_mod

    monkeypatch.setattr(peft_mod, "write_safetensors", write)
    out = tmp_path / "out"
    hostile.run([*commands(world)["resize"], "-o", out], inputs=list(world.values()), code=130, out=out,
                says="no output was left behind")  # fmt: skip
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("inside_an_import", [False, True])
def test_a_stop_while_the_summary_is_printed_says_what_was_written(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inside_an_import: bool
) -> None:
    """A signal once every output is written, while the command prints its summary (importing rich's table: found
    by the kill runs, where it landed inside that import and came out as a RuntimeError traceback, or killed the
    process by SIGINT): it is held until the command ends, then said truthfully, exit 130, no traceback.
    ``inside_an_import``: the stop raised inside an import anyway (a dataclass's __set_name__ wraps it)."""
    from rich import table

    from loratools import cli as cli_mod

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    real = table.Table.__init__

    def init(self: Any, *a: Any, **k: Any) -> None:
        if inside_an_import:
            raise RuntimeError("Error calling __set_name__") from KeyboardInterrupt()
        cli_mod._stop(signal.SIGINT, None)  # the handler, as a real SIGINT would run it here
        real(self, *a, **k)

    monkeypatch.setattr(table.Table, "__init__", init)
    out = tmp_path / "small"
    try:
        r = hostile.run([*commands(world)["resize"], "-o", out], inputs=list(world.values()), code=130,
                        says="it had already written")  # fmt: skip
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    assert str(out) in r.stderr and os.listdir(tmp_path) == [out.name]
