"""The Hugging Face Hub: read adapters and checkpoints by repo id, and publish adapters with a model card.

Thin over ``huggingface_hub``: files land in its normal cache (``HF_HUB_CACHE``, or ``HF_HOME/hub``), only the files
a command needs. The environment (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``) is
read at each call, not at import, and passed to ``huggingface_hub`` explicitly. Every failure of the Hub becomes one
:class:`HubError` line with a hint, and no message ever holds the token.

A repo is named ``owner/name``, or ``owner/name/path/in/repo`` for a file or folder inside it; ``hf://`` in front
forces the Hub even where a local path of that name exists. The revision is a separate argument.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from .errors import FileFormatError, HubError, LoratoolsError
from .units import human_bytes

if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from .ops.inspect import InspectReport

Kind = Literal["adapter", "checkpoint", "file"]

PREFIX = "hf://"
DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"
#: files that unpickle, refused by ``push`` unless asked
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: weights in formats loratools does not read: never downloaded for a checkpoint
OTHER_WEIGHTS = (
    ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5", ".onnx", ".onnx_data", ".gguf", ".tflite", ".ot", ".pb",
)  # fmt: skip
CHECKPOINT_COMPONENTS = (
    "unet",
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "prior",
    "controlnet",
)
INDEX_SUFFIX = ".safetensors.index.json"
CARD = "README.md"

_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_RE = re.compile(rf"^({_PART})/({_PART})(?:/(.+))?$")
_MODEL_ID_RE = re.compile(rf"^(?:{_PART}/)?{_PART}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}


# ---- names ----------------------------------------------------------------------------------------------------


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
        if any(p in ("", ".", "..") for p in parts):
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


# ---- the environment, read at each call -------------------------------------------------------------------------


def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hf_home() -> Path:
    home = os.environ.get("HF_HOME")
    if home:
        return Path(os.path.expandvars(home)).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(os.path.expandvars(xdg)).expanduser() / "huggingface"


@dataclass(frozen=True)
class HubEnv:
    """What the environment says about the Hub right now. The token never shows in a repr."""

    endpoint: str
    cache_dir: Path
    offline: bool
    token: str | None = field(default=None, repr=False)

    def web_url(self, repo_id: str) -> str:
        return f"{self.endpoint}/{repo_id}"


def environment() -> HubEnv:
    """``HF_ENDPOINT``, ``HF_HUB_CACHE`` / ``HF_HOME``, ``HF_HUB_OFFLINE`` and the token (``HF_TOKEN``, else the file
    ``hf auth login`` saved under ``HF_HOME``), as they are now."""
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    cache_dir = Path(os.path.expandvars(cache)).expanduser() if cache else hf_home() / "hub"
    offline = _true(os.environ.get("HF_HUB_OFFLINE")) or _true(os.environ.get("TRANSFORMERS_OFFLINE"))
    token = (os.environ.get("HF_TOKEN") or "").strip() or None
    if token is None:
        token_file = Path(os.environ.get("HF_TOKEN_PATH") or hf_home() / "token").expanduser()
        try:
            token = token_file.read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError):
            token = None
    return HubEnv(endpoint, cache_dir, offline, token)


def timeout() -> float:
    """Seconds to wait for a metadata answer: ``HF_HUB_ETAG_TIMEOUT``, else 10 (huggingface_hub's own default; its
    shared HTTP client has none, so a silent server would otherwise hang the call)."""
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 10)
    except ValueError:
        return 10.0


def _api(env: HubEnv) -> HfApi:
    from huggingface_hub import HfApi

    from . import __version__

    return HfApi(endpoint=env.endpoint, token=env.token or False, library_name="loratools", library_version=__version__)


# ---- errors -------------------------------------------------------------------------------------------------------


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level failures of whichever HTTP library this huggingface_hub uses."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)), ("requests", ("ConnectionError", "Timeout"))):  # fmt: skip
        if module not in sys.modules:
            continue
        mod = importlib.import_module(module)
        found += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(found)


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def _retry_after(e: BaseException) -> str:
    headers = getattr(getattr(e, "response", None), "headers", None) or {}
    for key in ("Retry-After", "RateLimit-Reset"):
        value = headers.get(key)
        if value and str(value).strip().isdigit():
            return f"wait {int(value)} s and try again"
    reset = re.search(r"\bt=(\d+)", str(headers.get("RateLimit", "")))
    return f"wait {reset.group(1)} s and try again" if reset else "wait a minute and try again"


def hub_error(
    e: BaseException,
    env: HubEnv,
    repo_id: str,
    *,
    revision: str | None = None,
    path: str | None = None,
    writing: bool = False,
    arg: str | None = None,
) -> LoratoolsError | None:
    """The one-line error (and hint) for a failure of a Hub request, or None when ``e`` is not one (a bug)."""
    from huggingface_hub import errors as hfe

    rev = revision or DEFAULT_REVISION
    where = env.endpoint.split("://", 1)[-1]
    login = "set HF_TOKEN to an access token (or run `hf auth login`)"
    err: LoratoolsError | None = None
    status = _status(e)
    if isinstance(e, hfe.GatedRepoError):
        err = HubError(
            f"{repo_id} is a gated repo and this account has no access to it yet",
            f"accept its conditions at {env.web_url(repo_id)}, then {login} for that account"
            if env.token is None
            else f"accept its conditions at {env.web_url(repo_id)} with the account of the token in use",
        )
    elif isinstance(e, hfe.DisabledRepoError):
        err = HubError(f"{repo_id}: access to this repo is disabled on {where}")
    elif isinstance(e, hfe.RevisionNotFoundError):
        err = HubError(f"{repo_id} has no revision {rev!r}", "give a branch, tag or commit of the repo with --revision")
    elif isinstance(e, hfe.RemoteEntryNotFoundError):
        err = HubError(f"{repo_id} has no file {path or '?'} at revision {rev!r}", "check the path inside the repo")
    elif isinstance(e, hfe.RepositoryNotFoundError) and status != 401 or status == 404:
        lead = f"{arg}: no such local file or folder, and no" if arg and not arg.startswith(PREFIX) else "no"
        err = HubError(
            f"{lead} repo {repo_id} on {where} (not found, or private)",
            "check the name; a private repo needs a token: " + login
            if env.token is None
            else "check the name, and that the token's account can see the repo",
        )
    elif isinstance(e, (hfe.LocalEntryNotFoundError, hfe.OfflineModeIsEnabled)):
        err = HubError(
            f"{repo_id} is not in the cache ({env.cache_dir}) and the Hub cannot be used",
            "run the command once online (unset HF_HUB_OFFLINE), then it works offline",
        )
    elif status == 401:
        if isinstance(e, hfe.RepositoryNotFoundError) and not writing:
            err = HubError(
                f"no repo {repo_id} on {where} that this request may see (401 Unauthorized)",
                "check the name; a private or gated repo needs a token: " + login,
            )
        elif env.token is None:
            err = HubError(f"the Hub at {where} asks for a token (401 Unauthorized)", login)
        else:
            err = HubError(
                f"the Hub at {where} refused the token (401 Unauthorized)",
                f"the token in HF_TOKEN (or saved by `hf auth login`) is invalid or expired; make a new one at "
                f"{env.endpoint}/settings/tokens",
            )
    elif status == 403:
        err = HubError(
            f"{repo_id}: permission denied (403 Forbidden)",
            f"the token needs write access to {repo_id.split('/')[0]} (a fine-grained token must list it)"
            if writing
            else "the token's account cannot read this repo",
        )
    elif status == 429:
        err = HubError(f"the Hub at {where} is rate limiting this client (429 Too Many Requests)", _retry_after(e))
    elif status is not None and status >= 500:
        err = HubError(f"the Hub at {where} failed ({status})", "try again later")
    elif isinstance(e, hfe.BadRequestError) or status == 400:
        detail = (getattr(e, "server_message", None) or "").strip().splitlines()
        err = HubError(
            f"the Hub refused the request for {repo_id} (400 Bad Request)" + (f": {detail[0]}" if detail else "")
        )
    elif status is not None:
        err = HubError(f"the Hub at {where} answered {status} for {repo_id}")
    elif isinstance(e, _transport_errors()):
        err = HubError(
            f"cannot reach the Hub at {env.endpoint}",
            "check the network (and HF_ENDPOINT); with HF_HUB_OFFLINE=1, loratools uses only files already cached",
        )
    elif isinstance(e, ValueError) and "Invalid metadata in README.md" in str(e):
        detail = " ".join(line.strip("- ") for line in str(e).splitlines()[1:] if line.strip())
        err = HubError(
            "the Hub rejected the model card's metadata" + (f": {detail}" if detail else ""),
            "fix the README.md front matter (or base_model in the adapter's config), or push with your own README.md",
        )
    if err is not None and env.token:
        err.message = err.message.replace(env.token, "***")
        err.hint = err.hint.replace(env.token, "***") if err.hint else None
        err.args = (err.message,)
    return err


# ---- which files a command needs --------------------------------------------------------------------------------


@dataclass
class Plan:
    files: list[str]  # paths in the repo to download
    target: str  # what the command reads, relative to the snapshot root ("" for the root folder)


def _split(path: str | None) -> tuple[str, str]:
    folder = (path or "").strip("/")
    return folder, f"{folder}/" if folder else ""


def _children(files: set[str], prefix: str) -> set[str]:
    return {f[len(prefix) :] for f in files if f.startswith(prefix)}


def plan_adapter(files: set[str], ref: RepoRef) -> Plan:
    """The adapter files of a repo: a PEFT folder's config and weights, a diffusers file, or the one .safetensors."""
    from .formats import diffusers, peft

    path = ref.path
    if path is not None and path in files:
        name = PurePosixPath(path).name
        folder, prefix = _split(str(PurePosixPath(path).parent) if "/" in path else "")
        if name in (*peft.WEIGHTS, peft.CONFIG) and f"{prefix}{peft.CONFIG}" in files:
            return plan_adapter(files, RepoRef(ref.repo_id, folder or None))
        return Plan([path], path)
    folder, prefix = _split(path)
    inside = _children(files, prefix)
    if path and not inside:
        raise HubError(f"{ref.repo_id} has no file or folder {path}", "check the path inside the repo")
    top = {f for f in inside if "/" not in f}
    where = f"{ref.repo_id}/{folder}" if folder else ref.repo_id
    if peft.CONFIG in top:
        weights = next((w for w in peft.WEIGHTS if w in top), None)
        if weights is None:
            raise FileFormatError(f"{where}: {peft.CONFIG} but no {' or '.join(peft.WEIGHTS)}")
        return Plan([prefix + peft.CONFIG, prefix + weights], folder)
    if diffusers.FILENAME in top:
        return Plan([prefix + diffusers.FILENAME], prefix + diffusers.FILENAME)
    tensors = sorted(f for f in top if f.endswith(".safetensors"))
    if len(tensors) == 1:
        return Plan([prefix + tensors[0]], prefix + tensors[0])
    if tensors:
        shown = ", ".join(tensors[:6]) + (f" (and {len(tensors) - 6} more)" if len(tensors) > 6 else "")
        raise FileFormatError(
            f"{where} holds {len(tensors)} .safetensors files: {shown}", f"name one: {where}/{tensors[0]}"
        )
    nested = sorted({f.rsplit("/", 1)[0] for f in inside if f.endswith(f"/{peft.CONFIG}")})
    raise FileFormatError(
        f"{where}: no adapter found in this repo" + ("" if not folder else " folder"),
        f"adapters in sub-folders: {', '.join(f'{where}/{n}' for n in nested[:4])}"
        if nested
        else f"expected {peft.CONFIG} (PEFT), {diffusers.FILENAME} (diffusers) or one .safetensors file",
    )


