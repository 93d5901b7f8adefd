"""Regular expressions that come from outside: PEFT configs (``rank_pattern``, ``alpha_pattern``,
``target_modules``, ...) and the command line (``extract --include``). They are matched with exactly the
semantics of Python's ``re`` (what PEFT uses) but at bounded cost: ``re`` cannot be interrupted, and a pattern
such as ``(.|.)*[XY]`` takes it hours on a module name.

How: the pattern is checked and parsed by ``re``'s own parser (so exactly the patterns ``re`` accepts are
accepted, and an invalid one is refused, as PEFT fails on it), the parse tree is written back out in a syntax
that the ``regex`` module reads the same way (every literal escaped, so ``regex``'s extensions such as
``[[:alpha:]]`` or ``a{e<=1}`` cannot change a meaning), and ``regex`` matches it with a time budget. The time
is counted per pattern set (a config's ``rank_pattern``, say) over all the names it is matched against, so a
hostile config costs at most :data:`BUDGET` seconds per field before it is refused with an error naming the
pattern. Patterns made only of name characters and dots (nearly every real one) cannot backtrack
catastrophically and are not counted.
"""

from __future__ import annotations

import functools
import importlib
import re
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import FileFormatError, LoratoolsError

#: CPU seconds of matching a pattern set may spend, over all names, before it is refused as pathological (CPU
#: time is what regex's timeout counts; on a loaded machine the wall-clock time is longer)
BUDGET = 2.0
#: characters of one pattern (loratools' own extract writes alternations of every module path: tens of KB)
MAX_PATTERN = 256 * 1024
#: characters of a name matched against a pattern; no module path comes near it
MAX_NAME = 4096
#: names remembered per pattern set (a name is matched once, however many times it is asked about)
MEMO = 1 << 16

Mode = Literal["peft", "fullmatch", "search"]

_LITERAL = re.compile(r"[A-Za-z0-9_\-.]*")

try:  # Python >= 3.11
    _P: Any = importlib.import_module("re._parser")
    _C: Any = importlib.import_module("re._constants")
except ImportError:  # pragma: no cover - Python 3.10
    _P = importlib.import_module("sre_parse")
    _C = importlib.import_module("sre_constants")


class _Untranslatable(Exception):
    pass


def peft_compose(key: str) -> str:
    """PEFT's ``get_pattern_key``: ``re.match(rf"(.*\\.)?({key})$", name)``."""
    return rf"(.*\.)?({key})$"


# ---- re's parse tree -> regex syntax ----------------------------------------------------------------------
#
# Exactness: literals, ranges, `.`, groups, repeats, alternation, anchors, lookarounds and backreferences mean the
# same in both engines. Character classes (\d \w \s \b) and case-insensitive matching do not (re follows
# str.isalnum / str.isspace and its own case table, regex the Unicode properties): they are written out as
# explicit ASCII sets, which both engines read alike, and a pattern that uses them in Unicode mode, or matches
# case-insensitively, is matched against ASCII names only (a non-ASCII name is refused, not guessed at).

_FLAGS = (("i", 2), ("m", 8), ("s", 16))  # IGNORECASE, MULTILINE, DOTALL
_IGNORECASE, _UNICODE, _ASCII = 2, 32, 256

_WORD = "A-Za-z0-9_"
#: the ASCII members of each class: Unicode mode (str.isspace counts \x1c-\x1f) and ASCII mode
_CLASSES = {
    "DIGIT": ("0-9", "0-9"),
    "WORD": (_WORD, _WORD),
    "SPACE": ("\\x09-\\x0d\\x1c-\\x20", "\\x09-\\x0d\\x20"),
}
_ANYCHAR = "[\\x00-\\U0010ffff]"


def _flags(bits: int) -> str:
    return "".join(c for c, b in _FLAGS if bits & b)


def _lit(c: int) -> str:
    ch = chr(c)
    if ch.isascii() and (ch.isalnum() or ch == "_"):
        return ch
    if c < 0x100:
        return f"\\x{c:02x}"
    if c < 0x10000:
        return f"\\u{c:04x}"
    return f"\\U{c:08x}"


