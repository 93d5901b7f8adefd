"""Every exception loratools raises to a user. The CLI turns these into one ``Error:`` line."""

from __future__ import annotations

import errno
from collections.abc import Iterable


class LoratoolsError(Exception):
    """Base class: a problem with the user's data or request, never a bug."""

    #: the CLI's exit status for it (diff and validate give 2 for "could not compare")
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(LoratoolsError):
    """A library function called with an argument of the wrong type or value (``param`` names it). Raised before
    anything is read; the CLI checks the same values itself and reports them as usage errors (exit 2)."""

    def __init__(self, message: str, hint: str | None = None, *, param: str | None = None) -> None:
        super().__init__(message, hint)
        self.param = param


class OutputNameError(UsageError):
    """An output name that contradicts what is written (a ``.safetensors`` name for a PEFT folder, a kohya file
    without its suffix): refused, never guessed at; a usage error (exit 2)."""

    exit_code = 2


class FileFormatError(LoratoolsError):
    """A file is unreadable, truncated, or not in the format it claims to be."""


class HeaderError(FileFormatError):
    """A safetensors header that lies: bad length, bad JSON, offsets outside the file."""


class UnsafePickleError(FileFormatError):
    """A pickle file that tries to run code or load objects other than tensors."""


class UnknownKeysError(FileFormatError):
    """A reader was given keys it cannot account for."""

    def __init__(self, keys: Iterable[str], fmt: str, hint: str | None = None) -> None:
        self.keys = sorted(keys)
        shown = ", ".join(self.keys[:8])
        more = f" (and {len(self.keys) - 8} more)" if len(self.keys) > 8 else ""
        super().__init__(
            f"{len(self.keys)} key(s) not understood as {fmt}: {shown}{more}",
            hint or "pass --format to read it as another format, or report the file",
        )


class ShapeError(LoratoolsError):
    """Factors whose shapes do not fit together, or do not fit a base weight."""


class IncompatibleAdaptersError(LoratoolsError):
    """Adapters that cannot be combined."""


class OutputError(LoratoolsError):
    """An output that cannot be written where it was asked for (or a write that failed: a full disk, a
    read-only folder, no permission)."""


class OutputExistsError(OutputError):
    """Refusing to overwrite an existing output (or an input)."""


class HubError(LoratoolsError):
    """A Hugging Face Hub request failed."""


#: hints for what the system says when a file cannot be read or written
_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free some space or write elsewhere",
    errno.EROFS: "that file system is read-only: write elsewhere",
    errno.EACCES: "check the permissions, or write elsewhere",
    errno.EPERM: "check the permissions, or write elsewhere",
    errno.EFBIG: "the file system cannot hold a file that large",
    errno.EIO: "the disk reported an input/output error",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.ELOOP: "a path goes round in symbolic links",
}


def from_os_error(e: OSError, cls: type[LoratoolsError] = OutputError) -> LoratoolsError:
    """What the system refused (a full disk, a read-only folder, no permission) as one line and a hint."""
    what = e.strerror or str(e)
    message = f"{what}: {e.filename}" if e.filename is not None else what
    return cls(message, _OS_HINTS.get(e.errno or 0))