def _variant_of(name: str, names: set[str]) -> bool:
    """``x.fp16.safetensors`` beside ``x.safetensors`` (diffusers variants), or a variant index."""
    if re.search(r"\.safetensors\.index\.[^.]+\.json$", name):
        return True
    m = re.match(r"^(.+?)\.([A-Za-z0-9_]+)\.safetensors$", name)
    return m is not None and f"{m.group(1)}.safetensors" in names


def _checkpoint_folder(files: set[str], prefix: str, read_json: Callable[[str], Any], subfolders: bool) -> list[str]:
    """The files of one model folder a merge needs: its config and other small files, and its safetensors weights
    (the shards its index names, when it has one); never weights in other formats."""
    inside = _children(files, prefix)
    top = sorted(f for f in inside if "/" not in f and not f.startswith("."))
    names = set(top)
    wanted: list[str] = []
    indexes = [f for f in top if f.endswith(INDEX_SUFFIX)]
    shards: set[str] | None = None
    if len(indexes) == 1:
        try:
            weight_map = read_json(prefix + indexes[0])["weight_map"]
            shards = {str(s) for s in weight_map.values()}
        except (KeyError, TypeError, ValueError):
            shards = None
    for f in top:
        low = f.lower()
        if low.endswith(OTHER_WEIGHTS) or _variant_of(f, names):
            continue
        if low.endswith(".safetensors") and shards is not None and f not in shards:
            continue
        wanted.append(prefix + f)
    if subfolders:
        for sub in sorted({f.split("/", 1)[0] for f in inside if "/" in f and not f.startswith(".")}):
            wanted += _checkpoint_folder(files, f"{prefix}{sub}/", read_json, True)
    return wanted


