"""The one canonical adapter model: modules, their factors, and the delta math. No I/O, no CLI.

Every reader turns its file into an :class:`Adapter`; every writer and operation works on that. The math of a
module's contribution to its base weight is defined once:

* LoRA:  ``delta = scale * up @ down`` with ``scale = alpha / r`` (``alpha / sqrt(r)`` for rsLoRA); conv
  factors are flattened and the result reshaped; a Tucker ``mid`` core is contracted in between.
* LoHa:  ``delta = (w1a @ w1b) * (w2a @ w2b) * alpha / r`` (Hadamard product), Tucker cores optional.
* LoKr:  ``delta = kron(w1, w2) * alpha / r`` where either side may be low-rank (``a @ b``); when neither
  side is low-rank there is no rank and the scale is 1.
* full:  ``delta = diff``.

``delta()`` returns the tensor in the base weight's *stored* layout: transposed for ``fan_in_fan_out``
(GPT-2 ``Conv1D``, stored in x out) and ``vocab x hidden`` for embeddings, so ``W + delta`` is always right.
DoRA modules carry a magnitude and are applied with :meth:`Module.apply`.

Tensors are held as :class:`TensorRef` so header-only facts (shapes, dtypes, ranks) need no data and no torch.

The package, by job: :mod:`.tensors` (TensorRef, dtype names), :mod:`.shapes` (which factors each kind has and
the rules their shapes follow), :mod:`.delta` (the math on factor tensors), :mod:`.module` (Module: the scale,
the layout, DoRA), :mod:`.adapter` (Adapter, Extra), :mod:`.components` (diffusers components, kohya prefixes).
"""

from __future__ import annotations

from .adapter import PROVENANCE_KEY, Adapter, Extra, ExtraRole, target_kind
from .delta import MAX_DELTA, MAX_DELTA_ENV, max_delta, rows
from .module import DoraAxis, Layer, Module
from .shapes import FACTORS, LOKR_KEYS, ModuleKind
from .tensors import DTYPE_SIZES, TensorRef, dtype_name, torch_dtype

__all__ = [
    "DTYPE_SIZES",
    "FACTORS",
    "LOKR_KEYS",
    "MAX_DELTA",
    "MAX_DELTA_ENV",
    "PROVENANCE_KEY",
    "Adapter",
    "DoraAxis",
    "Extra",
    "ExtraRole",
    "Layer",
    "Module",
    "ModuleKind",
    "TensorRef",
    "dtype_name",
    "max_delta",
    "rows",
    "target_kind",
    "torch_dtype",
]
