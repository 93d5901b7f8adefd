"""The hostile battery's harness: run one case and check every promise loratools makes about bad input.

A case is a command line (or a library call) and the paths it must not touch. Whatever it is given, afterwards:
- no traceback: the command ends with an exit code, never an exception (a bug keeps its traceback: it fails here);
- the exit code is the expected one (0, 1 data error / findings, 2 usage / could not compare, 130/143 signals);
- an error is one ``Error:`` line on stderr (a ``Hint:`` may follow), with the expected words in it;
- every input is byte for byte, mode for mode as it was;
- a failure leaves nothing beside the output (no temp, no half-written output, no ``.old``);
- a success writes outputs with the umask's modes;
- it ends in bounded time (pytest-timeout's hard limit stops a hang that never returns; ``seconds`` here
  bounds the ones that do).

Cases are data built by code (no binary blobs); each category has its own ``test_hostile_*.py``.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
import traceback
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: ``seconds`` a case may take unless it says otherwise (the hard limit is pytest-timeout's, in pyproject.toml)
SECONDS = 30.0


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float


def snapshot(paths: Iterable[str | os.PathLike[str]]) -> dict[str, tuple[str, int, str]]:
    """Every file, folder and link under ``paths``: (kind, mode, sha256 of the bytes or the link's target)."""
    out: dict[str, tuple[str, int, str]] = {}

    def visit(p: Path) -> None:
        try:
            st = p.lstat()
        except FileNotFoundError:
            out[str(p)] = ("missing", 0, "")
            return
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            out[str(p)] = ("link", mode, os.readlink(p))
        elif stat.S_ISDIR(st.st_mode):
            out[str(p)] = ("dir", mode, "")
            for child in sorted(p.iterdir()):
                visit(child)
        elif stat.S_ISREG(st.st_mode):
            out[str(p)] = ("file", mode, hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[str(p)] = ("special", mode, str(st.st_rdev))

    for p in paths:
        visit(Path(p))
    return out


def listing(folder: Path) -> set[str]:
    return set(os.listdir(folder)) if folder.is_dir() else set()


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_modes(path: Path, mask: int | None = None) -> None:
    """Files loratools wrote have mode 0666 & ~umask, folders 0777 & ~umask."""
    mask = umask() if mask is None else mask
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if p.is_symlink():
            continue
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        got = stat.S_IMODE(p.stat().st_mode)
        assert got == want, f"{p}: mode {got:o}, the umask {mask:03o} gives {want:o}"


def check_error_text(code: int, stderr: str, says: str | Collection[str] | None, findings: bool = False) -> None:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    if code in (1, 2) and not (findings and code == 1):
        assert len(errors) == 1, f"expected one Error: line, got:\n{stderr}"
    else:
        assert len(errors) <= 1, f"several Error: lines:\n{stderr}"
    words = [says] if isinstance(says, str) else list(says or ())
    for w in words:
        assert w.lower() in stderr.lower(), f"expected {w!r} in:\n{stderr}"


def run(
    args: list[str],
    *,
    inputs: Iterable[str | os.PathLike[str]] = (),
    code: int | Collection[int] = 1,
    out: str | os.PathLike[str] | None = None,
    says: str | Collection[str] | None = None,
    seconds: float = SECONDS,
    env: dict[str, str] | None = None,
    also: Iterable[str | os.PathLike[str]] = (),
    findings: bool = False,
) -> Outcome:
    """``loratools ARGS`` in-process, checked against every promise (see the module's docstring). ``also``: other
    outputs the command writes beside ``out`` (merge's --report). ``findings``: exit 1 may mean findings (validate,
    diff), printed on stdout, with no Error line."""
    from click.testing import CliRunner

    from loratools.cli import cli

    inputs = [Path(p) for p in inputs]
    before = snapshot(inputs)
    target = Path(out) if out is not None else None
    beside = listing(target.parent) if target is not None else set()
    t0 = time.perf_counter()
    r = CliRunner().invoke(cli, [str(a) for a in args], env=env)
    took = time.perf_counter() - t0
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        tb = "".join(traceback.format_exception(r.exception))
        raise AssertionError(f"loratools {' '.join(map(str, args))} raised:\n{tb}\nstderr:\n{r.stderr}")
    codes = {code} if isinstance(code, int) else set(code)
    assert r.exit_code in codes, f"exit {r.exit_code}, expected {sorted(codes)}; stderr:\n{r.stderr}"
    check_error_text(r.exit_code, r.stderr, says, findings)
    assert snapshot(inputs) == before, f"an input changed: loratools {' '.join(map(str, args))}"
    if target is not None:
        now = listing(target.parent)
        if r.exit_code != 0:
            assert now <= beside, f"left behind after a failure: {sorted(now - beside)}"
        else:
            extra = now - beside - {target.name} - {Path(p).name for p in also}
            assert not extra, f"left beside the output: {sorted(extra)}"
            check_modes(target)
    assert took < seconds, f"took {took:.1f} s (limit {seconds} s)"
    return Outcome(r.exit_code, r.stdout, r.stderr, took)


def call(
    fn: Callable[..., Any],
    *args: Any,
    raises: type[BaseException] | tuple[type[BaseException], ...] | None = None,
    inputs: Iterable[str | os.PathLike[str]] = (),
    says: str | None = None,
    seconds: float = SECONDS,
    **kwargs: Any,
) -> Any:
    """A library call checked the same way: it returns, or raises ``raises`` (a LoratoolsError subclass) with a
    one-line message; inputs untouched; bounded time."""
    from loratools.errors import LoratoolsError

    inputs = [Path(p) for p in inputs]
    before = snapshot(inputs)
    t0 = time.perf_counter()
    result: Any = None
    try:
        result = fn(*args, **kwargs)
    except LoratoolsError as e:
        if raises is None or not isinstance(e, raises):
            raise
        assert "\n" not in e.message, f"a multi-line message: {e.message!r}"
        if says:
            assert says.lower() in str(e).lower(), f"expected {says!r} in {e}"
    else:
        assert raises is None, f"expected {raises}, it returned {result!r}"
    assert snapshot(inputs) == before, "an input changed"
    assert time.perf_counter() - t0 < seconds
    return result
