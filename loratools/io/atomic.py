"""Outputs appear whole or not at all, and never in place of an input.

Every output is written into a temp beside its target (``.<target>.<pid>.<random>.tmp``), fsynced, then renamed
into place; a failure (an error, Ctrl-C, SIGTERM) removes the temp. The rules, checked before any work starts
(:func:`check_output`) and again at the rename:

- an input is never replaced: not the input itself, not a file inside an input folder, not a folder holding an
  input, not through a symbolic link or a hard link;
- an existing output is replaced only with ``force``, and only if it is a regular file or a folder (never a
  FIFO, a device, a socket or a symbolic link);
- without ``force`` the rename never replaces an output that appeared while the work ran (another run writing
  the same path): it is refused instead (``renameat2(RENAME_NOREPLACE)``, or a hard link where that is missing);
- with ``force`` a folder is swapped in one step (``renameat2(RENAME_EXCHANGE)``); where that is missing, the old
  one is moved aside to a pid-named ``.old`` first, which the next run restores or removes if this one is killed
  between the two renames;
- several outputs of one command (``merge``'s model and its report) are committed together: all or none;
- files get mode ``0666 & ~umask`` and folders ``0777 & ~umask``, as ``open`` and ``mkdir`` give them;
- the files, their folders and the parent are fsynced before success is reported.

A run killed by SIGKILL or a power cut leaves its temp; the next run writing the same target removes it (or
restores a moved-aside output) and says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputError, OutputExistsError, from_os_error
from .interrupts import critical

log = logging.getLogger("loratools")

PathLike = str | os.PathLike[str]


# ---- checks -------------------------------------------------------------------------------------------------


def _kind(p: Path) -> str:
    """What is at ``p``, without following a final symbolic link."""
    try:
        mode = p.lstat().st_mode
    except FileNotFoundError:
        return "missing"
    except NotADirectoryError:
        return "missing"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def _real(p: Path) -> Path:
    """``p`` with every link in its folders resolved, the last part kept as it is (a link there is refused)."""
    return Path(os.path.realpath(p.parent)) / p.name


def _clash(t: Path, src: Path) -> str | None:
    """Why writing ``t`` would touch input ``src``, or None."""
    if not (src.exists() or src.is_symlink()):
        return None
    rs = Path(os.path.realpath(src))
    rt = Path(os.path.realpath(t)) if t.is_symlink() else _real(t)  # a link is judged by where it points
    if rt == rs or _real(t) == _real(src):
        return f"output {t} is one of the inputs"
    if rs.is_relative_to(rt):
        return f"output {t} holds one of the inputs ({src})"
    if rs.is_dir() and rt.is_relative_to(rs):
        return f"output {t} is inside the input folder {src}"
    with contextlib.suppress(OSError):
        if t.exists() and os.path.samefile(t, src):
            return f"output {t} is one of the inputs ({src}, through a link)"
    return None


def check_output(target: PathLike, *, force: bool = False, inputs: Iterable[PathLike] = ()) -> Path:
    """Refuse to write ``target`` where it would replace or enter an input, replace something that is not a
    regular file or folder, or (without ``force``) replace anything. Returns ``target`` as a Path."""
    if target is None or not isinstance(target, (str, os.PathLike)):
        raise OutputError(f"an output path is needed, not {type(target).__name__}")
    t = Path(target)
    last = os.fspath(target).rstrip("/").rpartition("/")[2]  # Path("x/.") is Path("x"): look at what was typed
    if not last or last in (".", "..") or t.name in ("", ".", ".."):
        raise OutputError(f"output {str(target)!r} is not a file or folder name", "name the output, e.g. -o out")
    for src in inputs:
        why = _clash(t, Path(src))
        if why:
            raise OutputExistsError(why, "write to a new path: loratools never overwrites its inputs")
    parent = t.parent
    pk = _kind(Path(os.path.realpath(parent)))
    if pk == "missing":
        raise OutputError(f"folder {parent} does not exist", "create it first")
    if pk != "folder":
        raise OutputError(f"{parent} is not a folder")
    kind = _kind(t)
    if kind not in ("missing", "file", "folder"):
        raise OutputExistsError(
            f"output {t} is a {kind}: loratools only replaces regular files and folders", "write to another path"
        )
    if kind != "missing" and not force:
        raise OutputExistsError(f"output {t} already exists", "pass --force to overwrite it")
    return t


# ---- system calls ---------------------------------------------------------------------------------------------

_NOREPLACE, _EXCHANGE = 1, 2  # renameat2 flags (Linux)
_AT_FDCWD = -100


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def _rename2(src: Path, dst: Path, flag: int) -> bool:
    """``rename`` with RENAME_NOREPLACE or RENAME_EXCHANGE; False where the system or the file system lacks it.
    Raises FileExistsError (no-replace, ``dst`` exists) and other OSErrors as they come."""
    if _LIBC is None:
        return False
    s, d = os.fsencode(src), os.fsencode(dst)
    if sys.platform.startswith("linux") and hasattr(_LIBC, "renameat2"):
        rc = _LIBC.renameat2(_AT_FDCWD, s, _AT_FDCWD, d, ctypes.c_uint(flag))
    elif sys.platform == "darwin" and hasattr(_LIBC, "renamex_np"):
        rc = _LIBC.renamex_np(s, d, ctypes.c_uint(4 if flag == _NOREPLACE else 2))  # RENAME_EXCL / RENAME_SWAP
    else:
        return False
    if rc == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(e, os.strerror(e), str(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` unless ``dst`` exists (FileExistsError), in one step where the system allows."""
    if _rename2(src, dst, _NOREPLACE):
        return
    if src.is_file() and not src.is_symlink():
        try:
            os.link(src, dst)  # fails, atomically, when dst exists
        except FileExistsError:
            raise
        except OSError:
            pass  # no hard links on this file system: check, then rename
        else:
            os.unlink(src)
            return
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, "File exists", str(dst))
    os.rename(src, dst)


