"""What a SOURCE names on the Hub: ``owner/name`` or ``owner/name/path/in/repo`` (``hf://`` in front forces the
Hub), and revisions; both are checked before they become a URL or a path in the cache."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import LoratoolsError

PREFIX = "hf://"
DEFAULT_REVISION = "main"

_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_RE = re.compile(rf"^({_PART})/({_PART})(?:/(.+))?$")
_MODEL_ID_RE = re.compile(rf"^(?:{_PART}/)?{_PART}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class RepoRef:
    """``owner/name``, and optionally a file or folder inside the repo."""

    repo_id: str
    path: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}/{self.path}" if self.path else self.repo_id


def parse_repo_ref(arg: str) -> RepoRef | None:
    """``owner/name[/path/in/repo]`` (an optional ``hf://`` in front), or None when ``arg`` is not of that form."""
    text = arg[len(PREFIX) :] if arg.startswith(PREFIX) else arg
    m = _REPO_RE.match(text.rstrip("/"))
    if m is None or "\\" in text:
        return None
    owner, name, path = m.groups()
    if any("--" in p or ".." in p for p in (owner, name)):
        return None
    if path is not None:
        parts = path.split("/")
        if any(p in ("", ".", "..") for p in parts) or CONTROL_RE.search(path):
            return None
    return RepoRef(f"{owner}/{name}", path)


def is_repo_id(arg: str) -> bool:
    """True for ``owner/name`` or ``owner/name/path/in/repo`` that is not an existing local path, and for anything
    written ``hf://owner/name...``."""
    if arg.startswith(PREFIX):
        return parse_repo_ref(arg) is not None
    if os.path.lexists(arg):
        return False
    return parse_repo_ref(arg) is not None


def is_model_id(value: str | None) -> bool:
    """A string the Hub accepts as a model id in a card (``owner/name``, or a legacy bare ``name``)."""
    return bool(value) and _MODEL_ID_RE.match(value or "") is not None and ".." not in (value or "")


def is_commit(value: str) -> bool:
    """A full commit id (40 lower-case hex digits), as the Hub names commits."""
    return _COMMIT_RE.match(value) is not None


def printable(name: str) -> str:
    """A file name for a one-line message: as it is, or quoted with its control characters escaped."""
    return repr(name) if CONTROL_RE.search(name) else name


def show(value: object, limit: int = 80) -> str:
    """A value from the world, quoted for a one-line message (control characters escaped, long text cut)."""
    text = str(value)
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def check_revision(rev: str) -> None:
    """A revision becomes a path in the cache (``refs/<rev>``): a branch, tag or commit, never a way out of it."""
    parts = rev.split("/")
    bad = not rev or len(rev) > 256 or rev.startswith("/") or CONTROL_RE.search(rev) or "\\" in rev or ".." in parts
    if bad or any(p in ("", ".") for p in parts):
        raise LoratoolsError(f"{show(rev)} is not a revision", "give a branch, tag or commit of the repo")