def plan_checkpoint(files: set[str], ref: RepoRef, read_json: Callable[[str], Any]) -> Plan:
    """A base model to merge into: one .safetensors file, a model folder (config, index, shards, tokenizer...), or a
    diffusers pipeline (``model_index.json`` and its component folders), without weights in other formats."""
    path = ref.path
    if path is not None and path in files:
        if path.endswith(INDEX_SUFFIX):
            folder, prefix = _split(str(PurePosixPath(path).parent) if "/" in path else "")
            return Plan(_checkpoint_folder(files, prefix, read_json, False), path)
        if not path.endswith(".safetensors"):
            raise FileFormatError(f"{ref}: not a .safetensors checkpoint", "loratools merges into safetensors weights")
        return Plan([path], path)
    folder, prefix = _split(path)
    inside = _children(files, prefix)
    if path and not inside:
        raise HubError(f"{ref.repo_id} has no file or folder {path}", "check the path inside the repo")
    pipeline = "model_index.json" in inside or (
        not any(f.endswith(".safetensors") and "/" not in f for f in inside)
        and any(f.split("/", 1)[0] in CHECKPOINT_COMPONENTS for f in inside if "/" in f)
    )
    if pipeline:
        top_files = [prefix + f for f in sorted(inside) if "/" not in f and not f.startswith(".")]
        wanted = [f for f in top_files if not f.lower().endswith((*OTHER_WEIGHTS, ".safetensors"))]
        for sub in sorted({f.split("/", 1)[0] for f in inside if "/" in f and not f.startswith(".")}):
            wanted += _checkpoint_folder(files, f"{prefix}{sub}/", read_json, True)
    else:
        wanted = _checkpoint_folder(files, prefix, read_json, False)
    if not any(f.endswith(".safetensors") for f in wanted):
        where = f"{ref.repo_id}/{folder}" if folder else ref.repo_id
        raise FileFormatError(
            f"{where}: no .safetensors weights found", "loratools merges into safetensors checkpoints"
        )
    return Plan(wanted, folder)


