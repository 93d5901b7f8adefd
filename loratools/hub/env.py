"""What the environment says about the Hub, as huggingface_hub reads it: its ``constants`` (``HF_ENDPOINT``,
``HF_HUB_CACHE`` / ``HF_HOME``, ``HF_HUB_OFFLINE``, ``HF_HUB_ETAG_TIMEOUT``, read once when huggingface_hub is
imported) and its ``get_token()`` (``HF_TOKEN``, the token ``hf auth login`` saved, an OIDC token in CI, a refreshed
OAuth token). loratools keeps no reader of its own for them; it looks the values up at each call, so whatever
huggingface_hub believes is what loratools does. Its one variable of its own, ``LORATOOLS_HUB_DEADLINE``, is read at
each call."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import HubError, LoratoolsError
from ..version import __version__
from .ids import CONTROL_RE, show

if TYPE_CHECKING:
    from huggingface_hub import HfApi

#: the environment variable that sets a request's deadline, in seconds
DEADLINE_VAR = "LORATOOLS_HUB_DEADLINE"
DEFAULT_DEADLINE = 60.0
LIBRARY = "loratools"


@dataclass(frozen=True)
class HubEnv:
    """The Hub in use right now. The token never shows in a repr."""

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
    """The endpoint, cache folder and offline mode from ``huggingface_hub.constants``, and the token from
    ``huggingface_hub.get_token()``."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import OIDCError

    try:
        token = get_token()
    except OIDCError as e:  # HF_OIDC_RESOURCE asks for a token exchange, and it failed
        detail = CONTROL_RE.sub(" ", str(e)).strip()[:200]
        raise HubError(
            f"cannot get a Hub token through OIDC (HF_OIDC_RESOURCE is set): {detail}",
            "fix the CI job's OIDC set-up, or unset HF_OIDC_RESOURCE and set HF_TOKEN",
        ) from None
    except (OSError, UnicodeDecodeError):  # an unreadable token file: no token, as if there were none
        token = None
    return HubEnv(constants.ENDPOINT.rstrip("/"), Path(constants.HF_HUB_CACHE), bool(constants.HF_HUB_OFFLINE), token)


def timeout() -> float:
    """Seconds to wait for one metadata answer: huggingface_hub's ``HF_HUB_ETAG_TIMEOUT`` (10 by default; its shared
    HTTP client has none, so a silent server would otherwise hang the call)."""
    from huggingface_hub import constants

    try:
        value = float(constants.HF_HUB_ETAG_TIMEOUT)
    except (TypeError, ValueError):
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
            f"{DEADLINE_VAR}={show(raw)} is not a number of seconds",
            f"set it to a positive number of seconds (default {DEFAULT_DEADLINE:g}), or unset it",
        )
    return value


def api(env: HubEnv) -> HfApi:
    """huggingface_hub's client for ``env``: its endpoint, its token (never the implicit one), loratools' name."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=env.endpoint, token=env.token or False, library_name=LIBRARY, library_version=__version__)


def headers(env: HubEnv) -> dict[str, str]:
    """The headers huggingface_hub sends with a request of loratools (user agent, the token when there is one)."""
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    return dict(build_hf_headers(token=env.token or False, library_name=LIBRARY, library_version=__version__))
