"""What ``push`` uploads from SOURCE, and what it leaves out, with why: the files an adapter repo is made of (the
adapter, its README.md, the tokenizer and licence saved beside it) and the files ``--include`` names; never a hidden
file, a link out of SOURCE or to a hidden file, a special file, a pickle unasked, or a file holding a secret."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from ..errors import FileFormatError, LoratoolsError
from ..io.pickle import is_pickle
from .ids import CONTROL_RE, printable, show
from .watch import ANSWER_LIMIT

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
class LeftOut:
    path: str  # relative to SOURCE; a folder ends with "/"
    why: str


@dataclass
class Selection:
    """What goes up from ``source``: (path in the repo, local file), sorted; and what stays home, with why."""

    source: Path
    entries: list[tuple[str, Path]]
    left_out: list[LeftOut] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return [rel for rel, _ in self.entries]

    @property
    def readme(self) -> Path | None:
        return next((p for rel, p in self.entries if rel == CARD), None)


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
    if CONTROL_RE.search(pattern):
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
    from ..formats import diffusers, peft

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
) -> Selection:
    """What ``push`` uploads from SOURCE, and what it leaves out, with why.

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
                f"--include {show(pattern)}: {problem}", "name files relative to SOURCE: --include 'samples/*.png'"
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
                raise LoratoolsError(f"--include {show(pattern)} matches no file in {src}", "check the pattern")
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
    return Selection(src, list(chosen.items()), sorted(left, key=lambda lo: lo.path))
