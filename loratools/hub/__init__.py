"""The Hugging Face Hub: read adapters and checkpoints by repo id, and publish adapters with a model card.

Thin over ``huggingface_hub``, which owns the token (``get_token``), the environment (its ``constants``), the cache
(``hf_hub_download``, ``try_to_load_from_cache``, ``snapshot_download``) and model cards (``ModelCard``); loratools
plans which files a command needs, checks every answer of the Hub before it is used (a listing's names, a file's
commit and ETag, a header's bytes), keeps each request to a deadline, and turns every failure into one
:class:`~loratools.errors.HubError` line with a hint, never holding the token.

One module per job: :mod:`.ids` (repo ids, revisions), :mod:`.env` (the environment), :mod:`.watch` (deadlines and
checks on answers), :mod:`.errors` (failures as messages), :mod:`.filelist` (a repo's file list), :mod:`.plan`
(which files), :mod:`.download` (into the cache), :mod:`.headers` (header-only views), :mod:`.sources` (a SOURCE as a local path), :mod:`.selection` (what a push
uploads), :mod:`.card` (front matter), :mod:`.upload` (the upload). hub knows no ``ops``: a model card is made from an
inspect report by ``loratools.ops.card``, and the CLI composes the two.
"""

from __future__ import annotations

from .download import OnBytes, fetch
from .env import DEADLINE_VAR, HubEnv, deadline, environment
from .errors import hub_error
from .filelist import listing
from .headers import fetch_headers
from .ids import DEFAULT_REVISION, PREFIX, RepoRef, is_model_id, is_repo_id, parse_repo_ref, printable
from .plan import FetchKind, Plan, plan_adapter, plan_checkpoint
from .selection import (
    BROKEN,
    COMPANIONS,
    HIDDEN,
    LINK_DIR,
    LINK_HIDDEN,
    LINK_OUT,
    OTHER,
    OTHER_PICKLE,
    PICKLE,
    SPECIAL,
    LeftOut,
    Selection,
    include_problem,
    select,
)
from .sources import fetch_if_repo, origin
from .upload import PushFile, PushReport, push, target

__all__ = [
    "BROKEN", "COMPANIONS", "DEADLINE_VAR", "DEFAULT_REVISION", "HIDDEN", "LINK_DIR", "LINK_HIDDEN", "LINK_OUT",
    "OTHER", "OTHER_PICKLE", "PICKLE", "PREFIX", "SPECIAL", "HubEnv", "FetchKind", "LeftOut", "OnBytes", "Plan",
    "PushFile", "PushReport", "RepoRef", "Selection", "deadline", "environment", "fetch", "fetch_headers", "fetch_if_repo",
    "hub_error", "include_problem", "is_model_id", "is_repo_id", "listing", "origin", "parse_repo_ref", "plan_adapter",
    "plan_checkpoint", "printable", "push", "select", "target",
]  # fmt: skip
