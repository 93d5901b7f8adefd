"""Deadlines and checks on every answer of the Hub.

huggingface_hub gives each read a timeout, not a request: a server that sends one byte every few seconds keeps a
download going for ever, and it retries a cut download as long as bytes keep coming. Two event hooks on its shared
HTTP client (active only inside :func:`watching`, in this context) bound both, and check what loratools relies on in
each answer before huggingface_hub uses it: sizes, and the commit and ETag that become paths in the cache.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from ..errors import HubError
from ..units import human_bytes
from .env import DEADLINE_VAR
from .ids import is_commit, show

#: a file's deadline grows by a second for each MiB received (up to its announced size): a download that averages
#: 1 MiB/s after its first minute always finishes
RATE = 1 << 20
#: the most bytes an answer of the Hub's API (a repo's file list) or a JSON index may hold
ANSWER_LIMIT = 64 << 20
#: the most bytes one file may announce: huggingface_hub's own limit for downloads over plain HTTP (50 GB)
MAX_FILE = 50 * 1000**3
#: the most times one request may be retried (huggingface_hub resumes a download as long as bytes keep coming)
MAX_RETRIES = 5

_ETAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


def _secs(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def wait_hint(headers: Any) -> str:
    """How long a rate-limited client should wait, from the answer's headers."""
    headers = headers or {}
    for key in ("Retry-After", "RateLimit-Reset"):
        value = headers.get(key)
        if value and str(value).strip().isdigit() and len(str(value).strip()) < 10:
            return f"wait {int(value)} s and try again"
    reset = re.search(r"\bt=(\d{1,9})\b", str(headers.get("RateLimit", "")))
    return f"wait {reset.group(1)} s and try again" if reset else "wait a minute and try again"


@dataclass
class Watch:
    """One request (a repo's file list) or one file's download (its HEAD, GET and retries), as it goes."""

    what: str  # "the file list of owner/name", "owner/name/adapter_model.safetensors"
    where: str  # the Hub's host
    seconds: float
    listing: bool
    commit: str | None = None  # the commit every answer about a file must come from
    verb: str = ""  # what the messages say is being done: "reading" (a listing), "downloading" (a file)
    start: float = field(default_factory=time.monotonic)
    received: int = 0
    size: int | None = None  # the size the Hub announced for the file
    asked: dict[str, int] = field(default_factory=dict)  # how often each request was sent
    last: dict[str, str] = field(default_factory=dict)  # what went wrong with it last time
    trouble: str | None = None  # what went wrong last, for the message

    def __post_init__(self) -> None:
        self.verb = self.verb or ("reading" if self.listing else "downloading")

    def allowed(self) -> float:
        if self.listing:
            return self.seconds
        return self.seconds + min(self.received, self.size if self.size is not None else MAX_FILE) / RATE

    def left(self) -> float:
        return self.start + self.allowed() - time.monotonic()

    def late(self) -> HubError:
        detail = f" ({self.trouble})" if self.trouble else ""
        return HubError(
            f"{self.verb} {self.what} from {self.where} did not finish within {_secs(self.allowed())} s{detail}",
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
                f"{self.verb} {self.what} from {self.where}: gave up after {n - 1} attempts ({self.trouble})",
                "the Hub or the network is failing: try again later",
            )

    def broke_off(self, key: str) -> None:
        self.trouble = self.last[key] = "the connection broke off"

    def check(self, status: int, headers: Any, method: str, key: str) -> int:
        """What an answer's headers say, checked; returns the most body bytes it may have."""
        if status == 429:
            raise HubError(
                f"the Hub at {self.where} is rate limiting this client (429 Too Many Requests)", wait_hint(headers)
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
            if not is_commit(commit):
                raise HubError(
                    f"the Hub at {self.where} answered {self.what} with a commit id that is not one ({show(commit)})",
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
                    f"({show(etag)})",
                    "is HF_ENDPOINT a Hugging Face Hub (or a mirror of one)?",
                )
        return limit if status >= 300 or self.size is None else self.size


_WATCH: ContextVar[Watch | None] = ContextVar("loratools_hub_watch", default=None)
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
        def __init__(self, inner: Any, watch: Watch, limit: int, key: str) -> None:
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
def watching(w: Watch) -> Iterator[Watch]:
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
