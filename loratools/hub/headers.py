"""Header-only views of a repo: names, shapes and configs without the weights.

``validate --base owner/model``, ``convert --base owner/model`` and ``inspect --fast owner/name`` need a checkpoint's
tensor names and shapes and its ``config.json``, not gigabytes of weights. A view is a local folder laid out as the
repo is: its small JSON files (configs, indexes) downloaded into the cache as usual and linked in, and for each
``.safetensors`` file a *stub*: the file's header, read by HTTP range requests (as huggingface_hub's
``get_safetensors_metadata`` reads it), followed by a sparse hole up to the file's real size. loratools' readers take
the stub as they take the file, and check its header as strictly (:func:`loratools.io.safetensors.read_header`, run
here before the view is handed out): the header bytes come from the Hub, and are no more trusted than a file's.

A stub holds no tensor data: it is for readers that read headers only. A file already in the cache is linked as it
is, and an adapter file whose header lists tensors of one element (kohya's and LyCORIS' ``alpha`` values, which a
reader does read) is downloaded whole. The view lives in a folder the caller owns (a temporary one) and is removed
with it; the cache gets no stub, ever."""

from __future__ import annotations

import math
import os
import re
import struct
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import HubError, LoratoolsError
from ..io.checkpoint import INDEX_SUFFIX
from ..io.safetensors import MAX_HEADER, read_header
from .download import OnBytes, Request, request
from .env import HubEnv, headers, timeout
from .ids import RepoRef
from .plan import FetchKind, Plan
from .watch import MAX_FILE, Watch, watching

#: what the first range request asks for: most headers fit (huggingface_hub's choice, for the same reason)
FIRST = 100_000
#: small JSON files a reader of names, shapes and configs needs, downloaded whole
WHOLE = ("config.json", "model_index.json", "adapter_config.json")

_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


def _whole(rel: str) -> bool:
    name = PurePosixPath(rel).name
    return name in WHOLE or name.endswith(INDEX_SUFFIX)


def _get(env: HubEnv, url: str, start: int, end: int, what: str) -> tuple[bytes, int]:
    """``bytes=start-end`` of a file, and its size, through huggingface_hub's HTTP client; a server that ignores the
    range sends the file from its start, of which only what was asked for is read."""
    from huggingface_hub import get_session, hf_raise_for_status

    want = end - start + 1
    with get_session().stream(
        "GET", url, headers={**headers(env), "Range": f"bytes={start}-{end}"}, timeout=timeout()
    ) as response:
        hf_raise_for_status(response)
        if response.status_code == 206:
            m = _RANGE_RE.match(str(response.headers.get("Content-Range") or "").strip())
            if m is None or int(m.group(1)) != start:
                raise HubError(
                    f"the Hub at {env.host} answered a range request for {what} with a Content-Range that is not "
                    f"the one asked for ({str(response.headers.get('Content-Range'))[:80]!r})",
                    "is HF_ENDPOINT a Hugging Face Hub (or a mirror of one)?",
                )
            size = int(m.group(3))
        elif start == 0 and str(response.headers.get("Content-Length") or "").strip().isdigit():
            size = int(response.headers["Content-Length"])
        else:
            raise HubError(
                f"the Hub at {env.host} did not answer a range request for {what} ({response.status_code})",
                "is HF_ENDPOINT a Hugging Face Hub (or a mirror of one)?",
            )
        data = bytearray()
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) >= want:
                break
    if size > MAX_FILE:
        raise HubError(f"the Hub at {env.host} announces {size} bytes for {what}, more than a file may have")
    return bytes(data[:want]), size


