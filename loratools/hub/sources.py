"""A SOURCE as the commands take it: a local path as it is, or a Hub repo id fetched (whole, or as a header-only
view), and the name a fetched source is recorded under."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LoratoolsError
from .download import OnBytes, fetch_as
from .headers import fetch_headers_as
from .ids import PREFIX, is_repo_id
from .plan import FetchKind


def fetch_if_repo(
    arg: str,
    *,
    revision: str | None = None,
    kind: FetchKind = "adapter",
    on_bytes: OnBytes | None = None,
    headers_into: str | os.PathLike[str] | None = None,
) -> Path:
    """What every command calls on a SOURCE: a local path as it is, a Hub repo id fetched (see
    :func:`.download.fetch`), or with ``headers_into`` a header-only view built in that folder (see
    :func:`.headers.fetch_headers`).

    A SOURCE that is neither an existing local path nor of a repo id's form is returned as it is, for the reader to
    say that no such file exists; one of a repo id's form that names no local path is looked up on the Hub, and its
    error then says both: ``a/b: no such local file or folder, and no repo a/b on huggingface.co``."""
    if is_repo_id(arg):
        local = None if arg.startswith(PREFIX) else arg
        if headers_into is not None:
            return fetch_headers_as(arg, headers_into, revision, kind, on_bytes, local)
        return fetch_as(arg, revision, kind, on_bytes, local)
    if revision is not None:
        raise LoratoolsError(f"--revision applies to Hub repo ids, and {arg} is a local path", "leave out --revision")
    return Path(arg)


def origin(arg: str, revision: str | None = None) -> str | None:
    """How a SOURCE fetched from the Hub is named in a provenance record (``owner/name[/file][@revision]``), or None
    for a local path."""
    return arg + (f"@{revision}" if revision else "") if is_repo_id(arg) else None
