from __future__ import annotations

import click

from .output import (
    dtype_option,
    fetch_if_remote,
    json_option,
    num,
    out_console,
    print_json,
    progress_bar,
    revision_option,
    to_option,
)
from .params import FRACTION, PATH, device_option, one_of


@click.command("resize")
@click.argument("source", type=PATH)
@revision_option
@click.option("-o", "--output", "out", required=True, type=PATH, help="Where to write the result.")
@click.option("--rank", type=click.IntRange(min=1), help="Re-compress every module to this rank.")
@click.option(
    "--energy",
    type=FRACTION,
    help="Per module, the smallest rank keeping this fraction of the delta's Frobenius energy (e.g. 0.99).",
)
@to_option
@dtype_option
@device_option
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@json_option
def resize_cmd(
    source: str,
    revision: str | None,
    out: str,
    rank: int | None,
    energy: float | None,
    to: str | None,
    dtype: str | None,
    device: str,
    force: bool,
    as_json: bool,
) -> None:
    """Shrink an adapter: optimal rank-K re-compression of every module (Eckart-Young), from its factors.

    A module already at or below the target rank is kept exactly. LoHa/LoKr modules become LoRA through
    their dense delta. DoRA modules that would need truncating are refused.

    \b
    Example:
      loratools resize fixtures/peft_llama_patterns --rank 2 -o small
      loratools resize fixtures/kohya_sd/lora.safetensors --energy 0.95 -o slim.safetensors
    """
    from ..ops.resize import resize

    one_of("--rank", rank, "--energy", energy)
    origins: dict[str, str] = {}
    source = fetch_if_remote(source, revision, origins=origins)
    with progress_bar("resizing modules") as progress:
        report = resize(
            source, out, rank, energy, to=to, dtype=dtype, device=device, force=force, progress=progress,
            origins=origins,
        )  # fmt: skip
    if as_json:
        print_json(report.to_dict())
        return
    from rich.table import Table

    table = Table(show_edge=False, header_style="bold")
    for col in ("module", "old rank", "new rank", "energy kept"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for m in report.modules:
        table.add_row(m.name, num(m.old_rank), str(m.new_rank), "exact" if m.kept else f"{m.energy:.6f}")
    con = out_console()
    con.print(table)
    con.print(f"wrote {report.output} ({report.format}), {len(report.modules)} modules", highlight=False)
