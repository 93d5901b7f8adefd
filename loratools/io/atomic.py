"""Outputs appear whole or not at all: write into a temp beside the target, then ``os.replace``."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import OutputExistsError

log = logging.getLogger("loratools")


def _prefix(t: Path) -> str:
    """Temps are named ``.<target>.<pid>.<random>.tmp``: the pid tells a crashed run's leftovers from a live one's."""
    return f".{t.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(t: Path) -> list[Path]:
    """Remove temps beside ``t`` left by runs that were killed (SIGKILL, power loss) and say so."""
    pattern = re.compile(rf"^\.{re.escape(t.name)}\.(\d+)\.[^.]+\.tmp$")
    removed: list[Path] = []
    if not t.parent.is_dir():
        return removed
    for entry in t.parent.iterdir():
        m = pattern.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed.append(entry)
            log.warning("removed %s, left by an interrupted run (pid %s)", entry.name, m.group(1))
    return removed


def check_output(
    target: str | os.PathLike[str], *, force: bool = False, inputs: Iterable[str | os.PathLike[str]] = ()
) -> Path:
    """Refuse to overwrite an input ever, and an existing output without ``force``."""
    t = Path(target)
    for src in inputs:
        s = Path(src)
        if t.exists() and s.exists() and (t.resolve() == s.resolve() or s.resolve().is_relative_to(t.resolve())):
            raise OutputExistsError(f"output {t} is one of the inputs", "write to a new path")
    if t.exists() and not force:
        raise OutputExistsError(f"output {t} already exists", "pass --force to overwrite it")
    if not t.parent.exists():
        raise OutputExistsError(f"folder {t.parent} does not exist", "create it first")
    return t


@contextlib.contextmanager
def atomic_write(target: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temp file path beside ``target``; on success it replaces ``target``, on failure it is removed."""
    t = check_output(target, force=force)
    clean_stale(t)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(t), suffix=".tmp", dir=t.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, t)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; on success it takes ``target``'s place, on failure it is removed."""
    t = check_output(target, force=force)
    clean_stale(t)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(t), suffix=".tmp", dir=t.parent))
    try:
        yield tmp
        if t.exists():
            old = t.with_name(f".{t.name}.old")
            if t.is_dir():
                os.replace(t, old)
                os.replace(tmp, t)
                shutil.rmtree(old, ignore_errors=True)
            else:
                t.unlink()
                os.replace(tmp, t)
        else:
            os.replace(tmp, t)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
