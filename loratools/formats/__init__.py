"""The on-disk formats: detection, and one reader and writer per format."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from ..errors import FileFormatError, HeaderError, ShapeError, UsageError
from ..io.atomic import check_output
from ..io.pickle import is_torch_pickle
from ..io.safetensors import shown
from ..model import Adapter
from . import diffusers, gguf, kohya, mlx, peft
from .common import open_raw
from .outputs import check_output_name

#: the formats loratools reads and writes alike (``--format``, ``--to``)
FORMATS: dict[str, ModuleType] = {"peft": peft, "kohya": kohya, "diffusers": diffusers, "mlx": mlx}
#: every format loratools reads: GGUF adapters are detected by their magic and written by ``convert --to gguf``
#: alone (a GGUF export needs the base's config)
READERS: dict[str, ModuleType] = {**FORMATS, gguf.NAME: gguf}


def _path(value: object, what: str) -> Path:
    """A path argument of the library, checked: a str or os.PathLike naming something (not bytes, not empty,
    no NUL byte)."""
    if not isinstance(value, (str, os.PathLike)):
        raise UsageError(f"{what} must be a path (str or os.PathLike), not {type(value).__name__}")
    text = os.fspath(value)
    if not isinstance(text, str):
        raise UsageError(f"{what} must be a str path, not {type(text).__name__}")
    if not text:
        raise UsageError(f"{what} is an empty path")
    if "\0" in text:
        raise UsageError(f"{what} {text!r} holds a NUL byte")
    return Path(text)


def _format(value: object, table: dict[str, ModuleType] = FORMATS) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise UsageError(f"format must be a string ({', '.join(table)}) or None, not {type(value).__name__}")
    if value == gguf.NAME and table is FORMATS:
        raise FileFormatError(
            "unknown format 'gguf' here: GGUF is read by every command and written by `convert --to gguf`, "
            "which reads the base's config.json",
            "choose one of " + ", ".join(FORMATS) + ", then `loratools convert OUT --to gguf --base BASE`",
        )
    if value not in table:
        raise FileFormatError(f"unknown format {value!r}", "choose one of " + ", ".join(table))
    return value


def detect(source: str | os.PathLike[str]) -> str:
    """The format of a file or folder, from its layout and its keys (header only)."""
    p = _path(source, "source")
    if not p.exists():
        raise FileFormatError(f"{p}: no such file or folder")
    if p.is_dir():
        if mlx.is_mlx_folder(p):  # before PEFT's: it has an adapter_config.json too
            return mlx.NAME
        if peft.is_peft_folder(p):
            return peft.NAME
        if (p / diffusers.FILENAME).is_file():
            return diffusers.NAME
        one = _one_file(p)
        if one is not None:
            return detect(one)
        raise FileFormatError(
            f"{p}: no adapter found in this folder",
            f"expected {peft.CONFIG} (PEFT), {diffusers.FILENAME} (diffusers), one .safetensors or one .gguf file",
        )
    if gguf.is_gguf(p):  # by its magic, whatever its name
        return gguf.NAME
    if p.name in peft.WEIGHTS and peft.has_config(p.parent):
        return peft.NAME
    if p.name == mlx.WEIGHTS and mlx.is_mlx_folder(p.parent):
        return mlx.NAME
    raw = open_raw(p, lenient=not is_torch_pickle(p))  # damage is for the reader to report
    keys = list(raw.tensors)
    for name, mod in FORMATS.items():
        if mod.looks_like(keys):
            return name
    if raw.problems:
        raise HeaderError(f"{p.name}: {raw.problems[0]}")
    if not keys:
        raise FileFormatError(f"{p}: holds no tensors")
    some = ", ".join(shown(k, 80) for k in sorted(keys)[:3])
    raise FileFormatError(
        f"{p}: not a LoRA adapter in any known format (keys like {some})",
        "known: " + ", ".join(FORMATS) + "; pass --format to force one",
    )


def _one_file(folder: Path) -> Path | None:
    """The one ``.safetensors`` file of a folder, else its one ``.gguf`` file (a folder holding only a GGUF
    adapter, as llama.cpp's converter and unsloth write one); None when there is no such single file."""
    for pattern in ("*.safetensors", "*.gguf"):
        files = sorted(folder.glob(pattern))
        if len(files) == 1:
            return files[0]
        if files:
            return None
    return None


def adapter_file(source: str | os.PathLike[str]) -> Path:
    """What a reader opens for ``source``: a folder holding exactly one ``.safetensors`` file (or, with none, one
    ``.gguf`` file) stands for that file, an mlx-lm folder for its weights (read with the config beside them);
    anything else (a file, a PEFT or diffusers folder) for itself."""
    p = Path(source)
    if mlx.is_mlx_folder(p):
        return p / mlx.WEIGHTS
    if p.is_dir() and not peft.is_peft_folder(p) and not (p / diffusers.FILENAME).is_file():
        one = _one_file(p)
        if one is not None:
            return one
    return p


def load_adapter(
    source: str | os.PathLike[str], format: str | None = None, *, problems: list[str] | None = None
) -> Adapter:
    """Read any supported adapter file or folder into the canonical model.

    Every key is accounted for: unknown keys raise :class:`UnknownKeysError`. With ``problems`` (a list), damage
    is collected there instead of raised, as far as the file can still be read (validate uses this).
    """
    src = _path(source, "source")
    if problems is not None and not isinstance(problems, list):
        raise UsageError(
            f"problems must be a list (findings are appended to it) or None, not {type(problems).__name__}"
        )
    fmt = _format(format, READERS) or detect(src)
    adapter: Adapter = READERS[fmt].read(adapter_file(src), problems=problems)
    for m in adapter.modules.values():
        found = m.check() if problems is None else []
        if found:
            raise ShapeError(f"{shown(m.name)}: {found[0]}", "run `loratools validate` for every finding")
        # zero-size tensors are valid safetensors, but a factor without elements is a rank-0 module: it adds
        # nothing, its scale divides by zero, and PEFT (r=0) and ComfyUI (alpha / rank) refuse it
        empty = sorted(role for role, t in m.factors.items() if t.numel == 0)
        if empty:
            msg = f"{shown(m.name)}: factor(s) {', '.join(empty)} hold no elements (rank 0): the module adds nothing"
            if problems is None:
                raise ShapeError(msg, "remove the module, or retrain it with a rank above 0")
            problems.append(msg)
    return adapter


def input_files(source: str | os.PathLike[str]) -> list[Path]:
    """What reading ``source`` reads: itself, for a bare PEFT weights file the config beside it, and for a GGUF
    adapter the base's config.json beside it, which gives the head counts when the file has none (an output must
    never replace one of these)."""
    p = Path(source)
    out = [p]
    if p.is_file() and (p.parent / peft.CONFIG).is_file():
        out.append(p.parent / peft.CONFIG)
    if p.is_file() and (p.parent / "config.json").is_file() and gguf.is_gguf(p):
        out.append(p.parent / "config.json")
    return out


def save_adapter(
    adapter: Adapter, out: str | os.PathLike[str], format: str | None = None, *, force: bool = False
) -> Path:
    """Write ``adapter`` in ``format`` (default: the format it was read from), atomically."""
    if not isinstance(adapter, Adapter):
        raise UsageError(f"adapter must be an Adapter (from load_adapter), not {type(adapter).__name__}")
    target = _path(out, "out")
    if not isinstance(force, bool):
        raise UsageError(f"force must be True or False, not {type(force).__name__}")
    fmt = _format(format) or _format(adapter.format)
    if fmt is None:
        raise UsageError("the adapter has no format of its own: pass format=")
    # never in place of what the adapter was read from, --force or not
    check_output(target, force=force, inputs=input_files(adapter.source) if adapter.source else [])
    check_output_name(target, fmt)
    writer: Callable[..., Path] = FORMATS[fmt].write
    return writer(adapter, target, force=force)
