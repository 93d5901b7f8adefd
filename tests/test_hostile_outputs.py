"""Hostile output paths: every way a user (or a second run) can point an output at an input, at something that
is not a file, at a place that appeared meanwhile, or at a folder where the system refuses the write. Whatever
happens: inputs untouched, nothing left beside the output, one Error line, umask modes on success."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import hostile
import pytest
import torch
from conftest import FIXTURES

from loratools.io import atomic
from loratools.io.safetensors import write_safetensors


@pytest.fixture(scope="module")
def world(mf: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The inputs every case reads (and must leave as they were): a base folder, the same base as one file, a
    fine-tuned twin for extract, a PEFT folder and a kohya file."""
    root = tmp_path_factory.mktemp("world")
    mf.tiny_llama().save_pretrained(root / "base")
    shutil.copy(root / "base" / "model.safetensors", root / "single.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(str(root / "base" / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v for k, v in tensors.items()}
    (root / "tuned").mkdir()
    write_safetensors(root / "tuned" / "model.safetensors", tuned)
    shutil.copy(root / "base" / "config.json", root / "tuned" / "config.json")
    shutil.copytree(FIXTURES / "peft_llama", root / "peft")
    shutil.copy(FIXTURES / "kohya_sd/lora.safetensors", root / "kohya.safetensors")
    return {p.name: p for p in root.iterdir()}


#: command -> (its arguments before -o, the inputs it reads, the output's kind: file or folder)
def commands(w: dict[str, Path]) -> dict[str, tuple[list[str], list[Path], str]]:
    return {
        "merge": (["merge", str(w["base"]), str(w["peft"])], [w["base"], w["peft"]], "folder"),
        "merge-file": (["merge", str(w["single.safetensors"]), str(w["peft"])], [w["single.safetensors"], w["peft"]],
                       "file"),
        "convert": (["convert", str(w["peft"]), "--to", "kohya"], [w["peft"]], "file"),
        "resize": (["resize", str(w["peft"]), "--rank", "2"], [w["peft"]], "folder"),
        "mix": (["mix", str(w["kohya.safetensors"]), str(w["kohya.safetensors"]), "--weights", "0.5,0.5"],
                [w["kohya.safetensors"]], "file"),
        "extract": (["extract", str(w["base"]), str(w["tuned"]), "--rank", "2"], [w["base"], w["tuned"]], "folder"),
    }  # fmt: skip


COMMANDS = ["merge", "merge-file", "convert", "resize", "mix", "extract"]


def out_of(where: Path, kind: str) -> Path:
    """The output a command is pointed at: a folder name, or a file name with the suffix of its format (an output
    name that says otherwise is refused: tests/test_ux.py)."""
    return where / ("out" if kind == "folder" else "out.safetensors")


ALL = list(FIXTURES.iterdir())


def slow_unless(keep: bool) -> list[pytest.MarkDecorator]:
    return [] if keep else [pytest.mark.slow]


def cases(attacks: list[str], first: str = "") -> list[object]:
    """Every command x attack; the default run keeps every attack once and every command once (the rest is
    `make reliability`'s)."""
    out = []
    for i, attack in enumerate(attacks):
        for j, cmd in enumerate(COMMANDS):
            keep = j == i % len(COMMANDS) or (i == 0)
            out.append(pytest.param(cmd, attack, id=f"{cmd}-{attack}", marks=slow_unless(keep)))
    return out


# ---- outputs that would replace or enter an input ---------------------------------------------------------------

#: attack -> the output path (from the world and the command's first input), and the words of the refusal
INPUT_ATTACKS: dict[str, tuple[Callable[[dict[str, Path], Path], Path], str]] = {
    "the-input-itself": (lambda w, first: first, "one of the inputs"),
    "a-file-inside-the-input": (
        lambda w, first: (first / sorted(os.listdir(first))[0]) if first.is_dir() else first,
        "input",
    ),
    "the-folder-holding-the-input": (lambda w, first: first.parent, "holds one of the inputs"),
    "a-link-to-the-input": (lambda w, first: _link(first.parent / f"link-to-{first.name}", first), "input"),
    "through-a-linked-folder": (
        lambda w, first: (
            _link(first.parent / f"alias-{first.name}", first if first.is_dir() else first.parent)
            / (sorted(os.listdir(first))[0] if first.is_dir() else first.name)
        ),
        "input",
    ),
}


def _link(link: Path, to: Path) -> Path:
    if not link.is_symlink():
        link.symlink_to(to)
    return link


@pytest.mark.parametrize("force", [True, False], ids=["force", "no-force"])
@pytest.mark.parametrize(("cmd", "attack"), cases(list(INPUT_ATTACKS)))
def test_an_output_never_replaces_an_input(world: dict[str, Path], cmd: str, attack: str, force: bool) -> None:
    args, inputs, _ = commands(world)[cmd]
    where, words = INPUT_ATTACKS[attack]
    out = where(world, inputs[0])
    hostile.run([*args, "-o", out, *(["--force"] if force else [])], inputs=list(world.values()), code=1, says=words)


def test_a_hard_link_to_an_input_is_an_input(world: dict[str, Path], tmp_path: Path) -> None:
    link = tmp_path / "hard.safetensors"
    os.link(world["single.safetensors"], link)
    hostile.run(
        ["merge", world["single.safetensors"], world["peft"], "-o", link, "--force"],
        inputs=list(world.values()), code=1, says="one of the inputs",
    )  # fmt: skip


@pytest.mark.parametrize("fixture", sorted(p.name for p in ALL if p.name not in ("README.md", "make_fixtures.py")))
def test_save_adapter_never_rewrites_its_source(fixture: str, tmp_path: Path) -> None:
    from loratools import load_adapter, save_adapter
    from loratools.errors import OutputExistsError

    src = tmp_path / fixture
    (shutil.copytree if (FIXTURES / fixture).is_dir() else shutil.copy)(FIXTURES / fixture, src)
    if src.is_dir() and not (src / "adapter_config.json").exists() and len(list(src.iterdir())) == 1:
        src = next(src.iterdir())  # a folder holding one kohya file: the file is the source
    adapter = load_adapter(src)
    hostile.call(save_adapter, adapter, src, force=True, raises=OutputExistsError, inputs=[tmp_path], says="input")
    if src.is_dir():
        inner = sorted(src.iterdir())[0]
        hostile.call(save_adapter, adapter, inner, force=True, raises=OutputExistsError, inputs=[tmp_path])


# ---- outputs that are not regular files or folders, or cannot be made -------------------------------------------


def _fifo(p: Path) -> Path:
    os.mkfifo(p)
    return p


def _socket(p: Path) -> Path:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    s.close()
    return p


PLACE_ATTACKS: dict[str, tuple[Callable[[Path], Path], str, bool]] = {
    # name: (make the output path in a scratch folder, words, with --force)
    "a-fifo": (lambda d: _fifo(d / "out"), "FIFO", True),
    "a-socket": (lambda d: _socket(d / "out"), "socket", True),
    "a-dangling-link": (lambda d: _link(d / "out", d / "nowhere"), "symbolic link", True),
    "a-link-to-another-file": (lambda d: _link(d / "out", _touch(d / "other")), "symbolic link", True),
    "an-existing-file": (lambda d: _touch(d / "out"), "already exists", False),
    "an-existing-folder": (lambda d: _mkdir(d / "out"), "already exists", False),
    "a-missing-folder": (lambda d: d / "missing" / "out", "does not exist", True),
    "a-file-as-folder": (lambda d: _touch(d / "file") / "out", "not a folder", True),
    "an-empty-name": (lambda d: Path(""), "not a file or folder name", True),
    "a-dot": (lambda d: f"{d}/.", "not a file or folder name", True),  # type: ignore[dict-item]
    "a-dot-dot": (lambda d: f"{d}/sub/..", "not a file or folder name", True),  # type: ignore[dict-item]
}


def _touch(p: Path) -> Path:
    p.write_text("someone else's\n")
    return p


def _mkdir(p: Path) -> Path:
    p.mkdir()
    (p / "keep.txt").write_text("someone else's\n")
    return p


@pytest.mark.parametrize(("cmd", "attack"), cases(list(PLACE_ATTACKS)))
def test_outputs_that_cannot_be_placed_are_refused(
    world: dict[str, Path], tmp_path: Path, cmd: str, attack: str
) -> None:
    args, _, _ = commands(world)[cmd]
    make, words, force = PLACE_ATTACKS[attack]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = make(scratch)
    hostile.run(
        [*args, "-o", out, *(["--force"] if force else [])],
        inputs=[*world.values(), scratch], code=(1, 2) if attack == "an-empty-name" else 1, says=words,
    )  # fmt: skip


# ---- merge --report: an output like any other ----------------------------------------------------------------

#: a report named neither .html nor .json is a usage error (exit 2); every other refusal exits 1
REPORT_USAGE = ("a-pdf", "no-suffix")
REPORT_ATTACKS: dict[str, tuple[Callable[[dict[str, Path], Path], Path], str, bool]] = {
    "the-adapter-config": (lambda w, d: w["peft"] / "adapter_config.json", "input", True),
    "the-adapter-config-no-force": (lambda w, d: w["peft"] / "adapter_config.json", "input", False),
    "the-base-config": (lambda w, d: w["base"] / "config.json", "input", True),
    "the-base-weights": (lambda w, d: w["base"] / "model.safetensors", "input", True),
    "inside-the-output": (lambda w, d: d / "merged" / "report.json", "does not exist", True),
    "the-output-itself": (lambda w, d: d / "merged", "overlap", True),
    "holding-the-output": (lambda w, d: d, "overlap", True),
    "a-pdf": (lambda w, d: d / "report.pdf", ".json or .html", True),
    "no-suffix": (lambda w, d: d / "report", ".json or .html", True),
    "a-fifo": (lambda w, d: _fifo(d / "report.json"), "FIFO", True),
    "an-existing-report": (lambda w, d: _touch(d / "report.json"), "already exists", False),
    "a-missing-folder": (lambda w, d: d / "nope" / "report.html", "does not exist", True),
    "a-link-to-the-adapter": (lambda w, d: _link(d / "report.json", w["peft"] / "adapter_config.json"), "input", True),
}


@pytest.mark.parametrize("attack", list(REPORT_ATTACKS))
def test_the_report_follows_the_output_rules(world: dict[str, Path], tmp_path: Path, attack: str) -> None:
    where, words, force = REPORT_ATTACKS[attack]
    report = where(world, tmp_path)
    out = tmp_path / "merged"
    hostile.run(
        ["merge", world["base"], world["peft"], "-o", out, "--report", report, *(["--force"] if force else [])],
        inputs=[*world.values(), *([report] if report.exists() else [])], code=2 if attack in REPORT_USAGE else 1,
        out=out, says=words,
    )  # fmt: skip
    assert not out.exists()


def test_a_failing_report_takes_the_output_with_it(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loratools.ops import merge as merge_mod

    def broken(*a: object) -> str:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "r.html"))

    monkeypatch.setattr(merge_mod, "render_report", broken)
    out = tmp_path / "merged"
    hostile.run(
        ["merge", world["base"], world["peft"], "-o", out, "--report", tmp_path / "r.html"],
        inputs=list(world.values()), code=1, out=out, says="No space left",
    )  # fmt: skip
    assert os.listdir(tmp_path) == []