def _plan(files: set[str], ref: RepoRef, kind: Kind, read_json: Callable[[str], Any]) -> Plan:
    if kind == "adapter":
        return plan_adapter(files, ref)
    if kind == "checkpoint":
        return plan_checkpoint(files, ref, read_json)
    if kind == "file":  # one named file, as it is (a base model's config.json)
        if ref.path is None or ref.path not in files:
            raise HubError(f"{ref} is not a file in the repo", "name a file: owner/name/path/in/repo")
        return Plan([ref.path], ref.path)
    raise LoratoolsError(f"unknown kind {kind!r}", "adapter, checkpoint or file")


# ---- download -------------------------------------------------------------------------------------------------------


def _storage(env: HubEnv, repo_id: str) -> Path:
    return env.cache_dir / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo_id: str, revision: str | None = None, env: HubEnv | None = None) -> Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (a branch, tag or commit), if there is one."""
    env = env or environment()
    storage = _storage(env, repo_id)
    rev = revision or DEFAULT_REVISION
    sha: str | None = rev if _COMMIT_RE.match(rev) else None
    if sha is None:
        try:
            sha = (storage / "refs" / rev).read_text(encoding="utf-8").strip()
        except OSError:
            return None
    snapshot = storage / "snapshots" / sha
    return snapshot if sha and snapshot.is_dir() else None


def _from_cache(ref: RepoRef, rev: str, kind: Kind, env: HubEnv, why: str, hint: str) -> Path:
    snapshot = cached_snapshot(ref.repo_id, rev, env)
    if snapshot is None:
        raise HubError(f"{ref.repo_id} (revision {rev!r}) is not in the cache {env.cache_dir}, and {why}", hint)
    files = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}

    def read_json(rel: str) -> Any:
        return json.loads((snapshot / rel).read_text(encoding="utf-8"))

    plan = _plan(files, ref, kind, read_json)
    missing = [f for f in plan.files if f not in files]
    if missing:
        raise HubError(f"{ref.repo_id} is only partly in the cache (missing {', '.join(missing[:4])}), and {why}", hint)
    return snapshot / plan.target if plan.target else snapshot


class _Quiet:
    """A progress bar that shows nothing (``progress=False``), in the shape huggingface_hub calls."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: float | None = 1) -> None:
        pass

    def close(self) -> None:
        pass


