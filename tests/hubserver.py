"""A small Hub-compatible HTTP server for the tests, stdlib only, on 127.0.0.1.

It answers exactly what the real ``huggingface_hub`` client sends for the calls loratools makes, over an in-memory
store of repos (commits as whole file maps):

- ``POST /api/repos/create``: create a repo (initial commit with ``.gitattributes``), 409 when it exists
- ``POST /api/validate-yaml``: parse a README's front matter (400 when it does not parse)
- ``POST /api/models/{repo}/preupload/{rev}``: every file is uploaded "regular" (base64 in the commit)
- ``POST /api/models/{repo}/commit/{rev}``: the NDJSON commit (``?create_pr=1`` opens ``refs/pr/N``)
- ``POST /api/models/{repo}/branch/{branch}``: create a branch
- ``GET /api/models/{repo}[/revision/{rev}]``: model info with ``sha`` and ``siblings``
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the file listing
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}``: a file, with ``X-Repo-Commit``, ``ETag``, ``Content-Length`` and
  ``Range`` (``bytes=a-b`` and ``bytes=a-``, 206 with ``Content-Range``; 416 past the end), as header-only reads of
  safetensors files ask for it

Writes need a token from ``tokens`` (401 without one); a wrong token is 401 on any request; private repos are not
found without a token; gated repos refuse downloads (403 ``GatedRepo``). Unknown repos, revisions and files are 404
with the ``X-Error-Code`` the client turns into its typed errors. ``log`` records every request as
(method, path, authenticated), ``ranges`` every range asked for, ``authorizations`` every Authorization header
received; ``force`` makes every answer
one status (429 rate limits, 5xx).

A hostile Hub: ``serve(method, path_regex, reply)`` answers matching requests with ``reply`` (a :class:`Reply`, or a
function of the request's path returning one) before any route, and a reply can lie and misbehave: announce another
Content-Length (``length``), send its body slowly (``pause`` seconds between ``chunk``-byte pieces), break the
connection after ``cut`` bytes, or write ``raw`` bytes that are not HTTP at all.

The fixtures at the end (``no_internet``, ``hf_env``, ``server``) are shared by the Hub tests.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

TOKEN = "hf_test_SECRETtoken_0123456789"


def blob_sha(data: bytes) -> str:
    """git's blob id: what the Hub calls a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool = False
    gated: bool = False
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: bytes}
    messages: dict[str, str] = field(default_factory=dict)
    prs: int = 0


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    head_length: int | None = None  # Content-Length to announce for HEAD
    # a hostile server's ways
    length: int | str | None = None  # the Content-Length to announce instead of the body's ("" : none at all)
    pause: float = 0.0  # seconds between pieces of the body
    chunk: int = 1 << 16  # bytes per piece
    cut: int | None = None  # close the connection after this many bytes of the body
    raw: bytes | None = None  # written as it is instead of an HTTP answer, then the connection is closed


Rule = tuple[str | None, "re.Pattern[str]", "Reply | Callable[[str], Reply | None]"]


def _json(status: int, data: Any, **headers: str) -> Reply:
    return Reply(status, json.dumps(data).encode(), {"Content-Type": "application/json", **headers})


def _error(status: int, code: str | None, message: str, **headers: str) -> Reply:
    extra = {"X-Error-Message": message, **headers}
    if code:
        extra["X-Error-Code"] = code
    return _json(status, {"error": message}, **extra)


