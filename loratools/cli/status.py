"""Exit statuses of the commands that answer a question (``diff``, ``validate``), as diff(1) and cmp give them:
0 the answer is yes (same, sound), 1 it is no (differs, findings), 2 there is no answer (an input missing,
unreadable or not what the command compares, a Hub error, a usage error), so that a script can tell "different"
from "broken".

Every other command exits 1 on a LoratoolsError (cli/__init__.py's Group renders it). Here such an error means
"could not compare": :func:`could_not_compare` turns it into a :class:`CouldNotCompare`, which click prints as
the same ``Error:`` (and ``Hint:``) lines on stderr, plain text (no markup is read from the message), exit 2.
Nothing is printed on stdout then, also with ``--json``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import IO, Any

import click

from ..errors import LoratoolsError

#: diff(1)'s and cmp's status for trouble
COULD_NOT_COMPARE = 2


class CouldNotCompare(click.ClickException):
    exit_code = COULD_NOT_COMPARE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(click.style("Error:", fg="red", bold=True) + " " + self.format_message(), err=True)
        if self.hint:
            click.echo(click.style("Hint:", fg="yellow") + " " + self.hint, err=True)


def _os_message(e: OSError) -> str:
    what = e.strerror or type(e).__name__
    where = os.fsdecode(e.filename) if isinstance(e.filename, bytes) else e.filename
    return what if where is None else f"{where}: {what}"


@contextlib.contextmanager
def could_not_compare() -> Iterator[None]:
    """Inside: a LoratoolsError, or an OSError reading an input, means there is no answer (exit 2)."""
    try:
        yield
    except LoratoolsError as e:
        raise CouldNotCompare(e.message, e.hint) from None
    except OSError as e:
        raise CouldNotCompare(_os_message(e)) from None
