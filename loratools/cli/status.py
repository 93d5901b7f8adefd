"""Exit statuses of the commands that answer a question (``diff``, ``validate``), as diff(1) and cmp give them:
0 the answer is yes (same, sound), 1 it is no (differs, findings), 2 there is no answer (an input missing,
unreadable or not what the command compares, a Hub error, a usage error), so that a script can tell "different"
from "broken".

Every other command exits 1 on a LoratoolsError. Here such an error means "could not compare":
:func:`could_not_compare` marks it with exit code 2, and cli/__init__.py's Group prints it as every error is
printed (one ``Error:`` line and a ``Hint:`` on stderr). Nothing is printed on stdout then, also with ``--json``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..errors import FileFormatError, LoratoolsError, from_os_error

#: diff(1)'s and cmp's status for trouble
COULD_NOT_COMPARE = 2


@contextlib.contextmanager
def could_not_compare() -> Iterator[None]:
    """Inside: a LoratoolsError, or an OSError reading an input, means there is no answer (exit 2)."""
    try:
        yield
    except LoratoolsError as e:
        e.exit_code = COULD_NOT_COMPARE
        raise
    except OSError as e:
        known = from_os_error(e, FileFormatError)
        known.exit_code = COULD_NOT_COMPARE
        raise known from None
