"""The numbers of a merge: per merged tensor, the norm of the delta meant, of the base, the relative change, and
how much of the delta survived storage (the rest was rounded away, or overflowed to inf); by layer for the chart
of the HTML page (:mod:`.merge_html`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .report_data import AdapterFacts
from .select import LeftOut

#: below this fraction of its delta retained in storage, a tensor is worth keeping in fp32 (or the adapter is worth
#: serving unmerged): the page and the table flag it
RETAINED_THRESHOLD = 0.97


@dataclass
class TensorReport:
    name: str
    shape: list[int]
    dtype: str
    adapters: int
    delta_norm: float  # ||intended delta||, float32 arithmetic
    base_norm: float
    relative_change: float  # delta_norm / base_norm
    max_abs_delta: float
    retained: float  # 1 - ||(stored - base) - delta|| / ||delta||: how much of the delta survived storage
    overflow: int  # elements that became inf in storage
    replaced: bool = False
    contributions: list[float] = field(default_factory=list)  # per input adapter: ||weight * its delta|| here


@dataclass
class MergeReport:
    base: str
    output: str | None
    adapters: list[str]
    weights: list[float]
    device: str
    dtype: str | None
    tensors: list[TensorReport] = field(default_factory=list)
    copied: int = 0  # tensors copied unchanged
    files_copied: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)  # what --include / --exclude / --*-only left out
    adapter_facts: list[AdapterFacts] = field(default_factory=list)  # per input adapter, after the filter

    @property
    def summary(self) -> dict[str, Any]:
        merged = [t for t in self.tensors if t.delta_norm > 0]
        kept = sorted(t.retained for t in merged)
        return {
            "merged": len(self.tensors),
            "copied": self.copied,
            "overflow": sum(t.overflow for t in self.tensors),
            "retained_min": kept[0] if kept else None,
            "retained_median": kept[len(kept) // 2] if kept else None,
            "relative_change_max": max((t.relative_change for t in merged), default=None),
            "below_threshold": sum(t.retained < RETAINED_THRESHOLD for t in merged),
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["summary"] = self.summary
        return d
