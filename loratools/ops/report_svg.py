"""The charts of the HTML reports, as inline SVG written here (no script, no library, no network): a heatmap with
a colour scale, a histogram and horizontal bars, each with real linear axes and tick labels.

Every piece of text that comes from an adapter (a module name, a path) goes through :func:`esc`; numbers are
formatted here. Colours of the data are fixed (a viridis ramp, readable on light and dark pages); axes, labels and
frames use ``currentColor`` and CSS classes, so the page's light or dark scheme applies to them.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence

#: viridis, 9 stops (perceptually even, readable by most colour-blind readers, dark to light)
VIRIDIS = (
    (68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
    (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37),
)  # fmt: skip


def esc(text: object) -> str:
    """Text made safe for HTML text and double- or single-quoted attributes."""
    return html.escape(str(text), quote=True)


def colour(t: float) -> str:
    """The ramp's colour at ``t`` in [0, 1] (clamped), as ``#rrggbb``."""
    t = min(1.0, max(0.0, t)) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    f = t - i
    rgb = (round(a + (b - a) * f) for a, b in zip(VIRIDIS[i], VIRIDIS[i + 1], strict=True))
    return "#" + "".join(f"{c:02x}" for c in rgb)


def ticks(lo: float, hi: float, count: int = 5) -> tuple[float, float, list[float]]:
    """A linear axis over [lo, hi]: (start, end, ticks), the ends widened to whole steps of 1, 2, 2.5 or 5 times a
    power of ten, with about ``count`` ticks. A range of one value is widened around it."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 1e-3 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, count)
    step = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= step * m * (1 + 1e-9):
            step *= m
            break
    start, end = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    n = round((end - start) / step)
    return start, end, [start + i * step for i in range(n + 1)]


def tick_label(v: float, step: float) -> str:
    """A tick value with the digits its step needs, no more: 0.9615, 2.5e-05, 1200."""
    if v == 0 or abs(v) < step * 1e-6:
        return "0"
    big = max(abs(v), step)
    if 1e-3 <= big < 1e5:
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        if round(step * 10**decimals, 6) % 1:  # 2.5, 0.25: one more digit
            decimals += 1
        return f"{v:.{decimals}f}"
    digits = max(0, math.floor(math.log10(big)) - math.floor(math.log10(step) + 1e-9))
    if round(step / 10 ** math.floor(math.log10(step) + 1e-9), 6) % 1:
        digits += 1
    return f"{v:.{digits}e}"


def _axis_x(x0: float, x1: float, y: float, start: float, end: float, marks: list[float], label: str) -> list[str]:
    step = marks[1] - marks[0] if len(marks) > 1 else 1.0
    parts = [f'<g class="axis x"><line x1="{x0:.1f}" y1="{y:.1f}" x2="{x1:.1f}" y2="{y:.1f}"/>']
    for v in marks:
        x = x0 + (v - start) / (end - start) * (x1 - x0)
        parts.append(
            f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x:.1f}" y2="{y + 5:.1f}"/>'
            f'<text class="tick" x="{x:.1f}" y="{y + 17:.1f}" text-anchor="middle">{esc(tick_label(v, step))}</text>'
        )
    parts.append(
        f'<text class="label" x="{(x0 + x1) / 2:.1f}" y="{y + 36:.1f}" text-anchor="middle">{esc(label)}</text>'
    )
    return [*parts, "</g>"]


def _axis_y(x: float, y0: float, y1: float, start: float, end: float, marks: list[float], label: str) -> list[str]:
    """A vertical axis from y0 (value ``start``, bottom) to y1 (value ``end``, top)."""
    step = marks[1] - marks[0] if len(marks) > 1 else 1.0
    parts = [f'<g class="axis y"><line x1="{x:.1f}" y1="{y0:.1f}" x2="{x:.1f}" y2="{y1:.1f}"/>']
    for v in marks:
        y = y0 - (v - start) / (end - start) * (y0 - y1)
        parts.append(
            f'<line x1="{x - 5:.1f}" y1="{y:.1f}" x2="{x:.1f}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{x - 8:.1f}" y="{y + 4:.1f}" text-anchor="end">{esc(tick_label(v, step))}</text>'
        )
    mid = (y0 + y1) / 2
    parts.append(
        f'<text class="label" x="{x - 46:.1f}" y="{mid:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 {x - 46:.1f} {mid:.1f})">{esc(label)}</text>'
    )
    return [*parts, "</g>"]


def _svg(width: float, height: float, title: str, body: list[str], cls: str) -> str:
    return (
        f'<svg class="chart {cls}" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{esc(title)}"><title>{esc(title)}</title>'
        + "".join(body)
        + "</svg>"
    )


def heatmap(
    title: str,
    rows: Sequence[str],
    cols: Sequence[str],
    values: dict[tuple[str, str], float],
    row_label: str,
    col_label: str,
    scale_label: str,
    fmt: Callable[[float], str],
    filters: dict[tuple[str, str], str] | None = None,
    ident: str = "heat",
) -> str:
    """Rows x columns of cells coloured on a linear scale from the smallest to the largest value (widened to whole
    ticks), with the scale drawn beside it. A cell without a value is left blank; each cell's tooltip names it and
    gives its value; ``filters`` gives a cell the text that clicking it puts in the table's filter."""
    if not values:
        return ""
    finite = [v for v in values.values() if math.isfinite(v)]
    start, end, marks = ticks(min(finite, default=0.0), max(finite, default=1.0), 4)
    fit = min(48, max(len(r) for r in rows))  # characters of a row label shown: a longer one keeps its end
    left = 34 + 6.3 * fit  # the row labels, and the axis title left of them
    top = min(170, 24 + 6 * max(len(c) for c in cols))
    cw = max(14.0, min(44.0, 560 / len(cols)))
    ch = max(6.0, min(26.0, 520 / len(rows)))
    grid_w, grid_h = cw * len(cols), ch * len(rows)
    legend_x = left + grid_w + 24
    width, height = legend_x + max(90, 7 * len(scale_label)), max(top + grid_h + 52, top + 200)
    body = [f'<text class="label" x="{left + grid_w / 2:.1f}" y="14" text-anchor="middle">{esc(col_label)}</text>']
    for j, c in enumerate(cols):
        x = left + (j + 0.5) * cw
        body.append(
            f'<text class="tick" x="{x:.1f}" y="{top - 6}" text-anchor="start" '
            f'transform="rotate(-50 {x:.1f} {top - 6})">{esc(c)}</text>'
        )
    every = max(1, math.ceil(12 / ch))  # label every row when there is room, else every n-th
    for i, r in enumerate(rows):
        y = top + i * ch
        if i % every == 0 or i == len(rows) - 1:
            shown = r if len(r) <= fit else "\u2026" + r[-(fit - 1) :]
            body.append(
                f'<text class="tick" x="{left - 6:.1f}" y="{y + ch / 2 + 4:.1f}" text-anchor="end">{esc(shown)}'
                f"<title>{esc(r)}</title></text>"
            )
        for j, c in enumerate(cols):
            v = values.get((r, c))
            if v is None:
                continue
            t = (v - start) / (end - start) if math.isfinite(v) else 1.0
            fill = colour(t) if math.isfinite(v) else "#d7191c"
            flt = (filters or {}).get((r, c))
            attr = f' data-filter="{esc(flt)}"' if flt else ""
            body.append(
                f'<rect class="cell" x="{left + j * cw:.1f}" y="{y:.1f}" width="{cw - 1:.1f}" height="{ch - 1:.1f}" '
                f'fill="{fill}"{attr}><title>{esc(f"{row_label} {r}, {c}: {fmt(v)}")}</title></rect>'
            )
    body.append(
        f'<rect class="frame" x="{left - 0.5}" y="{top - 0.5}" width="{grid_w:.1f}" height="{grid_h:.1f}" fill="none"/>'
    )
    body.append(
        f'<text class="label" x="14" y="{top + grid_h / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + grid_h / 2:.1f})">{esc(row_label)}</text>'
    )
    # the colour scale: a vertical ramp with its own linear axis
    lh = min(grid_h, 180) if grid_h >= 100 else 160
    stops = "".join(f'<stop offset="{k / 8:.3f}" stop-color="{colour(k / 8)}"/>' for k in range(9))
    gid = f"ramp-{ident}"  # ident: the caller's own id (letters), one per page
    body.append(
        f'<defs><linearGradient id="{gid}" x1="0" y1="1" x2="0" y2="0">{stops}</linearGradient></defs>'
        f'<rect x="{legend_x}" y="{top}" width="14" height="{lh:.1f}" fill="url(#{gid})"/>'
    )
    step = marks[1] - marks[0] if len(marks) > 1 else 1.0
    body.append('<g class="axis y">')
    for v in marks:
        y = top + lh - (v - start) / (end - start) * lh
        body.append(
            f'<line x1="{legend_x + 14}" y1="{y:.1f}" x2="{legend_x + 19}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{legend_x + 22}" y="{y + 4:.1f}">{esc(tick_label(v, step))}</text>'
        )
    body.append(f'<text class="label" x="{legend_x}" y="{top + lh + 22:.1f}">{esc(scale_label)}</text></g>')
    return _svg(width, height, title, body, "heatmap")


