"""An adapter in canonical form: its modules, the full tensors it carries, its metadata and config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .module import Module
from .tensors import TensorRef

#: the header metadata key under which every file loratools writes records what made it (command, parameters, each
#: input's sha256, version); ``inspect`` shows it, and a writer carries it across formats
PROVENANCE_KEY = "loratools"

ExtraRole = Literal["modules_to_save", "base_layer", "trainable_tokens", "other"]


@dataclass
class Extra:
    """A tensor that is not a LoRA factor (a full weight that replaces the base's), carried through untouched."""

    ref: TensorRef
    role: ExtraRole = "other"


@dataclass
class Adapter:
    """An adapter in canonical form, whatever file it came from.

    ``modules`` are keyed by the base model's module path (``model.layers.0.self_attn.q_proj``); diffusers
    files keep their component prefix (``unet.down_blocks.0...``) and kohya/LyCORIS files their flattened
    names (``lora_unet_down_blocks_0_...``), which only a base model's module list can turn back into dots.
    ``extras`` are keyed by the full tensor name in the same scheme (``lm_head.weight``).
    """

    format: str
    modules: dict[str, Module] = field(default_factory=dict)
    extras: dict[str, Extra] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None
    source: str | None = None

    @property
    def num_params(self) -> int:
        return sum(m.num_params for m in self.modules.values()) + sum(e.ref.numel for e in self.extras.values())

    @property
    def nbytes(self) -> int:
        refs = [t for m in self.modules.values() for t in m.tensors().values()]
        refs += [e.ref for e in self.extras.values()]
        return sum(t.nbytes for t in refs)

    def dtypes(self) -> dict[str, int]:
        """Tensor count per dtype."""
        counts: dict[str, int] = {}
        for m in self.modules.values():
            for t in m.tensors().values():
                counts[t.dtype] = counts.get(t.dtype, 0) + 1
        for e in self.extras.values():
            counts[e.ref.dtype] = counts.get(e.ref.dtype, 0) + 1
        return dict(sorted(counts.items()))

    def target_kinds(self) -> dict[str, int]:
        """Module count per target kind: the last part of the module path (``q_proj``, ``to_k``)."""
        counts: dict[str, int] = {}
        for name in self.modules:
            kind = target_kind(name)
            counts[kind] = counts.get(kind, 0) + 1
        return dict(sorted(counts.items()))


def target_kind(name: str) -> str:
    """``model.layers.0.self_attn.q_proj`` -> ``q_proj``; ``...to_out.0`` -> ``to_out.0``."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1].isdigit():
        return ".".join(parts[-2:])
    return parts[-1]
