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
    import torch

    p = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notes from the safe unpickler are not the user's concern
            obj: Any = torch.load(p, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
    except pickle.UnpicklingError as e:
        reason = _reason(str(e))
        if "GLOBAL" in reason or "global" in reason:
            raise UnsafePickleError(
                f"{p.name}: refused to unpickle: it asks to load code or objects, not just tensors ({reason})",
                "loratools never runs code from pickles; if you trust the file, re-save it as safetensors",
            ) from None
        raise UnsafePickleError(
            f"{p.name}: not a readable torch pickle ({reason})",
            "loratools never runs code from pickles; if you trust the file, re-save it as safetensors",
        ) from None
    except (EOFError, RuntimeError, ValueError, OSError, zipfile.BadZipFile, KeyError, TypeError) as e:
        raise FileFormatError(f"{p.name}: not a readable torch pickle ({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise FileFormatError(f"{p.name}: holds a {type(obj).__name__}, not a dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise FileFormatError(f"{p.name}: entries that are not tensors: {', '.join(map(str, bad[:5]))}")
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
