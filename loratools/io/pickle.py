"""Legacy pickle files (``adapter_model.bin``, ``.pt``, ``.ckpt``): read only with ``weights_only=True``.

A payload that tries to build anything but tensors and plain containers is refused, never run.

The one table of file names that can carry a pickle payload lives here, with its two views: what loratools reads as
a torch pickle (:func:`is_torch_pickle`), and every pickle container, which ``push`` never uploads unasked and a
checkpoint download never fetches (:func:`is_pickle`).
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FileFormatError, UnsafePickleError

if TYPE_CHECKING:
    import torch

#: what ``torch.save`` writes and ``torch.load`` reads: loratools reads these (with ``weights_only=True``)
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pth.tar")
#: every file kind that can hold a pickle payload, i.e. code that runs when it is loaded
PICKLE_SUFFIXES = (
    *TORCH_SUFFIXES,
    ".pt2",  # torch.export archives (their constants are torch.save pickles)
    ".tar",  # torch's legacy tar format: torch.load reads it
    ".pkl", ".pickle", ".p",  # pickle.dump
    ".dill",  # dill, a superset of pickle
    ".joblib", ".sav",  # joblib / scikit-learn dumps (pickle inside)
    ".npy", ".npz",  # numpy object arrays are pickled (np.load(..., allow_pickle=True) runs them)
    ".pdparams", ".pdopt",  # PaddlePaddle's paddle.save (pickle)
)  # fmt: skip
#: compression a pickle container is often wrapped in (``x.pkl.gz`` is read by pandas and joblib as it is)
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".lzma", ".zst", ".z", ".lz4")


def is_torch_pickle(name: str | os.PathLike[str]) -> bool:
    """A file loratools reads with ``torch.load`` (``adapter_model.bin``, ``x.pt``, ``x.pth.tar``...)."""
    return Path(name).name.lower().endswith(TORCH_SUFFIXES)


def is_pickle(name: str | os.PathLike[str]) -> bool:
    """A file that can carry a pickle payload, also compressed (``x.pkl.gz``): never uploaded or fetched unasked."""
    low = Path(name).name.lower()
    if low.endswith(COMPRESSION_SUFFIXES):
        low = low.rsplit(".", 1)[0]
    return low.endswith(PICKLE_SUFFIXES)


def read_pickle(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a torch pickle: a dict of name -> tensor (or ``{"state_dict": {...}}``), loaded with
    ``weights_only=True`` (nothing but tensors and plain containers is built, no code runs) and without
    memory-mapping, so that torch checks every storage record against the size the pickle claims (a mapped load
    reads past a short record into the bytes that follow it, as PEFT's own load never does). Every tensor must
    be a plain dense CPU tensor of a dtype loratools knows, holding its own data."""
    import stat
    import struct

    import torch

    from ..errors import LoratoolsError
    from ..model import dtype_name

    def _tensor_problem(t: torch.Tensor) -> str | None:
        """Why a tensor from a pickle cannot be used as adapter data, or None."""
        if t.is_nested:
            return "is a nested tensor"
        if t.layout != torch.strided:
            return f"is a {str(t.layout).removeprefix('torch.')} tensor, not a dense one"
        if t.device.type != "cpu":
            held = ": it holds no data" if t.device.type == "meta" else ""
            return f"lives on the {t.device.type} device{held}"
        if t.is_quantized:
            return f"is quantized ({t.dtype})"
        if t.dtype.is_complex:
            return f"is complex ({t.dtype})"
        try:
            dtype_name(t.dtype)
        except LoratoolsError:
            return f"has a dtype loratools does not read ({t.dtype})"
        # a tensor whose strides repeat elements (an expanded view) would become far larger once copied
        if t.numel() * t.element_size() > t.untyped_storage().nbytes():
            return f"claims {t.numel()} elements but its storage holds {t.untyped_storage().nbytes()} bytes"
        return None

    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise FileFormatError(f"{p}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise FileFormatError(f"{p}: {kind}, expected a torch pickle")
    if st.st_size == 0:
        raise FileFormatError(f"{p.name}: an empty file (0 bytes), not a torch pickle", "is the download incomplete?")
    hint = "loratools never runs code from pickles; if you trust the file, re-save it as safetensors"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notes from the safe unpickler are not the user's concern
            obj: Any = torch.load(p, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        reason = _reason(str(e))
        if "GLOBAL" in reason or "global" in reason:
            raise UnsafePickleError(
                f"{p.name}: refused to unpickle: it asks to load code or objects, not just tensors ({reason})", hint
            ) from None
        raise UnsafePickleError(f"{p.name}: not a readable torch pickle ({reason})", hint) from None
    except (
        EOFError, RuntimeError, ValueError, OSError, zipfile.BadZipFile, KeyError, TypeError, AttributeError,
        IndexError, struct.error, OverflowError, MemoryError, NotImplementedError, AssertionError,
    ) as e:  # fmt: skip
        # what torch's loader raises on a damaged or lying file (RecursionError is a RuntimeError)
        raise FileFormatError(
            f"{p.name}: not a readable torch pickle ({type(e).__name__}: {_reason(str(e))})", hint
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise FileFormatError(f"{p.name}: holds a {type(obj).__name__}, not a dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        shown = ", ".join(repr(k)[:60] for k in bad[:5])
        raise FileFormatError(
            f"{p.name}: {len(bad)} entr{'y is' if len(bad) == 1 else 'ies are'} not a name -> tensor: {shown}",
            "an adapter pickle is a flat dict of tensors; nested containers and non-string keys are not read",
        )
    for name, t in obj.items():
        problem = _tensor_problem(t)
        if problem:
            raise FileFormatError(f"{p.name}: tensor {repr(name)[:80]} {problem}")
    return obj


def _reason(message: str) -> str:
    """The one informative line of torch's weights-only refusal (its text is mostly boilerplate)."""
    lines = [x.strip() for x in message.splitlines() if x.strip()]
    for x in lines:
        if x.startswith(("Trying to load unsupported GLOBAL", "Unsupported", "Unsupported global")) or "GLOBAL" in x:
            return x[:200]
    for x in lines:
        if not x.startswith(("Weights only load failed", "Please file", "Check the documentation")):
            return x[:200]
    return lines[0][:200] if lines else "unreadable"