def _repeat(lo: int, hi: int) -> str:
    return f"{{{lo},}}" if hi == _C.MAXREPEAT else f"{{{lo},{hi}}}"


class _Writer:
    """Writes one parse tree in ``regex`` syntax; ``ascii_only`` ends up true when the result is exact for
    ASCII names only (see above)."""

    def __init__(self) -> None:
        self.ascii_only = False

    def lit(self, c: int, flags: int) -> str:
        if flags & _IGNORECASE:
            self.ascii_only = True
            if c >= 0x80:
                raise _Untranslatable("a case-insensitive non-ASCII character")
        return _lit(c)

    def category(self, cat: Any, flags: int) -> tuple[str, bool]:
        """(the class's ASCII members, negated?)"""
        name = str(cat).removeprefix("CATEGORY_")
        negated = name.startswith("NOT_")
        name = name.removeprefix("NOT_")
        if name not in _CLASSES:
            raise _Untranslatable(str(cat))
        if not flags & _ASCII:
            self.ascii_only = True
        return _CLASSES[name][1 if flags & _ASCII else 0], negated

    def set(self, items: Any, flags: int) -> str:
        positive: list[str] = []
        complements: list[str] = []
        negate = False
        for op, av in items:
            name = str(op)
            if name == "NEGATE":
                negate = True
            elif name == "LITERAL":
                positive.append(self.lit(av, flags))
            elif name == "RANGE":
                positive.append(f"{self.lit(av[0], flags)}-{self.lit(av[1], flags)}")
            elif name == "CATEGORY":
                members, negated = self.category(av, flags)
                (complements if negated else positive).append(members)
            else:
                raise _Untranslatable(name)
        if not complements:
            return "[" + ("^" if negate else "") + "".join(positive) + "]"
        union = [f"[^{c}]" for c in complements] + (["[" + "".join(positive) + "]"] if positive else [])
        either = "(?:" + "|".join(union) + ")"
        return f"(?:(?!{either}){_ANYCHAR})" if negate else either

    def at(self, code: Any, flags: int) -> str:
        name = str(code)
        simple = {"AT_BEGINNING": "^", "AT_BEGINNING_STRING": r"\A", "AT_END": "$", "AT_END_STRING": r"\Z"}
        if name in simple:
            return simple[name]
        if name not in ("AT_BOUNDARY", "AT_NON_BOUNDARY"):
            raise _Untranslatable(name)
        if not flags & _ASCII:
            self.ascii_only = True
        w = f"[{_WORD}]"
        if name == "AT_BOUNDARY":
            return f"(?:(?<={w})(?!{w})|(?<!{w})(?={w}))"
        # re's \B never matches in an empty string
        return rf"(?:(?!\A\Z)(?:(?<={w})(?={w})|(?<!{w})(?!{w})))"

    def emit(self, sub: Any, flags: int) -> str:
        if flags & _IGNORECASE:
            self.ascii_only = True
        out = []
        for op, av in sub:
            name = str(op)
            if name == "LITERAL":
                out.append(self.lit(av, flags))
            elif name == "NOT_LITERAL":
                out.append(f"[^{self.lit(av, flags)}]")
            elif name == "ANY":
                out.append(".")
            elif name == "IN":
                out.append(self.set(av, flags))
            elif name == "CATEGORY":
                out.append(self.set([(op, av)], flags))
            elif name == "AT":
                out.append(self.at(av, flags))
            elif name == "BRANCH":
                out.append("(?:" + "|".join(self.emit(alt, flags) for alt in av[1]) + ")")
            elif name == "SUBPATTERN":
                group, add, remove, inner = av
                # re's _combine_flags: a scoped a/u replaces the type flag; the classes above follow it, so
                # only i, m and s need saying to regex
                scoped = (flags & ~(_ASCII | _UNICODE) if add & (_ASCII | _UNICODE) else flags) | add
                body = self.emit(inner, scoped & ~remove)
                on, off = _flags(add), _flags(remove)
                if on or off:
                    body = f"(?{on}{'-' + off if off else ''}:{body})"
                out.append(f"({body})" if group is not None else f"(?:{body})")
            elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                lo, hi, item = av
                lazy = {"MAX_REPEAT": "", "MIN_REPEAT": "?", "POSSESSIVE_REPEAT": "+"}[name]
                out.append(f"(?:{self.emit(item, flags)}){_repeat(lo, hi)}{lazy}")
            elif name == "GROUPREF":
                out.append(f"(?:\\g<{av}>)")
            elif name == "GROUPREF_EXISTS":
                gid, yes, no = av
                tail = f"|{self.emit(no, flags)}" if no is not None else ""
                out.append(f"(?({gid}){self.emit(yes, flags)}{tail})")
            elif name in ("ASSERT", "ASSERT_NOT"):
                direction, inner = av
                kind = ("=" if name == "ASSERT" else "!") if direction == 1 else ("<=" if name == "ASSERT" else "<!")
                out.append(f"(?{kind}{self.emit(inner, flags)})")
            elif name == "ATOMIC_GROUP":
                out.append(f"(?>{self.emit(av, flags)})")
            else:
                raise _Untranslatable(name)
        return "".join(out)


