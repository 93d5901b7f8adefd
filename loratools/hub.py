"""The Hugging Face Hub: read adapters and checkpoints by repo id, and publish adapters with a model card.

Thin over ``huggingface_hub``: files land in its normal cache (``HF_HUB_CACHE``, or ``HF_HOME/hub``), only the files
a command needs. The environment (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``,
``LORATOOLS_HUB_DEADLINE``) is read at each call, not at import, and passed to ``huggingface_hub`` explicitly. Every
failure of the Hub becomes one :class:`HubError` line with a hint, and no message ever holds the token.

What a Hub answers is data from the world, checked before it is used: a repo's file list (names that are plain
relative paths, a commit id), the headers of a file (its size, commit and ETag, which become paths in the cache), and
every request has an overall deadline besides huggingface_hub's per-read timeouts.

A repo is named ``owner/name``, or ``owner/name/path/in/repo`` for a file or folder inside it; ``hf://`` in front
forces the Hub even where a local path of that name exists. The revision is a separate argument.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import re
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

from .errors import FileFormatError, HubError, LoratoolsError
from .io.pickle import PICKLE_SUFFIXES as PICKLE_SUFFIXES  # every pickle container: push refuses them unasked
from .io.pickle import is_pickle
from .units import human_bytes

if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from .ops.inspect import InspectReport

Kind = Literal["adapter", "checkpoint", "file"]

PREFIX = "hf://"
DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"
#: weights in formats loratools does not read, besides every pickle container (io.pickle's table): never downloaded
#: for a checkpoint
OTHER_WEIGHTS = (".msgpack", ".h5", ".onnx", ".onnx_data", ".gguf", ".tflite", ".ot", ".pb")
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
#: what an adapter repo holds besides the adapter and its card, uploaded by ``push`` without being named: the
#: tokenizer and chat template transformers saves beside an adapter trained with new tokens (PEFT's Trainer pushes
#: them too), and a licence. Anything else (training arguments, optimizer states, samples, notes) needs --include.
COMPANIONS = frozenset(
    {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
        "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
        "chat_template.json", "LICENSE", "LICENSE.md", "LICENSE.txt",
    }
)  # fmt: skip

#: the environment variable that sets a request's deadline, in seconds
DEADLINE_VAR = "LORATOOLS_HUB_DEADLINE"
DEFAULT_DEADLINE = 60.0
#: a file's deadline grows by a second for each MiB received (up to its announced size): a download that averages
#: 1 MiB/s after its first minute always finishes
RATE = 1 << 20
#: the most bytes an answer of the Hub's API (a repo's file list) or a JSON index may hold
ANSWER_LIMIT = 64 << 20
#: the most files a repo's file list may name
MAX_FILES = 100_000
#: the longest file name in a repo
MAX_NAME = 1000
#: the most bytes one file may announce: huggingface_hub's own limit for downloads over plain HTTP (50 GB)
MAX_FILE = 50 * 1000**3
#: the most times one request may be retried (huggingface_hub resumes a download as long as bytes keep coming)
MAX_RETRIES = 5

_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_RE = re.compile(rf"^({_PART})/({_PART})(?:/(.+))?$")
_MODEL_ID_RE = re.compile(rf"^(?:{_PART}/)?{_PART}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_ETAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
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
        if any(p in ("", ".", "..") for p in parts) or _CONTROL_RE.search(path):
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


def printable(name: str) -> str:
    """A file name for a one-line message: as it is, or quoted with its control characters escaped."""
    return repr(name) if _CONTROL_RE.search(name) else name


def _show(value: object, limit: int = 80) -> str:
    """A value from the world, quoted for a one-line message (control characters escaped, long text cut)."""
    text = str(value)
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


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

    @property
    def host(self) -> str:
        return self.endpoint.split("://", 1)[-1]


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
        value = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 10)
    except ValueError:
        return 10.0
    return value if math.isfinite(value) and value > 0 else 10.0


def deadline() -> float:
    """Seconds one request to the Hub may take in all (``LORATOOLS_HUB_DEADLINE``, default 60); a file's download gets
    a second more for each MiB it receives. A bad value is an error, not a silent default."""
    raw = os.environ.get(DEADLINE_VAR)
    if raw is None or not raw.strip():
        return DEFAULT_DEADLINE
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise LoratoolsError(
            f"{DEADLINE_VAR}={_show(raw)} is not a number of seconds",
            f"set it to a positive number of seconds (default {DEFAULT_DEADLINE:g}), or unset it",
        )
    return value


def _api(env: HubEnv) -> HfApi:
    from huggingface_hub import HfApi

    from .version import __version__

    return HfApi(endpoint=env.endpoint, token=env.token or False, library_name="loratools", library_version=__version__)


# ---- deadlines and checks on every answer -------------------------------------------------------------------------
#
# huggingface_hub gives each read a timeout, not a request: a server that sends one byte every few seconds keeps a
# download going for ever, and it retries a cut download as long as bytes keep coming. Two event hooks on its shared
# HTTP client (active only inside ``_watching``, in this context) bound both, and check what loratools relies on in
# each answer before huggingface_hub uses it: sizes, and the commit and ETag that become paths in the cache.


def _secs(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


@dataclass
class _Watch:
    """One request (a repo's file list) or one file's download (its HEAD, GET and retries), as it goes."""

    what: str  # "the file list of owner/name", "owner/name/adapter_model.safetensors"
    where: str  # the Hub's host
    seconds: float
    listing: bool
    commit: str | None = None  # the commit every answer about a file must come from
    start: float = field(default_factory=time.monotonic)
    received: int = 0
    size: int | None = None  # the size the Hub announced for the file
    asked: dict[str, int] = field(default_factory=dict)  # how often each request was sent
    last: dict[str, str] = field(default_factory=dict)  # what went wrong with it last time
    trouble: str | None = None  # what went wrong last, for the message

    def allowed(self) -> float:
        if self.listing:
            return self.seconds
        return self.seconds + min(self.received, self.size if self.size is not None else MAX_FILE) / RATE

    def left(self) -> float:
        return self.start + self.allowed() - time.monotonic()

    def late(self) -> HubError:
        detail = f" ({self.trouble})" if self.trouble else ""
        return HubError(
            f"{'reading' if self.listing else 'downloading'} {self.what} from {self.where} did not finish within "
            f"{_secs(self.allowed())} s{detail}",
            f"the Hub is slow or stalled: try again later, or allow more time with {DEADLINE_VAR}=SECONDS "
            f"(now {_secs(self.seconds)})",
        )

    def sent(self, method: str, url: str) -> None:
        """A request goes out: a repeat is a retry (or a redirect loop), and there is a limit to those."""
        key = f"{method} {url}"
        self.asked[key] = n = self.asked.get(key, 0) + 1
        if n > 1:
            self.trouble = self.last.get(key) or "the Hub failed to answer"
        if n > MAX_RETRIES + 1:
            raise HubError(
                f"{'reading' if self.listing else 'downloading'} {self.what} from {self.where}: gave up after "
                f"{n - 1} attempts ({self.trouble})",
                "the Hub or the network is failing: try again later",
            )

    def broke_off(self, key: str) -> None:
        self.trouble = self.last[key] = "the connection broke off"

    def check(self, status: int, headers: Any, method: str, key: str) -> int:
        """What an answer's headers say, checked; returns the most body bytes it may have."""
        if status == 429:
            raise HubError(
                f"the Hub at {self.where} is rate limiting this client (429 Too Many Requests)", _wait_hint(headers)
            )
        if status >= 500:
            self.trouble = self.last[key] = f"the Hub answered {status}"
        elif 300 <= status < 400:
            self.last[key] = "it redirects in a loop"
        limit = ANSWER_LIMIT if self.listing or status >= 300 else MAX_FILE
        for header in ("X-Linked-Size", "Content-Length"):
            value = str(headers.get(header) or "").strip()
            if not value.isdigit():
                continue
            n = int(value)
            if n > (ANSWER_LIMIT if self.listing else MAX_FILE):
                raise HubError(
                    f"the Hub at {self.where} announces {n} bytes for {self.what}, more than "
                    f"{human_bytes(ANSWER_LIMIT if self.listing else MAX_FILE)}",
                    "is HF_ENDPOINT a Hugging Face Hub? a file list or a file that large is not an adapter's",
                )
            announces_file = header == "X-Linked-Size" or (status == 200 and method in ("HEAD", "GET"))
            if not self.listing and self.size is None and status < 300 and announces_file:
                self.size = n
        if self.listing:
            return limit
        commit = headers.get("X-Repo-Commit")
        if commit is not None:
            if not _COMMIT_RE.match(commit):
                raise HubError(
                    f"the Hub at {self.where} answered {self.what} with a commit id that is not one ({_show(commit)})",
                    "is HF_ENDPOINT a Hugging Face Hub (or a mirror of one)?",
                )
            if self.commit is not None and commit != self.commit:
                raise HubError(
                    f"the Hub at {self.where} answered {self.what} from commit {commit}, not from {self.commit} "
                    "that its file list names",
                    "the repo may have changed meanwhile: try again",
                )
        etag = headers.get("X-Linked-Etag") or headers.get("ETag")
        if method == "HEAD" and status < 300 and etag is not None:
            plain = etag.lstrip("W/").strip('"')  # what huggingface_hub makes of it: a file name in the cache
            if not _ETAG_RE.match(plain) or set(plain) == {"."}:
                raise HubError(
                    f"the Hub at {self.where} answered {self.what} with an ETag that is not a plain name "
                    f"({_show(etag)})",
                    "is HF_ENDPOINT a Hugging Face Hub (or a mirror of one)?",
                )
        return limit if status >= 300 or self.size is None else self.size


_WATCH: ContextVar[_Watch | None] = ContextVar("loratools_hub_watch", default=None)
_STREAMS: dict[str, type] = {}


def _http_module(obj: object) -> Any:
    """The HTTP library (httpx2 or httpx) ``obj`` belongs to."""
    return sys.modules[type(obj).__module__.split(".")[0]]


def _timed_stream(http: Any) -> type:
    """A response body that counts its bytes and keeps to the deadline of the request it belongs to."""
    cls = _STREAMS.get(http.__name__)
    if cls is not None:
        return cls

    class Timed(http.SyncByteStream):  # type: ignore[misc]
        def __init__(self, inner: Any, watch: _Watch, limit: int, key: str) -> None:
            self.inner, self.watch, self.limit, self.key = inner, watch, limit, key

        def __iter__(self) -> Iterator[bytes]:
            w, got = self.watch, 0
            try:
                for chunk in self.inner:
                    got += len(chunk)
                    w.received += len(chunk)
                    if got > self.limit:
                        announced = not w.listing and self.limit == w.size
                        raise HubError(
                            f"the Hub at {w.where} sent more than {self.limit} bytes for {w.what}"
                            + (", more than it announced" if announced else ""),
                            "is HF_ENDPOINT a Hugging Face Hub (or a mirror of one)?",
                        )
                    if w.left() <= 0:
                        raise w.late()
                    yield chunk
            except http.TimeoutException:
                if w.left() <= 0.05:
                    raise w.late() from None
                raise
            except (http.RemoteProtocolError, http.ReadError):
                w.broke_off(self.key)
                raise

        def close(self) -> None:
            self.inner.close()

    _STREAMS[http.__name__] = Timed
    return Timed


def _on_request(request: Any) -> None:
    w = _WATCH.get()
    if w is None:
        return
    w.sent(request.method, str(request.url))
    left = w.left()
    if left <= 0:
        raise w.late()
    timeouts = request.extensions.get("timeout")
    if isinstance(timeouts, dict):  # no single wait may outlast the deadline
        request.extensions["timeout"] = {k: left if v is None else min(float(v), left) for k, v in timeouts.items()}


def _on_response(response: Any) -> None:
    w = _WATCH.get()
    if w is None:
        return
    key = f"{response.request.method} {response.request.url}"
    limit = w.check(response.status_code, response.headers, response.request.method, key)
    response.stream = _timed_stream(_http_module(response))(response.stream, w, limit, key)


@contextlib.contextmanager
def _watching(w: _Watch) -> Iterator[_Watch]:
    """Every request huggingface_hub makes in this block (in this context) keeps to ``w``'s deadline and checks."""
    from huggingface_hub import get_session

    hooks = get_session().event_hooks  # the client is shared, and made anew after some failures: hook it each time
    if _on_request not in hooks["request"]:
        hooks["request"].append(_on_request)
    if _on_response not in hooks["response"]:
        hooks["response"].append(_on_response)
    token = _WATCH.set(w)
    try:
        yield w
    finally:
        _WATCH.reset(token)


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


def _http_errors(*names: str) -> tuple[type[BaseException], ...]:
    """The named exception classes of whichever of httpx2 / httpx is loaded."""
    found: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):
        mod = sys.modules.get(module)
        if mod is not None:
            found += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(found)


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def _wait_hint(headers: Any) -> str:
    headers = headers or {}
    for key in ("Retry-After", "RateLimit-Reset"):
        value = headers.get(key)
        if value and str(value).strip().isdigit() and len(str(value).strip()) < 10:
            return f"wait {int(value)} s and try again"
    reset = re.search(r"\bt=(\d{1,9})\b", str(headers.get("RateLimit", "")))
    return f"wait {reset.group(1)} s and try again" if reset else "wait a minute and try again"