def fetch(arg: str, *, revision: str | None = None, kind: Kind = "adapter", progress: bool = True) -> Path:
    """Download what a command needs from a Hub repo into the huggingface_hub cache, and return the local path that
    loratools' readers take: a PEFT folder, a single adapter file, or a model folder / file for ``kind="checkpoint"``.

    Only the needed files are downloaded (an adapter never pulls the repo's other weights). Offline
    (``HF_HUB_OFFLINE=1``) or when the Hub cannot be reached, the cached snapshot is used, or a :class:`HubError` says
    it is not there. ``progress`` shows huggingface_hub's bars on stderr (when it is a terminal).
    """
    ref = parse_repo_ref(arg)
    if ref is None:
        raise LoratoolsError(f"{arg!r} is not a Hub repo id", "write owner/name, or owner/name/path/in/repo")
    env = environment()
    rev = revision or DEFAULT_REVISION
    if env.offline:
        return _from_cache(ref, rev, kind, env, "HF_HUB_OFFLINE is set", "run it once online (unset HF_HUB_OFFLINE)")
    from huggingface_hub import hf_hub_download

    from . import __version__

    api = _api(env)
    current: str | None = None
    try:
        info = api.model_info(ref.repo_id, revision=rev, timeout=timeout())
        sha = info.sha or rev
        files = {s.rfilename for s in info.siblings or []}
        snapshot: Path | None = None

        def get(rel: str) -> Path:
            nonlocal current, snapshot
            current = rel
            local = Path(
                hf_hub_download(
                    ref.repo_id,
                    rel,
                    revision=sha,
                    endpoint=env.endpoint,
                    token=env.token or False,
                    cache_dir=env.cache_dir,
                    etag_timeout=timeout(),
                    library_name="loratools",
                    library_version=__version__,
                    tqdm_class=None if progress else _Quiet,
                )  # fmt: skip
            )
            snapshot = local.parents[len(PurePosixPath(rel).parts) - 1]
            return local

        def read_json(rel: str) -> Any:
            return json.loads(get(rel).read_text(encoding="utf-8"))

        plan = _plan(files, ref, kind, read_json)
        for rel in plan.files:
            get(rel)
    except LoratoolsError:
        raise
    except Exception as e:
        err = hub_error(e, env, ref.repo_id, revision=rev, path=current or ref.path, arg=arg)
        if err is None:
            raise
        if isinstance(e, _transport_errors()):
            return _from_cache(ref, rev, kind, env, f"the Hub at {env.endpoint} cannot be reached", err.hint or "")
        raise err from e
    assert snapshot is not None
    if rev != sha:
        _write_ref(snapshot.parent.parent, rev, sha)
    return snapshot / plan.target if plan.target else snapshot


def _write_ref(storage: Path, revision: str, sha: str) -> None:
    """Record that ``revision`` is ``sha`` (the cache's ``refs/``), so the snapshot is found offline."""
    ref = storage / "refs" / revision
    try:
        if ref.is_file() and ref.read_text(encoding="utf-8") == sha:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
        tmp.write_text(sha, encoding="utf-8")
        os.replace(tmp, ref)
    except OSError:
        pass  # a read-only cache still serves this run; only offline look-ups by branch name need the ref


#: local cache path -> the repo id it was fetched as (provenance records the id, not the cache path)
_ORIGINS: dict[str, str] = {}


def origin(path: str | os.PathLike[str]) -> str | None:
    """The Hub repo id (``owner/name[/file][@revision]``) a local path was fetched as in this process, if any."""
    return _ORIGINS.get(str(path))


def resolve(arg: str, *, revision: str | None = None, kind: Kind = "adapter", progress: bool = True) -> Path:
    """What every command calls on a SOURCE: a local path as it is, a Hub repo id fetched (see :func:`fetch`)."""
    if is_repo_id(arg):
        path = fetch(arg, revision=revision, kind=kind, progress=progress)
        _ORIGINS[str(path)] = arg + (f"@{revision}" if revision else "")
        return path
    if revision is not None:
        raise LoratoolsError(f"--revision applies to Hub repo ids, and {arg} is a local path", "leave out --revision")
    return Path(arg)


