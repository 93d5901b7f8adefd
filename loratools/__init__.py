"""loratools: inspect, validate, convert, mix, resize, merge, compare and extract LoRA adapters, in one canonical model.

The library API (docs/api.md), one convention for every operation:

* ``load_adapter`` reads any supported file or folder into an :class:`Adapter`; ``save_adapter`` writes one
  atomically.
* ``<verb>_adapter(s)`` works in memory: adapters in, an adapter and a report out (``inspect_adapter``: the report);
  nothing is read or written.
* ``<verb>`` does what the command of that name does: paths in, the output written atomically (a temp beside the
  target, then a rename; never over an input, never over an existing output without ``force=True``), the report
  out. ``validate``, ``merge``, ``diff`` and ``extract`` read files by nature (the bytes of an adapter, a base
  checkpoint streamed tensor by tensor) and exist at this level.

Arguments are checked before anything is read: a wrong one is a :class:`UsageError`; what the data or the system
refuses is another :class:`LoratoolsError`.
"""

from __future__ import annotations

from .errors import (
    FileFormatError,
    HeaderError,
    HubError,
    IncompatibleAdaptersError,
    LoratoolsError,
    OutputError,
    OutputExistsError,
    ShapeError,
    UnknownKeysError,
    UnsafePickleError,
    UsageError,
)
from .formats import detect, load_adapter, save_adapter
from .io.progress import Progress, Tick
from .model import Adapter, Extra, Module, TensorRef
from .ops.convert import ConvertReport, convert, convert_adapter
from .ops.diff import DiffReport, diff
from .ops.extract import ExtractReport, extract, extract_adapter
from .ops.inspect import InspectReport, inspect, inspect_adapter
from .ops.merge import MergeReport, merge
from .ops.mix import MixReport, mix, mix_adapters
from .ops.resize import ResizeReport, resize, resize_adapter
from .ops.validate import ValidateReport, validate
from .version import __version__

__all__ = [
    "Adapter",
    "ConvertReport",
    "DiffReport",
    "Extra",
    "ExtractReport",
    "FileFormatError",
    "HeaderError",
    "HubError",
    "IncompatibleAdaptersError",
    "InspectReport",
    "LoratoolsError",
    "MergeReport",
    "MixReport",
    "Module",
    "OutputError",
    "OutputExistsError",
    "Progress",
    "ResizeReport",
    "ShapeError",
    "TensorRef",
    "Tick",
    "UnknownKeysError",
    "UnsafePickleError",
    "UsageError",
    "ValidateReport",
    "__version__",
    "convert",
    "convert_adapter",
    "detect",
    "diff",
    "extract",
    "extract_adapter",
    "inspect",
    "inspect_adapter",
    "load_adapter",
    "merge",
    "mix",
    "mix_adapters",
    "resize",
    "resize_adapter",
    "save_adapter",
    "validate",
]