#: sync_file_range(2)'s flag: start writing the range's dirty pages out, wait for nothing
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Start writing a file's dirty pages to the disk now, without waiting (Linux ``sync_file_range``): called as
    a big output is written, it makes the fsync before the rename wait for the last few pages only, where it
    would otherwise wait for all of them. Nothing happens where the system has no such call."""
    call = getattr(_LIBC, "sync_file_range", None) if sys.platform.startswith("linux") else None
    if call is not None:
        call(fd, ctypes.c_int64(0), ctypes.c_int64(0), ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))  # 0, 0: to its end


def reserve(fd: int, size: int) -> None:
    """Reserve the blocks of a file about to be written, ``size`` bytes from its start (Linux ``fallocate``, never
    glibc's emulation, which would write the zeros): a disk too small says so before any work (OSError ENOSPC).
    Where the system or the file system cannot, nothing happens."""
    linux = sys.platform.startswith("linux")
    call = (getattr(_LIBC, "fallocate64", None) or getattr(_LIBC, "fallocate", None)) if linux else None
    if call is None:  # (fallocate64: 64-bit offsets on 32-bit systems too)
        return
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if call(fd, 0, 0, size) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(err, os.strerror(err))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # file systems that cannot sync folders
            raise
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Every file under ``path`` (or ``path`` itself), then the folders, deepest first."""
    if not path.is_dir():
        _fsync(path)
        return
    folders: list[Path] = []
    for root, _dirs, files in os.walk(path):
        folders.append(Path(root))
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                _fsync(p)
    for folder in reversed(folders):
        _fsync(folder)


def _make_file(p: Path) -> None:
    """A new empty file, mode 0666 & ~umask as the kernel applies it; FileExistsError if the name is taken."""
    os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o666))


def _make_folder(p: Path) -> None:
    """A new empty folder, mode 0777 & ~umask."""
    os.mkdir(p, 0o777)


#: outputs committed in this process (the CLI tells a stop after an output was written from one before)
COMMITTED: list[Path] = []
#: temp folders being filled: an output committed inside one is part of a larger output, not one of its own
_FILLING: set[Path] = set()


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# ---- stale temps ----------------------------------------------------------------------------------------------


def _prefix(t: Path) -> str:
    """Temps are named ``.<target>.<pid>.<random>.tmp``: the pid tells a crashed run's leftovers from a live one's."""
    return f".{t.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_stale(t: Path) -> list[Path]:
    """Remove temps beside ``t`` left by runs that were killed (SIGKILL, power loss) and say so. An output that
    such a run had moved aside (``.old``) while ``t`` is missing is put back instead."""
    pattern = re.compile(rf"^\.{re.escape(t.name)}\.(?:(\d+)\.[^.]+\.(tmp|old)|old)$")
    removed: list[Path] = []
    try:
        entries = list(t.parent.iterdir())
    except OSError:
        return removed
    for entry in sorted(entries):
        m = pattern.match(entry.name)
        if not m:
            continue
        pid = int(m.group(1)) if m.group(1) else None  # a bare `.name.old`: left by an older loratools
        if pid is not None and (pid == os.getpid() or _alive(pid)):
            continue
        who = f"pid {pid}" if pid is not None else "an older loratools"
        if m.group(2) != "tmp" and _kind(t) == "missing":
            with contextlib.suppress(OSError):
                os.rename(entry, t)
                log.warning("put back %s, moved aside by an interrupted run (%s)", t.name, who)
                continue
        _remove(entry)
        removed.append(entry)
        log.warning("removed %s, left by an interrupted run (%s)", entry.name, who)
    return removed


# ---- staging and committing ---------------------------------------------------------------------------------


@dataclass
class _Staged:
    target: Path
    tmp: Path
    folder: bool
    old: Path | None = None  # after commit: the replaced output, until the whole stage is committed
    placed: bool = False


