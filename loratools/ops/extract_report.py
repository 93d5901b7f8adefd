"""What an extraction found: per factored module its rank, the energy kept and the error; the tensors kept
whole, the biases, and what was left out and why."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ExtractedModule:
    name: str
    shape: list[int]  # the weight's stored shape
    layer: str  # linear, conv or embedding
    rank: int
    energy: float  # fraction of ||D||² the rank-k truncation keeps: sum(s[:k]²) / ||D||²
    error: float  # ||D - stored up @ down|| / ||D||, measured on the stored (rounded) factors
    norm: float  # ||D||, Frobenius


@dataclass
class SkippedTensor:
    name: str
    reason: str


@dataclass
class ExtractReport:
    base: str
    tuned: str
    output: str | None
    format: str
    rank: int | None
    energy: float | None
    max_rank: int | None
    device: str
    embeddings: str
    modules: list[ExtractedModule] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)  # tensors kept whole (PEFT modules_to_save)
    biases: list[str] = field(default_factory=list)  # bias differences stored as LoRA biases
    skipped: list[SkippedTensor] = field(default_factory=list)  # changed, but left out of the adapter
    unchanged: int = 0  # tensor pairs with equal values
    excluded: int = 0  # base tensors left out by --include / --exclude
    params: int = 0
    bytes: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, Any]:
        ranks = sorted(m.rank for m in self.modules)
        total = sum(m.norm**2 for m in self.modules)
        lost = sum((m.error * m.norm) ** 2 for m in self.modules)
        return {
            "modules": len(self.modules),
            "saved": len(self.saved),
            "biases": len(self.biases),
            "skipped": len(self.skipped),
            "unchanged": self.unchanged,
            "rank_min": ranks[0] if ranks else None,
            "rank_max": ranks[-1] if ranks else None,
            "error_max": max((m.error for m in self.modules), default=None),
            "error_total": math.sqrt(lost / total) if total else None,  # over all modules together
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["summary"] = self.summary
        return d