# ---- push ------------------------------------------------------------------------------------------------------------


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
    card_action: str  # generated | updated | kept (the folder's own README.md) | kept-remote (the repo's stays)
    skipped: list[str] = field(default_factory=list)  # hidden files and folders, left out
    dry_run: bool = False
    private: bool = False
    create_pr: bool = False
    url: str | None = None
    commit_url: str | None = None
    commit: str | None = None
    pr_url: str | None = None

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_size"] = self.total_size
        return d


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def collect(source: str | os.PathLike[str], *, allow_pickles: bool = False) -> tuple[list[tuple[str, Path]], list[str]]:
    """The files to upload, as (path in repo, local path), and the hidden entries left out. Refuses symlinks that
    lead outside ``source`` and, without ``allow_pickles``, pickle files."""
    src = Path(source)
    if not src.exists():
        raise FileFormatError(f"{src}: no such file or folder")
    entries: list[tuple[str, Path]] = []
    skipped: list[str] = []
    if src.is_file():
        entries.append((src.name, src))
    else:
        root = src.resolve()
        seen: set[Path] = set()
        for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
            here = Path(dirpath)
            real = here.resolve()
            if not _inside(real, root):
                raise LoratoolsError(
                    f"refusing to upload {here.relative_to(src).as_posix()}: a symlink to {real}, outside {src}",
                    "copy what belongs to the upload into the folder",
                )
            if real in seen:
                dirnames[:] = []
                continue
            seen.add(real)
            for name in sorted(dirnames):
                if name.startswith("."):
                    skipped.append((here / name).relative_to(src).as_posix() + "/")
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
            for name in sorted(filenames):
                p = here / name
                rel = p.relative_to(src).as_posix()
                if name.startswith("."):
                    skipped.append(rel)
                    continue
                target = p.resolve()
                if not _inside(target, root):
                    raise LoratoolsError(
                        f"refusing to upload {rel}: a symlink to {target}, outside {src}",
                        "copy the file into the folder if it belongs to the upload",
                    )
                if not target.is_file():
                    raise LoratoolsError(f"cannot upload {rel}: not a regular file (a broken symlink?)")
                entries.append((rel, p))
    pickles = [rel for rel, _ in entries if rel.lower().endswith(PICKLE_SUFFIXES)]
    if pickles and not allow_pickles:
        raise LoratoolsError(
            f"refusing to upload pickle file(s): {', '.join(pickles[:6])}" + (" ..." if len(pickles) > 6 else ""),
            "a pickle can run code when it is loaded: save the adapter as safetensors, or pass --allow-pickles",
        )
    return entries, skipped


def _g(x: float) -> str:
    return f"{x:g}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def recipe(entry: dict[str, Any]) -> str:
    """The recipe of a file loratools made, for people: ``mix of A (0.7) and B (0.3), svd to rank 16``."""
    from .ops.provenance import describe

    inputs = [PurePosixPath(str(i.get("source", "?")).replace("\\", "/")).name for i in entry.get("inputs", [])]
    command = entry.get("command")
    if not inputs:
        return describe(entry)
    if command == "mix":
        weights = entry.get("weights") or [1.0] * len(inputs)
        parts = [f"{n} ({_g(float(w))})" for n, w in zip(inputs, weights, strict=False)]
        text = f"mix of {_join(parts)}"
        method, rank = entry.get("method"), entry.get("rank")
        if method == "svd":
            text += f", svd to rank {rank}" if rank else ", svd"
        elif method == "cat":
            text += ", exact (cat: the ranks add up)"
        elif method == "linear":
            text += ", PEFT's linear combination of factors (not the weighted sum of the deltas)"
    elif command == "resize":
        text = f"resize of {inputs[0]}"
        if entry.get("rank"):
            text += f" to rank {entry['rank']}"
        elif entry.get("energy"):
            text += f", keeping {_g(float(entry['energy']))} of the energy"
    else:
        return describe(entry)
    if entry.get("dtype"):
        text += f", stored as {entry['dtype']}"
    return text


def _spread(values: list[float | int | None]) -> str:
    known = sorted({v for v in values if v is not None})
    if not known:
        return "-"
    shown = [str(int(v)) if float(v).is_integer() else _g(float(v)) for v in known]
    return shown[0] if len(shown) == 1 else f"{shown[0]} to {shown[-1]} (by module)"