class Stage:
    """Temps for one or more outputs, committed together by :meth:`commit`: all of them take their targets'
    places, or none does (an output committed before a later one failed is taken back)."""

    def __init__(self, *, force: bool = False, inputs: Iterable[PathLike] = ()) -> None:
        self.force = force
        self.inputs = [Path(p) for p in inputs]
        self.items: list[_Staged] = []

    def _check(self, target: PathLike) -> Path:
        t = check_output(target, force=self.force, inputs=self.inputs)
        for other in self.items:
            a, b = _real(t), _real(other.target)
            if a == b or a.is_relative_to(b) or b.is_relative_to(a):
                raise OutputError(f"outputs {other.target} and {t} overlap", "write them to separate paths")
        clean_stale(t)
        return t

    def file(self, target: PathLike) -> Path:
        """A temp file to fill; it becomes ``target`` at commit."""
        return self._temp(self._check(target), folder=False)

    def folder(self, target: PathLike) -> Path:
        """A temp folder to fill; it becomes ``target`` at commit."""
        return self._temp(self._check(target), folder=True)

    def _temp(self, t: Path, *, folder: bool) -> Path:
        with critical():  # made and recorded in one step: a Ctrl-C can never leave an unrecorded temp
            while True:
                tmp = t.with_name(f"{_prefix(t)}{secrets.token_hex(4)}.tmp")
                item = _Staged(t, tmp, folder)
                self.items.append(item)
                try:
                    (_make_folder if folder else _make_file)(tmp)
                except FileExistsError:
                    self.items.remove(item)
                    continue
                except BaseException:
                    self.items.remove(item)
                    raise
                if folder:
                    _FILLING.add(tmp)
                return tmp

    def commit(self) -> None:
        for item in self.items:
            fsync_tree(item.tmp)
        with critical():  # the renames (and their undoing) are not cut in half by a signal
            try:
                for item in self.items:
                    self._place(item)
            except BaseException:
                self._undo()
                raise
            for item in self.items:
                if item.old is not None:
                    _remove(item.old)
            parents = {item.target.parent for item in self.items}
            COMMITTED.extend(i.target for i in self.items if not any(i.target.is_relative_to(f) for f in _FILLING))
            _FILLING.difference_update(i.tmp for i in self.items)
            self.items = []
        for parent in parents:  # the new names are on disk too
            _fsync(parent)

    def _place(self, item: _Staged) -> None:
        t = item.target
        kind = _kind(t)
        if kind == "missing" or not self.force:
            try:
                _rename_noreplace(item.tmp, t)
            except FileExistsError:
                raise OutputExistsError(
                    f"output {t} appeared while this run was writing it (another run?); it was left as it is",
                    "pass --force to overwrite it",
                ) from None
            item.placed = True
            return
        if kind not in ("file", "folder"):
            raise OutputExistsError(f"output {t} is now a {kind}: loratools only replaces regular files and folders")
        if _rename2(item.tmp, t, _EXCHANGE):  # one step: the temp's name now holds the old output
            item.old, item.placed = item.tmp, True
            return
        old = t.with_name(f"{_prefix(t)}{secrets.token_hex(4)}.old")
        if kind == "file" and not item.folder:
            try:  # kept under a second name until the whole stage is committed
                os.link(t, old)
            except OSError:
                shutil.copy2(t, old)
            os.replace(item.tmp, t)
            item.old, item.placed = old, True
            return
        os.rename(t, old)  # killed between these two renames: the next run puts `old` back (clean_stale)
        try:
            os.rename(item.tmp, t)
        except BaseException:
            os.rename(old, t)
            raise
        item.old, item.placed = old, True

    def _undo(self) -> None:
        """Take back what was placed: a replaced output returns, a new one is removed."""
        for item in reversed(self.items):
            if not item.placed:
                continue
            with contextlib.suppress(OSError):
                if item.old is None:
                    _remove(item.target)
                elif item.old == item.tmp:  # exchanged: exchange back
                    if not _rename2(item.tmp, item.target, _EXCHANGE):
                        raise OSError(errno.ENOTSUP, "cannot exchange back")
                else:
                    _remove(item.target)
                    os.rename(item.old, item.target)
                item.old, item.placed = None, False

    def abort(self) -> None:
        with critical():
            _FILLING.difference_update(i.tmp for i in self.items)
            for item in self.items:
                if not item.placed:
                    _remove(item.tmp)
                elif item.old is not None:
                    _remove(item.old)
            self.items = []


@contextlib.contextmanager
def stage(*, force: bool = False, inputs: Iterable[PathLike] = ()) -> Iterator[Stage]:
    """A :class:`Stage` committed when the block ends normally, removed when it raises (or is interrupted)."""
    s = Stage(force=force, inputs=inputs)
    try:
        yield s
        s.commit()
    except OSError as e:  # a full disk, a read-only folder, no permission: the user's to fix, not a bug
        s.abort()
        raise from_os_error(e) from e
    except BaseException:
        s.abort()
        raise


@contextlib.contextmanager
def atomic_write(target: PathLike, *, force: bool = False, inputs: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yield a temp file path beside ``target``; on success it replaces ``target``, on failure it is removed."""
    with stage(force=force, inputs=inputs) as s:
        yield s.file(target)


@contextlib.contextmanager
def atomic_dir(target: PathLike, *, force: bool = False, inputs: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; on success it takes ``target``'s place, on failure it is removed."""
    with stage(force=force, inputs=inputs) as s:
        yield s.folder(target)
