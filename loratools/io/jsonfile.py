"""The one JSON reader for everything loratools reads as JSON: safetensors headers, adapter and model configs,
checkpoint indexes, header metadata values. The world writes these, so nothing in them is trusted:

* a size limit, checked before anything is read (and only regular files are opened: a FIFO would block);
* strict UTF-8, no byte-order mark (the reference readers refuse both);
* duplicate keys refused (``json`` silently keeps the last one, serde-based readers the first or neither);
* a nesting depth limit (no ``RecursionError``, however deep the document);
* no ``NaN`` / ``Infinity`` (not JSON; ``json`` accepts them), no float that overflows to infinity
  (``1e400``), no integer past Python's digit limit (4300 digits);
* no lone surrogate in a string (``"\\ud800"``: not Unicode; it breaks printing later).

And the one JSON writer's rule (:func:`dumps`): what loratools prints or writes as JSON is JSON, NaN and
Infinity as strings.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
from pathlib import Path
from typing import Any, NoReturn

from ..errors import FileFormatError, LoratoolsError

#: bytes of a JSON file loratools reads (a config, an index); the largest real indexes are a few MB
MAX_BYTES = 64 * 1024 * 1024
#: nesting of objects and arrays; real configs nest 4-5 levels, safetensors headers 3
MAX_DEPTH = 64


class _Refused(Exception):
    """Raised inside the decoder's hooks; turned into the caller's error class with the document's name."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Refused(f"duplicate key {_short(k)}")
            seen.add(k)
    return out


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {_short(text)} is out of range")
    return value


def _constant(text: str) -> Any:
    raise _Refused(f"{text} is not a JSON value")


def _constant_allowed(text: str) -> float:
    return float(text)


def _short(text: str, n: int = 60) -> str:
    shown = repr(text)
    return shown if len(shown) <= n else shown[: n - 4] + "...'"


def loads(
    data: bytes | str,
    *,
    where: str,
    error: type[LoratoolsError] = FileFormatError,
    max_depth: int = MAX_DEPTH,
    nonfinite: bool = False,
) -> Any:
    """Parse ``data`` as JSON, refusing everything listed in the module's docstring with ``error``
    (``"{where}: ..."``). ``nonfinite`` lets NaN/Infinity through (model configs written by ``json.dumps``)."""

    def fail(why: str) -> NoReturn:
        raise error(f"{where}: {why}") from None

    if isinstance(data, bytes):
        if data.startswith(b"\xef\xbb\xbf"):
            fail("not valid JSON (it starts with a byte-order mark, which JSON does not allow)")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            fail(f"not valid JSON (not UTF-8 at byte {e.start})")
    else:
        text = data
        if text.startswith("\ufeff"):
            fail("not valid JSON (it starts with a byte-order mark, which JSON does not allow)")
    try:
        value = json.loads(
            text,
            object_pairs_hook=_pairs,
            parse_float=_float,  # (integers: Python's own digit limit refuses the huge ones, below)
            parse_constant=_constant_allowed if nonfinite else _constant,
        )
    except _Refused as e:
        fail(str(e))
    except RecursionError:
        fail(f"nested deeper than {max_depth} levels")
    except json.JSONDecodeError as e:
        fail(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
    except ValueError as e:  # int() past sys.get_int_max_str_digits(), or a hook's own conversion
        if "digits" in str(e):
            fail(f"an integer of more than {sys.get_int_max_str_digits()} digits")
        fail(f"not valid JSON ({str(e)[:100]})")
    # lone surrogates only come from \u escapes (UTF-8 cannot carry them); the depth can only pass the limit
    # with more brackets than the limit: the walk is skipped when neither can be
    surrogates = "\\ud" in text or "\\uD" in text
    if surrogates or text.count("[") + text.count("{") > max_depth:
        problem = _check(value, max_depth, surrogates)
        if problem:
            fail(problem)
    return value


def _check(value: Any, max_depth: int, surrogates: bool = True) -> str | None:
    """Depth and (``surrogates``) lone surrogates, iteratively (a recursive walk is what the limit protects
    against); strings are looked at only when they may hold surrogates, containers only to go deeper."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            if depth > max_depth:
                return f"nested deeper than {max_depth} levels"
            for k, x in v.items():
                if surrogates and _surrogate(k):
                    return f"key {_short(k)} holds a lone surrogate (not Unicode)"
                if surrogates or isinstance(x, (dict, list)):
                    stack.append((x, depth + 1))
        elif isinstance(v, list):
            if depth > max_depth:
                return f"nested deeper than {max_depth} levels"
            stack.extend((x, depth + 1) for x in v if surrogates or isinstance(x, (dict, list)))
        elif isinstance(v, str) and surrogates and _surrogate(v):
            return f"string {_short(v)} holds a lone surrogate (not Unicode)"
    return None


def _surrogate(s: str) -> bool:
    if s.isascii():
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def regular_size(p: Path, what: str) -> int:
    """The size of a regular file; a folder, a special file (a FIFO would block the read) or an unreadable path
    is refused before anything is opened."""
    try:
        st = p.stat()
    except FileNotFoundError:
        raise FileFormatError(f"{p}: no such file") from None
    except OSError as e:
        raise FileFormatError(f"{p}: cannot read ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise FileFormatError(f"{p}: is a folder, expected a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise FileFormatError(f"{p}: not a regular file, expected a {what}")
    return st.st_size


def read_bytes(path: str | os.PathLike[str], *, limit: int | None = None, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (default :data:`MAX_BYTES`; checked before reading;
    a special file is refused rather than opened, since a FIFO would block forever)."""
    limit = MAX_BYTES if limit is None else limit
    p = Path(path)
    size = regular_size(p, what)
    if size > limit:
        raise FileFormatError(
            f"{p}: {size} bytes, beyond the {limit} byte limit for a {what}", "is it the file you meant?"
        )
    try:
        with open(p, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as e:
        raise FileFormatError(f"{p}: cannot read ({e.strerror or e})") from None
    if len(data) > limit:  # it grew since the stat
        raise FileFormatError(f"{p}: beyond the {limit} byte limit for a {what}")
    return data


def load(
    path: str | os.PathLike[str],
    *,
    what: str = "JSON file",
    limit: int | None = None,
    nonfinite: bool = False,
) -> Any:
    """Read and parse a JSON file (see :func:`loads`); errors are :class:`FileFormatError` naming the path."""
    return loads(read_bytes(path, limit=limit, what=what), where=str(path), nonfinite=nonfinite)


def load_object(
    path: str | os.PathLike[str],
    *,
    what: str = "JSON file",
    limit: int | None = None,
    nonfinite: bool = False,
) -> dict[str, Any]:
    """:func:`load`, and the document must be a JSON object."""
    value = load(path, what=what, limit=limit, nonfinite=nonfinite)
    if not isinstance(value, dict):
        raise FileFormatError(f"{path}: a {what} must be a JSON object, this is {kind(value)}")
    return value


def kind(value: Any) -> str:
    """A JSON value's kind in words, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def finite(value: Any) -> Any:
    """``value`` with every NaN / Infinity as a string (``"nan"``, ``"inf"``, ``"-inf"``): JSON has neither, so a
    bad adapter's numbers still give a document every JSON reader (a browser, ``jq``) takes."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`finite` ``(value)``, refusing NaN / Infinity should one slip through."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)
