"""The one renderer of the HTML reports (merge, extract, diff): a self-contained page (inline CSS, one inline
script, no network, light and dark by ``prefers-color-scheme``) built from blocks: summary cards, notes, a facts
table per input, heatmaps and histograms (:mod:`.report_svg`), and a sortable, filterable table.

Text from adapters is data: every string goes through :func:`~.report_svg.esc` into HTML text or attributes; the
script is static (it reads the table's cells, never builds HTML from them), and the page's Content-Security-Policy
allows that script alone (by its hash): no inline handler, no other script, no request of any kind.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..version import __version__
from .report_data import AdapterFacts, layer_and_type, layer_order
from .report_svg import esc, heatmap

CSS = """
:root{color-scheme:light dark;--bg:#fff;--fg:#1d2330;--muted:#5b6474;--line:#d5dae3;--card:#f4f6f9;--bar:#3b6fb6;
--warn-bg:#fff3dc;--warn:#7a4300;--ok-bg:#e6f4ea;--ok:#1e5b2f;--hover:#eef2f8}
@media (prefers-color-scheme:dark){:root{--bg:#14171c;--fg:#e3e7ee;--muted:#9aa4b2;--line:#323844;--card:#1c2027;
--bar:#6f9fe0;--warn-bg:#3a2a12;--warn:#f5c77a;--ok-bg:#15301e;--ok:#9fd8ad;--hover:#232936}}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:var(--bg);color:var(--fg);
margin:0 auto;padding:24px 32px 48px;max-width:1280px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:32px 0 8px;border-bottom:1px solid var(--line);
padding-bottom:4px}
.sub{color:var(--muted);margin:0 0 16px;overflow-wrap:anywhere}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:8px 14px;min-width:130px}
.card b{display:block;font-size:19px;font-variant-numeric:tabular-nums}.card span{color:var(--muted);font-size:12px}
.note{border-radius:8px;padding:10px 14px;margin:10px 0;background:var(--card);border:1px solid var(--line)}
.note.warn{background:var(--warn-bg);color:var(--warn);border-color:transparent}
.note.ok{background:var(--ok-bg);color:var(--ok);border-color:transparent}
.explain{color:var(--muted);font-size:13px;max-width:900px}
.charts{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
figure{margin:0}figcaption{font-weight:600;margin:0 0 4px}
svg.chart{color:var(--fg);max-width:100%;height:auto;display:block}
svg text{fill:currentColor;font-size:11px;font-family:inherit}svg .label{font-size:12px;fill:var(--muted)}
svg .axis line,svg .frame{stroke:currentColor;stroke-width:1;opacity:.7}
svg .bar{fill:var(--bar)}svg .cell{cursor:pointer}svg .cell:hover{stroke:currentColor;stroke-width:2}
svg .threshold{stroke:#d7191c;stroke-width:1.5;stroke-dasharray:5 3}svg .threshold-label{fill:#d7191c}
.tools{display:flex;gap:12px;align-items:center;margin:8px 0}
.tools input{font:inherit;padding:5px 8px;border:1px solid var(--line);border-radius:6px;background:var(--bg);
color:var(--fg);min-width:320px}.tools span{color:var(--muted)}
.scroll{overflow:auto;max-height:80vh;border:1px solid var(--line);border-radius:8px}
table{border-collapse:collapse;font-size:12.5px;width:100%}
th,td{padding:4px 10px;border-bottom:1px solid var(--line);text-align:left;white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
thead th{position:sticky;top:0;background:var(--card);z-index:1}
th button{all:unset;cursor:pointer;font-weight:600}th button:focus-visible{outline:2px solid var(--bar)}
th[aria-sort=ascending] button::after{content:" \\25B2"}th[aria-sort=descending] button::after{content:" \\25BC"}
tbody tr:hover{background:var(--hover)}td.bad{color:#d7191c;font-weight:600}
.facts td{white-space:normal;overflow-wrap:break-word}
footer{margin-top:32px;color:var(--muted);font-size:12px}
"""

JS = """(function () {
  "use strict";
  function key(td, numeric) {
    if (!numeric) { return td.textContent.toLowerCase(); }
    var v = Number(td.getAttribute("data-v"));
    return isNaN(v) ? Infinity : v;
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
    heads.forEach(function (th, i) {
      th.querySelector("button").addEventListener("click", function () {
        var numeric = th.classList.contains("num");
        var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
        heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a.cells[i], numeric), y = key(b.cells[i], numeric);
          return (x < y ? -1 : x > y ? 1 : 0) * dir;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  document.querySelectorAll("input.filter").forEach(function (input) {
    var table = document.getElementById(input.getAttribute("data-table"));
    var count = document.getElementById(input.getAttribute("data-count"));
    var rows = Array.prototype.slice.call(table.tBodies[0].rows);
    function apply() {
      var q = input.value.trim().toLowerCase(), shown = 0;
      rows.forEach(function (r) {
        var show = !q || r.textContent.toLowerCase().indexOf(q) >= 0;
        r.hidden = !show;
        if (show) { shown += 1; }
      });
      count.textContent = shown + " of " + rows.length + " rows";
    }
    input.addEventListener("input", apply);
    apply();
  });
  document.querySelectorAll("[data-filter]").forEach(function (cell) {
    cell.addEventListener("click", function () {
      var input = document.querySelector("input.filter");
      if (!input) { return; }
      input.value = cell.getAttribute("data-filter");
      input.dispatchEvent(new Event("input"));
      input.scrollIntoView({block: "center"});
    });
  });
})();
"""

#: the page may run its own script (by hash) and nothing else, and may fetch nothing
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    f"script-src 'sha256-{base64.b64encode(hashlib.sha256(JS.encode()).digest()).decode()}'"
)


@dataclass
class Column:
    label: str
    numeric: bool = False
    fmt: Callable[[Any], str] = str
    title: str = ""  # the header's tooltip: what the column means
    bad: Callable[[Any], bool] | None = None  # a value worth flagging (drawn in red)


def _cell(col: Column, value: Any) -> str:
    text = "-" if value is None else col.fmt(value)
    cls = ' class="num' + (" bad" if value is not None and col.bad and col.bad(value) else "") + '"'
    if not col.numeric:
        return f"<td>{esc(text)}</td>"
    v = "NaN" if value is None else repr(float(value)).replace("inf", "Infinity").replace("nan", "NaN")
    return f'<td{cls} data-v="{esc(v)}">{esc(text)}</td>'


def table(ident: str, columns: Sequence[Column], rows: Sequence[Sequence[Any]], filterable: bool = True) -> str:
    """A table sortable by any column (click a header) and, with ``filterable``, filtered by a text box (rows that
    contain the text). ``ident``: the table's id (letters), one per page."""
    head = "".join(
        f'<th scope="col"{" class=num" if c.numeric else ""} title="{esc(c.title)}"><button type="button">'
        f"{esc(c.label)}</button></th>"
        for c in columns
    )
    body = "".join("<tr>" + "".join(_cell(c, v) for c, v in zip(columns, r, strict=True)) + "</tr>" for r in rows)
    tools = (
        f'<div class="tools"><input class="filter" type="search" placeholder="filter rows: a name, layer or type" '
        f'aria-label="filter rows" data-table="{ident}" data-count="{ident}-count"><span id="{ident}-count">'
        f"{len(rows)} rows</span></div>"
        if filterable
        else ""
    )
    return (
        f'{tools}<div class="scroll"><table class="sortable" id="{ident}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def cards(items: Sequence[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(f'<div class="card"><b>{esc(v)}</b><span>{esc(k)}</span></div>' for k, v in items) + "</div>"  # fmt: skip


def note(text: str, kind: str = "") -> str:
    """A boxed note; ``kind`` "warn" or "ok" colours it."""
    return f'<p class="note {esc(kind)}">{esc(text)}</p>'


def explain(text: str) -> str:
    return f'<p class="explain">{esc(text)}</p>'


def section(title: str, *blocks: str) -> str:
    body = "".join(b for b in blocks if b)
    return f"<h2>{esc(title)}</h2>{body}" if body else ""


def figure(caption: str, svg: str) -> str:
    return f"<figure><figcaption>{esc(caption)}</figcaption>{svg}</figure>" if svg else ""


def charts(*figures: str) -> str:
    return '<div class="charts">' + "".join(figures) + "</div>"


def facts_table(facts: Sequence[AdapterFacts], weights: bool = True) -> str:
    """One row per input adapter: where it is, its format and base model, ranks, alphas, targets, weight."""

    def some(values: Sequence[Any], fmt: Callable[[Any], str] = str) -> str:
        shown = ", ".join(fmt(v) for v in values[:8])
        return (shown + f", ... ({len(values)})" if len(values) > 8 else shown) or "-"

    cols = [
        Column("#"), Column("adapter"), Column("format"), Column("base model"), Column("modules", True, str),
        Column("types"), Column("ranks"), Column("alphas", title="none stored: alpha = rank"), Column("targets"),
    ]  # fmt: skip
    if weights:
        cols.append(Column("weight", True, lambda w: f"{w:g}"))
    rows = []
    for i, f in enumerate(facts, 1):
        row: list[Any] = [
            str(i), f.path, f.format, f.base_model or "-", f.modules,
            ", ".join(f"{k} {n}" for k, n in f.types.items()), some(f.ranks), some(f.alphas, lambda a: f"{a:g}"),
            some([f"{k} ({n})" for k, n in f.targets.items()]),
        ]  # fmt: skip
        if weights:
            row.append(f.weight)
        rows.append(row)
    return f'<div class="facts">{table("facts", cols, rows, filterable=False)}</div>'


def grid(
    items: Sequence[tuple[str, float]], worst: Callable[[Sequence[float]], float]
) -> tuple[list[str], list[str], dict[tuple[str, str], float], dict[tuple[str, str], str], str]:
    """Values by (layer, module type) for a heatmap: rows (layers, the common leading part left out), columns
    (types), each cell's value (``worst`` of its tensors'), the table filter a cell sets, and the axis title."""
    cells: dict[tuple[str, str], list[float]] = {}
    for name, v in items:
        cells.setdefault(layer_and_type(name), []).append(v)
    layers = sorted({lay for lay, _ in cells}, key=layer_order)
    types = sorted({t for _, t in cells})
    parts = [lay.split(".") for lay in layers if lay]
    common = 0
    if len(parts) > 1:
        while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
            common += 1
    prefix = ".".join(parts[0][:common]) if parts and common else ""

    def short(lay: str) -> str:
        return "(no layer)" if not lay else ".".join(lay.split(".")[common:])

    values = {(short(lay), t): worst(vs) for (lay, t), vs in cells.items()}
    filters = {(short(lay), t): f"{lay}.{t}" if lay else t for (lay, t) in cells}
    title = f"layer ({prefix}.N)" if prefix else "layer"
    return [short(lay) for lay in layers], types, values, filters, title


def heat(caption: str, items: Sequence[tuple[str, float]], worst: Callable[[Sequence[float]], float],
         scale: str, fmt: Callable[[float], str], ident: str) -> str:  # fmt: skip
    """A figure with the heatmap of ``items`` (name, value) by layer and module type."""
    if not items:
        return ""
    rows, cols, values, filters, row_label = grid(items, worst)
    svg = heatmap(caption, rows, cols, values, row_label, "module type", scale, fmt, filters, ident)
    return figure(caption, svg)


def page(title: str, subtitle: str, blocks: Sequence[str]) -> str:
    """The whole document."""
    body = "".join(b for b in blocks if b)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="color-scheme" content="light dark">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="loratools {esc(__version__)}">
<title>{esc(title)}</title><style>{CSS}</style></head>
<body><h1>{esc(title)}</h1><p class="sub">{esc(subtitle)}</p>
{body}
<footer>Made by loratools {esc(__version__)}. This page is one file: it needs no network and runs no script but its
own (sorting and filtering the tables).</footer>
<script>{JS}</script></body></html>
"""


def fmt_or_dash(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)