class HubServer:
    def __init__(self, tokens: set[str] | None = None) -> None:
        self.tokens = set(tokens or ())
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str, bool]] = []
        self.ranges: list[tuple[str, str]] = []  # (path, Range header) of every request that asked for a range
        self.authorizations: list[str] = []
        self.force: tuple[int, dict[str, str]] | None = None
        self.rules: list[Rule] = []
        self.lock = threading.RLock()
        self._counter = itertools.count(1)
        self._httpd: ThreadingHTTPServer | None = None

    # ---- life -------------------------------------------------------------------------------------------------

    def start(self) -> HubServer:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        httpd = _Quiet(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        httpd.block_on_close = False
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, args=(0.01,), name="hubserver", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    # ---- the store ----------------------------------------------------------------------------------------------

    def _commit(self, repo: Repo, files: dict[str, bytes], message: str) -> str:
        sha = hashlib.sha1(f"commit {next(self._counter)} {sorted(files)}".encode()).hexdigest()
        repo.commits[sha] = dict(files)
        repo.messages[sha] = message
        return sha

    def add_repo(
        self, repo_id: str, files: dict[str, bytes] | None = None, *, private: bool = False, gated: bool = False
    ) -> str:
        """A repo with ``files`` on main; returns the commit."""
        with self.lock:
            repo = Repo(private=private, gated=gated)
            sha = self._commit(repo, {".gitattributes": b"*.safetensors filter=lfs\n", **(files or {})}, "init")
            repo.refs["main"] = sha
            self.repos[repo_id] = repo
            return sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self.lock:
            repo = self.repos[repo_id]
            return dict(repo.commits[repo.refs.get(revision, revision)])

    def serve(self, method: str | None, path: str, reply: Reply | Callable[[str], Reply | None]) -> None:
        """Answer ``method`` (None: any) requests whose path matches the regex ``path`` with ``reply``."""
        with self.lock:
            self.rules.append((method, re.compile(path), reply))

    def requests(self, method: str | None = None, contains: str = "") -> list[str]:
        return [p for m, p, _ in self.log if (method is None or m == method) and contains in p]

    def downloads(self, repo_id: str) -> list[str]:
        """Files whose bytes were sent (GET on resolve, not for a range of the file), as paths in the repo."""
        ranged = [p for p, _ in self.ranges]
        out = []
        for path in self.requests("GET", f"/{repo_id}/resolve/"):
            if path in ranged:
                ranged.remove(path)
                continue
            out.append(path.split("/resolve/", 1)[1].split("/", 1)[1])
        return out

    def ranged(self, repo_id: str) -> list[tuple[str, str]]:
        """The range requests for files of ``repo_id``: (path in the repo, the Range asked for)."""
        prefix = f"/{repo_id}/resolve/"
        return [(p[len(prefix) :].split("/", 1)[1], r) for p, r in self.ranges if p.startswith(prefix)]

    # ---- requests -----------------------------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> Reply:
        split = urlsplit(raw_path)
        parts = [unquote(p) for p in split.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        auth = headers.get("authorization") or ""
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        with self.lock:
            self.log.append((method, unquote(split.path), token in self.tokens))
            if headers.get("range"):
                self.ranges.append((unquote(split.path), str(headers.get("range"))))
            if auth:
                self.authorizations.append(auth)
            for want, pattern, reply in self.rules:
                if (want is None or want == method) and pattern.search(unquote(split.path)):
                    answer = reply(unquote(split.path)) if callable(reply) else reply
                    if answer is not None:
                        return answer
            if token is not None and token not in self.tokens:
                return _error(401, None, "Invalid credentials in Authorization header")
            if self.force is not None:
                status, extra = self.force
                return _error(status, None, f"forced {status}", **extra)
            return self._route(method, parts, query, token is not None, body)

    def _route(self, method: str, parts: list[str], query: dict[str, str], authed: bool, body: bytes) -> Reply:
        if parts[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create(json.loads(body or b"{}"), authed)
        if parts[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml(json.loads(body or b"{}"))
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            repo = self.repos.get(repo_id)
            if repo is None or (repo.private and not authed):
                return _error(401 if not authed else 404, "RepoNotFound", "Repository not found")
            if method == "GET" and (not rest or rest[0] == "revision"):
                return self._info(repo_id, repo, "/".join(rest[1:]) or "main")
            if method == "GET" and rest and rest[0] == "tree":
                return self._tree(repo, rest[1], "/".join(rest[2:]), query.get("recursive") in ("True", "true", "1"))
            if method == "POST" and rest and rest[0] in ("preupload", "commit", "branch"):
                if not authed:
                    return _error(401, None, "You must be authenticated to write to this repo")
                target = "/".join(rest[1:])
                if rest[0] == "preupload":
                    return self._preupload(repo, target, json.loads(body or b"{}"))
                if rest[0] == "commit":
                    return self._commit_request(repo_id, repo, target, body, query.get("create_pr") == "1")
                return self._branch(repo, target, json.loads(body or b"{}"))
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), authed)
        return _error(404, None, f"no route for {method} /{'/'.join(parts)}")

    def _sha(self, repo: Repo, revision: str) -> str | None:
        if revision in repo.refs:
            return repo.refs[revision]
        return revision if revision in repo.commits else None

    def _create(self, payload: dict[str, Any], authed: bool) -> Reply:
        if not authed:
            return _error(401, None, "Invalid username or password.")
        repo_id = f"{payload.get('organization')}/{payload.get('name')}"
        if repo_id in self.repos:
            return _json(409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
        self.add_repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        return _json(200, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, payload: dict[str, Any]) -> Reply:
        content = str(payload.get("content", ""))
        m = re.match(r"^---\n(.*?)\n---\n", content, flags=re.S)
        try:
            meta = yaml.safe_load(m.group(1)) if m else {}
        except yaml.YAMLError as e:
            return _json(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
        if meta is not None and not isinstance(meta, dict):
            return _json(400, {"errors": [{"message": "metadata must be a mapping"}]})
        return _json(200, {"errors": [], "warnings": []})

    def _info(self, repo_id: str, repo: Repo, revision: str) -> Reply:
        sha = self._sha(repo, revision)
        if sha is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = repo.commits[sha]
        siblings = [{"rfilename": p, "size": len(b)} for p, b in sorted(files.items())]
        return _json(200, {"id": repo_id, "sha": sha, "private": repo.private, "gated": repo.gated, "siblings": siblings, "tags": []})  # fmt: skip

    def _tree(self, repo: Repo, revision: str, path: str, recursive: bool) -> Reply:
        sha = self._sha(repo, revision)
        if sha is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        entries: list[dict[str, Any]] = []
        folders: set[str] = set()
        for p, data in sorted(repo.commits[sha].items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/", 1)[0])
                continue
            entries.append({"type": "file", "path": p, "size": len(data), "oid": blob_sha(data)})
        entries += [{"type": "directory", "path": f, "oid": blob_sha(f.encode())} for f in sorted(folders)]
        return _json(200, entries)

    def _preupload(self, repo: Repo, revision: str, payload: dict[str, Any]) -> Reply:
        sha = self._sha(repo, revision)
        if sha is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        current = repo.commits[sha]
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": blob_sha(current[f["path"]]) if f["path"] in current else None,
            }
            for f in payload.get("files", [])
        ]
        return _json(200, {"files": files})

    def _commit_request(self, repo_id: str, repo: Repo, revision: str, body: bytes, create_pr: bool) -> Reply:
        base = self._sha(repo, revision)
        if base is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = dict(repo.commits[base])
        summary = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                if value.get("encoding") != "base64":
                    return _error(400, None, "only base64 file contents are supported here")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:
                return _error(400, None, f"this test server does not take {key!r} operations")
        sha = self._commit(repo, files, summary)
        pr_url = None
        if create_pr:
            repo.prs += 1
            repo.refs[f"refs/pr/{repo.prs}"] = sha
            pr_url = f"{self.url}/{repo_id}/discussions/{repo.prs}"
        else:
            repo.refs[revision] = sha
        return _json(200, {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": pr_url})  # fmt: skip

    def _branch(self, repo: Repo, branch: str, payload: dict[str, Any]) -> Reply:
        if branch in repo.refs:
            return _error(409, None, "Reference already exists")
        start = self._sha(repo, str(payload.get("startingPoint") or "main"))
        if start is None:
            return _error(404, "RevisionNotFound", "Invalid starting point")
        repo.refs[branch] = start
        return _json(200, {})

    def _resolve(self, repo_id: str, revision: str, path: str, authed: bool) -> Reply:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authed):
            return _error(401 if not authed else 404, "RepoNotFound", "Repository not found")
        if repo.gated:
            return _error(403 if authed else 401, "GatedRepo", "Access to this repo is restricted")
        sha = self._sha(repo, revision)
        if sha is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        data = repo.commits[sha].get(path)
        if data is None:
            return _error(404, "EntryNotFound", "Entry not found", **{"X-Repo-Commit": sha})
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{blob_sha(data)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        return Reply(200, data, headers, head_length=len(data))


class _Handler(BaseHTTPRequestHandler):
    server_hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _answer(self, method: str) -> None:
        reply = self.server_hub.handle(method, self.path, self.headers, self._body() if method == "POST" else b"")
        body, status = reply.body, reply.status
        headers = dict(reply.headers)
        rng = self.headers.get("Range")
        m = re.match(r"bytes=(\d+)-(\d*)$", rng or "")
        if status == 200 and reply.head_length is not None and m:
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(body) - 1
            end = min(end, len(body) - 1)
            if start > end:
                status, body = 416, b""
                headers["Content-Range"] = f"bytes */{len(reply.body)}"
            else:
                status, body = 206, body[start : end + 1]
                headers["Content-Range"] = f"bytes {start}-{end}/{len(reply.body)}"
        if reply.raw is not None:
            self.wfile.write(reply.raw)
            self.wfile.flush()
            self._hang_up()
            return
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        length = reply.length if reply.length is not None else len(body)
        if method == "HEAD" and reply.length is None and reply.head_length is not None and status == 200:
            length = reply.head_length
        if length != "":
            self.send_header("Content-Length", str(length))
        else:
            self.close_connection = True  # the body ends when the connection does
        self.end_headers()
        if method == "HEAD":
            return
        if reply.cut is not None:
            body = body[: reply.cut]
        try:
            for i in range(0, len(body), reply.chunk):
                if i and reply.pause:
                    time.sleep(reply.pause)
                self.wfile.write(body[i : i + reply.chunk])
                self.wfile.flush()
        except OSError:  # the client gave up
            self.close_connection = True
            return
        if reply.cut is not None or length == "":
            self._hang_up()

    def _hang_up(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def do_GET(self) -> None:
        self._answer("GET")

    def do_HEAD(self) -> None:
        self._answer("HEAD")

    def do_POST(self) -> None:
        self._answer("POST")


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:  # a client that hung up is not news
        pass


# ---- fixtures shared by the Hub tests -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_internet(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Any connection or name lookup beyond 127.0.0.1 is refused and recorded; the test then fails."""
    attempts: list[Any] = []
    local = ("127.0.0.1", "localhost", "::1")
    real_connect, real_gai = socket.socket.connect, socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> None:
        if isinstance(address, tuple) and address[0] not in local:
            attempts.append(address)
            raise OSError(f"test guard: no network beyond 127.0.0.1 ({address[0]})")
        real_connect(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in (*local, None):
            attempts.append(host)
            raise socket.gaierror(f"test guard: no name lookups ({host})")
        return real_gai(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts
    assert not attempts, f"a test tried to reach {attempts}"


def set_env(monkeypatch: pytest.MonkeyPatch, **env: str | None) -> None:
    """Set (None: unset) environment variables as a process started with them would see them: huggingface_hub reads
    most of its variables once, when it is imported, into ``huggingface_hub.constants`` (which loratools looks up at
    each call); so the variables are set, and every constant they change is recomputed the way huggingface_hub
    computes it (its ``constants`` module run afresh) and patched for the test."""
    import importlib.util

    import huggingface_hub.constants as constants

    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("_loratools_test_hf_constants", constants.__file__)
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    for name, value in vars(fresh).items():
        if name.isupper() and getattr(constants, name, None) != value:
            monkeypatch.setattr(constants, name, value)


@pytest.fixture
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private HF_HOME and cache, no token, online, no Xet, no telemetry, the default deadline."""
    home = tmp_path / "hf-home"
    # other test modules import huggingface_hub with HF_HUB_OFFLINE=1 (the fixture builders set it): online here
    set_env(
        monkeypatch, HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"), HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1", HF_TOKEN=None, HF_HUB_OFFLINE=None, TRANSFORMERS_OFFLINE=None,
        HF_TOKEN_PATH=None, HUGGINGFACE_HUB_CACHE=None, LORATOOLS_HUB_DEADLINE=None, HF_ENDPOINT=None,
        HF_HUB_ETAG_TIMEOUT=None, HF_OIDC_RESOURCE=None,
    )  # fmt: skip
    return home


@pytest.fixture
def server(hf_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    with HubServer(tokens={TOKEN}) as s:
        set_env(monkeypatch, HF_ENDPOINT=s.url, HF_TOKEN=TOKEN)
        yield s
