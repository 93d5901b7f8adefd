from __future__ import annotations

from typing import TYPE_CHECKING

import click

from .output import fetch_if_remote, json_option, out_console, print_json, progress_bar, revision_option, styled
from .params import PATH, TOLERANCE, report_option
from .status import could_not_compare

if TYPE_CHECKING:
    from ..ops.diff import DiffReport

#: notes shown under the table without --all (--json lists them all)
SHOWN_NOTES = 10


def _num(x: float, spec: str) -> str:
    return "0" if x == 0 else format(x, spec)


def _cosine(c: float) -> str:
    """Near 1 the distance from 1 is what tells: ``1-2.3e-10``."""
    return f"1-{1 - c:.2g}" if 0.9999 < c < 1 else f"{c:.6g}"


@click.command("diff")
@click.argument("a", type=PATH)
@click.argument("b", type=PATH)
@revision_option
@click.option("--atol", type=TOLERANCE, default=0.0, show_default=True, help="Absolute tolerance per element.")
@click.option("--rtol", type=TOLERANCE, default=0.0, show_default=True, help="Relative tolerance (times |b|).")
@click.option(
    "--mode",
    type=click.Choice(["auto", "tensors", "deltas"]),
    default="auto",
    show_default=True,
    help="tensors: stored tensors by name. deltas: adapters module by module. auto: deltas when both are adapters.",
)
@report_option
@click.option("--force", is_flag=True, help="Overwrite the report if it exists.")
@click.option("--all", "show_all", is_flag=True, help="List every tensor and note, not only those that differ.")
@json_option
def diff_cmd(
    a: str, b: str, revision: str | None, atol: float, rtol: float, mode: str, report_path: str | None, force: bool,
    show_all: bool, as_json: bool,
) -> None:  # fmt: skip
    """Compare two checkpoints or two adapters: exit 0 when they match within tolerance, 1 when they differ, 2
    when they cannot be compared.

    A and B are safetensors files, model folders (single or sharded with model.safetensors.index.json),
    diffusers pipeline folders, or adapters in any format loratools reads. Two adapters are compared by their
    deltas, module by module, so a PEFT folder matches its kohya or diffusers conversion; anything else is
    compared tensor by tensor by name, streaming from the files. Per pair: max |a-b|, relative Frobenius
    difference ||a-b||/||a||, and cosine. A pair differs when some element has |a-b| > atol + rtol*|b|
    (as numpy.allclose); tensors only on one side and shape or dtype changes count as differences too.

    Exit 2, as diff(1) and cmp give it, when there is no answer: an input missing or unreadable, one that is
    neither a checkpoint nor an adapter, a Hub error, or a usage error. Nothing is printed on stdout then (also
    with --json); the Error line is on stderr.

    \b
    Example:
      loratools diff fixtures/peft_llama fixtures/peft_llama_bin
      loratools diff fixtures/peft_llama fixtures/peft_llama_patterns --json
      loratools diff fixtures/peft_llama fixtures/peft_llama_dora --mode tensors --atol 1e-3 --all
    """
    from ..ops.diff import plan_diff
    from ..ops.report_data import check_report
    from ..ops.report_pages import render_diff, write_report

    kind = "checkpoint" if mode == "tensors" else "adapter"  # a Hub id is fetched as what --mode compares
    with could_not_compare():
        a, b = fetch_if_remote(a, revision, kind), fetch_if_remote(b, revision, kind)
        if report_path is not None:
            check_report(report_path, None, force=force, inputs=[a, b])
        plan = plan_diff(a, b, mode)  # type: ignore[arg-type]
        with progress_bar("comparing") as progress:
            rep = plan.run(atol, rtol, progress=progress)
        if report_path is not None:
            write_report(report_path, rep.to_dict(), lambda: render_diff(rep), force=force, inputs=[a, b])
    if as_json:
        print_json(rep.to_dict())
    else:
        _render(rep, show_all)
    if not rep.identical:
        raise SystemExit(1)


def _render(rep: DiffReport, show_all: bool) -> None:
    from rich.table import Table
    from rich.text import Text

    con = out_console()
    changes = {c.name: c for c in rep.changed}
    table = Table(show_edge=False, header_style="bold")
    for col, justify in [
        ("module" if rep.mode == "deltas" else "tensor", "left"), ("shape", "left"), ("dtype", "left"),
        ("max abs diff", "right"), ("rel diff", "right"), ("cosine", "right"), ("status", "left"),
    ]:  # fmt: skip
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    rows: list[tuple[str, list[str | Text]]] = []
    for t in rep.tensors:
        c = changes.pop(t.name, None)
        status = ["differs"] if t.differs else []
        dtype = t.dtype
        if c is not None and c.a_dtype != c.b_dtype:
            dtype = f"{c.a_dtype}->{c.b_dtype}"
            status.append("dtype")
        if c is not None and c.a_shape != c.b_shape:
            status.append("shape")
        if not status and not show_all:
            continue
        shape = "x".join(map(str, t.shape))
        cells = [shape, dtype, _num(t.max_abs, ".4g"), _num(t.rel_fro, ".4g"), _cosine(t.cosine)]
        rows.append((t.name, [*cells, Text(", ".join(status), "red") if status else Text("same", "green")]))
    for c in changes.values():  # shape changes, not compared
        shape = "x".join(map(str, c.a_shape)) + "->" + "x".join(map(str, c.b_shape))
        dtype = c.a_dtype if c.a_dtype == c.b_dtype else f"{c.a_dtype}->{c.b_dtype}"
        rows.append((c.name, [shape, dtype, "-", "-", "-", Text("shape", "red")]))
    rows += [(n, ["", "", "-", "-", "-", Text("only in A", "red")]) for n in rep.only_in_a]
    rows += [(n, ["", "", "-", "-", "-", Text("only in B", "red")]) for n in rep.only_in_b]
    for name, row in sorted(rows, key=lambda r: r[0]):
        table.add_row(name, *row)
    if rows:
        con.print(table)
    notes = rep.notes if show_all else rep.notes[:SHOWN_NOTES]
    for note in notes:
        con.print(styled(("Note:", "dim"), " ", note))
    if len(notes) < len(rep.notes):
        con.print(styled((f"Note: ... and {len(rep.notes) - len(notes)} more (--all or --json lists them)", "dim")))
    tol = f"atol {rep.atol:g}, rtol {rep.rtol:g}" if rep.atol or rep.rtol else "exact"
    if rep.identical:
        con.print(styled(("identical", "green"), f": {rep.compared} tensors compared ({rep.mode}, {tol})"))
    else:
        con.print(
            styled(
                ("different", "red"),
                f": {rep.compared} tensors compared ({rep.mode}, {tol}), {rep.differ} differ, "
                f"{len(rep.only_in_a)} only in A, {len(rep.only_in_b)} only in B, "
                f"{len(rep.changed)} shape/dtype change(s)",
            )
        )
