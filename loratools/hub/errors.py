"""Every failure of a Hub request as one :class:`~loratools.errors.HubError` line with a hint, never holding the
token. A failure that is not the Hub's (a bug in loratools) is left to keep its traceback."""

from __future__ import annotations

import importlib
import re
import sys

from ..errors import HubError, LoratoolsError
from .env import HubEnv
from .ids import CONTROL_RE, DEFAULT_REVISION, PREFIX
from .watch import wait_hint


def transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level failures of whichever HTTP library this huggingface_hub uses."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)), ("requests", ("ConnectionError", "Timeout"))):  # fmt: skip
        if module not in sys.modules:
            continue
        mod = importlib.import_module(module)
        found += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(found)


def http_errors(*names: str) -> tuple[type[BaseException], ...]:
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


def _detail(e: BaseException) -> str:
    text = CONTROL_RE.sub(" ", str(e)).strip()
    return text[:160] + ("..." if len(text) > 160 else "")


def unwrap(e: BaseException) -> BaseException:
    """huggingface_hub's "not in the cache either" error, reduced to the failure of the Hub behind it."""
    from huggingface_hub import errors as hfe

    cause = e.__cause__
    return cause if isinstance(e, hfe.LocalEntryNotFoundError) and isinstance(cause, BaseException) else e


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
        response = getattr(e, "response", None)
        err = HubError(
            f"the Hub at {where} is rate limiting this client (429 Too Many Requests)",
            wait_hint(getattr(response, "headers", None)),
        )
    elif status is not None and status >= 500:
        err = HubError(f"the Hub at {where} failed ({status})", "try again later")
    elif isinstance(e, hfe.BadRequestError) or status == 400:
        detail = CONTROL_RE.sub(" ", getattr(e, "server_message", None) or "").strip()
        err = HubError(
            f"the Hub refused the request for {repo_id} (400 Bad Request)" + (f": {detail[:200]}" if detail else "")
        )
    elif status is not None:
        err = HubError(f"the Hub at {where} answered {status} for {repo_id}")
    elif isinstance(e, http_errors("TooManyRedirects")):
        err = HubError(
            f"the Hub at {where} redirects {repo_id} in a loop (too many redirects)",
            "is HF_ENDPOINT a Hugging Face Hub (or a mirror of one)?",
        )
    elif isinstance(e, http_errors("ProtocolError", "DecodingError")):
        err = HubError(
            f"the Hub at {where} sent a broken answer for {repo_id}{'/' + path if path else ''} ({_detail(e)})",
            "try again later; with HF_HUB_OFFLINE=1, loratools uses only files already cached",
        )
    elif isinstance(e, UnicodeDecodeError):  # huggingface_hub reading an error answer whose body is not text
        err = HubError(
            f"the Hub at {where} sent a broken answer for {repo_id}{'/' + path if path else ''} (an error whose "
            "message is not text)",
            "is HF_ENDPOINT a Hugging Face Hub (or a mirror of one)? try again later",
        )
    elif isinstance(e, transport_errors()):
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
