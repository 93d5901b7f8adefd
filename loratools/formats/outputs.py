"""What an output's name must say: a folder format (PEFT, mlx-lm, a merged model folder) gets a folder name, a file format
(kohya, diffusers, GGUF, a single-file merge) a file name with its suffix. A name that says otherwise
(``-o r6.safetensors`` for a PEFT folder, ``-o r7`` for a kohya file) is refused before any work, never guessed
at: one check for convert, resize, mix, merge and extract."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import OutputNameError

#: suffixes that name a file of weights, a config or a report: never a folder's name
FILE_SUFFIXES = (".safetensors", ".sft", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".json", ".html", ".npz", ".onnx")


def _layout(fmt: str | None) -> tuple[str | None, str]:
    """What ``fmt``'s writer says it writes: (what its folder holds, or None for one file; its file's suffix). Each
    format module declares its own (``FOLDER``, ``SUFFIX``): a format added to the registry brings its layout."""
    from . import READERS  # the package's registry (this module is imported while the package loads)

    mod = READERS.get(fmt or "")
    return getattr(mod, "FOLDER", None), getattr(mod, "SUFFIX", ".safetensors")


def output_suffix(fmt: str) -> str | None:
    """The suffix of ``fmt``'s output file, or None when it is written as a folder."""
    folder, suffix = _layout(fmt)
    return None if folder else suffix


def check_output_name(
    out: str | os.PathLike[str], fmt: str | None = None, *, folder: bool | None = None, what: str | None = None
) -> None:
    """Refuse (:class:`~loratools.errors.OutputNameError`, a usage error, ``param="out"``) an output name that contradicts what is
    written: ``fmt``'s folder or file, or with ``folder`` given, a folder (True) or a ``.safetensors`` file (False)."""
    p = Path(out)
    suffix = p.suffix.lower()
    what = what or (f"a {fmt} adapter" if fmt else "the output")
    want = (".safetensors" if not folder else None) if fmt is None else output_suffix(fmt)
    if p.name.lower() in FILE_SUFFIXES:  # ``-o .safetensors``: a suffix and no name (pathlib calls it a dotfile)
        raise OutputNameError(
            f"-o {out} is a suffix with no name before it", f"name it, e.g. -o {p.with_name('adapter' + (want or ''))}",
            param="out",
        )  # fmt: skip
    if want is not None and str(out).endswith(("/", os.sep)):  # pathlib drops the slash that says "a folder"
        raise OutputNameError(
            f"{what} is written as one {want} file, but -o {out} ends in a slash (a folder)",
            f"name it {p.with_suffix(want) if suffix in FILE_SUFFIXES else str(p) + want}", param="out",
        )  # fmt: skip
    if want is None:
        if suffix in FILE_SUFFIXES:
            kind = _layout(fmt)[0] or "a folder"
            raise OutputNameError(
                f"{what} is written as {kind}, but -o {out} names a {suffix} file",
                f"give a folder name, e.g. -o {p.with_suffix('')}",
                param="out",
            )  # fmt: skip
        return
    if suffix == want:
        return
    got = f"ends in {p.suffix}" if p.suffix else "has no suffix"
    raise OutputNameError(
        f"{what} is written as one {want} file, but -o {out} {got}",
        f"name it {p.with_suffix(want) if suffix in FILE_SUFFIXES else str(p) + want}",
        param="out",
    )
