"""The hostile battery, Hub responses: the real huggingface_hub client against tests/hubserver.py serving lying,
broken, slow and malicious answers (file lists, file headers and bodies, configs, base indexes, redirects, statuses).

Every case: one ``Error:`` line (exit 1, usage 2), never a traceback, never a hang (a short deadline through
``LORATOOLS_HUB_DEADLINE``), the token never printed, and nothing written outside the cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hostile
import hubserver
import numpy as np
import pytest
from conftest import FIXTURES
from hubserver import TOKEN, HubServer, Reply
from safetensors.numpy import save as st_save

from loratools import hub
from loratools.errors import HubError
from loratools.hub import filelist as hub_listing
from loratools.hub import watch as hub_watch

no_internet, hf_env, server = hubserver.no_internet, hubserver.hf_env, hubserver.server  # the shared fixtures

REPO = "evil/repo"
SHA = "5" * 40
ADAPTER = {p.name: p.read_bytes() for p in sorted((FIXTURES / "peft_llama").iterdir())}
LISTING = r"^/api/models/evil/repo(/revision/.*)?$"


def info(files: Any = None, **over: Any) -> dict[str, Any]:
    """A model-info answer for REPO listing ``files`` (names or sibling objects), with keys replaced by ``over``."""
    names = list(ADAPTER) if files is None else files
    siblings = [f if isinstance(f, dict) else {"rfilename": f} for f in names]
    return {"id": REPO, "sha": SHA, "private": False, "siblings": siblings, **over}


def body(data: Any) -> bytes:
    return data if isinstance(data, bytes) else json.dumps(data).encode()


def outside(tmp_path: Path) -> set[str]:
    """Every path under tmp_path but the cache: a hostile answer must never write there."""
    home = tmp_path / "hf-home"
    return {str(p) for p in tmp_path.rglob("*") if not p.is_relative_to(home)}


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """A half-second deadline: a slow or stalled Hub fails fast."""
    monkeypatch.setenv(hub.DEADLINE_VAR, "0.5")


def slow_but(params: list[Any], *default: str) -> list[Any]:
    """The cases, all but ``default`` (ids) marked slow: the default run keeps a few of each kind."""
    assert set(default) <= {p.id for p in params}, set(default) - {p.id for p in params}
    return [
        p if p.id in default else pytest.param(*p.values, marks=[*p.marks, pytest.mark.slow], id=p.id) for p in params
    ]


def check(server: HubServer, tmp_path: Path, args: list[str], says: str | list[str], code: int = 1) -> hostile.Outcome:
    before = outside(tmp_path)
    got = hostile.run(args, code=code, says=says, seconds=15)
    assert TOKEN not in got.stdout + got.stderr
    assert outside(tmp_path) == before, "a Hub answer wrote outside the cache"
    return got


# ---- the file list (model info) ------------------------------------------------------------------------------------

deep = b'{"id": "evil/repo", "sha": "' + SHA.encode() + b'", "siblings": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

LISTINGS: list[Any] = [
    pytest.param(info([5]), "a file name that is int", id="sibling-int-name"),
    pytest.param(info([None]), "a file name that is null", id="sibling-null-name"),
    pytest.param(info([{"size": 3}]), "has no file name ('rfilename')", id="sibling-without-name"),
    pytest.param(info([["adapter_config.json"]]), "a file name that is list", id="sibling-name-a-list"),
    pytest.param(info(["x"]) | {"siblings": ["adapter_config.json"]}, "has no file name", id="sibling-a-string"),
    pytest.param(info() | {"siblings": {"a": 1}}, "'siblings' is not a list", id="siblings-an-object"),
    pytest.param(info() | {"siblings": None}, "no list of files ('siblings')", id="siblings-null"),
    pytest.param({"id": REPO, "sha": SHA}, "no list of files", id="siblings-missing"),
    pytest.param({k: v for k, v in info().items() if k != "id"}, "no repo id ('id')", id="no-id"),
    pytest.param(info(id=7), "the repo id is '7'", id="id-an-int"),
    pytest.param(info(id=""), "the repo id is ''", id="id-empty"),
    pytest.param({k: v for k, v in info().items() if k != "sha"}, "no commit ('sha')", id="no-sha"),
    pytest.param(info(sha=12345), "not a commit id", id="sha-an-int"),
    pytest.param(info(sha="../../../../tmp/x"), "not a commit id", id="sha-a-path"),
    pytest.param(info(sha="abc123"), "not a commit id", id="sha-too-short"),
    pytest.param(info(sha="A" * 40), "not a commit id", id="sha-upper-case"),
    pytest.param(info(sha=None), "no commit ('sha')", id="sha-null"),
    pytest.param(info([*ADAPTER, "/etc/passwd"]), "an absolute file name", id="absolute-name"),
    pytest.param(info([*ADAPTER, "../../../.bashrc"]), "'..' part", id="dotdot-name"),
    pytest.param(info([*ADAPTER, "a/../../b"]), "'..' part", id="dotdot-inside-name"),
    pytest.param(info([*ADAPTER, "a//b"]), "an empty or '.' part", id="empty-part"),
    pytest.param(info([*ADAPTER, "./x"]), "an empty or '.' part", id="dot-part"),
    pytest.param(info([*ADAPTER, "a/"]), "an empty or '.' part", id="trailing-slash"),
    pytest.param(info([*ADAPTER, ""]), "an empty file name", id="empty-name"),
    pytest.param(info([*ADAPTER, "a\\..\\..\\b"]), "a '..' part", id="backslash-name"),
    pytest.param(info([*ADAPTER, "\\\\host\\share\\x"]), "an absolute file name", id="unc-name"),
    pytest.param(info([*ADAPTER, "C:/Windows/x"]), "an absolute file name", id="drive-name"),
    pytest.param(info([*ADAPTER, "a\nb"]), "control characters", id="newline-name"),
    pytest.param(info([*ADAPTER, "a\x00b"]), "control characters", id="nul-name"),
    pytest.param(info([*ADAPTER, "x" * 5000]), "a file name of 5000 characters", id="long-name"),
    pytest.param(
        info([*ADAPTER, "[/x]\x00"]),
        "'[/x]\\x00'",
        id="markup-in-a-name",
    ),
    pytest.param(
        info([*ADAPTER, "adapter_config.json/x.safetensors"]),
        "'adapter_config.json' is both a file and a folder",
        id="file-and-folder",
    ),
    pytest.param(info([*ADAPTER, "a/b", "a"]), "'a' is both a file and a folder", id="file-and-folder-deep"),
    pytest.param(info([*ADAPTER, "adapter_config.json"]), "lists 'adapter_config.json' twice", id="listed-twice"),
    pytest.param(b"{", "not valid JSON", id="truncated-json"),
    pytest.param(b"", "not valid JSON", id="empty-body"),
    pytest.param(b"<html>maintenance</html>", "not valid JSON", id="html"),
    pytest.param(b"[]", "a JSON list, not an object", id="json-list"),
    pytest.param(b'"x"', "a JSON str, not an object", id="json-string"),
    pytest.param(b"null", "a JSON NoneType, not an object", id="json-null"),
    pytest.param(b"\xff\xfe{}", "not UTF-8", id="not-utf8"),
    pytest.param(deep, "nested deeper than 64 levels", id="deep-nesting"),
    pytest.param(
        b'{"id": "evil/repo", "sha": "' + SHA.encode() + b'", "sha": "' + b"6" * 40 + b'", "siblings": []}',
        "duplicate key 'sha'",
        id="duplicate-key",
    ),
]


@pytest.mark.parametrize(
    ("answer", "says"),
    slow_but(
        LISTINGS,
        "sibling-int-name",
        "sibling-null-name",
        "no-id",
        "sha-a-path",
        "absolute-name",
        "dotdot-name",
        "file-and-folder",
        "truncated-json",
        "deep-nesting",
        "duplicate-key",
        "backslash-name",
    ),
)
def test_a_hostile_file_list(server: HubServer, tmp_path: Path, answer: Any, says: str) -> None:
    server.serve("GET", LISTING, Reply(200, body(answer), {"Content-Type": "application/json"}))
    check(server, tmp_path, ["inspect", REPO], ["sent a broken file list for evil/repo", says])
    assert server.downloads(REPO) == []  # nothing is fetched on a broken list


@pytest.mark.parametrize(
    "junk",
    slow_but(
        [
            pytest.param({"private": "yes", "gated": [1], "tags": 5, "downloads": "many"}, id="wrong-types-elsewhere"),
            pytest.param({"cardData": [], "siblings_extra": None, "lastModified": 12}, id="wrong-card-data"),
            pytest.param({"siblings": [{"rfilename": n, "size": "big", "lfs": 3} for n in ADAPTER]}, id="wrong-sizes"),
            pytest.param(
                {"siblings": [*info()["siblings"], {"rfilename": "notes\\x.txt"}]}, id="a-backslash-elsewhere"
            ),
        ],
        "wrong-sizes",
    ),
)
def test_junk_beside_what_is_used_does_not_matter(server: HubServer, tmp_path: Path, junk: dict[str, Any]) -> None:
    """Fields loratools does not use are not read, so junk in them cannot break a download."""
    sha = server.add_repo(REPO, ADAPTER)
    server.serve("GET", LISTING, Reply(200, body(info(sha=sha) | junk)))
    got = check(server, tmp_path, ["inspect", REPO, "--json"], [], code=0)
    assert json.loads(got.stdout)["format"] == "peft"


def test_a_listing_of_another_commit_than_asked(server: HubServer, tmp_path: Path) -> None:
    server.serve("GET", LISTING, Reply(200, body(info())))
    check(server, tmp_path, ["inspect", REPO, "--revision", "7" * 40], f"not of the commit {'7' * 40} asked for")


def test_too_many_files(server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_listing, "MAX_FILES", 50)
    server.serve("GET", LISTING, Reply(200, body(info([*ADAPTER, *(f"f{i}" for i in range(49))]))))
    check(server, tmp_path, ["inspect", REPO], "51 files, more than 50")


@pytest.mark.slow
def test_a_huge_file_list(server: HubServer, tmp_path: Path) -> None:
    names = [*ADAPTER, *(f"x/{i:06d}.json" for i in range(hub_listing.MAX_FILES))]
    server.serve("GET", LISTING, Reply(200, body(info(names))))
    check(server, tmp_path, ["inspect", REPO], f"{hub_listing.MAX_FILES + 2} files, more than {hub_listing.MAX_FILES}")


@pytest.mark.slow
def test_a_big_but_honest_file_list_is_fine(server: HubServer, tmp_path: Path) -> None:
    """20,000 files in 2,000 folders: planning stays linear (a folder is never rescanned per sub-folder)."""
    files = {**ADAPTER, **{f"runs/{i // 10}/{i}.txt": b"" for i in range(20_000)}}
    sha = server.add_repo(REPO, {})
    server.repos[REPO].commits[sha] = files
    check(server, tmp_path, ["inspect", REPO, "--json"], [], code=0)
    assert sorted(server.downloads(REPO)) == sorted(ADAPTER)


def test_a_list_that_announces_ten_terabytes(server: HubServer, tmp_path: Path) -> None:
    server.serve("GET", LISTING, Reply(200, body(info()), length=10**13, cut=100))
    check(server, tmp_path, ["inspect", REPO], "announces 10000000000000 bytes for the file list of evil/repo")


def test_a_list_longer_than_a_list_may_be(server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_watch, "ANSWER_LIMIT", 4096)
    server.serve("GET", LISTING, Reply(200, body(info([f"f{i}" for i in range(500)])), length=""))
    check(server, tmp_path, ["inspect", REPO], "sent more than 4096 bytes for the file list of evil/repo")


STATUSES: list[Any] = [
    pytest.param(Reply(500, b"oops"), "the Hub at 127.0.0.1", id="500"),
    pytest.param(Reply(502, b""), "failed (502)", id="502"),
    pytest.param(Reply(503, b"", {"Retry-After": "99999999"}), "failed (503)", id="503-retry-after"),
    pytest.param(Reply(429, b"", {"Retry-After": "99999999999999"}), "rate limiting", id="429-huge-retry-after"),
    pytest.param(Reply(429, b"", {"RateLimit": '"api";r=0;t=4'}), "rate limiting", id="429-ratelimit-header"),
    pytest.param(Reply(404, b"not here"), "no repo evil/repo", id="404-no-error-code"),
    pytest.param(Reply(401, b"{}", {"X-Error-Code": "RepoNotFound"}), "may see (401", id="401-repo-not-found"),
    pytest.param(Reply(401, b"{}"), "refused the token (401", id="401"),
    pytest.param(Reply(403, b"{}"), "permission denied (403", id="403"),
    pytest.param(Reply(418, b"teapot"), "answered 418", id="418"),
    pytest.param(Reply(400, b"{}", {"X-Error-Message": "bad\tthing " + "x" * 500}), "400 Bad Request", id="400"),
    pytest.param(Reply(302, b"", {"Location": "/api/models/evil/repo/revision/main"}), "in a loop", id="redirect-loop"),
    pytest.param(Reply(302, b"", {"Location": "http://[::1"}), "evil/repo", id="redirect-to-a-broken-url"),
    pytest.param(Reply(200, b"", raw=b"SSH-2.0-OpenSSH_9.0\r\n"), "broken answer", id="not-http"),
    pytest.param(Reply(200, b"x" * 100, length=1000, cut=10), "broken answer", id="truncated"),
    pytest.param(Reply(200, b"abc", {"Content-Encoding": "gzip"}), "broken answer", id="bad-gzip"),
    pytest.param(Reply(200, b"{}", length="-5"), "broken answer", id="negative-length"),
    pytest.param(Reply(200, b"{}", length="12abc"), "broken answer", id="garbage-length"),
    pytest.param(Reply(418, b"X\0\0\0" + b"\xff" * 8), "an error whose message is not text", id="error-not-text"),
]


@pytest.mark.parametrize(
    ("reply", "says"),
    slow_but(STATUSES, "500", "429-huge-retry-after", "404-no-error-code", "redirect-loop", "not-http", "truncated"),
)
def test_a_hostile_status_for_the_file_list(server: HubServer, tmp_path: Path, reply: Reply, says: str) -> None:
    server.serve("GET", LISTING, reply)
    got = check(server, tmp_path, ["inspect", REPO], says)
    assert got.seconds < 5  # no Retry-After is slept, no retry loop runs


def test_the_token_never_leaves_the_hub_on_a_redirect(server: HubServer, tmp_path: Path) -> None:
    with HubServer(tokens={TOKEN}) as elsewhere:
        elsewhere.serve("GET", ".*", Reply(404, b"{}"))
        server.serve("GET", LISTING, Reply(302, b"", {"Location": f"{elsewhere.url}/api/models/evil/repo"}))
        check(server, tmp_path, ["inspect", REPO], "no repo evil/repo")
        assert elsewhere.log and not elsewhere.authorizations  # it was asked, without the token


@pytest.mark.parametrize(
    "reply",
    slow_but(
        [
            pytest.param(Reply(200, body(info()), pause=0.2, chunk=1), id="one-byte-at-a-time"),
            pytest.param(Reply(200, body(info()), pause=30, chunk=10), id="stalls"),
        ],
        "one-byte-at-a-time",
    ),
)
def test_a_slow_file_list(server: HubServer, tmp_path: Path, quick: None, reply: Reply) -> None:
    server.serve("GET", LISTING, reply)
    got = check(server, tmp_path, ["inspect", REPO], "reading the file list of evil/repo from 127.0.0.1")
    assert "did not finish within 0.5 s" in got.stderr and got.seconds < 4


# ---- a file's headers and body -------------------------------------------------------------------------------------

WEIGHTS = r"^/evil/repo/resolve/[^/]+/adapter_model\.safetensors$"


def file_reply(server: HubServer, **change: Any) -> Callable[[str], Reply]:
    """The honest answer for the adapter's weights, with ``change`` applied (headers merged; None removes one)."""
    headers = change.pop("headers", {})

    def answer(path: str) -> Reply:
        honest = server._resolve(REPO, path.split("/")[4], "adapter_model.safetensors", True)
        merged = {k: v for k, v in {**honest.headers, **headers}.items() if v is not None}
        return dataclasses.replace(honest, headers=merged, **change)

    return answer


