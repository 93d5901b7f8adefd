"""Outputs appear whole or not at all: write into a temp beside the target, then ``os.replace``."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import OutputExistsError


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
    fd, tmp = tempfile.mkstemp(prefix=f".{t.name}.", suffix=".tmp", dir=t.parent)
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{t.name}.", suffix=".tmp", dir=t.parent))
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