def translate(pattern: str) -> tuple[str, bool]:
    """``pattern`` (Python ``re`` syntax, already known to compile) in ``regex`` syntax with the same meaning,
    and whether that holds for ASCII names only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = _P.parse(pattern)
    flags = tree.state.flags
    if not flags & _ASCII:
        flags |= _UNICODE  # re's fix_flags, for a str pattern
    w = _Writer()
    body = w.emit(tree, flags)
    prefix = _flags(flags)
    return (f"(?{prefix})" if prefix else "") + body, w.ascii_only


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> Any:
    """The ``regex`` object for ``pattern``, or the reason it cannot be had (a string)."""
    import regex

    if len(pattern) > MAX_PATTERN:
        return f"longer than {MAX_PATTERN} characters"
    try:
        with warnings.catch_warnings():  # re's FutureWarning about `[[` is not the user's business here
            warnings.simplefilter("ignore")
            re.compile(pattern)
    except re.error as e:
        return f"not a valid regular expression ({e})"
    except (RecursionError, OverflowError, MemoryError):
        return "not a regular expression loratools can compile (too deeply nested or too large)"
    try:
        text, ascii_only = translate(pattern)
        return _Regex(regex.compile(text, regex.VERSION0), ascii_only)
    except (_Untranslatable, regex.error, RecursionError, OverflowError, MemoryError) as e:
        return f"a construct loratools cannot match with bounded cost ({str(e)[:80]})"


@dataclass(frozen=True)
class _Regex:
    compiled: Any
    ascii_only: bool  # exact for ASCII names only


def _shown(pattern: str) -> str:
    text = repr(pattern)
    return text if len(text) <= 80 else text[:76] + "...'"


# ---- pattern sets -----------------------------------------------------------------------------------------


class PatternSet:
    """The patterns of one config field (or one option), matched with one time budget."""

    def __init__(self, patterns: Sequence[str], what: str, mode: Mode, error: type[LoratoolsError]) -> None:
        self.patterns = list(patterns)
        self.what = what
        self.mode = mode
        self.error = error
        self.spent = 0.0
        self.memo: dict[tuple[str, bool], str | None] = {}
        self._objects: list[_Regex] = []
        self._counted: list[bool] = []
        for p in self.patterns:
            if not isinstance(p, str):
                raise error(f"{what}: pattern {p!r} is not a string")
            full = peft_compose(p) if mode == "peft" else p
            obj = _compiled(full)
            if isinstance(obj, str):
                raise error(
                    f"{what} {_shown(p)}: {obj}",
                    "PEFT fails on it too; fix or remove the pattern" if mode != "search" else None,
                )
            self._objects.append(obj)
            self._counted.append(_LITERAL.fullmatch(p) is None)

    def _hit(self, i: int, name: str) -> bool:
        rx = self._objects[i]
        if rx.ascii_only and not name.isascii():
            raise self.error(
                f"{self.what} {_shown(self.patterns[i])}: the pattern uses \\d, \\w, \\s, \\b or (?i), which "
                f"Python's re reads its own way outside ASCII, and the name {_shown(name)} is not ASCII",
                "spell the characters out ([0-9], [A-Za-z_], [Qq], ...) instead",
            )
        obj = rx.compiled
        call = obj.search if self.mode == "search" else obj.fullmatch if self.mode == "fullmatch" else obj.match
        if not self._counted[i]:
            return call(name) is not None
        left = BUDGET - self.spent
        t0 = time.process_time()  # the clock regex's timeout runs on: CPU seconds of this process
        try:
            if left <= 0:
                raise TimeoutError
            return call(name, timeout=left) is not None
        except TimeoutError:
            raise self.error(
                f"{self.what} {_shown(self.patterns[i])}: matching takes too long (over {BUDGET:g} s of CPU), "
                "the pattern backtracks catastrophically",
                "Python's re (PEFT) would hang on it; simplify the pattern (no nested repeats like (a|a)*)",
            ) from None
        finally:
            self.spent += time.process_time() - t0

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str):
            raise self.error(f"{self.what}: cannot match a name that is not a string ({name!r})")
        if len(name) > MAX_NAME:
            raise self.error(
                f"{self.what}: a name of {len(name)} characters is too long to match patterns against "
                f"(limit {MAX_NAME}): {_shown(name)}"
            )

    def first(self, name: str) -> str | None:
        """The first pattern, in order, that matches ``name`` (PEFT's ``get_pattern_key``)."""
        key = (name, False)
        if key in self.memo:
            return self.memo[key]
        self._check_name(name)
        found = next((p for i, p in enumerate(self.patterns) if self._hit(i, name)), None)
        self._remember(key, found)
        return found

    def any(self, name: str) -> bool:
        return self.first(name) is not None

    def _remember(self, key: tuple[str, bool], value: str | None) -> None:
        if len(self.memo) >= MEMO:
            self.memo.clear()
        self.memo[key] = value


#: pattern sets by (patterns, what, mode, error), most recently used last
_SETS: OrderedDict[tuple[Any, ...], PatternSet] = OrderedDict()
_SETS_KEPT = 256


def pattern_set(
    patterns: Sequence[str], what: str, mode: Mode, error: type[LoratoolsError] = FileFormatError
) -> PatternSet:
    """The (cached) pattern set for these patterns: the same config asked about again reuses its matches and
    its budget. Raises ``error`` for a pattern that is not a valid ``re`` pattern."""
    try:
        key = tuple(patterns)
        hash(key)
    except TypeError:
        raise error(f"{what}: patterns must be strings") from None
    cache_key = (key, what, mode, error)
    found = _SETS.get(cache_key)
    if found is None:
        found = _SETS[cache_key] = PatternSet(key, what, mode, error)
        while len(_SETS) > _SETS_KEPT:
            _SETS.popitem(last=False)
    _SETS.move_to_end(cache_key)
    return found


def pattern_key(patterns: Sequence[str], name: str, what: str) -> str | None:
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: the first key, in insertion order, for which
    ``re.match(rf"(.*\\.)?({key})$", name)`` matches; ``None`` when none does."""
    if not patterns:
        return None
    return pattern_set(patterns, what, "peft").first(name)


def fullmatch(pattern: str, name: str, what: str) -> bool:
    """PEFT's rule for a ``target_modules`` (or ``exclude_modules``) string: ``re.fullmatch(pattern, name)``."""
    return pattern_set((pattern,), what, "fullmatch").any(name)


def check(patterns: Sequence[str], what: str, mode: Mode) -> None:
    """Refuse (``FileFormatError``) a pattern that ``re`` would refuse, before any matching."""
    pattern_set(patterns, what, mode)