def histogram(
    title: str, values: Sequence[float], x_label: str, threshold: float | None = None, threshold_label: str = ""
) -> str:
    """Counts of ``values`` in equal bins over a linear axis (widened to whole ticks), with a count axis; a dashed
    line marks ``threshold`` when it falls inside the axis."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return ""
    start, end, marks = ticks(min(finite), max(finite), 5)
    bins = max(5, min(40, round(math.sqrt(len(finite)) * 2)))
    counts = [0] * bins
    for v in finite:
        counts[min(bins - 1, int((v - start) / (end - start) * bins))] += 1
    c_start, c_end, c_marks = ticks(0, max(counts), 4)
    c_marks = [m for m in c_marks if m == int(m)] or [0.0, float(max(counts))]
    c_end = max(c_end, c_marks[-1])
    left, top, w, h = 70, 16, 520, 200
    width, height = left + w + 20, top + h + 50
    body = []
    bw = w / bins
    for i, n in enumerate(counts):
        if not n:
            continue
        bh = n / c_end * h
        lo, hi = start + i * (end - start) / bins, start + (i + 1) * (end - start) / bins
        label = f"{tick_label(lo, (end - start) / bins)} to {tick_label(hi, (end - start) / bins)}: {n}"
        body.append(
            f'<rect class="bar" x="{left + i * bw + 0.5:.1f}" y="{top + h - bh:.1f}" width="{bw - 1:.1f}" '
            f'height="{bh:.1f}"><title>{esc(label)}</title></rect>'
        )
    if threshold is not None and start <= threshold <= end:
        x = left + (threshold - start) / (end - start) * w
        body.append(
            f'<line class="threshold" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + h}"/>'
            f'<text class="tick threshold-label" x="{x + 4:.1f}" y="{top + 10}">{esc(threshold_label)}</text>'
        )
    body += _axis_x(left, left + w, top + h, start, end, marks, x_label)
    body += _axis_y(left, top + h, top, c_start, c_end, c_marks, "tensors")
    return _svg(width, height, title, body, "histogram")


def hbars(title: str, items: Sequence[tuple[str, float]], x_label: str) -> str:
    """One horizontal bar per item on a linear axis from 0, its value at its end."""
    if not items:
        return ""
    start, end, marks = ticks(0, max(max(v for _, v in items), 0.0) or 1.0, 5)
    longest = max(len(k) for k, _ in items)
    left, top, w, bh = min(300, 16 + 7 * longest), 10, 420, 22
    h = bh * len(items)
    width, height = left + w + 90, top + h + 50
    body = []
    for i, (k, v) in enumerate(items):
        y = top + i * bh
        bw = max(0.0, v - start) / (end - start) * w
        body.append(
            f'<text class="tick" x="{left - 6}" y="{y + bh / 2 + 4:.1f}" text-anchor="end">{esc(k)}</text>'
            f'<rect class="bar" x="{left}" y="{y + 3:.1f}" width="{bw:.1f}" height="{bh - 6}">'
            f"<title>{esc(f'{k}: {v:.4g}')}</title></rect>"
            f'<text class="tick" x="{left + bw + 4:.1f}" y="{y + bh / 2 + 4:.1f}">{esc(f"{v:.4g}")}</text>'
        )
    body += _axis_x(left, left + w, top + h, start, end, marks, x_label)
    return _svg(width, height, title, body, "bars")