def read_head(env: HubEnv, ref: RepoRef, rel: str, sha: str, seconds: float) -> tuple[bytes, int]:
    """The 8-byte length and the JSON header of a ``.safetensors`` file of the repo, and the file's size."""
    from huggingface_hub import hf_hub_url

    what = f"{ref.repo_id}/{rel}"
    url = hf_hub_url(ref.repo_id, rel, revision=sha, endpoint=env.endpoint)
    with watching(Watch(f"the header of {what}", env.host, seconds, listing=False, commit=sha, verb="reading")):
        head, size = _get(env, url, 0, FIRST - 1, what)
        if len(head) < 8 or size < 8:
            raise HubError(f"{what}: {size} bytes on the Hub, too short for a safetensors header", "is it truncated?")
        (n,) = struct.unpack("<Q", head[:8])
        if n > MAX_HEADER or n > size - 8:
            raise HubError(
                f"{what}: header length {n} on the Hub is beyond "
                + (f"the {MAX_HEADER} byte limit" if n > MAX_HEADER else f"the end of the {size}-byte file"),
                "is it a safetensors file?",
            )
        if len(head) < 8 + n:
            rest, again = _get(env, url, len(head), 8 + n - 1, what)
            if again != size:
                raise HubError(f"{what}: the Hub gave two sizes for it ({size}, {again})", "try again")
            head += rest
        if len(head) < 8 + n:
            raise HubError(f"{what}: the Hub sent {len(head)} bytes of its {8 + n}-byte header", "try again later")
    return head[: 8 + n], size


def _stub(path: Path, head: bytes, size: int, what: str) -> None:
    """The header, then a hole up to the file's size (no disk is used for it), checked by loratools' own reader."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(size)
    try:
        read_header(path)
    except LoratoolsError as e:
        said = e.message.replace(str(path), path.name).removeprefix(path.name + ": ")  # the stub is no one's file
        e.message = f"{what} (its header, read from the Hub): {said}"
        e.args = (e.message,)
        raise


def _holds_values(path: Path) -> bool:
    """A header listing tensors of one element: values (alphas) a reader of an adapter reads."""
    return any(math.prod(t.shape) <= 1 for t in read_header(path).tensors.values())


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)


def fetch_headers(
    arg: str, into: str | os.PathLike[str], *, revision: str | None = None, kind: FetchKind = "checkpoint",
    on_bytes: OnBytes | None = None,
) -> Path:  # fmt: skip
    """A header-only view of what ``kind`` needs of a Hub repo, built in the folder ``into`` (which the caller
    removes): the path loratools' readers take. Offline, or with the Hub out of reach, the cached files themselves
    (see :func:`.download.fetch`)."""
    return fetch_headers_as(arg, into, revision, kind, on_bytes, None)


def fetch_headers_as(
    arg: str, into: str | os.PathLike[str], revision: str | None, kind: FetchKind, on_bytes: OnBytes | None,
    local: str | None,
) -> Path:  # fmt: skip
    """:func:`fetch_headers`; ``local``: the SOURCE as given, when it could have been a local path."""

    def work(req: Request, wanted: Plan) -> Path:
        root = Path(into) / req.ref.repo_id.split("/")[1]  # named as the repo: messages name a base by its folder
        for rel in wanted.files:
            req.current = rel
            _view(req.env, req.ref, rel, req.sha, req.seconds, root / rel, kind, req.get)
        return root / wanted.target if wanted.target else root

    return request(arg, revision, kind, on_bytes, local, work)


def _view(env: HubEnv, ref: RepoRef, rel: str, sha: str, seconds: float, dst: Path, kind: FetchKind, get: Any) -> None:
    """One planned file in the view: linked from the cache (a small JSON file, a file already cached, weights a
    reader must read), a stub (a ``.safetensors`` file's header), or left out (tokenizers and the like)."""
    from huggingface_hub import try_to_load_from_cache

    if not rel.endswith(".safetensors"):
        if _whole(rel) or kind != "checkpoint":  # an adapter's other files (legacy .bin weights) are read whole
            _link(get(rel), dst)
        return
    cached = try_to_load_from_cache(ref.repo_id, rel, cache_dir=env.cache_dir, revision=sha)
    if isinstance(cached, str):
        _link(Path(cached), dst)
        return
    head, size = read_head(env, ref, rel, sha, seconds)
    _stub(dst, head, size, f"{ref.repo_id}/{rel}")
    if kind != "checkpoint" and _holds_values(dst):
        dst.unlink()
        _link(get(rel), dst)
