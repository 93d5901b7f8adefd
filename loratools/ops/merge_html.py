"""The merge report as one HTML page (:mod:`.report_html`): the adapters' facts, heatmaps by layer and module type of
the relative change and of the fraction of the delta retained after the cast, the distribution of the retained
fractions, the worst tensors first against the threshold, each adapter's contribution, and every tensor in a
sortable, filterable table."""

from __future__ import annotations

import math

from .merge_report import RETAINED_THRESHOLD, MergeReport, TensorReport
from .report_html import (
    Column,
    cards,
    charts,
    explain,
    facts_table,
    figure,
    fmt_or_dash,
    heat,
    note,
    page,
    section,
    table,
)
from .report_svg import hbars, histogram

WORST = 10


def _columns(report: MergeReport) -> list[Column]:
    low = RETAINED_THRESHOLD
    cols = [
        Column("tensor"), Column("shape"), Column("dtype"),
        Column("|delta|", True, lambda v: f"{v:.4g}", "Frobenius norm of the delta meant (float32)"),
        Column("|W|", True, lambda v: f"{v:.4g}", "Frobenius norm of the base weight"),
        Column("relative change", True, lambda v: f"{v:.3e}", "|delta| / |W|"),
        Column("max |delta|", True, lambda v: f"{v:.3e}", "largest change of one element"),
        Column("retained", True, lambda v: f"{v:.4f}", "1 - |stored - meant| / |delta|", lambda v: v < low),
        Column("inf", True, str, "elements that overflowed to inf in storage", lambda v: v > 0),
    ]  # fmt: skip
    if len(report.adapters) > 1:
        cols += [
            Column(f"adapter {i} |w delta|", True, lambda v: f"{v:.4g}", f"||weight * delta|| of {a}")
            for i, a in enumerate(report.adapters, 1)
        ]
    return cols


def _row(t: TensorReport, adapters: int) -> list[object]:
    row: list[object] = [
        t.name + (" (replaced)" if t.replaced else ""), "x".join(map(str, t.shape)), t.dtype, t.delta_norm,
        t.base_norm, t.relative_change, t.max_abs_delta, t.retained, t.overflow,
    ]  # fmt: skip
    if adapters > 1:
        row += (t.contributions + [0.0] * adapters)[:adapters]
    return row


def _contribution(report: MergeReport) -> str:
    """Each adapter's share of the change: ||weight_i * delta_i|| over all tensors, and by layer and module type."""
    n = len(report.adapters)
    if n < 2:
        return ""
    totals = [math.sqrt(sum((t.contributions[i] if i < len(t.contributions) else 0.0) ** 2 for t in report.tensors))
              for i in range(n)]  # fmt: skip
    bars = hbars(
        "Contribution of each adapter",
        [(f"{i}: {a}", v) for i, (a, v) in enumerate(zip(report.adapters, totals, strict=True), 1)],
        "||weight x delta|| over all merged tensors (linear)",
    )
    shares = []
    for t in report.tensors:
        if len(t.contributions) == n and sum(t.contributions) > 0:
            shares.append((t.name, t.contributions[0] / math.sqrt(sum(c * c for c in t.contributions))))
    first = heat(
        "Share of adapter 1 in the change, by layer and module type", shares, max,
        "||w1 d1|| / sqrt(sum ||wi di||^2)", lambda v: f"{v:.3f}", "share",
    )  # fmt: skip
    return section(
        "Contribution per adapter",
        explain("The norm of each adapter's own weighted delta, summed over the tensors it changes."),
        charts(figure("Contribution of each adapter", bars), first),
    )


def render(report: MergeReport) -> str:
    s = report.summary
    merged = [t for t in report.tensors if t.delta_norm > 0]
    low = sorted((t for t in merged if t.retained < RETAINED_THRESHOLD), key=lambda t: t.retained)
    worst = sorted(merged, key=lambda t: t.retained)[:WORST]
    pct = f"{RETAINED_THRESHOLD:.0%}"
    if low:
        threshold = note(
            f"{len(low)} of {len(merged)} merged tensors keep less than {pct} of their delta after the cast to "
            f"{report.dtype or 'their stored dtype'}: keep those tensors in fp32 (merge again with --dtype fp32), "
            "or serve the adapter unmerged.",
            "warn",
        )
    else:
        threshold = (
            note(f"Every merged tensor keeps at least {pct} of its delta after the cast.", "ok") if merged else ""
        )
    overflow = (
        note(f"{s['overflow']} value(s) overflowed to inf in storage: the merged model is broken there; merge again "
             "with --dtype bf16 or --dtype fp32.", "warn")
        if s["overflow"] else ""
    )  # fmt: skip
    summary = cards([
        ("tensors merged", str(s["merged"])), ("tensors copied", str(s["copied"])),
        ("retained, lowest", fmt_or_dash(s["retained_min"], ".4f")),
        ("retained, median", fmt_or_dash(s["retained_median"], ".4f")),
        (f"below {pct} retained", str(s["below_threshold"])),
        ("relative change, largest", fmt_or_dash(s["relative_change_max"], ".3e")),
        ("overflowed to inf", str(s["overflow"])),
    ])  # fmt: skip
    rel = [(t.name, t.relative_change) for t in merged]
    kept = [(t.name, t.retained) for t in merged]
    heatmaps = charts(
        heat("Relative change |delta| / |W|", rel, max, "largest in the cell (linear)", lambda v: f"{v:.3e}", "rel"),
        heat("Fraction of the delta retained after the cast", kept, min, "lowest in the cell (linear)",
             lambda v: f"{v:.4f}", "kept"),
    )  # fmt: skip
    dist = histogram(
        "Distribution of the fraction retained", [t.retained for t in merged],
        "fraction of the delta retained (linear)", RETAINED_THRESHOLD, f"{pct} threshold",
    )  # fmt: skip
    cols = _columns(report)
    n = len(report.adapters)
    rows = [_row(t, n) for t in sorted(report.tensors, key=lambda t: t.retained)]
    subtitle = (
        f"Output {report.output or '(not written)'}; base {report.base}; {n} adapter(s); stored as "
        f"{report.dtype or 'the base dtypes'}; computed on {report.device}"
    )
    notes = "".join(note(w, "warn") for w in report.warnings)
    return page(
        "Merge report",
        subtitle,
        [
            summary,
            threshold,
            overflow,
            notes,
            section("Adapters", facts_table(report.adapter_facts)),
            section(
                "By layer and module type",
                explain(
                    "Relative change: how much each weight moves, |delta| / |W|. Retained: how much of the delta "
                    "meant survived the cast to the stored dtype, 1 - |(stored - base) - delta| / |delta|; small "
                    "deltas on large bf16 or fp16 weights are partly rounded away. Click a cell to list its tensors."
                ),
                heatmaps,
            ),
            section("Distribution of the fraction retained", figure("Tensors by fraction retained", dist)),
            section(
                f"Least retained first (the {min(WORST, len(worst))} worst)",
                table("worst", cols, [_row(t, n) for t in worst], filterable=False),
            ),
            _contribution(report),
            section("Every merged tensor", table("tensors", cols, rows)),
        ],
    )
