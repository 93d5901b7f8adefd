"""Publishing an adapter: what :func:`.selection.select` picked, and the card the caller made (``ops.card`` renders
one from an inspect report), go up in one commit. hub knows nothing of inspect: it gets the card's body and its
metadata, and owns only how they meet an existing README.md (see :mod:`.card`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FileFormatError, HubError, LoratoolsError
from .card import compose, filled, updated
from .download import download
from .env import HubEnv, api, deadline, environment
from .errors import hub_error
from .filelist import listing
from .ids import DEFAULT_REVISION, PREFIX, RepoRef, check_revision, parse_repo_ref
from .selection import CARD, LeftOut, Selection


@dataclass
class PushFile:
    path: str  # path in the repo
    size: int
    source: str  # the local file, or "generated" for a model card made by loratools


@dataclass
class PushReport:
    source: str
    repo_id: str
    revision: str
    format: str
    files: list[PushFile]
    card: str | None  # the README.md loratools uploads (made or updated), None when it uploads none of its own
    #: generated | updated | filled (the folder's PEFT template, its empty base_model filled in) | kept (the folder's
    #: own README.md) | kept-remote (the repo's stays)
    card_action: str
    skipped: list[str] = field(default_factory=list)  # every path left out (left_out says why)
    dry_run: bool = False
    private: bool = False
    create_pr: bool = False
    url: str | None = None
    commit_url: str | None = None
    commit: str | None = None
    pr_url: str | None = None
    left_out: list[LeftOut] = field(default_factory=list)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_size"] = self.total_size
        return d


def target(repo_id: str, revision: str | None = None, create_pr: bool = False) -> tuple[str, str]:
    """The repo and branch a push goes to, checked before anything is read: ``owner/name`` (no path in it), and a
    branch, or a pull request against main."""
    ref = parse_repo_ref(repo_id)
    if ref is None or ref.path is not None or repo_id.startswith(PREFIX):
        raise LoratoolsError(f"{repo_id!r} is not a Hub repo id", "write owner/name, e.g. me/llama-lora")
    if create_pr and revision not in (None, DEFAULT_REVISION):
        raise LoratoolsError(
            "--create-pr opens a pull request against main; it cannot go with --revision",
            "push to a branch with --revision, or open a pull request with --create-pr",
        )
    rev = revision or DEFAULT_REVISION
    check_revision(rev)
    return ref.repo_id, rev


def _card_text(path: Path, name: str = CARD) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FileFormatError(f"{name}: not UTF-8 text") from None
    except OSError as e:
        raise FileFormatError(f"{name}: cannot be read ({e.strerror or type(e).__name__})") from None


def push(
    selection: Selection,
    repo_id: str,
    *,
    format: str,
    card: str,
    metadata: dict[str, Any],
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
    update_card: bool = False,
) -> PushReport:
    """Upload what ``selection`` picked (see :func:`.selection.select`) to ``repo_id`` in one commit, creating the repo
    (and branch) if needed. ``card`` is the body of a model card for a folder without a README.md, ``metadata`` its
    front matter (also what ``update_card`` writes into an existing README.md, the folder's or else the repo's);
    ``format`` names the adapter's format in the commit message. The source is never modified: a card is uploaded
    from memory. ``dry_run`` makes no request at all."""
    repo_id, rev = target(repo_id, revision, create_pr)
    env = environment()
    entries = list(selection.entries)
    text: str | None = None
    readme = selection.readme
    if readme is None:
        text, action = compose(metadata, card), "generated"
    elif update_card:
        text, action = updated(_card_text(readme), metadata), "updated"
    else:
        text = filled(_card_text(readme), metadata)
        action = "filled" if text is not None else "kept"
    if text is not None:
        entries = [(rel, p) for rel, p in entries if rel != CARD]
    if text is not None and env.token and env.token in text:
        raise LoratoolsError(
            "refusing to upload the model card: it would hold the Hugging Face token in use",
            "the adapter's config or metadata holds the token: remove it",
        )
    out = PushReport(
        source=str(selection.source), repo_id=repo_id, revision=rev, format=format,
        files=[PushFile(rel, p.stat().st_size, str(p)) for rel, p in entries], card=text, card_action=action,
        skipped=[lo.path for lo in selection.left_out], dry_run=dry_run, private=private, create_pr=create_pr,
        url=env.web_url(repo_id), left_out=list(selection.left_out),
    )  # fmt: skip
    if text is not None:
        out.files.append(PushFile(CARD, len(text.encode("utf-8")), "generated"))
    if dry_run:
        return out
    if env.offline:
        raise HubError("cannot push while HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE to upload")
    _upload(out, entries, env, message, metadata, update_card)
    return out


def _upload(
    out: PushReport,
    entries: list[tuple[str, Path]],
    env: HubEnv,
    message: str | None,
    meta: dict[str, Any],
    update: bool,
) -> None:
    from huggingface_hub import CommitOperationAdd

    client = api(env)
    repo_id, revision = out.repo_id, out.revision
    try:
        url = client.create_repo(repo_id, private=True if out.private else None, exist_ok=True)
        out.url = str(url)
        if revision != DEFAULT_REVISION and not out.create_pr:
            client.create_branch(repo_id, branch=revision, exist_ok=True)
        if out.card_action == "generated":
            _, remote = listing(repo_id, revision, env)
            if CARD in remote:  # the repo's own card stays, or gets its metadata updated
                out.files = [f for f in out.files if f.path != CARD]
                if update:
                    local = download(env, RepoRef(repo_id), CARD, revision, None, deadline(), None)
                    out.card = updated(_card_text(local, f"{repo_id}/{CARD}"), meta, f"{repo_id}/{CARD}")
                    out.card_action = "updated"
                    out.files.append(PushFile(CARD, len(out.card.encode("utf-8")), "generated"))
                else:
                    out.card, out.card_action = None, "kept-remote"
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p)) for rel, p in entries]
        if out.card is not None:
            operations.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=out.card.encode("utf-8")))
        info = client.create_commit(
            repo_id, operations, commit_message=message or f"Upload {out.format} adapter with loratools",
            revision=None if out.create_pr else revision, create_pr=out.create_pr,
        )  # fmt: skip
    except LoratoolsError:
        raise
    except Exception as e:
        err = hub_error(e, env, repo_id, revision=revision, writing=True)
        if err is None and isinstance(e, (ValueError, KeyError, TypeError)):  # huggingface_hub could not read an answer
            err = HubError(
                f"the Hub at {env.host} gave an answer huggingface_hub cannot read ({type(e).__name__})",
                "is HF_ENDPOINT a Hugging Face Hub (or a mirror of one)? the upload may not have happened",
            )
        if err is None:
            raise
        raise err from e
    out.commit_url, out.commit, out.pr_url = info.commit_url, info.oid, info.pr_url