def test_a_report_that_cannot_be_placed_takes_back_a_replaced_output(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--force replaced the old output; the report's rename then fails: the old output comes back whole."""
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("the previous merge\n")
    real = atomic.Stage._place

    def place(self: atomic.Stage, item: atomic._Staged) -> None:
        if item.target.suffix == ".json":
            raise OSError(errno.EROFS, "Read-only file system", str(item.target))
        real(self, item)

    monkeypatch.setattr(atomic.Stage, "_place", place)
    hostile.run(
        ["merge", world["base"], world["peft"], "-o", out, "--report", tmp_path / "r.json", "--force"],
        inputs=[*world.values(), out], code=1, says="read-only",
    )  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["merged"]


def test_the_report_is_written_with_the_output(world: dict[str, Path], tmp_path: Path) -> None:
    import json

    out = tmp_path / "merged"
    r = hostile.run(
        ["merge", world["base"], world["peft"], "-o", out, "--report", tmp_path / "r.json", "--json"],
        inputs=list(world.values()), code=0, out=out, also=[tmp_path / "r.json"],
    )  # fmt: skip
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["output"] == str(out) and report["tensors"]
    assert json.loads(r.stdout) == report  # --json prints what --report writes
    hostile.check_modes(tmp_path / "r.json")


# ---- a second run writing the same output ---------------------------------------------------------------------


@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
@pytest.mark.parametrize("cmd", [pytest.param(c, marks=slow_unless(c in ("merge", "convert"))) for c in COMMANDS])
def test_an_output_that_appears_meanwhile_is_never_replaced_without_force(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cmd: str, force: bool
) -> None:
    args, _, kind = commands(world)[cmd]
    out = out_of(tmp_path, kind)
    real = atomic.Stage.commit

    def commit(self: atomic.Stage) -> None:  # another run finishes first, between our check and our rename
        if not out.exists():
            _mkdir(out) if kind == "folder" else _touch(out)
        real(self)

    monkeypatch.setattr(atomic.Stage, "commit", commit)
    if force:
        hostile.run([*args, "-o", out, "--force"], inputs=list(world.values()), code=0)
        assert not (out / "keep.txt").exists() if kind == "folder" else out.read_bytes() != b"someone else's\n"
        assert sorted(os.listdir(tmp_path)) == [out.name]
    else:
        r = hostile.run([*args, "-o", out], inputs=list(world.values()), code=1, says="appeared while")
        assert "--force" in r.stderr
        assert (out / "keep.txt").read_text() if kind == "folder" else out.read_text() == "someone else's\n"
        assert sorted(os.listdir(tmp_path)) == [out.name]


def test_noreplace_rename_without_the_system_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where renameat2 is missing, a file still cannot replace one that appeared (a hard link never does)."""
    monkeypatch.setattr(atomic, "_rename2", lambda *a: False)
    (tmp_path / "a").write_text("new")
    (tmp_path / "b").write_text("theirs")
    with pytest.raises(FileExistsError):
        atomic._rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "theirs" and (tmp_path / "a").read_text() == "new"
    atomic._rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "c").read_text() == "new" and not (tmp_path / "a").exists()


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_force_replaces_a_folder_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(atomic, "_rename2", lambda *a: False)
    out = _mkdir(tmp_path / "out")
    with atomic.atomic_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert os.listdir(out) == ["new.txt"] and os.listdir(tmp_path) == ["out"]


# ---- leftovers of killed runs -----------------------------------------------------------------------------------


def _dead_pid() -> int:
    pid = 2**22 - 7
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


LEFTOVERS = {
    # name: (leftover names beside `out`, whether `out` exists before the run)
    "legacy-old-with-output": ([".{out}.old"], True),
    "legacy-old-without-output": ([".{out}.old"], False),
    "pid-old-with-output": ([".{out}.{dead}.ab12cd.old"], True),
    "pid-old-without-output": ([".{out}.{dead}.ab12cd.old"], False),
    "dead-temp-file": ([".{out}.{dead}.x1y2z3.tmp"], False),
    "dead-temp-folder": ([".{out}.{dead}.x1y2z3.tmp/"], True),
    "several": ([".{out}.{dead}.a.tmp", ".{out}.{dead}.b.tmp/", ".{out}.old"], True),
}


@pytest.mark.parametrize(("cmd", "case"), cases(list(LEFTOVERS)))
def test_leftovers_of_killed_runs_are_cleaned_and_never_break_a_run(
    world: dict[str, Path], tmp_path: Path, cmd: str, case: str
) -> None:
    args, _, kind = commands(world)[cmd]
    names, existed = LEFTOVERS[case]
    dead = _dead_pid()
    out = out_of(tmp_path, kind)
    for name in names:
        p = tmp_path / name.format(dead=dead, out=out.name).rstrip("/")
        if name.endswith("/"):
            _mkdir(p)
        else:
            _touch(p)
    if existed:
        _mkdir(out) if kind == "folder" else _touch(out)
    r = hostile.run([*args, "-o", out, "--force"], inputs=list(world.values()), code=0)
    assert sorted(os.listdir(tmp_path)) == [out.name], os.listdir(tmp_path)
    assert "interrupted run" in r.stderr


def test_a_live_runs_temp_is_left_alone(world: dict[str, Path], tmp_path: Path) -> None:
    live = tmp_path / f".out.safetensors.{os.getppid()}.abc.tmp"
    _touch(live)
    hostile.run([*commands(world)["convert"][0], "-o", tmp_path / "out.safetensors"], inputs=list(world.values()),
                code=0)  # fmt: skip
    assert live.read_text() == "someone else's\n"


def test_an_output_moved_aside_by_a_killed_run_is_put_back(tmp_path: Path) -> None:
    old = _mkdir(tmp_path / f".out.{_dead_pid()}.q.old")
    atomic.clean_stale(tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").is_file() and not old.exists()


# ---- modes and the umask ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmd", "mask"),
    [
        pytest.param(cmd, mask, id=f"{cmd}-{mask:03o}", marks=slow_unless(mask == 0o077 or cmd == "merge"))
        for cmd in COMMANDS
        for mask in (0o022, 0o077, 0o002, 0o027, 0o000)
    ],
)
def test_outputs_get_the_umask_modes(world: dict[str, Path], tmp_path: Path, cmd: str, mask: int) -> None:
    old = os.umask(mask)
    try:
        out = out_of(tmp_path, commands(world)[cmd][2])
        hostile.run(
            [*commands(world)[cmd][0], "-o", out],
            inputs=list(world.values()),
            code=0,
            out=out,
        )  # fmt: skip  (run() checks 0666/0777 & ~umask on every path)
    finally:
        os.umask(old)


# ---- what the system refuses ---------------------------------------------------------------------------------

SYSTEM = {
    "read-only": errno.EROFS,
    "no-permission": errno.EACCES,
    "disk-full": errno.ENOSPC,
    "quota": errno.EDQUOT,
    "io-error": errno.EIO,
}


@pytest.mark.parametrize("where", ["make-file", "make-folder", "reserve", "write", "fsync", "rename"])
@pytest.mark.parametrize("what", list(SYSTEM))
def test_what_the_system_refuses_is_one_error_line(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str, where: str
) -> None:
    """ "reserve": merge's fallocate of its output; "write": the writes of its merged blocks (around the page
    cache where the file system allows it, else through it)."""
    from loratools.io import direct as direct_io
    from loratools.io import stream

    code = SYSTEM[what]

    def fail(*a: object, **k: object) -> None:
        raise OSError(code, os.strerror(code), str(out))

    cmd = "merge-file" if where == "make-file" else "merge"
    out = out_of(tmp_path, commands(world)[cmd][2])
    if where in ("make-file", "make-folder"):
        monkeypatch.setattr(atomic, "_" + where.replace("-", "_"), fail)
    elif where == "reserve":
        monkeypatch.setattr(direct_io, "reserve", fail)
        monkeypatch.setattr(direct_io, "open_direct", lambda path: os.open(path, os.O_WRONLY))  # reached everywhere
    elif where == "write":
        monkeypatch.setattr(direct_io.DirectIO, "write", staticmethod(fail))
        monkeypatch.setattr(stream, "put", fail)  # where the file system takes no direct writes
    elif where == "fsync":
        monkeypatch.setattr(atomic.os, "fsync", fail)
    else:
        monkeypatch.setattr(atomic, "_rename_noreplace", fail)
    hostile.run(
        [*commands(world)[cmd][0], "-o", out], inputs=list(world.values()), code=1, out=out,
        says=os.strerror(code),
    )  # fmt: skip
    assert os.listdir(tmp_path) == []


def _without_dac_override() -> None:
    """In a child about to exec, as root: drop the capabilities that let root write into any folder (the exec'd
    program then has the permissions of an ordinary owner)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_a_real_read_only_folder(world: dict[str, Path], tmp_path: Path) -> None:
    """A folder the user may not write to (as root: a child without the capability to write anywhere)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    args = [*commands(world)["convert"][0], "-o", str(ro / "out.safetensors")]
    try:
        if os.geteuid() != 0:
            hostile.run(args, inputs=list(world.values()), code=1, out=ro / "out.safetensors", says="permission")
            return
        import subprocess
        import sys

        before = hostile.snapshot(world.values())
        r = subprocess.run([sys.executable, "-m", "loratools", *args], capture_output=True, text=True, timeout=120,
                           preexec_fn=_without_dac_override)  # fmt: skip
        assert r.returncode == 1, r.stderr
        hostile.check_error_text(1, r.stderr, "permission denied")
        assert os.listdir(ro) == [] and hostile.snapshot(world.values()) == before
    finally:
        ro.chmod(0o755)


# ---- durability ------------------------------------------------------------------------------------------------


def test_files_and_folders_are_fsynced_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, atomic._rename_noreplace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src: Path, dst: Path) -> None:
        events.append(("rename", str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic, "_rename_noreplace", rename)
    out = tmp_path / "out"
    with atomic.atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
    renamed = events.index(("rename", str(out)))
    synced = {Path(p).name for kind, p in events[:renamed] if kind == "fsync"}
    assert {"a.txt", "b.txt", "sub"} <= synced and any(n.endswith(".tmp") for n in synced)
    assert ("fsync", str(tmp_path)) in events[renamed:]  # the folder that holds the new name


def test_modes_survive_special_permissions_on_the_parent(tmp_path: Path) -> None:
    """A setgid parent (shared project folders) still gives the umask's permission bits."""
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(0o2775)
    with atomic.atomic_write(parent / "f") as tmp:
        tmp.write_text("x")
    assert stat.S_IMODE((parent / "f").stat().st_mode) == 0o666 & ~hostile.umask()
