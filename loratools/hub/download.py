"""Downloads into huggingface_hub's cache: loratools plans which files (see :mod:`.plan`), huggingface_hub writes
and reads the cache (``hf_hub_download`` stores blobs, snapshots and ``refs/``; ``try_to_load_from_cache`` and
``snapshot_download(local_files_only=True)`` find what is there). Each request keeps to a deadline
(:mod:`.watch`), and offline, or when the Hub cannot be reached, the cached snapshot answers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import HubError, LoratoolsError
from ..version import __version__
from .env import LIBRARY, HubEnv, deadline, environment, timeout
from .errors import http_errors, hub_error, transport_errors, unwrap
from .filelist import listing, load_json
from .ids import DEFAULT_REVISION, RepoRef, check_revision, parse_repo_ref
from .plan import FetchKind, Plan, plan
from .watch import Watch, watching

#: how a download reports its progress: (file in the repo, bytes received so far, its size when known)
OnBytes = Callable[[str, int, "int | None"], None]


def bar_class(name: str, on_bytes: OnBytes | None) -> type:
    """A progress bar in the shape huggingface_hub drives (``tqdm_class``) that draws nothing itself: it reports
    the bytes of ``name`` to ``on_bytes`` (the CLI's own bar), or to nobody. huggingface_hub's tqdm bars never
    show."""

    class Bar:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.n = int(kwargs.get("initial") or 0)
            self.total = kwargs.get("total")
            self.format_dict: dict[str, Any] = {}
            self._report()

        def _report(self) -> None:
            if on_bytes is not None:
                on_bytes(name, self.n, self.total if isinstance(self.total, int) else None)

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def update(self, n: float | None = 1) -> None:
            self.n += int(n or 0)
            self._report()

        def update_transfer(self, n: float | None = 1) -> None:  # Xet's network bytes: the file's bytes count
            pass

        def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
            pass

        def set_transfer_postfix_str(self, *args: Any, **kwargs: Any) -> None:
            pass

        def set_description(self, *args: Any, **kwargs: Any) -> None:
            pass

        def refresh(self) -> None:
            self._report()

        def close(self) -> None:
            pass

    return Bar


def download(
    env: HubEnv, ref: RepoRef, rel: str, revision: str, commit: str | None, seconds: float, on_bytes: OnBytes | None
) -> Path:
    """One file of a repo into the cache, by ``hf_hub_download``, within the deadline (``commit``: the commit every
    answer must come from). A file cached for a commit is not asked for again."""
    from huggingface_hub import hf_hub_download

    with watching(Watch(f"{ref.repo_id}/{rel}", env.host, seconds, listing=False, commit=commit)):
        return Path(
            hf_hub_download(
                ref.repo_id,
                rel,
                revision=revision,
                endpoint=env.endpoint,
                token=env.token or False,
                cache_dir=env.cache_dir,
                etag_timeout=timeout(),
                library_name=LIBRARY,
                library_version=__version__,
                tqdm_class=bar_class(rel, on_bytes),
            )  # fmt: skip
        )


def _keep_ref(env: HubEnv, ref: RepoRef, first: str, snapshot: Path, rev: str, sha: str, seconds: float) -> None:
    """Let huggingface_hub record in the cache that ``rev`` (a branch or tag) is ``sha``, so that the snapshot is
    found offline by that name: when ``try_to_load_from_cache`` does not already find it there, one download of a
    file already cached (a HEAD request, no body) writes ``refs/<rev>``."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(ref.repo_id, first, cache_dir=env.cache_dir, revision=rev)
    if isinstance(found, str) and Path(found) == snapshot / first:
        return
    download(env, ref, first, rev, sha, seconds, None)


def _cached_snapshot(env: HubEnv, repo_id: str, rev: str) -> Path | None:
    """The cached snapshot of ``repo_id`` at ``rev`` (a branch, tag or commit), as huggingface_hub finds it."""
    from huggingface_hub import errors as hfe
    from huggingface_hub import snapshot_download

    try:  # no request: huggingface_hub resolves refs/ and finds the snapshot folder (allow_patterns: check none)
        folder = snapshot_download(
            repo_id, revision=rev, cache_dir=env.cache_dir, local_files_only=True, allow_patterns=[]
        )
    except (hfe.LocalEntryNotFoundError, hfe.IncompleteSnapshotError, OSError, ValueError):
        return None
    return Path(folder)


def _repo_cached(env: HubEnv, repo_id: str) -> bool:
    from huggingface_hub.file_download import repo_folder_name

    return (env.cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")).is_dir()


def from_cache(
    ref: RepoRef, rev: str, kind: FetchKind, env: HubEnv, why: str, hint: str, local: str | None = None
) -> Path:
    """What :func:`fetch` would give, from the cached snapshot alone, when the Hub cannot be asked (``why``).
    ``local``: the SOURCE as given, when it could have been a local path (the error says first that it is not)."""
    snapshot = _cached_snapshot(env, ref.repo_id, rev)
    if snapshot is None:
        if local is not None and not _repo_cached(env, ref.repo_id):  # a mistyped local path? say that first
            raise HubError(
                f"{local}: no such local file or folder, and no Hub repo {ref.repo_id} in the cache ({why})",
                f"check the path; for the Hub: {hint}",
            )
        raise HubError(f"{ref.repo_id} (revision {rev!r}) is not in the cache {env.cache_dir}, and {why}", hint)
    files = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}

    def read_json(rel: str) -> Any:
        return load_json(snapshot / rel, f"{ref.repo_id}/{rel}")

    wanted = plan(files, ref, kind, read_json)
    missing = [f for f in wanted.files if f not in files]
    if missing:
        raise HubError(f"{ref.repo_id} is only partly in the cache (missing {', '.join(missing[:4])}), and {why}", hint)
    return snapshot / wanted.target if wanted.target else snapshot


def fetch(
    arg: str, *, revision: str | None = None, kind: FetchKind = "adapter", on_bytes: OnBytes | None = None
) -> Path:
    """Download what a command needs from a Hub repo into the huggingface_hub cache, and return the local path that
    loratools' readers take: a PEFT folder, a single adapter file, or a model folder / file for ``kind="checkpoint"``.

    Only the needed files are downloaded (an adapter never pulls the repo's other weights). Offline
    (``HF_HUB_OFFLINE=1``) or when the Hub cannot be reached, the cached snapshot is used, or a :class:`HubError` says
    it is not there. Each request keeps to a deadline (:func:`.env.deadline`). ``on_bytes`` hears of each file's
    progress (huggingface_hub's own bars never show).
    """
    return fetch_as(arg, revision, kind, on_bytes, None)


def begin(
    arg: str, revision: str | None, kind: FetchKind, local: str | None
) -> tuple[RepoRef, HubEnv, str, Path | None]:
    """What every request starts from: the repo, the environment and the revision; offline
    (``HF_HUB_OFFLINE=1``), the cached snapshot as the answer (or a HubError saying it is not there)."""
    ref = parse_repo_ref(arg)
    if ref is None:
        raise LoratoolsError(f"{arg!r} is not a Hub repo id", "write owner/name, or owner/name/path/in/repo")
    env = environment()
    rev = revision or DEFAULT_REVISION
    check_revision(rev)
    if env.offline:
        why, hint = "HF_HUB_OFFLINE is set", "run it once online (unset HF_HUB_OFFLINE)"
        return ref, env, rev, from_cache(ref, rev, kind, env, why, hint, local)
    return ref, env, rev, None


@dataclass
class Request:
    """One request's state: what it downloads is told to the error messages (``current``)."""

    ref: RepoRef
    env: HubEnv
    rev: str
    seconds: float
    on_bytes: OnBytes | None
    sha: str = ""
    current: str | None = None

    def get(self, rel: str) -> Path:
        self.current = rel
        return download(self.env, self.ref, rel, self.sha, self.sha, self.seconds, self.on_bytes)


def request(
    arg: str, revision: str | None, kind: FetchKind, on_bytes: OnBytes | None, local: str | None,
    work: Callable[[Request, Plan], Path],
) -> Path:  # fmt: skip
    """A Hub request: the listing, loratools' plan of the files it needs, then ``work`` (download them, or read
    their headers); a Hub out of reach answers from the cache; every other failure is one HubError."""
    ref, env, rev, cached = begin(arg, revision, kind, local)
    if cached is not None:
        return cached
    req = Request(ref, env, rev, deadline(), on_bytes)
    try:
        req.sha, files = listing(ref.repo_id, rev, env)
        wanted: Plan = plan(files, ref, kind, lambda rel: load_json(req.get(rel), f"{ref.repo_id}/{rel}"))
        return work(req, wanted)
    except LoratoolsError:
        raise
    except Exception as e:
        err = hub_error(e, env, ref.repo_id, revision=rev, path=req.current or ref.path, arg=local)
        if err is None:
            raise
        failure = unwrap(e)
        if isinstance(failure, transport_errors()):  # the Hub is out of reach, or broke off: the cache may serve
            broken = isinstance(failure, http_errors("ProtocolError"))
            why = err.message if broken else f"the Hub at {env.endpoint} cannot be reached"
            return from_cache(ref, rev, kind, env, why, err.hint or "", local)
        raise err from e


def fetch_as(arg: str, revision: str | None, kind: FetchKind, on_bytes: OnBytes | None, local: str | None) -> Path:
    """:func:`fetch`; ``local``: the SOURCE as given, when it could have been a local path (errors say so first)."""

    def work(req: Request, wanted: Plan) -> Path:
        paths = [req.get(rel) for rel in wanted.files]
        snapshot = paths[0].parents[len(PurePosixPath(wanted.files[0]).parts) - 1]
        if req.rev != req.sha:
            req.current = wanted.files[0]
            _keep_ref(req.env, req.ref, wanted.files[0], snapshot, req.rev, req.sha, req.seconds)
        return snapshot / wanted.target if wanted.target else snapshot

    return request(arg, revision, kind, on_bytes, local, work)
