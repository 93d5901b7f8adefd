"""The merge report as a self-contained HTML page: a summary, a per-layer chart (inline SVG, no scripts) of the
relative change and of the delta retained in storage, and the per-tensor table."""

from __future__ import annotations

import html
import math

from .merge_report import MergeReport, iter_layers


def _bars(values: list[tuple[str, float]], title: str, fmt: str, log: bool = False) -> str:
    if not values:
        return ""
    w, h, pad = max(320, 18 * len(values) + 60), 180, 40
    vals = [max(v, 1e-12) for _, v in values]
    top = max(vals)
    bottom = min(vals) if log else 0.0

    def scale(v: float) -> float:
        if log:
            lo, hi = math.log10(bottom), math.log10(top)
            return 0.0 if hi == lo else (math.log10(max(v, 1e-12)) - lo) / (hi - lo) * 0.9 + 0.1
        return v / top if top else 0.0

    bw = (w - pad - 10) / len(values)
    parts = [f'<svg width="{w}" height="{h + 40}" role="img"><title>{html.escape(title)}</title>']
    for i, (label, v) in enumerate(values):
        bh = scale(v) * h
        x = pad + i * bw
        parts.append(
            f'<rect x="{x:.1f}" y="{h - bh + 10:.1f}" width="{bw * 0.8:.1f}" height="{bh:.1f}" fill="#4a7ab5">'
            f"<title>layer {html.escape(label)}: {v:{fmt}}</title></rect>"
            f'<text x="{x + bw * 0.4:.1f}" y="{h + 25}" font-size="9" text-anchor="middle">{html.escape(label)}</text>'
        )
    parts.append(f'<text x="4" y="14" font-size="11">{top:{fmt}}</text></svg>')
    return f"<h3>{html.escape(title)}</h3>" + "".join(parts)


def render(report: MergeReport) -> str:
    layers = list(iter_layers(report))
    s = report.summary
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(c))}</td>"
            for c in (
                t.name,
                "x".join(map(str, t.shape)),
                t.dtype,
                f"{t.delta_norm:.4g}",
                f"{t.base_norm:.4g}",
                f"{t.relative_change:.3e}",
                f"{t.max_abs_delta:.3e}",
                f"{t.retained:.4f}",
                t.overflow,
            )
        )
        + "</tr>"  # fmt: skip
        for t in report.tensors
    )
    head = "".join(
        f"<th>{h}</th>"
        for h in ("tensor", "shape", "dtype", "|delta|", "|W|", "relative change", "max |delta|", "retained", "inf")
    )
    summary = ", ".join(f"{k.replace('_', ' ')}: {v if not isinstance(v, float) else f'{v:.4g}'}" for k, v in s.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>loratools merge report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}td:first-child{{text-align:left}}</style></head><body>
<h1>Merge report</h1>
<p>Base: {html.escape(report.base)}<br>Adapters: {html.escape(", ".join(report.adapters))}
(weights {html.escape(", ".join(f"{w:g}" for w in report.weights))})<br>Output: {html.escape(str(report.output))}
({html.escape(report.dtype or "base dtypes")}, computed on {html.escape(report.device)})</p>
<p>{html.escape(summary)}</p>
<p>Retained is how much of the intended delta survived the cast to the stored dtype:
1 - |(stored - base) - delta| / |delta|. Small deltas on large bf16/fp16 weights are partly rounded away.</p>
{_bars([(k, v) for k, v, _ in layers], "Largest relative change |delta| / |W| per layer", ".3e", log=True)}
{_bars([(k, r) for k, _, r in layers], "Smallest fraction of the delta retained per layer", ".4f")}
<h2>Tensors</h2><table><tr>{head}</tr>{rows}</table></body></html>
"""