def card_metadata(rep: InspectReport, license: str | None = None) -> dict[str, Any]:
    """The model card's YAML front matter, in the Hub's conventions."""
    meta: dict[str, Any] = {}
    # PEFT's base_model_name_or_path is what from_pretrained took: a Hub id unless it is a local path. kohya's
    # "base model" fields are labels (sd_v1, a checkpoint's file name), never ids, and are left to the body.
    if rep.format == "peft" and is_model_id(rep.base_model) and not os.path.exists(rep.base_model or ""):
        meta["base_model"] = rep.base_model
        meta["base_model_relation"] = "adapter"
    library = {"peft": "peft", "diffusers": "diffusers"}.get(rep.format)
    if library:
        meta["library_name"] = library
    task = rep.config.get("task_type") if rep.format == "peft" else None
    if isinstance(task, str) and task in _PIPELINE_TAGS:
        meta["pipeline_tag"] = _PIPELINE_TAGS[task]
    license = license or rep.metadata.get("modelspec.license") or rep.metadata.get("license")
    if license:
        meta["license"] = license
    meta["tags"] = ["lora", rep.format, "loratools"]
    return meta


def _front_matter(meta: dict[str, Any]) -> str:
    import yaml

    return "---\n" + str(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)) + "---\n"


def split_card(text: str) -> tuple[dict[str, Any], str]:
    """A README's YAML front matter (empty when it has none) and its body."""
    import yaml

    m = re.match(r"^\ufeff?---[ \t]*\r?\n(.*?)^---[ \t]*(?:\r?\n|$)", text, flags=re.S | re.M)
    if m is None:
        return {}, text
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError as e:
        raise FileFormatError(f"{CARD}: its YAML front matter does not parse ({e.__class__.__name__})") from None
    if not isinstance(meta, dict):
        raise FileFormatError(f"{CARD}: its front matter is not a YAML mapping")
    return meta, text[m.end() :]


def updated_card(text: str, meta: dict[str, Any]) -> str:
    """``text`` with its front matter updated: loratools' facts replace the same keys, tags are merged, and a license
    already there stays; the body is kept as it is."""
    old, body = split_card(text)
    new = dict(old)
    for key, value in meta.items():
        if key == "tags":
            tags = old.get("tags") or []
            tags = [tags] if isinstance(tags, str) else list(tags)
            new["tags"] = tags + [t for t in value if t not in tags]
        elif key == "license" and old.get("license"):
            continue
        else:
            new[key] = value
    return _front_matter(new) + body


def render_card(rep: InspectReport, repo_id: str, meta: dict[str, Any], files: list[str]) -> str:
    """A README.md for an adapter: front matter, the facts ``inspect`` gives, the recipe when loratools made it,
    and how to load it."""
    from .ops.provenance import describe

    name = repo_id.split("/", 1)[1]
    base = rep.base_model
    base_text = f"[{base}](https://huggingface.co/{base})" if "base_model" in meta else f"`{base}`" if base else None
    kinds = ", ".join(f"{k} {v}" for k, v in rep.types.items())
    names = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA", "full": "full-diff"}
    kind_text = "/".join(dict.fromkeys(names.get(t.split("+")[0], t) for t in rep.types)) or "LoRA"
    targets = [f"{k} x{v}" for k, v in rep.target_modules.items()]
    target_text = ", ".join(targets[:8]) + (f" (and {len(targets) - 8} more)" if len(targets) > 8 else "")
    lines = [
        f"# {name}",
        "",
        f"A {kind_text} adapter"
        + (f" for {base_text}" if base_text else "")
        + f", in {rep.format} format. Published with loratools.",
        "",
        "| | |",
        "|---|---|",
        f"| Format | {rep.format} |",
        f"| Base model | {base_text or 'unknown'} |",
        f"| Rank | {_spread([m.rank for m in rep.modules])} |",
        f"| Alpha | {_spread([m.alpha for m in rep.modules])} |",
        f"| Targets | {target_text or '-'} |",
        f"| Modules | {rep.num_modules} ({kinds}) |",
        f"| Parameters | {rep.num_params:,} |",
        f"| Size | {human_bytes(rep.size_on_disk)} ({', '.join(files[:4])}{', ...' if len(files) > 4 else ''}) |",
        f"| Dtypes | {', '.join(f'{k} x{v}' for k, v in rep.dtypes.items())} |",
    ]
    if rep.made_by:
        lines += ["", "## How it was made", "", recipe(rep.made_by) + ".", "", f"Record: `{describe(rep.made_by)}`"]
    lines += ["", "## Use", ""]
    if rep.format == "peft":
        lines += [
            "```python",
            "from peft import PeftModel",
            "",
            f'model = PeftModel.from_pretrained(base_model, "{repo_id}")' + (f"  # base_model: {base}" if base else ""),
            "```",
        ]
    else:
        weight = files[0] if len(files) == 1 else None
        lines += [
            "```python",
            f'pipe.load_lora_weights("{repo_id}"' + (f', weight_name="{weight}")' if weight else ")"),
            "```",
        ]
    lines += ["", "```sh", f"loratools inspect {repo_id}", "```", ""]
    return _front_matter(meta) + "\n" + "\n".join(lines)