def _retry_after(e: BaseException) -> str:
    return _wait_hint(getattr(getattr(e, "response", None), "headers", None))


def _detail(e: BaseException) -> str:
    text = _CONTROL_RE.sub(" ", str(e)).strip()
    return text[:160] + ("..." if len(text) > 160 else "")


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
    where = env.host
    login = "set HF_TOKEN to an access token (or run `hf auth login`)"
    # a SOURCE that could have been a local path: say first that it is not one
    lead = f"{arg}: no such local file or folder, and " if arg and not arg.startswith(PREFIX) else ""
    err: LoratoolsError | None = None
    status = _status(e)
    cause = e.__cause__
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
        err = HubError(
            f"{lead}no repo {repo_id} on {where} (not found, or private)",
            "check the name; a private repo needs a token: " + login
            if env.token is None
            else "check the name, and that the token's account can see the repo",
        )
    elif isinstance(e, hfe.FileMetadataError) or isinstance(cause, hfe.FileMetadataError):
        err = HubError(
            f"the Hub at {where} answered {repo_id}/{path or '?'} without the headers of a Hub file "
            "(X-Repo-Commit, ETag)",
            "is HF_ENDPOINT a Hugging Face Hub (or a mirror of one)? check it, and any proxy in between",
        )
    elif isinstance(e, hfe.OfflineModeIsEnabled) or (
        isinstance(e, hfe.LocalEntryNotFoundError) and not isinstance(cause, BaseException)
    ):
        err = HubError(
            f"{repo_id} is not in the cache ({env.cache_dir}) and the Hub cannot be used",
            "run the command once online (unset HF_HUB_OFFLINE), then it works offline",
        )
    elif isinstance(e, hfe.LocalEntryNotFoundError) and isinstance(cause, BaseException):
        return hub_error(cause, env, repo_id, revision=revision, path=path, writing=writing, arg=arg)
    elif status == 401:
        if isinstance(e, hfe.RepositoryNotFoundError) and not writing:
            err = HubError(
                f"{lead}no repo {repo_id} on {where} that this request may see (401 Unauthorized)",
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
        detail = _CONTROL_RE.sub(" ", getattr(e, "server_message", None) or "").strip()
        err = HubError(
            f"the Hub refused the request for {repo_id} (400 Bad Request)" + (f": {detail[:200]}" if detail else "")
        )
    elif status is not None:
        err = HubError(f"the Hub at {where} answered {status} for {repo_id}")
    elif isinstance(e, _http_errors("TooManyRedirects")):
        err = HubError(
            f"the Hub at {where} redirects {repo_id} in a loop (too many redirects)",
            "is HF_ENDPOINT a Hugging Face Hub (or a mirror of one)?",
        )
    elif isinstance(e, _http_errors("ProtocolError", "DecodingError")):
        err = HubError(
            f"the Hub at {where} sent a broken answer for {repo_id}{'/' + path if path else ''} ({_detail(e)})",
            "try again later; with HF_HUB_OFFLINE=1, loratools uses only files already cached",
        )
    elif isinstance(e, _transport_errors()):
        err = HubError(
            f"cannot reach the Hub at {env.endpoint}",
            "check the network (and HF_ENDPOINT); with HF_HUB_OFFLINE=1, loratools uses only files already cached",
        )
    elif isinstance(e, OSError) and "Consistency check failed" in str(e):
        sizes = re.search(r"size (\d+) but has size (\d+)", str(e))
        got = f" ({sizes.group(2)} of {sizes.group(1)} bytes)" if sizes else ""
        err = HubError(
            f"the download of {repo_id}/{path or '?'} from {where} came out the wrong size{got}",
            "try again later: the Hub (or a proxy) cut or padded the file",
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


# ---- what the Hub lists -------------------------------------------------------------------------------------------


def _bad_name(name: object) -> str | None:
    """Why ``name`` cannot be a file of a repo (it becomes a path in the cache), or None."""
    if not isinstance(name, str):
        return f"a file name that is {'null' if name is None else type(name).__name__ + ' ' + _show(name)}"
    if not name:
        return "an empty file name"
    if len(name) > MAX_NAME:
        return f"a file name of {len(name)} characters"
    if _CONTROL_RE.search(name):
        return f"a file name with control characters ({_show(name)})"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return f"an absolute file name ({_show(name)})"
    if ".." in name.replace("\\", "/").split("/"):  # a way out of the cache, on any system (as huggingface_hub checks)
        return f"a file name with a '..' part ({_show(name)})"
    if any(p in ("", ".") for p in name.split("/")):
        return f"a file name with an empty or '.' part ({_show(name)})"
    return None


def _no_duplicates(what: str) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            raise FileFormatError(f"{what}: the key {_show(twice)} appears twice")
        return out

    return hook


def _parse_json(data: bytes, what: str) -> Any:
    """JSON from the world: UTF-8, duplicate keys and deep nesting refused, one line when it is broken."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates(what))
    except UnicodeDecodeError:
        raise FileFormatError(f"{what}: not UTF-8 text") from None
    except RecursionError:
        raise FileFormatError(f"{what}: nested too deeply to read") from None
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{what}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def _load_json(path: Path, what: str) -> Any:
    """A JSON file from a repo (an index), within :data:`ANSWER_LIMIT`."""
    try:
        size = path.stat().st_size
        if size > ANSWER_LIMIT:
            raise FileFormatError(f"{what}: {human_bytes(size)}, more than a JSON file of a model may be")
        data = path.read_bytes()
    except OSError as e:
        raise FileFormatError(f"{what}: cannot be read ({e.strerror or type(e).__name__})") from None
    return _parse_json(data, what)


def parse_listing(data: bytes, repo_id: str, revision: str, where: str) -> tuple[str, set[str]]:
    """A repo's commit and file names, from the Hub's model-info answer; anything that is not one is a HubError."""

    def bad(problem: str) -> HubError:
        return HubError(
            f"the Hub at {where} sent a broken file list for {repo_id}: {problem}",
            "is HF_ENDPOINT a Hugging Face Hub (or a mirror of one)? try again later",
        )

    try:
        info = _parse_json(data, "it")
    except FileFormatError as e:
        raise bad(e.message.removeprefix("it: ")) from None
    if not isinstance(info, dict):
        raise bad(f"a JSON {type(info).__name__}, not an object")
    if not isinstance(info.get("id"), str) or not info["id"]:
        raise bad("no repo id ('id')" if info.get("id") is None else f"the repo id is {_show(info['id'])}")
    sha = info.get("sha")
    if sha is None:
        raise bad("no commit ('sha')")
    if not isinstance(sha, str) or not _COMMIT_RE.match(sha):
        raise bad(f"the commit ('sha') is {_show(sha)}, not a commit id")
    if _COMMIT_RE.match(revision) and sha != revision:
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
        problem = _bad_name(name)
        if problem:
            raise bad(f"entry {i} of 'siblings' has {problem}")
        if name in files:
            raise bad(f"it lists {_show(name)} twice")
        files.add(name)
    folders = {f[:i] for f in files for i, c in enumerate(f) if c == "/"}
    both = sorted(files & folders)
    if both:
        raise bad(f"{_show(both[0])} is both a file and a folder")
    return sha, files


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


class _Tree:
    """A repo's files by folder, built once, so that a plan never rescans the whole list for each folder."""

    def __init__(self, files: set[str]) -> None:
        self.files: dict[str, list[str]] = {}  # folder ("" for the root) -> the names of its files
        self.dirs: dict[str, list[str]] = {}  # folder -> the names of its sub-folders
        linked: set[str] = set()
        for f in sorted(files):
            folder, _, name = f.rpartition("/")
            self.files.setdefault(folder, []).append(name)
            while folder and folder not in linked:  # each folder is entered in its parent once
                linked.add(folder)
                parent, _, sub = folder.rpartition("/")
                self.dirs.setdefault(parent, []).append(sub)
                folder = parent
        for subs in self.dirs.values():
            subs.sort()

    def has(self, folder: str) -> bool:
        return folder in self.files or folder in self.dirs


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


def _not_read(name: str) -> bool:
    """Weights loratools does not read: every pickle container, and the other formats."""
    return is_pickle(name) or name.lower().endswith(OTHER_WEIGHTS)


def shards_of(index: Any, what: str, names: set[str]) -> set[str]:
    """The shard files a ``*.safetensors.index.json`` names, each one a file beside it (in ``names``)."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(index, dict):
        raise FileFormatError(f"{what}: a JSON {type(index).__name__}, not an index object")
    if not isinstance(weight_map, dict):
        found = "none" if weight_map is None else f"a {type(weight_map).__name__}"
        raise FileFormatError(f"{what}: 'weight_map' must map tensor names to shard files, found {found}")
    if not weight_map:
        raise FileFormatError(f"{what}: 'weight_map' is empty")
    shards: set[str] = set()
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise FileFormatError(f"{what}: the shard of {_show(key)} is {_show(shard)}, not a file name")
        if shard not in shards:
            if "/" in shard or shard in (".", "..") or not shard.endswith(".safetensors"):
                raise FileFormatError(f"{what}: {_show(shard)} is not the name of a .safetensors file beside it")
            if shard not in names:
                raise FileFormatError(f"{what}: it names the shard {_show(shard)}, which the repo does not have")
            shards.add(shard)
    return shards


def _checkpoint_folder(
    tree: _Tree, folder: str, read_json: Callable[[str], Any], subfolders: bool, repo: str = ""
) -> list[str]:
    """The files of one model folder a merge needs: its config and other small files, and its safetensors weights
    (the shards its index names, when it has one); never weights in other formats. With ``subfolders``, the same
    for every folder below it (not hidden)."""
    wanted: list[str] = []
    todo = [folder]
    while todo:
        here = todo.pop(0)
        prefix = f"{here}/" if here else ""
        top = [f for f in tree.files.get(here, []) if not f.startswith(".")]
        names = set(top)
        indexes = [f for f in top if f.endswith(INDEX_SUFFIX)]
        shards = None
        if len(indexes) == 1:
            shards = shards_of(read_json(prefix + indexes[0]), f"{repo}/{prefix}{indexes[0]}".lstrip("/"), names)
        for f in top:
            if _not_read(f) or _variant_of(f, names):
                continue
            if f.lower().endswith(".safetensors") and shards is not None and f not in shards:
                continue
            wanted.append(prefix + f)
        if subfolders:
            todo[:0] = [f"{prefix}{sub}" for sub in tree.dirs.get(here, []) if not sub.startswith(".")]
    return wanted


def plan_checkpoint(files: set[str], ref: RepoRef, read_json: Callable[[str], Any]) -> Plan:
    """A base model to merge into: one .safetensors file, a model folder (config, index, shards, tokenizer...), or a
    diffusers pipeline (``model_index.json`` and its component folders), without weights in other formats."""
    path = ref.path
    tree = _Tree(files)
    if path is not None and path in files:
        if path.endswith(INDEX_SUFFIX):
            folder = str(PurePosixPath(path).parent) if "/" in path else ""
            return Plan(_checkpoint_folder(tree, folder, read_json, False, ref.repo_id), path)
        if not path.endswith(".safetensors"):
            raise FileFormatError(f"{ref}: not a .safetensors checkpoint", "loratools merges into safetensors weights")
        return Plan([path], path)
    folder, prefix = _split(path)
    if path and not tree.has(folder):
        raise HubError(f"{ref.repo_id} has no file or folder {path}", "check the path inside the repo")
    top = tree.files.get(folder, [])
    subs = tree.dirs.get(folder, [])
    pipeline = "model_index.json" in top or (
        not any(f.endswith(".safetensors") for f in top) and any(s in CHECKPOINT_COMPONENTS for s in subs)
    )
    if pipeline:
        wanted = [
            prefix + f
            for f in top
            if not f.startswith(".") and not f.lower().endswith(".safetensors") and not _not_read(f)
        ]
        for sub in subs:
            if not sub.startswith("."):
                wanted += _checkpoint_folder(tree, f"{prefix}{sub}", read_json, True, ref.repo_id)
    else:
        wanted = _checkpoint_folder(tree, folder, read_json, False, ref.repo_id)
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


def _check_revision(rev: str) -> None:
    """A revision becomes a path in the cache (``refs/<rev>``): a branch, tag or commit, never a way out of it."""
    parts = rev.split("/")
    if not rev or len(rev) > 256 or rev.startswith("/") or _CONTROL_RE.search(rev) or "\\" in rev or ".." in parts:
        raise LoratoolsError(f"{_show(rev)} is not a revision", "give a branch, tag or commit of the repo")
    if any(p in ("", ".") for p in parts):
        raise LoratoolsError(f"{_show(rev)} is not a revision", "give a branch, tag or commit of the repo")


def cached_snapshot(repo_id: str, revision: str | None = None, env: HubEnv | None = None) -> Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (a branch, tag or commit), if there is one."""
    env = env or environment()
    storage = _storage(env, repo_id)
    rev = revision or DEFAULT_REVISION
    sha: str | None = rev if _COMMIT_RE.match(rev) else None
    if sha is None:
        try:
            sha = (storage / "refs" / rev).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not _COMMIT_RE.match(sha):
            return None
    snapshot = storage / "snapshots" / sha
    return snapshot if sha and snapshot.is_dir() else None


def _from_cache(ref: RepoRef, rev: str, kind: Kind, env: HubEnv, why: str, hint: str, local: str | None = None) -> Path:
    """The cached snapshot, when the Hub cannot be asked (``why``). ``local``: see :func:`_fetch`."""
    snapshot = cached_snapshot(ref.repo_id, rev, env)
    if snapshot is None:
        if local is not None and not _storage(env, ref.repo_id).is_dir():  # a mistyped local path? say that first
            raise HubError(
                f"{local}: no such local file or folder, and no Hub repo {ref.repo_id} in the cache ({why})",
                f"check the path; for the Hub: {hint}",
            )
        raise HubError(f"{ref.repo_id} (revision {rev!r}) is not in the cache {env.cache_dir}, and {why}", hint)
    files = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}

    def read_json(rel: str) -> Any:
        return _load_json(snapshot / rel, f"{ref.repo_id}/{rel}")

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


def listing(repo_id: str, revision: str | None = None, env: HubEnv | None = None) -> tuple[str, set[str]]:
    """The commit ``revision`` of ``repo_id`` is at, and the names of its files, checked (see :func:`parse_listing`),
    within the deadline. Errors of the Hub are raised as huggingface_hub raises them (see :func:`hub_error`)."""
    from huggingface_hub import get_session, hf_raise_for_status
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    from .version import __version__

    env = env or environment()
    rev = revision or DEFAULT_REVISION
    url = f"{env.endpoint}/api/models/{repo_id}/revision/{quote(rev, safe='')}"
    headers = build_hf_headers(token=env.token or False, library_name="loratools", library_version=__version__)
    with _watching(_Watch(f"the file list of {repo_id}", env.host, deadline(), listing=True)):
        response = get_session().get(url, headers=headers, timeout=timeout())
        hf_raise_for_status(response)
        data = response.content
    return parse_listing(data, repo_id, rev, env.host)


def _unwrap(e: BaseException) -> BaseException:
    """huggingface_hub's "not in the cache either" error, reduced to the failure of the Hub behind it."""
    from huggingface_hub import errors as hfe

    cause = e.__cause__
    return cause if isinstance(e, hfe.LocalEntryNotFoundError) and isinstance(cause, BaseException) else e


def fetch(arg: str, *, revision: str | None = None, kind: Kind = "adapter", progress: bool = True) -> Path:
    """Download what a command needs from a Hub repo into the huggingface_hub cache, and return the local path that
    loratools' readers take: a PEFT folder, a single adapter file, or a model folder / file for ``kind="checkpoint"``.

    Only the needed files are downloaded (an adapter never pulls the repo's other weights). Offline
    (``HF_HUB_OFFLINE=1``) or when the Hub cannot be reached, the cached snapshot is used, or a :class:`HubError` says
    it is not there. Each request keeps to a deadline (:func:`deadline`). ``progress`` shows huggingface_hub's bars on
    stderr (when it is a terminal).
    """
    return _fetch(arg, revision, kind, progress, None)


def _fetch(arg: str, revision: str | None, kind: Kind, progress: bool, local: str | None) -> Path:
    """:func:`fetch`; ``local``: the SOURCE as given, when it could have been a local path (errors say so first)."""
    ref = parse_repo_ref(arg)
    if ref is None:
        raise LoratoolsError(f"{arg!r} is not a Hub repo id", "write owner/name, or owner/name/path/in/repo")
    env = environment()
    rev = revision or DEFAULT_REVISION
    _check_revision(rev)
    if env.offline:
        return _from_cache(
            ref, rev, kind, env, "HF_HUB_OFFLINE is set", "run it once online (unset HF_HUB_OFFLINE)", local
        )
    seconds = deadline()
    from huggingface_hub import hf_hub_download

    from .version import __version__

    current: str | None = None
    snapshot: Path | None = None
    try:
        sha, files = listing(ref.repo_id, rev, env)

        def get(rel: str) -> Path:
            nonlocal current, snapshot
            current = rel
            with _watching(_Watch(f"{ref.repo_id}/{rel}", env.host, seconds, listing=False, commit=sha)):
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
            return _load_json(get(rel), f"{ref.repo_id}/{rel}")

        plan = _plan(files, ref, kind, read_json)
        for rel in plan.files:
            get(rel)
    except LoratoolsError:
        raise
    except Exception as e:
        err = hub_error(e, env, ref.repo_id, revision=rev, path=current or ref.path, arg=local)
        if err is None:
            raise
        failure = _unwrap(e)
        if isinstance(failure, _transport_errors()):  # the Hub is out of reach, or broke off: the cache may serve
            broken = isinstance(failure, _http_errors("ProtocolError"))
            why = err.message if broken else f"the Hub at {env.endpoint} cannot be reached"
            return _from_cache(ref, rev, kind, env, why, err.hint or "", local)
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
    except (OSError, UnicodeDecodeError):
        pass  # a read-only cache still serves this run; only offline look-ups by branch name need the ref


#: local cache path -> the repo id it was fetched as (provenance records the id, not the cache path)
_ORIGINS: dict[str, str] = {}


def origin(path: str | os.PathLike[str]) -> str | None:
    """The Hub repo id (``owner/name[/file][@revision]``) a local path was fetched as in this process, if any."""
    return _ORIGINS.get(str(path))


def resolve(arg: str, *, revision: str | None = None, kind: Kind = "adapter", progress: bool = True) -> Path:
    """What every command calls on a SOURCE: a local path as it is, a Hub repo id fetched (see :func:`fetch`).

    A SOURCE that is neither an existing local path nor of a repo id's form is returned as it is, for the reader to
    say that no such file exists; one of a repo id's form that names no local path is looked up on the Hub, and its
    error then says both: ``a/b: no such local file or folder, and no repo a/b on huggingface.co``."""
    if is_repo_id(arg):
        path = _fetch(arg, revision, kind, progress, None if arg.startswith(PREFIX) else arg)
        _ORIGINS[str(path)] = arg + (f"@{revision}" if revision else "")
        return path
    if revision is not None:
        raise LoratoolsError(f"--revision applies to Hub repo ids, and {arg} is a local path", "leave out --revision")
    return Path(arg)


# ---- push ------------------------------------------------------------------------------------------------------------

# why a file of SOURCE is not uploaded
HIDDEN = "hidden"
OTHER = "not part of the adapter (name it with --include to upload it)"
OTHER_PICKLE = "not part of the adapter, and a pickle (only with --include and --allow-pickles)"
PICKLE = "a pickle: loading it can run code (--allow-pickles to upload it)"
LINK_OUT = "a link to a file outside the folder"
LINK_HIDDEN = "a link to a hidden file"
LINK_DIR = "a link to a folder (not followed)"
BROKEN = "a broken link"
SPECIAL = "not a regular file"


@dataclass
class PushFile:
    path: str  # path in the repo
    size: int
    source: str  # the local file, or "generated" for a model card made by loratools


@dataclass
class LeftOut:
    path: str  # relative to SOURCE; a folder ends with "/"
    why: str


@dataclass
class PushReport:
    source: str
    repo_id: str
    revision: str
    format: str
    files: list[PushFile]
    card: str | None  # the README.md loratools uploads (made or updated), None when it uploads none of its own
    card_action: str  # generated | updated | kept (the folder's own README.md) | kept-remote (the repo's stays)
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


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def include_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be an ``--include`` pattern, or None."""
    if not pattern.strip():
        return "an empty pattern"
    if pattern.startswith("/") or re.match(r"^[A-Za-z]:", pattern):
        return "a pattern must be relative to SOURCE"
    if "\\" in pattern:
        return "write folders with /"
    if _CONTROL_RE.search(pattern):
        return "a pattern with control characters"
    parts = _pattern(pattern).rstrip("/").split("/")
    if ".." in parts:
        return "a pattern must stay inside SOURCE"
    if any(p.startswith(".") for p in parts):
        return "hidden files and folders are never uploaded"
    return None


def _pattern(pattern: str) -> str:
    while pattern.startswith("./"):
        pattern = pattern[2:]
    return pattern


def _matches(pattern: str, rel: str) -> bool:
    """huggingface_hub's ``allow_patterns`` rule (fnmatch on the path in the repo; ``dir/`` means ``dir/*``), and a
    folder's name stands for the files below it."""
    p = _pattern(pattern)
    return fnmatchcase(rel, p + "*" if p.endswith("/") else p) or fnmatchcase(rel, p.rstrip("/") + "/*")


@dataclass
class _Found:
    rel: str
    path: Path
    problem: str | None  # why it can never be uploaded; None for a regular file (or a link to one inside)


def _problem(p: Path, root: Path) -> str | None:
    if p.name.startswith("."):
        return HIDDEN
    try:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            target = Path(os.path.realpath(p))
            if not _inside(target, root):
                return LINK_OUT
            if any(part.startswith(".") for part in target.relative_to(root).parts):
                return LINK_HIDDEN
            st = os.stat(p)
    except OSError:
        return BROKEN
    return None if stat.S_ISREG(st.st_mode) else SPECIAL


def _scan(src: Path) -> tuple[list[_Found], list[LeftOut]]:
    """Every file under the folder SOURCE with what bars it, and the folders not entered (hidden ones, links to
    folders, unreadable ones). Links are never followed into folders."""
    root = src.resolve()
    found: list[_Found] = []
    out: list[LeftOut] = []

    def unreadable(e: OSError) -> None:
        rel = Path(e.filename).relative_to(src).as_posix() if e.filename else "?"
        out.append(LeftOut(f"{rel}/", f"cannot be listed ({e.strerror or type(e).__name__})"))

    for dirpath, dirnames, filenames in os.walk(src, onerror=unreadable):
        here = Path(dirpath)
        keep = []
        for name in sorted(dirnames):
            rel = (here / name).relative_to(src).as_posix()
            if name.startswith("."):
                out.append(LeftOut(f"{rel}/", HIDDEN))
            elif (here / name).is_symlink():
                out.append(LeftOut(f"{rel}/", LINK_DIR))
            else:
                keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            p = here / name
            found.append(_Found(p.relative_to(src).as_posix(), p, _problem(p, root)))
    return found, out


def _adapter_files(src: Path, top: dict[str, _Found]) -> list[str]:
    """The files the adapter in the folder is made of, by layout (as ``formats.detect`` reads a folder)."""
    from .formats import diffusers, peft

    if peft.CONFIG in top:
        weights = next((w for w in peft.WEIGHTS if w in top), None)
        if weights is None:
            raise FileFormatError(f"{src}: {peft.CONFIG} but no {' or '.join(peft.WEIGHTS)}")
        return [peft.CONFIG, weights]
    if diffusers.FILENAME in top:
        return [diffusers.FILENAME]
    tensors = sorted(rel for rel in top if rel.endswith(".safetensors") and not rel.startswith("."))
    if len(tensors) == 1:
        return tensors
    raise FileFormatError(
        f"{src}: no adapter found in this folder"
        + (f" ({len(tensors)} .safetensors files: {', '.join(tensors[:4])})" if tensors else ""),
        f"expected {peft.CONFIG} (PEFT), {diffusers.FILENAME} (diffusers) or one .safetensors file; "
        "push one adapter file by naming it",
    )


_KEY_MARK = b"PRIVATE KEY-----"


def secret_in(path: Path, token: str | None) -> str | None:
    """What secret the file holds, if any: the Hugging Face token in use, or a private key (in a .safetensors file,
    its header, where metadata lives)."""
    needles = [(_KEY_MARK, "a private key")]
    if token and len(token) >= 8:
        needles.insert(0, (token.encode("utf-8"), "the Hugging Face token in use"))
    keep = max(len(n) for n, _ in needles) - 1
    with open(path, "rb") as f:
        if path.name.lower().endswith(".safetensors"):
            head = f.read(8)
            chunks: Iterator[bytes] = iter([f.read(min(int.from_bytes(head, "little"), ANSWER_LIMIT))])
        else:
            chunks = iter(lambda: f.read(1 << 20), b"")
        tail = b""
        for chunk in chunks:
            buf = tail + chunk
            for needle, what in needles:
                if needle in buf:
                    return what
            tail = buf[-keep:]
    return None


def select(
    source: str | os.PathLike[str],
    *,
    include: Sequence[str] = (),
    allow_pickles: bool = False,
    token: str | None = None,
) -> tuple[list[tuple[str, Path]], list[LeftOut]]:
    """What ``push`` uploads from SOURCE, as (path in repo, local path), and what it leaves out, with why.

    A folder gives the files its adapter is made of (a PEFT config and weights, a diffusers or kohya file), its
    README.md, the usual companions (:data:`COMPANIONS`: tokenizer, chat template, licence) and the files
    ``include`` patterns name; never a hidden file, a link that leads out of SOURCE or to a hidden file, or a pickle
    without ``allow_pickles``. A file the adapter needs, or one an ``include`` pattern names exactly, that cannot go
    is an error; a file that holds ``token`` (or a private key) is always one."""
    src = Path(source)
    if not src.exists():
        raise FileFormatError(f"{src}: no such file or folder")
    patterns = list(include)
    for pattern in patterns:
        problem = include_problem(pattern)
        if problem:
            raise LoratoolsError(
                f"--include {_show(pattern)}: {problem}", "name files relative to SOURCE: --include 'samples/*.png'"
            )
    chosen: dict[str, Path] = {}
    left: list[LeftOut] = []
    if not src.is_dir():
        if patterns:
            raise LoratoolsError("--include applies to a folder SOURCE, and SOURCE is a file", "leave out --include")
        if src.name.startswith("."):
            raise LoratoolsError(
                f"refusing to upload {printable(src.name)}: a hidden file", "rename it without the leading dot"
            )
        if not src.is_file():
            raise LoratoolsError(f"cannot upload {printable(str(src))}: {SPECIAL}")
        chosen[src.name] = src
    else:
        found, left = _scan(src)
        by_rel = {f.rel: f for f in found}
        top = {f.rel: f for f in found if "/" not in f.rel and f.problem != HIDDEN}
        for rel in _adapter_files(src, top) + ([CARD] if CARD in top else []):
            problem = by_rel[rel].problem
            if problem:
                raise LoratoolsError(
                    f"cannot upload {printable(rel)}, a file of the adapter: {problem}",
                    "copy the file itself into the folder (cp -L)",
                )
            chosen[rel] = by_rel[rel].path
        for rel in sorted(COMPANIONS & set(top)):
            if by_rel[rel].problem is None:
                chosen[rel] = by_rel[rel].path
        for pattern in patterns:
            matched = [f for f in found if _matches(pattern, f.rel)]
            if not matched:
                raise LoratoolsError(f"--include {_show(pattern)} matches no file in {src}", "check the pattern")
            exact = len(matched) == 1 and matched[0].rel == _pattern(pattern)
            for f in matched:
                if f.rel in chosen:
                    continue
                problem = f.problem or (PICKLE if is_pickle(f.rel) and not allow_pickles else None)
                if problem is None:
                    chosen[f.rel] = f.path
                elif exact:
                    raise LoratoolsError(
                        f"refusing to upload {printable(f.rel)}: {problem}",
                        "pass --allow-pickles if you trust it"
                        if problem == PICKLE
                        else "copy what belongs to the upload into the folder",
                    )
        named = {lo.path for lo in left}
        for f in found:
            if f.rel not in chosen and f.rel not in named:
                why = f.problem or (OTHER_PICKLE if is_pickle(f.rel) else OTHER)
                if patterns and is_pickle(f.rel) and not allow_pickles and any(_matches(p, f.rel) for p in patterns):
                    why = PICKLE
                left.append(LeftOut(f.rel, why))
        chosen = dict(sorted(chosen.items()))
    pickles = [rel for rel in chosen if is_pickle(rel)]
    if pickles and not allow_pickles:
        raise LoratoolsError(
            f"refusing to upload pickle file(s): {', '.join(map(printable, pickles[:6]))}"
            + (" ..." if len(pickles) > 6 else ""),
            "a pickle can run code when it is loaded: save the adapter as safetensors, or pass --allow-pickles",
        )
    for rel, p in chosen.items():
        try:
            secret = secret_in(p, token)
        except OSError as e:
            raise LoratoolsError(f"cannot read {printable(rel)}: {e.strerror or type(e).__name__}") from None
        if secret:
            raise LoratoolsError(
                f"refusing to upload {printable(rel)}: it holds {secret}",
                "remove the token from the file (and revoke it if the file was ever shared)"
                if "token" in secret
                else "a private key never belongs in a repo: remove it from the file, or leave the file out",
            )
    return list(chosen.items()), sorted(left, key=lambda lo: lo.path)


def collect(source: str | os.PathLike[str], *, allow_pickles: bool = False) -> tuple[list[tuple[str, Path]], list[str]]:
    """The files ``push`` uploads (see :func:`select`), and the paths it leaves out."""
    entries, left = select(source, allow_pickles=allow_pickles)
    return entries, [lo.path for lo in left]


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
    include: Sequence[str] = (),
) -> PushReport:
    """Upload an adapter folder or file to ``repo_id`` in one commit, creating the repo (and branch) if needed, with
    a model card made from ``inspect`` when the folder has no README.md. What goes up is what :func:`select` picks;
    the report lists what was left out, and why. ``source`` is never modified: the card is uploaded from memory.
    ``dry_run`` makes no request at all."""
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
    rev = revision or DEFAULT_REVISION
    _check_revision(rev)
    env = environment()
    entries, left = select(src, include=include, allow_pickles=allow_pickles, token=env.token)
    fmt = detect(src)
    rep = report(load_adapter(src, fmt), src, norms=False)
    meta = card_metadata(rep)
    card: str | None = None
    readme = next((p for rel, p in entries if rel == CARD), None)
    if readme is None:
        card, action = render_card(rep, ref.repo_id, meta, [rel for rel, _ in entries]), "generated"
    elif update_card:
        card, action = updated_card(_card_text(readme), meta), "updated"
        entries = [(rel, p) for rel, p in entries if rel != CARD]
    else:
        action = "kept"
    if card is not None and env.token and env.token in card:
        raise LoratoolsError(
            "refusing to upload the model card: it would hold the Hugging Face token in use",
            "the adapter's config or metadata holds the token: remove it",
        )
    out = PushReport(
        source=str(src), repo_id=ref.repo_id, revision=rev, format=fmt,
        files=[PushFile(rel, p.stat().st_size, str(p)) for rel, p in entries], card=card, card_action=action,
        skipped=[lo.path for lo in left], dry_run=dry_run, private=private, create_pr=create_pr,
        url=env.web_url(ref.repo_id), left_out=left,
    )  # fmt: skip
    if card is not None:
        out.files.append(PushFile(CARD, len(card.encode("utf-8")), "generated"))
    if dry_run:
        return out
    if env.offline:
        raise HubError("cannot push while HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE to upload")
    _upload(out, entries, env, message, meta, update_card)
    return out


