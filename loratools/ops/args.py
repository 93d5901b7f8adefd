"""The arguments of the library's public functions, checked before any file is read.

A wrong type or value (``None`` for a path, a string where a list is expected, a negative rank, NaN, a weight
list of the wrong length, an unknown name) is a :class:`~loratools.errors.UsageError` with a one-line message
that names the argument, never a ``TypeError`` or ``AttributeError`` from deep inside. Each checker returns the
value (normalised where said) so that a function can check and bind in one line.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Collection
from typing import Any

from ..errors import UsageError

#: device names the linear algebra accepts (whether a GPU is there is checked when the work starts)
DEVICE = re.compile(r"cpu|cuda(:\d{1,3})?")


def _kind(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def path(value: Any, name: str) -> Any:
    """A str or os.PathLike naming a path: not empty, no NUL (which no file system accepts)."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(text, str):
        raise UsageError(f"{name} must be a path (str or os.PathLike), not {_kind(value)}", param=name)
    if not text:
        raise UsageError(f"{name} is an empty path", param=name)
    if "\0" in text:
        raise UsageError(f"{name} {text!r} holds a NUL character: no file system accepts it", param=name)
    return value


def optional_path(value: Any, name: str) -> Any:
    return None if value is None else path(value, name)


def path_list(value: Any, name: str, *, at_least: int = 1) -> list[Any]:
    """A list or tuple of paths (a single path or a string is refused: it is not a list of inputs)."""
    if not isinstance(value, (list, tuple)):
        what = "a single path" if isinstance(value, (str, bytes, os.PathLike)) else _kind(value)
        raise UsageError(f"{name} must be a list of paths, not {what}", param=name)
    if len(value) < at_least:
        raise UsageError(f"{name} needs at least {at_least} path(s), got {len(value)}", param=name)
    for i, v in enumerate(value):
        path(v, f"{name}[{i}]")
    return list(value)


def strings(value: Any, name: str) -> list[str]:
    """A list or tuple of strings (a bare string is refused: iterating it would give its characters)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise UsageError(f"{name} must be a list of strings, not {_kind(value)}", param=name)
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise UsageError(f"{name}[{i}] must be a string, not {_kind(v)}", param=name)
    return list(value)


def integer(value: Any, name: str, *, minimum: int = 1) -> int | None:
    """None, or an int (not a bool, not a float) of at least ``minimum``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UsageError(f"{name} must be an integer, not {_kind(value)}", param=name)
    if value < minimum:
        raise UsageError(f"{name} must be at least {minimum}, not {value}", param=name)
    return int(value)


def number(value: Any, name: str, *, minimum: float | None = None, finite: bool = True) -> float:
    """A real number (not a bool), never NaN; infinite only when ``finite`` is False."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{name} must be a number, not {_kind(value)}", param=name)
    try:
        x = float(value)
    except OverflowError:
        raise UsageError(f"{name} is too large for a float", param=name) from None
    if math.isnan(x) or (finite and math.isinf(x)):
        raise UsageError(f"{name} must be a {'finite ' if finite else ''}number, not {x}", param=name)
    if minimum is not None and x < minimum:
        least = "non-negative" if minimum == 0 else f"at least {minimum:g}"
        raise UsageError(f"{name} must be {least}, not {x:g}", param=name)
    return x


def fraction(value: Any, name: str) -> float | None:
    """None, or a number in (0, 1]."""
    if value is None:
        return None
    x = number(value, name)
    if not 0 < x <= 1:
        raise UsageError(f"{name} must be a fraction in (0, 1], not {x:g}", param=name)
    return x


def flag(value: Any, name: str) -> bool:
    """True or False, nothing merely truthy (``force="no"`` must not overwrite anything)."""
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be True or False, not {_kind(value)}", param=name)
    return value


def choice(value: Any, name: str, choices: Collection[str], *, optional: bool = True) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, str) or value not in choices:
        shown = repr(value) if isinstance(value, str) else _kind(value)
        raise UsageError(f"unknown {name} {shown}", "use one of " + ", ".join(choices), param=name)
    return value


def text(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise UsageError(f"{name} must be a string, not {_kind(value)}", param=name)
    return value


def callback(value: Any, name: str) -> None:
    if value is not None and not callable(value):
        raise UsageError(f"{name} must be callable, not {_kind(value)}", param=name)


def device(value: Any) -> str | None:
    """None, ``cpu``, ``cuda`` or ``cuda:N`` (whether a GPU is there is checked when the work starts)."""
    if value is None:
        return None
    if not isinstance(value, str) or not DEVICE.fullmatch(value):
        shown = repr(value) if isinstance(value, str) else _kind(value)
        raise UsageError(f"unknown device {shown}", "use cpu, cuda or cuda:N", param="device")
    return value


def weights(value: Any, count: int, what: str = "input") -> list[float]:
    """One finite number per input (a list or tuple: a string such as ``"0.5,0.5"`` is refused)."""
    if not isinstance(value, (list, tuple)):
        raise UsageError(f"weights must be a list of numbers, not {_kind(value)}", param="weights")
    if len(value) != count:
        raise UsageError(
            f"{len(value)} weight(s) for {count} {what}(s)", f"give one weight per {what}", param="weights"
        )
    return [number(w, f"weights[{i}]") for i, w in enumerate(value)]


def one_of(name_a: str, a: Any, name_b: str, b: Any) -> None:
    """Exactly one of two arguments is given."""
    if (a is None) == (b is None):
        raise UsageError(f"give exactly one of {name_a} and {name_b}")


def regexes(value: Any, name: str) -> list[re.Pattern[str]]:
    """A list of regular expressions, compiled."""
    out = []
    for p in strings(value, name):
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise UsageError(f"{name} {p!r}: not a regular expression ({e})", param=name) from None
    return out