@pytest.fixture
def repo(server: HubServer) -> str:
    return server.add_repo(REPO, ADAPTER)


HEADERS: list[Any] = [
    pytest.param("HEAD", {"headers": {"X-Repo-Commit": None}}, "without the headers of a Hub file", id="no-commit"),
    pytest.param("HEAD", {"headers": {"ETag": None}}, "without the headers of a Hub file", id="no-etag"),
    pytest.param("HEAD", {"headers": {"ETag": '"../../../../../../outside"'}}, "an ETag that is not a plain name", id="etag-path"),
    pytest.param("HEAD", {"headers": {"ETag": '"/tmp/x"'}}, "an ETag that is not a plain name", id="etag-absolute"),
    pytest.param("HEAD", {"headers": {"ETag": '".."'}}, "an ETag that is not a plain name", id="etag-dotdot"),
    pytest.param("HEAD", {"headers": {"X-Linked-Etag": "a/b"}}, "an ETag that is not a plain name", id="linked-etag-path"),
    pytest.param("HEAD", {"headers": {"X-Repo-Commit": "../../x"}}, "a commit id that is not one", id="commit-a-path"),
    pytest.param("HEAD", {"headers": {"X-Repo-Commit": "6" * 40}}, "not from", id="commit-another"),
    pytest.param(None, {"status": 404, "headers": {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": "../x"}}, "a commit id that is not one", id="404-commit-a-path"),
    pytest.param("HEAD", {"length": 10**13}, "announces 10000000000000 bytes", id="ten-terabytes"),
    pytest.param("HEAD", {"headers": {"X-Linked-Size": str(10**13)}}, "announces 10000000000000 bytes", id="linked-ten-terabytes"),
    pytest.param("GET", {"body": b"\0" * 20_000, "length": ""}, "sent more than 9176 bytes for evil/repo/adapter_model.safetensors, more than it announced", id="longer-than-announced"),
    pytest.param(None, {"status": 404, "headers": {"X-Error-Code": "EntryNotFound"}}, "has no file adapter_model.safetensors", id="listed-but-missing"),
    pytest.param(None, {"status": 403, "headers": {"X-Error-Code": "GatedRepo"}}, "is a gated repo", id="gated-on-download"),
    pytest.param(None, {"status": 401}, "refused the token (401", id="401-on-download"),
    pytest.param("GET", {"status": 429, "headers": {"Retry-After": "99999999"}}, "rate limiting", id="429-on-download"),
    pytest.param("GET", {"status": 302, "headers": {"Location": "/evil/repo/resolve/x/adapter_model.safetensors"}}, "in a loop", id="redirect-loop-on-download"),
    pytest.param("GET", {"body": b"", "length": ""}, "came out the wrong size (0 of 9176 bytes)", id="empty-body"),
    pytest.param("GET", {"body": b"x" * 100, "length": ""}, "came out the wrong size (100 of 9176 bytes)", id="short-body"),
    pytest.param("GET", {"body": b"\xff" * 9176}, "adapter_model.safetensors", id="garbage-bytes"),
    pytest.param("GET", {"status": 418, "body": b"X\0\0\0" + b"\xff" * 8}, "an error whose message is not text", id="error-not-text"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "change", "says"),
    slow_but(
        HEADERS,
        "no-commit",
        "etag-path",
        "commit-a-path",
        "commit-another",
        "404-commit-a-path",
        "ten-terabytes",
        "longer-than-announced",
        "listed-but-missing",
        "short-body",
    ),
)
def test_a_hostile_file_answer(
    server: HubServer, repo: str, tmp_path: Path, method: str | None, change: dict[str, Any], says: str
) -> None:
    server.serve(method, WEIGHTS, file_reply(server, **change))
    got = check(server, tmp_path, ["inspect", REPO], says)
    assert got.seconds < 5
    blobs = tmp_path / "hf-home" / "hub" / "models--evil--repo" / "blobs"
    assert not any(p.name.endswith(".incomplete") for p in blobs.glob("*")), "a partial download was left"


@pytest.mark.parametrize(
    ("change", "says"),
    slow_but(
        [
            pytest.param({"pause": 2.0, "chunk": 1}, "", id="one-byte-every-2s"),  # the server
            pytest.param({"pause": 30, "chunk": 100}, "", id="stalls-after-100-bytes"),
            pytest.param({"cut": 100}, "the connection broke off", id="cut-again-and-again"),
            pytest.param({"status": 500}, "the Hub answered 500", id="500-again-and-again"),
            pytest.param({"raw": b"garbage\r\n\r\n"}, "the Hub failed to answer", id="not-http-again-and-again"),
        ],
        "one-byte-every-2s",
    ),
)
def test_a_slow_or_failing_download_meets_its_deadline(
    server: HubServer, repo: str, tmp_path: Path, quick: None, change: dict[str, Any], says: str
) -> None:
    server.serve(None if "status" in change else "GET", WEIGHTS, file_reply(server, **change))
    got = check(server, tmp_path, ["inspect", REPO], ["downloading evil/repo/adapter_model.safetensors", says])
    assert "did not finish within 0.5 s" in got.stderr
    assert "LORATOOLS_HUB_DEADLINE" in got.stderr  # the hint names the knob
    assert got.seconds < 6


@pytest.mark.slow
def test_a_download_that_keeps_breaking_off_stops(server: HubServer, repo: str, tmp_path: Path) -> None:
    server.serve("GET", WEIGHTS, file_reply(server, cut=100))
    got = check(server, tmp_path, ["inspect", REPO], ["sent a broken answer", "received 100 bytes, expected 9176"])
    assert got.seconds < 10


def test_retries_are_bounded() -> None:
    """huggingface_hub resumes a download as long as each attempt brings bytes: the watch counts the attempts."""
    w = hub_watch.Watch("evil/repo/x", "h", 60.0, listing=False)
    for _ in range(hub_watch.MAX_RETRIES + 1):
        w.sent("GET", "http://h/x")
    w.broke_off("GET http://h/x")
    with pytest.raises(
        HubError, match=f"gave up after {hub_watch.MAX_RETRIES + 1} attempts \\(the connection broke off\\)"
    ):
        w.sent("GET", "http://h/x")


def test_the_deadline_grows_with_what_arrives() -> None:
    """A steady download is not cut by the deadline: each MiB received earns a second more, up to the file's size."""
    w = hub_watch.Watch("x", "h", 1.0, listing=False)
    w.received = 3 * hub_watch.RATE
    assert w.allowed() == 4.0  # 1 s + 3 MiB at 1 MiB/s
    w.size = hub_watch.RATE
    assert w.allowed() == 2.0  # bytes beyond the announced size (a download resumed again and again) earn nothing
    assert (
        hub_watch.Watch("x", "h", 1.0, listing=True, received=10 * hub_watch.RATE).allowed() == 1.0
    )  # a file list: fixed


def test_a_redirect_to_elsewhere_keeps_the_token_home(server: HubServer, repo: str, tmp_path: Path) -> None:
    """A file served from another host (a CDN): fetched there without the token."""
    with HubServer() as cdn:
        cdn.serve("GET", ".*", Reply(200, ADAPTER["adapter_model.safetensors"]))
        server.serve(
            "HEAD",
            WEIGHTS,
            file_reply(server, status=302, headers={"Location": f"{cdn.url}/blob", "X-Linked-Size": "9176", "X-Linked-Etag": '"' + "e" * 64 + '"'}),
        )  # fmt: skip
        check(server, tmp_path, ["inspect", REPO, "--json"], [], code=0)
        assert cdn.log and not cdn.authorizations
    assert all(auth == f"Bearer {TOKEN}" for auth in server.authorizations)


# ---- configs from the Hub ------------------------------------------------------------------------------------------


def config_repo(server: HubServer, config: bytes) -> None:
    server.add_repo(REPO, {**ADAPTER, "adapter_config.json": config})


def adapter_config(**change: Any) -> bytes:
    return json.dumps(json.loads(ADAPTER["adapter_config.json"]) | change).encode()


CONFIGS: list[Any] = [
    pytest.param(adapter_config(r="x"), "r must be", id="r-a-string"),
    pytest.param(adapter_config(lora_alpha=[]), "lora_alpha must be", id="alpha-a-list"),
    pytest.param(adapter_config(target_modules=5), "target_modules must be", id="targets-an-int"),
    pytest.param(adapter_config(rank_pattern=5), "rank_pattern must be", id="rank-pattern-an-int"),
    pytest.param(adapter_config(base_model_name_or_path=5), "base_model_name_or_path must be", id="base-an-int"),
    pytest.param(b"[]", "must be a JSON object", id="config-a-list"),
    pytest.param(b"{", "adapter_config.json", id="config-truncated"),
    pytest.param(
        adapter_config()[:-1] + b', "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        "adapter_config.json",
        id="config-deep-nesting",
    ),
]


@pytest.mark.parametrize(("config", "says"), slow_but(CONFIGS, "r-a-string", "config-a-list", "config-deep-nesting"))
def test_a_hostile_adapter_config_from_the_hub(server: HubServer, tmp_path: Path, config: bytes, says: str) -> None:
    config_repo(server, config)
    check(server, tmp_path, ["inspect", REPO], says)


@pytest.mark.timeout(30)
def test_a_redos_rank_pattern_from_the_hub(server: HubServer, tmp_path: Path) -> None:
    """Python's re takes minutes on this pattern; matched at bounded cost it simply matches nothing (as in PEFT)."""
    config = adapter_config(rank_pattern={"(.|.)*Z": 2}, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    config_repo(server, config)
    got = check(server, tmp_path, ["inspect", REPO, "--json"], [], code=0)
    assert {m["rank"] for m in json.loads(got.stdout)["modules"]} != {2}


BASE_CONFIGS: list[Any] = [
    pytest.param(b"[]", "not a JSON object", id="config-a-list"),
    pytest.param(b'{"num_hidden_layers": "x"}', "names no architecture", id="no-architecture"),
    pytest.param(b'{"architectures": "LlamaForCausalLM"}', "must be a list of names", id="architectures-a-string"),
    pytest.param(b'{"architectures": [5]}', "must be a list of names, not [5]", id="architecture-an-int"),
    pytest.param(
        b'{"architectures": ["LlamaForCausalLM"], "num_hidden_layers": "x"}',
        "must be a positive integer",
        id="layers-a-string",
    ),
    pytest.param(b"\xff\xfe", "not valid JSON", id="not-utf8"),
    pytest.param(b"{" * 3, "not valid JSON", id="truncated"),
    pytest.param(
        b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "nested deeper than",
        id="deep-nesting",
    ),
]


@pytest.mark.parametrize(("config", "says"), slow_but(BASE_CONFIGS, "no-architecture", "not-utf8", "deep-nesting"))
def test_a_hostile_base_config_from_the_hub(server: HubServer, tmp_path: Path, config: bytes, says: str) -> None:
    """``convert --to gguf`` reads the base's config.json from the Hub (the adapter's base_model_name_or_path)."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(ADAPTER["adapter_model.safetensors"])
    (adapter / "adapter_config.json").write_bytes(adapter_config(base_model_name_or_path="evil/base"))
    server.add_repo("evil/base", {"config.json": config})
    (tmp_path / "work").mkdir()
    out = tmp_path / "work" / "out.gguf"
    before = outside(tmp_path)
    got = hostile.run(["convert", str(adapter), "--to", "gguf", "-o", str(out)], inputs=[adapter], out=out, says=says)
    assert TOKEN not in got.stdout + got.stderr
    assert outside(tmp_path) == before
    assert server.downloads("evil/base") == ["config.json"]


# ---- a base model's index over the Hub -----------------------------------------------------------------------------

SHARD = st_save({"model.layers.0.self_attn.q_proj.weight": np.zeros((2, 2), np.float32)})


def index(weight_map: Any) -> bytes:
    return json.dumps({"metadata": {}, "weight_map": weight_map}).encode()


INDEXES: list[Any] = [
    pytest.param(index(["model-1.safetensors"]), "'weight_map' must map tensor names to shard files, found a list", id="weight-map-a-list"),
    pytest.param(index(None), "found none", id="weight-map-null"),
    pytest.param(index("model-1.safetensors"), "found a str", id="weight-map-a-string"),
    pytest.param(index(5), "found a int", id="weight-map-an-int"),
    pytest.param(index({"a": 5}), "the shard of 'a' is '5', not a file name", id="shard-an-int"),
    pytest.param(index({"a": None}), "the shard of 'a' is 'None'", id="shard-null"),
    pytest.param(index({"a": ["x"]}), "not a file name", id="shard-a-list"),
    pytest.param(index({}), "'weight_map' is empty", id="weight-map-empty"),
    pytest.param(index({"a": "model-9.safetensors"}), "names the shard 'model-9.safetensors', which the repo does not have", id="missing-shard"),
    pytest.param(index({"a": "../model-1.safetensors"}), "not the name of a .safetensors file beside it", id="shard-outside"),
    pytest.param(index({"a": "/etc/passwd"}), "not the name of a .safetensors file beside it", id="shard-absolute"),
    pytest.param(index({"a": "config.json"}), "not the name of a .safetensors file beside it", id="shard-not-safetensors"),
    pytest.param(b"[1, 2]", "a JSON list, not an index object", id="index-a-list"),
    pytest.param(b'{"weight_map": {}, "weight_map": {"a": "model-1.safetensors"}}', "duplicate key 'weight_map'", id="duplicate-weight-map"),
    pytest.param(b"{", "not valid JSON", id="index-truncated"),
    pytest.param(b'{"weight_map": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested deeper than 64 levels", id="index-deep-nesting"),
    pytest.param(b"\xff\xfe", "not UTF-8", id="index-not-utf8"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("data", "says"),
    slow_but(INDEXES, "weight-map-a-list", "shard-an-int", "missing-shard", "shard-outside", "index-deep-nesting"),
)
def test_a_hostile_base_index_over_the_hub(server: HubServer, tmp_path: Path, data: bytes, says: str) -> None:
    server.add_repo(
        "evil/base",
        {"config.json": b"{}", "model.safetensors.index.json": data, "model-1.safetensors": SHARD},
    )
    (tmp_path / "work").mkdir()
    out = tmp_path / "work" / "merged"
    before = outside(tmp_path)
    adapter = FIXTURES / "peft_llama"
    got = hostile.run(["merge", "evil/base", str(adapter), "-o", str(out)], inputs=[adapter], out=out, says=says)
    assert "evil/base/model.safetensors.index.json" in got.stderr
    assert outside(tmp_path) == before
    assert "model-1.safetensors" not in server.downloads("evil/base")  # refused before any weight is fetched


# ---- a base model's headers over the Hub (range requests) --------------------------------------------------------

BASE_WEIGHTS = r"^/evil/base/resolve/[^/]+/model\.safetensors$"


def raw_header(header: dict[str, Any], data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def range_reply(server: HubServer, *, body: bytes | None = None, **change: Any) -> Callable[[str], Reply]:
    """The honest answer for evil/base's weights (a range of them, as asked), with ``change`` applied: ``body`` replaces
    the file's bytes, ``headers`` are merged (None removes one), anything else replaces the Reply's field."""
    headers = change.pop("headers", {})

    def answer(path: str) -> Reply:
        honest = server._resolve("evil/base", path.split("/")[4], "model.safetensors", True)
        merged = {k: v for k, v in {**honest.headers, **headers}.items() if v is not None}
        data = honest.body if body is None else body
        return dataclasses.replace(honest, body=data, head_length=len(data), headers=merged, **change)

    return answer


def validate_base(server: HubServer, tmp_path: Path, says: str | list[str], code: int = 2) -> hostile.Outcome:
    """``validate ADAPTER --base evil/base``: the base's header read by range requests, its weights never."""
    got = hostile.run(
        ["validate", str(FIXTURES / "peft_llama"), "--base", "evil/base"], code=code, says=says, seconds=15,
        findings=code == 1,
    )  # fmt: skip
    assert TOKEN not in got.stdout + got.stderr
    assert "model.safetensors" not in server.downloads("evil/base"), "the weights were downloaded"
    return got


BASE_HEADERS: list[Any] = [
    pytest.param({"body": b"\xff" * 64}, "is it a safetensors file?", id="length-past-the-end"),
    pytest.param({"body": (2**62).to_bytes(8, "little") + b"{}"}, "beyond the 100000000 byte limit", id="length-huge"),
    pytest.param({"body": b"\x05"}, "too short for a safetensors header", id="one-byte-file"),
    pytest.param({"body": raw_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})}, "data ends at byte 8", id="offsets-past-the-end"),
    pytest.param({"body": b"\x1a" + b"\0" * 7 + b'{"a": 1, "a": 2, "b": 3}  '}, "duplicate key 'a'", id="duplicate-key"),
    pytest.param({"body": raw_header({"a": {"dtype": "X9", "shape": [], "data_offsets": [0, 0]}})}, "unknown dtype", id="unknown-dtype"),
    pytest.param({"body": b"\x0e" + b"\0" * 7 + b'{"a": [[[[]]]]}' + b"\0"}, "(its header, read from the Hub)", id="entry-not-an-object"),
    pytest.param({"status": 206, "headers": {"Content-Range": "bytes 5-10/9999"}}, "Content-Range that is not the one asked for", id="content-range-elsewhere"),
    pytest.param({"status": 206, "headers": {"Content-Range": "bytes 0-10/" + str(10**15)}}, "more than a file may have", id="content-range-huge"),
    pytest.param({"status": 206, "headers": {"Content-Range": "garbage"}}, "Content-Range that is not the one asked for", id="content-range-garbage"),
    pytest.param({"headers": {"X-Repo-Commit": "6" * 40}}, "not from", id="header-of-another-commit"),
    pytest.param({"headers": {"X-Repo-Commit": "../x"}}, "a commit id that is not one", id="commit-a-path"),
    pytest.param({"status": 416}, "evil/base", id="416"),
    pytest.param({"status": 404, "body": b'{"error": "Entry not found"}', "headers": {"X-Error-Code": "EntryNotFound"}}, "has no file model.safetensors", id="listed-but-missing"),
    pytest.param({"status": 418, "body": b"X\0\0\0" + b"\xff" * 8}, "an error whose message is not text", id="error-not-text"),
    pytest.param({"cut": 20}, "evil/base", id="cut-short"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "says"),
    slow_but(BASE_HEADERS, "length-past-the-end", "offsets-past-the-end", "duplicate-key", "content-range-elsewhere", "header-of-another-commit", "cut-short"),
)  # fmt: skip
def test_a_hostile_header_over_the_hub(server: HubServer, tmp_path: Path, change: dict[str, Any], says: str) -> None:
    """The header bytes of a base read over the Hub are checked as strictly as a local file's (loratools' own
    safetensors reader runs on them), and the range answer's headers are checked before they are used."""
    server.add_repo("evil/base", {"config.json": b"{}", "model.safetensors": SHARD, "big.bin": b"\0" * 1000})
    server.serve("GET", BASE_WEIGHTS, range_reply(server, **change))
    validate_base(server, tmp_path, says)


def test_a_hub_that_ignores_ranges_is_read_only_as_far_as_the_header(server: HubServer, tmp_path: Path) -> None:
    """A server that answers a range request with the whole file (200): the header is read from its start and the
    rest of the body is never read."""
    big = raw_header({"a": {"dtype": "F32", "shape": [1 << 20], "data_offsets": [0, 4 << 20]}}, b"\0" * (4 << 20))
    server.add_repo("evil/base", {"config.json": b"{}", "model.safetensors": big})
    server.serve("GET", BASE_WEIGHTS, range_reply(server, status=200, chunk=1 << 12, pause=0.001))
    got = validate_base(server, tmp_path, [], code=1)  # findings: the adapter's modules are not in that base
    assert "base-missing" in got.stdout and got.seconds < 5


def test_a_slow_header_meets_its_deadline(server: HubServer, tmp_path: Path, quick: None) -> None:
    server.add_repo("evil/base", {"config.json": b"{}", "model.safetensors": SHARD})
    server.serve("GET", BASE_WEIGHTS, range_reply(server, pause=2.0, chunk=1))
    got = validate_base(server, tmp_path, "reading the header of evil/base/model.safetensors from 127.0.0.1")
    assert "did not finish within 0.5 s" in got.stderr and got.seconds < 5


# ---- the environment and mistyped paths ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    slow_but([pytest.param(v, id=v.strip() or "blank") for v in ["abc", "0", "-1", "nan", "inf", " "]], "abc", "0"),
)
def test_a_bad_deadline_is_an_error(
    server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    server.add_repo(REPO, ADAPTER)
    monkeypatch.setenv(hub.DEADLINE_VAR, value)
    if value.strip():
        check(server, tmp_path, ["inspect", REPO], f"{hub.DEADLINE_VAR}='{value}' is not a number of seconds")
    else:  # empty: the default
        check(server, tmp_path, ["inspect", REPO, "--json"], [], code=0)


@pytest.mark.parametrize(
    "revision",
    slow_but([pytest.param(r, id=repr(r)) for r in ["../../x", "/abs", "a//b", "x\ny", "a/./b"]], "'../../x'"),
)
def test_a_revision_that_is_a_path(server: HubServer, tmp_path: Path, revision: str) -> None:
    server.add_repo(REPO, ADAPTER)
    check(server, tmp_path, ["inspect", REPO, "--revision", revision], "is not a revision")


@pytest.fixture
def in_fixtures(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(FIXTURES.parent)
    yield


MISTYPED = "fixtures/peft_lama"


def test_a_mistyped_path_offline(
    hf_env: Path, tmp_path: Path, in_fixtures: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as silent:  # a Hub that never answers: a request would hang, not fail
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        hubserver.set_env(monkeypatch, HF_HUB_OFFLINE="1", HF_ENDPOINT=f"http://127.0.0.1:{silent.getsockname()[1]}")
        got = hostile.run(["inspect", MISTYPED], says=[], seconds=3)
    error = next(line for line in got.stderr.splitlines() if line.startswith("Error:"))
    assert error.startswith(f"Error: {MISTYPED}: no such local file or folder, and no Hub repo {MISTYPED} in the cache")
    assert "Hint: check the path" in got.stderr


def test_a_mistyped_path_online(server: HubServer, tmp_path: Path, in_fixtures: None) -> None:
    got = check(server, tmp_path, ["inspect", MISTYPED], [])
    assert f"Error: {MISTYPED}: no such local file or folder, and no repo {MISTYPED} on 127.0.0.1" in got.stderr


def test_a_mistyped_path_without_a_token(
    server: HubServer, tmp_path: Path, in_fixtures: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    server.serve("GET", "^/api/models/", Reply(401, b"{}", {"X-Error-Code": "RepoNotFound"}))  # as huggingface.co does
    got = check(server, tmp_path, ["inspect", f"{MISTYPED}/adapter_config.json"], [])
    assert f"Error: {MISTYPED}/adapter_config.json: no such local file or folder, and no repo {MISTYPED}" in got.stderr


def test_a_mistyped_path_with_the_hub_out_of_reach(
    hf_env: Path, tmp_path: Path, in_fixtures: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        hubserver.set_env(monkeypatch, HF_ENDPOINT=f"http://127.0.0.1:{s.getsockname()[1]}")
    got = hostile.run(["inspect", MISTYPED], says=[], seconds=5)
    assert f"Error: {MISTYPED}: no such local file or folder, and no Hub repo {MISTYPED} in the cache" in got.stderr
    assert "cannot be reached" in got.stderr


def test_library_errors_are_hub_errors(server: HubServer) -> None:
    server.serve("GET", LISTING, Reply(200, b"[]"))
    hostile.call(hub.fetch, REPO, raises=HubError, says="a JSON list")
    hostile.call(hub.listing, REPO, raises=HubError, says="a JSON list")
    assert os.environ.get("HF_TOKEN") == TOKEN