def push(
    source: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
    update_card: bool = False,
    allow_pickles: bool = False,
) -> PushReport:
    """Upload an adapter folder or file to ``repo_id`` in one commit, creating the repo (and branch) if needed, with
    a model card made from ``inspect`` when the folder has no README.md. ``source`` is never modified: the card is
    uploaded from memory. ``dry_run`` makes no request at all."""
    from .formats import detect, load_adapter
    from .ops.inspect import report

    src = Path(source)
    ref = parse_repo_ref(repo_id)
    if ref is None or ref.path is not None or repo_id.startswith(PREFIX):
        raise LoratoolsError(f"{repo_id!r} is not a Hub repo id", "write owner/name, e.g. me/llama-lora")
    if create_pr and revision not in (None, DEFAULT_REVISION):
        raise LoratoolsError(
            "--create-pr opens a pull request against main; it cannot go with --revision",
            "push to a branch with --revision, or open a pull request with --create-pr",
        )
    entries, skipped = collect(src, allow_pickles=allow_pickles)
    fmt = detect(src)
    rep = report(load_adapter(src, fmt), src, norms=False)
    meta = card_metadata(rep)
    card: str | None = None
    readme = next((p for rel, p in entries if rel == CARD), None)
    if readme is None:
        card, action = render_card(rep, ref.repo_id, meta, [rel for rel, _ in entries]), "generated"
    elif update_card:
        card, action = updated_card(readme.read_text(encoding="utf-8"), meta), "updated"
        entries = [(rel, p) for rel, p in entries if rel != CARD]
    else:
        action = "kept"
    rev = revision or DEFAULT_REVISION
    env = environment()
    out = PushReport(
        source=str(src), repo_id=ref.repo_id, revision=rev, format=fmt,
        files=[PushFile(rel, p.stat().st_size, str(p)) for rel, p in entries], card=card, card_action=action,
        skipped=skipped, dry_run=dry_run, private=private, create_pr=create_pr, url=env.web_url(ref.repo_id),
    )  # fmt: skip
    if card is not None:
        out.files.append(PushFile(CARD, len(card.encode("utf-8")), "generated"))
    if dry_run:
        return out
    if env.offline:
        raise HubError("cannot push while HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE to upload")
    _upload(out, entries, env, message, meta, update_card)
    return out


def _upload(
    out: PushReport,
    entries: list[tuple[str, Path]],
    env: HubEnv,
    message: str | None,
    meta: dict[str, Any],
    update: bool,
) -> None:
    from huggingface_hub import CommitOperationAdd, hf_hub_download

    api = _api(env)
    repo_id, revision = out.repo_id, out.revision
    try:
        url = api.create_repo(repo_id, private=True if out.private else None, exist_ok=True)
        out.url = str(url)
        if revision != DEFAULT_REVISION and not out.create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        if out.card_action == "generated":
            listing = api.model_info(repo_id, revision=revision, timeout=timeout())
            remote = {s.rfilename for s in listing.siblings or []}
            if CARD in remote:  # the repo's own card stays, or gets its metadata updated
                out.files = [f for f in out.files if f.path != CARD]
                if update:
                    local = hf_hub_download(
                        repo_id, CARD, revision=revision, endpoint=env.endpoint, token=env.token or False,
                        cache_dir=env.cache_dir,
                    )  # fmt: skip
                    out.card = updated_card(Path(local).read_text(encoding="utf-8"), meta)
                    out.card_action = "updated"
                    out.files.append(PushFile(CARD, len(out.card.encode("utf-8")), "generated"))
                else:
                    out.card, out.card_action = None, "kept-remote"
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p)) for rel, p in entries]
        if out.card is not None:
            operations.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=out.card.encode("utf-8")))
        info = api.create_commit(
            repo_id, operations, commit_message=message or f"Upload {out.format} adapter with loratools",
            revision=None if out.create_pr else revision, create_pr=out.create_pr,
        )  # fmt: skip
    except LoratoolsError:
        raise
    except Exception as e:
        err = hub_error(e, env, repo_id, revision=revision, writing=True)
        if err is None:
            raise
        raise err from e
    out.commit_url, out.commit, out.pr_url = info.commit_url, info.oid, info.pr_url
