from __future__ import annotations

from typing import Any

import click

from .output import (
    dtype_option,
    fetch_if_remote,
    human_bytes,
    json_option,
    out_console,
    print_json,
    progress_bar,
    warn,
)
from .params import FRACTION, PATH, REGEX, device_option, one_of, refuse, report_option

#: rows the table shows without --all: the modules with the largest error
SHOWN = 20


@click.command("extract")
@click.argument("base", type=PATH)
@click.argument("tuned", type=PATH)
@click.option("-o", "--output", "out", required=True, type=PATH, help="Where to write the adapter.")
@click.option("--rank", type=click.IntRange(min=1), help="Factor every changed weight to this rank.")
@click.option(
    "--energy",
    type=FRACTION,
    help="Per module, the smallest rank keeping this fraction of the difference's Frobenius energy (e.g. 0.9).",
)
@click.option("--max-rank", type=click.IntRange(min=1), help="With --energy: never more than this rank.")
@click.option(
    "--embeddings",
    type=click.Choice(["lora", "save", "skip"]),
    default="save",
    show_default=True,
    help="Changed embeddings / lm_head: factor them (lora), keep them whole (save, PEFT modules_to_save), or "
    "leave them out with a warning (skip).",
)
@click.option(
    "--include", multiple=True, type=REGEX, metavar="REGEX", help="Only tensors whose name matches (repeatable)."
)
@click.option(
    "--exclude", multiple=True, type=REGEX, metavar="REGEX", help="Leave out tensors whose name matches (repeatable)."
)
@click.option("--base-model", help="base_model_name_or_path to record (default: BASE's config, else its path).")
@click.option(
    "--to", "to", type=click.Choice(["peft", "kohya", "diffusers"]), default="peft", show_default=True,
    help="Output format (kohya and diffusers need a diffusers pipeline).",
)  # fmt: skip
@dtype_option
@device_option
@click.option("--all", "show_all", is_flag=True, help=f"Print every module, not only the {SHOWN} least exact.")
@report_option
@click.option("--force", is_flag=True, help="Overwrite the output (and the report) if it exists.")
@json_option
def extract_cmd(
    base: str,
    tuned: str,
    out: str,
    rank: int | None,
    energy: float | None,
    max_rank: int | None,
    embeddings: str,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    base_model: str | None,
    to: str,
    dtype: str | None,
    device: str,
    show_all: bool,
    report_path: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Extract a LoRA adapter from a base checkpoint and its fine-tuned version.

    Each changed weight's difference TUNED - BASE is factored by a randomized SVD (exact when its rank is at
    most the target), streaming one tensor pair at a time. Changed norms and biases are kept whole (or as LoRA
    biases), embeddings per --embeddings; unchanged tensors are skipped. The per-module rank, energy kept and
    relative error are printed and saved in the output's metadata.

    \b
    Example:
      loratools extract ./Llama-3.2-1B ./Llama-3.2-1B-Instruct --rank 32 -o instruct-lora
      loratools extract ./base ./tuned --energy 0.9 --max-rank 128 --embeddings skip -o adapter
      loratools extract ./base ./tuned --rank 16 -o adapter --report extract.html
    """
    from ..ops.extract import extract
    from ..ops.report_data import check_report
    from ..ops.report_pages import render_extract, write_report

    one_of("--rank", rank, "--energy", energy)
    if max_rank is not None and rank is not None:
        refuse("--max-rank caps the ranks --energy picks; with --rank it has no use")
    base, tuned = fetch_if_remote(base, None, "checkpoint"), fetch_if_remote(tuned, None, "checkpoint")
    if report_path is not None:
        check_report(report_path, out, force=force, inputs=[base, tuned])
    with progress_bar("extracting") as progress:
        report = extract(
            base, tuned, out, rank, energy, max_rank=max_rank, to=to, dtype=dtype, device=device,
            include=include, exclude=exclude, embeddings=embeddings, base_model=base_model, force=force,
            progress=progress,
        )  # fmt: skip
    for w in report.warnings:
        warn(w)
    if report_path is not None:  # written after the adapter: an adapter is never taken back for its report
        write_report(report_path, report.to_dict(), lambda: render_extract(report), force=force, inputs=[base, tuned])
    if as_json:
        print_json(report.to_dict())
        return
    _print(report, show_all)


def _print(report: Any, show_all: bool) -> None:
    from rich.table import Table

    con = out_console()
    rows = sorted(report.modules, key=lambda m: -m.error)
    shown = rows if show_all or len(rows) <= SHOWN else rows[:SHOWN]
    table = Table(show_edge=False, header_style="bold")
    for col in ("module", "shape", "rank", "energy kept", "rel. error"):
        table.add_column(col, justify="left" if col in ("module", "shape") else "right")
    for m in sorted(shown, key=lambda m: m.name):
        table.add_row(m.name, "x".join(map(str, m.shape)), str(m.rank), f"{m.energy:.6f}", f"{m.error:.2e}")
    con.print(table)
    if len(shown) < len(rows):
        con.print(f"({len(rows) - len(shown)} more with smaller errors; --all shows every module)")
    s = report.summary
    ranks = (
        "-"
        if s["rank_min"] is None
        else f"{s['rank_min']}" + (f"-{s['rank_max']}" if s["rank_max"] != s["rank_min"] else "")
    )
    err = "-" if s["error_total"] is None else f"{s['error_total']:.2e} overall, {s['error_max']:.2e} max"
    extra = f", {s['saved']} kept whole" if s["saved"] else ""
    extra += f", {s['biases']} LoRA biases" if s["biases"] else ""
    con.print(
        f"wrote {report.output} ({report.format}, {human_bytes(report.bytes)}): {s['modules']} modules, rank "
        f"{ranks}{extra}; {s['unchanged']} unchanged, {s['skipped']} left out; relative error {err}",
        highlight=False,
    )
