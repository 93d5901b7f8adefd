"""Every exception loratools raises to a user. The CLI turns these into one ``Error:`` line."""

from __future__ import annotations

from collections.abc import Iterable


class LoratoolsError(Exception):
    """Base class: a problem with the user's data or request, never a bug."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


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


class OutputExistsError(LoratoolsError):
    """Refusing to overwrite an existing output (or an input)."""


class HubError(LoratoolsError):
    """A Hugging Face Hub request failed."""


class ArgumentError(LoratoolsError):
    """A library call given an argument of the wrong type or value (``load_adapter(None)``)."""
