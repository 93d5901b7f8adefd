"""The on-disk formats: detection, and one reader and writer per format."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from ..errors import FileFormatError, HeaderError, ShapeError
from ..io.atomic import check_output
from ..io.pickle import is_torch_pickle
from ..model import Adapter
from . import diffusers, kohya, peft
from .common import open_raw

FORMATS: dict[str, ModuleType] = {"peft": peft, "kohya": kohya, "diffusers": diffusers}


def detect(source: str | os.PathLike[str]) -> str:
    """The format of a file or folder, from its layout and its keys (header only)."""
    p = Path(source)
    if not p.exists():
        raise FileFormatError(f"{p}: no such file or folder")
    if p.is_dir():
        if peft.is_peft_folder(p):
            return peft.NAME
        if (p / diffusers.FILENAME).is_file():
            return diffusers.NAME
        files = sorted(p.glob("*.safetensors"))
        if len(files) == 1:
            return detect(files[0])
        raise FileFormatError(
            f"{p}: no adapter found in this folder",
            f"expected {peft.CONFIG} (PEFT), {diffusers.FILENAME} (diffusers) or one .safetensors file",
        )
    if p.name in peft.WEIGHTS and (p.parent / peft.CONFIG).is_file():
        return peft.NAME
    keys = list(open_raw(p).tensors) if is_torch_pickle(p) else _header_keys(p)
    for name, mod in FORMATS.items():
        if mod.looks_like(keys):
            return name
    if not keys:
        raise FileFormatError(f"{p}: holds no tensors")
    shown = ", ".join(sorted(keys)[:3])
    raise FileFormatError(
        f"{p}: not a LoRA adapter in any known format (keys like {shown})",
        "known: " + ", ".join(FORMATS) + "; pass --format to force one",
    )


def _header_keys(p: Path) -> list[str]:
    raw = open_raw(p, lenient=True)
    if not raw.tensors and raw.problems:  # every entry lied: say how, not "holds no tensors"
        raise HeaderError(f"{p}: {raw.problems[0]}", "the file's header is damaged")
    return list(raw.tensors)


def resolve_source(source: str | os.PathLike[str]) -> Path:
    """A folder holding exactly one adapter file stands for that file (PEFT and diffusers folders stay)."""
    p = Path(source)
    if p.is_dir() and not peft.is_peft_folder(p) and not (p / diffusers.FILENAME).is_file():
        files = sorted(p.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
    return p


def load_adapter(
    source: str | os.PathLike[str], format: str | None = None, *, problems: list[str] | None = None
) -> Adapter:
    """Read any supported adapter file or folder into the canonical model.

    Every key is accounted for: unknown keys raise :class:`UnknownKeysError`. With ``problems`` (a list), damage
    is collected there instead of raised, as far as the file can still be read (validate uses this).
    """
    fmt = format or detect(source)
    if fmt not in FORMATS:
        raise FileFormatError(f"unknown format {fmt!r}", "choose one of " + ", ".join(FORMATS))
    adapter: Adapter = FORMATS[fmt].read(resolve_source(source), problems=problems)
    if problems is None:
        for m in adapter.modules.values():
            found = m.check()
            if found:
                raise ShapeError(f"{m.name}: {found[0]}", "run `loratools validate` for every finding")
    return adapter


def input_files(source: str | os.PathLike[str]) -> list[Path]:
    """What reading ``source`` reads: itself, and for a bare PEFT weights file the config beside it (an output
    must never replace one of these)."""
    p = Path(source)
    out = [p]
    if p.is_file() and (p.parent / peft.CONFIG).is_file():
        out.append(p.parent / peft.CONFIG)
    return out


def save_adapter(
    adapter: Adapter, out: str | os.PathLike[str], format: str | None = None, *, force: bool = False
) -> Path:
    """Write ``adapter`` in ``format`` (default: the format it was read from), atomically."""
    fmt = format or adapter.format
    if fmt not in FORMATS:
        raise FileFormatError(f"unknown format {fmt!r}", "choose one of " + ", ".join(FORMATS))
    # never in place of what the adapter was read from, --force or not
    check_output(out, force=force, inputs=input_files(adapter.source) if adapter.source else [])
    writer: Callable[..., Path] = FORMATS[fmt].write
    return writer(adapter, out, force=force)
