"""A repo's file list at a revision: fetched by loratools through huggingface_hub's HTTP client (within the
deadline) and checked before anything plans with it, since every name in it becomes a path in the cache.

huggingface_hub's own ``model_info`` parses the whole answer into typed objects and fails on junk in fields loratools
never reads (a sibling's ``lfs`` that is not an object); this reader looks only at what loratools uses: the repo's
``id``, the commit ``sha`` and the ``rfilename`` of each sibling."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..errors import HubError, LoratoolsError
from ..io import jsonfile
from .env import HubEnv, deadline, environment, headers, timeout
from .ids import CONTROL_RE, DEFAULT_REVISION, is_commit, show
from .watch import ANSWER_LIMIT, Watch, watching

#: the most files a repo's file list may name
MAX_FILES = 100_000
#: the longest file name in a repo
MAX_NAME = 1000


def bad_name(name: object) -> str | None:
    """Why ``name`` cannot be a file of a repo (it becomes a path in the cache), or None."""
    if not isinstance(name, str):
        return f"a file name that is {'null' if name is None else type(name).__name__ + ' ' + show(name)}"
    if not name:
        return "an empty file name"
    if len(name) > MAX_NAME:
        return f"a file name of {len(name)} characters"
    if CONTROL_RE.search(name):
        return f"a file name with control characters ({show(name)})"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return f"an absolute file name ({show(name)})"
    if ".." in name.replace("\\", "/").split("/"):  # a way out of the cache, on any system (as huggingface_hub checks)
        return f"a file name with a '..' part ({show(name)})"
    if any(p in ("", ".") for p in name.split("/")):
        return f"a file name with an empty or '.' part ({show(name)})"
    return None


def parse_listing(data: bytes, repo_id: str, revision: str, where: str) -> tuple[str, set[str]]:
    """A repo's commit and file names, from the Hub's model-info answer; anything that is not one is a HubError."""

    def bad(problem: str) -> HubError:
        return HubError(
            f"the Hub at {where} sent a broken file list for {repo_id}: {problem}",
            "is HF_ENDPOINT a Hugging Face Hub (or a mirror of one)? try again later",
        )

    try:  # the one JSON reader: UTF-8, no duplicate keys, bounded nesting
        info = jsonfile.loads(data, where="it")
    except LoratoolsError as e:
        raise bad(e.message.removeprefix("it: ")) from None
    if not isinstance(info, dict):
        raise bad(f"a JSON {type(info).__name__}, not an object")
    if not isinstance(info.get("id"), str) or not info["id"]:
        raise bad("no repo id ('id')" if info.get("id") is None else f"the repo id is {show(info['id'])}")
    sha = info.get("sha")
    if sha is None:
        raise bad("no commit ('sha')")
    if not isinstance(sha, str) or not is_commit(sha):
        raise bad(f"the commit ('sha') is {show(sha)}, not a commit id")
    if is_commit(revision) and sha != revision:
        raise bad(f"it is of commit {sha}, not of the commit {revision} asked for")
    siblings = info.get("siblings")
    if not isinstance(siblings, list):
        raise bad("no list of files ('siblings')" if siblings is None else "'siblings' is not a list")
    if len(siblings) > MAX_FILES:
        raise bad(f"{len(siblings)} files, more than {MAX_FILES}")
    files: set[str] = set()
    for i, sibling in enumerate(siblings):
        if not isinstance(sibling, dict) or "rfilename" not in sibling:
            raise bad(f"entry {i} of 'siblings' has no file name ('rfilename')")
        name = sibling["rfilename"]
        problem = bad_name(name)
        if problem:
            raise bad(f"entry {i} of 'siblings' has {problem}")
        if name in files:
            raise bad(f"it lists {show(name)} twice")
        files.add(name)
    folders = {f[:i] for f in files for i, c in enumerate(f) if c == "/"}
    both = sorted(files & folders)
    if both:
        raise bad(f"{show(both[0])} is both a file and a folder")
    return sha, files


def listing(repo_id: str, revision: str | None = None, env: HubEnv | None = None) -> tuple[str, set[str]]:
    """The commit ``revision`` of ``repo_id`` is at, and the names of its files, checked (see :func:`parse_listing`),
    within the deadline. Errors of the Hub are raised as huggingface_hub raises them (see :func:`.errors.hub_error`)."""
    from huggingface_hub import get_session, hf_raise_for_status

    env = env or environment()
    rev = revision or DEFAULT_REVISION
    url = f"{env.endpoint}/api/models/{repo_id}/revision/{quote(rev, safe='')}"
    with watching(Watch(f"the file list of {repo_id}", env.host, deadline(), listing=True)):
        response = get_session().get(url, headers=headers(env), timeout=timeout())
        hf_raise_for_status(response)
        data = response.content
    return parse_listing(data, repo_id, rev, env.host)


def load_json(path: Path, what: str) -> Any:
    """A JSON file of a repo (an index), within :data:`ANSWER_LIMIT`, through the one JSON reader."""
    return jsonfile.loads(jsonfile.read_bytes(path, limit=ANSWER_LIMIT, what="JSON file of a model"), where=what)