def _card_text(path: Path, name: str = CARD) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FileFormatError(f"{name}: not UTF-8 text") from None
    except OSError as e:
        raise FileFormatError(f"{name}: cannot be read ({e.strerror or type(e).__name__})") from None


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
            _, remote = listing(repo_id, revision, env)
            if CARD in remote:  # the repo's own card stays, or gets its metadata updated
                out.files = [f for f in out.files if f.path != CARD]
                if update:
                    with _watching(_Watch(f"{repo_id}/{CARD}", env.host, deadline(), listing=False)):
                        local = hf_hub_download(
                            repo_id, CARD, revision=revision, endpoint=env.endpoint, token=env.token or False,
                            cache_dir=env.cache_dir,
                        )  # fmt: skip
                    out.card = updated_card(_card_text(Path(local), f"{repo_id}/{CARD}"), meta)
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
        if err is None and isinstance(e, (ValueError, KeyError, TypeError)):  # huggingface_hub could not read an answer
            err = HubError(
                f"the Hub at {env.host} gave an answer huggingface_hub cannot read ({type(e).__name__})",
                "is HF_ENDPOINT a Hugging Face Hub (or a mirror of one)? the upload may not have happened",
            )
        if err is None:
            raise
        raise err from e
    out.commit_url, out.commit, out.pr_url = info.commit_url, info.oid, info.pr_url
