"""Legacy pickle files (``adapter_model.bin``, ``.pt``, ``.ckpt``): read only with ``weights_only=True``.

A payload that tries to build anything but tensors and plain containers is refused, never run.
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


def read_pickle(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    import torch

    p = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notes from the safe unpickler are not the user's concern
            obj: Any = torch.load(p, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafePickleError(
            f"{p.name}: refused to unpickle: it holds more than tensors ({first[:200]})",
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
