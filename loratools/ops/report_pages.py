"""The report pages of ``extract`` (per module: the energy kept and the error of the factors) and ``diff`` (per
pair: the relative difference and the cosine), drawn by the one renderer (:mod:`.report_html`) as the merge page
is (:mod:`.merge_html`); and the writing of any report, as a page or as JSON, named by its suffix."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..io import jsonfile
from ..io.atomic import atomic_write
from .diff import DiffReport
from .extract_report import ExtractReport
from .report_html import Column, cards, charts, explain, figure, fmt_or_dash, heat, note, page, section, table
from .report_svg import histogram

WORST = 10


def report_text(path: str | os.PathLike[str], data: dict[str, Any], html: Callable[[], str]) -> str:
    """What a report file named ``path`` holds: the page (``.html``), or ``data`` as JSON."""
    if Path(path).suffix.lower() in (".html", ".htm"):
        return html()
    return jsonfile.dumps(data, indent=2, default=str) + "\n"


def write_report(
    path: str | os.PathLike[str], data: dict[str, Any], html: Callable[[], str], *, force: bool,
    inputs: Iterable[str | os.PathLike[str]],
) -> None:  # fmt: skip
    """Write the report atomically (checked before the work by :func:`.report_data.check_report`)."""
    with atomic_write(path, force=force, inputs=inputs) as tmp:
        tmp.write_text(report_text(path, data, html), encoding="utf-8")


def _settings(rows: list[tuple[str, object]]) -> str:
    return table("facts", [Column("setting"), Column("value")], [(k, "-" if v is None else str(v)) for k, v in rows], filterable=False)  # fmt: skip


def render_extract(report: ExtractReport) -> str:
    s = report.summary
    mods = report.modules
    cols = [
        Column("module"), Column("layer"), Column("shape"), Column("rank", True, str),
        Column("energy kept", True, lambda v: f"{v:.6f}", "sum(s[:k]^2) / ||D||^2"),
        Column("error", True, lambda v: f"{v:.3e}", "||D - up @ down|| / ||D||, of the stored factors"),
        Column("||D||", True, lambda v: f"{v:.4g}", "Frobenius norm of tuned - base"),
    ]  # fmt: skip

    def row(m: Any) -> list[object]:
        return [m.name, m.layer, "x".join(map(str, m.shape)), m.rank, m.energy, m.error, m.norm]

    worst = sorted(mods, key=lambda m: -m.error)
    skipped = (
        section(
            "Left out",
            table(
                "skipped",
                [Column("tensor"), Column("why")],
                [(t.name, t.reason) for t in report.skipped],
                filterable=False,
            ),
        )  # fmt: skip
        if report.skipped
        else ""
    )
    return page(
        "Extract report",
        f"Output {report.output or '(not written)'} ({report.format}); base {report.base}; tuned {report.tuned}; "
        f"computed on {report.device}",
        [
            cards(
                [
                    ("modules factored", str(s["modules"])),
                    ("ranks", f"{s['rank_min']}-{s['rank_max']}" if mods else "-"),
                    ("largest error", fmt_or_dash(s["error_max"], ".3e")),
                    ("error over all", fmt_or_dash(s["error_total"], ".3e")),
                    ("kept whole", str(s["saved"])),
                    ("biases", str(s["biases"])),
                    ("left out", str(s["skipped"])),
                    ("unchanged pairs", str(s["unchanged"])),
                ]
            ),  # fmt: skip
            "".join(note(w, "warn") for w in report.warnings),
            section(
                "Settings",
                _settings(
                    [
                        ("base", report.base),
                        ("tuned", report.tuned),
                        ("output", report.output),
                        ("format", report.format),
                        ("rank", report.rank),
                        ("energy", report.energy),
                        ("max rank", report.max_rank),
                        ("embeddings", report.embeddings),
                        ("parameters", report.params),
                        ("bytes", report.bytes),
                    ]
                ),
            ),  # fmt: skip
            section(
                "By layer and module type",
                explain(
                    "Energy kept: the fraction of ||tuned - base||^2 that the rank-k factors hold. Error: the "
                    "relative Frobenius error of the factors as stored. Click a cell to list its modules."
                ),  # fmt: skip
                charts(
                    heat(
                        "Energy kept",
                        [(m.name, m.energy) for m in mods],
                        min,
                        "lowest in the cell (linear)",
                        lambda v: f"{v:.6f}",
                        "energy",
                    ),
                    heat(
                        "Relative error",
                        [(m.name, m.error) for m in mods],
                        max,
                        "largest in the cell (linear)",
                        lambda v: f"{v:.3e}",
                        "error",
                    ),
                    heat(
                        "Rank",
                        [(m.name, float(m.rank)) for m in mods],
                        max,
                        "rank (linear)",
                        lambda v: f"{v:g}",
                        "rank",
                    ),
                ),  # fmt: skip
            ),
            section(
                "Distribution of the energy kept",
                figure(
                    "Modules by energy kept",
                    histogram(
                        "Modules by energy kept", [m.energy for m in mods], "fraction of the energy kept (linear)"
                    ),
                ),
            ),  # fmt: skip
            section(
                f"Least exact first (the {min(WORST, len(worst))} worst)",
                table("worst", cols, [row(m) for m in worst[:WORST]], filterable=False),
            ),  # fmt: skip
            section("Every module", table("tensors", cols, [row(m) for m in worst])),
            skipped,
        ],
    )


def render_diff(report: DiffReport) -> str:
    ts = report.tensors
    changes = {c.name: c for c in report.changed}
    what = "module" if report.mode == "deltas" else "tensor"
    cols = [
        Column(what), Column("shape"), Column("dtype"),
        Column("max |a-b|", True, lambda v: f"{v:.3e}"),
        Column("relative difference", True, lambda v: f"{v:.3e}", "||a - b|| / ||a||"),
        Column("cosine", True, lambda v: f"{v:.6f}"), Column("status"),
    ]  # fmt: skip

    def row(t: Any) -> list[object]:
        c = changes.get(t.name)
        status = "differs" if t.differs else "same"
        if c is not None:
            status += f" ({c.a_dtype} -> {c.b_dtype})" if c.a_dtype != c.b_dtype else " (shape)"
        return [t.name, "x".join(map(str, t.shape)), t.dtype, t.max_abs, t.rel_fro, t.cosine, status]

    tol = f"atol {report.atol:g}, rtol {report.rtol:g}" if report.atol or report.rtol else "exact"
    if report.identical:
        verdict = note(f"A and B match ({tol}): {report.compared} {what}s compared.", "ok")
    else:
        verdict = note(
            f"A and B differ ({tol}): {report.differ} of {report.compared} {what}s differ, "
            f"{len(report.only_in_a)} only in A, {len(report.only_in_b)} only in B, {len(report.changed)} changed "
            "shape or dtype.",
            "warn",
        )
    rel = [t.rel_fro for t in ts if math.isfinite(t.rel_fro)]
    logs = [math.log10(r) for r in rel if r > 0]
    zero = len(rel) - len(logs)
    only = [(n, "only in A") for n in report.only_in_a] + [(n, "only in B") for n in report.only_in_b]
    only += [(c.name, f"{c.a_shape} {c.a_dtype} -> {c.b_shape} {c.b_dtype}") for c in report.changed]
    return page(
        "Diff report",
        f"A {report.a}; B {report.b}; compared as {report.mode}",
        [
            cards(
                [
                    (f"{what}s compared", str(report.compared)),
                    ("differ", str(report.differ)),
                    ("only in A", str(len(report.only_in_a))),
                    ("only in B", str(len(report.only_in_b))),
                    ("shape or dtype changed", str(len(report.changed))),
                    ("largest relative difference", fmt_or_dash(max(rel, default=None), ".3e")),
                ]
            ),  # fmt: skip
            verdict,
            "".join(note(n) for n in report.notes[:20]),
            section(
                "By layer and module type",
                explain(
                    "Relative difference ||a - b|| / ||a|| and cosine similarity of each pair. Click a cell to "
                    "list its pairs."
                ),  # fmt: skip
                charts(
                    heat(
                        "Relative difference",
                        [(t.name, t.rel_fro) for t in ts],
                        max,
                        "largest in the cell (linear)",
                        lambda v: f"{v:.3e}",
                        "rel",
                    ),
                    heat(
                        "Cosine",
                        [(t.name, t.cosine) for t in ts],
                        min,
                        "lowest in the cell (linear)",
                        lambda v: f"{v:.6f}",
                        "cos",
                    ),
                ),  # fmt: skip
            ),
            section(
                "Distribution of the relative difference",
                explain(
                    f"On a log scale (stated): log10 of each non-zero relative difference. {zero} pair(s) are "
                    "equal (0) and not drawn."
                ),  # fmt: skip
                figure(
                    "Pairs by relative difference",
                    histogram("Pairs by relative difference", logs, "log10(||a - b|| / ||a||)  (log scale)"),
                ),  # fmt: skip
            ),
            section(
                "Only on one side, or changed", table("only", [Column(what), Column("what")], only, filterable=False)
            )
            if only
            else "",  # fmt: skip
            section(
                f"Most different first (the {min(WORST, len(ts))} most)",
                table("worst", cols, [row(t) for t in sorted(ts, key=lambda t: -t.rel_fro)[:WORST]], filterable=False),
            ),  # fmt: skip
            section(f"Every {what}", table("tensors", cols, [row(t) for t in sorted(ts, key=lambda t: -t.rel_fro)])),
        ],
    )
