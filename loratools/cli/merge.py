from __future__ import annotations

from typing import Any

import click

from .output import (
    dtype_option,
    fetch_if_remote,
    json_option,
    note,
    out_console,
    print_json,
    progress_bar,
    revision_option,
    warn,
)
from .params import PATH, WEIGHTS, Device, check_weights, filter_options, left_out_line, only


@click.command("merge")
@click.argument("base", type=PATH)
@click.argument("adapters", nargs=-1, required=True, type=PATH)
@revision_option
@click.option("-o", "--output", "out", required=True, type=PATH, help="Where to write the merged checkpoint.")
@click.option("--weights", type=WEIGHTS, help="One weight per adapter, comma-separated (default 1 each).")
@click.option(
    "--device",
    type=Device(auto=True),
    default="cpu",
    show_default=True,
    help="Where the merge runs: cuda or auto (cuda when present) for a GPU.",
)
@dtype_option
@click.option(
    "--report", "report_path", type=click.Path(),
    help="Also write the report: a page to open in a browser (.html) or JSON (.json); written with the output, "
    "or not at all.",
)  # fmt: skip
@click.option("--all", "show_all", is_flag=True, help="Print every merged tensor, not only the 20 least retained.")
@filter_options
@json_option
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
def merge_cmd(
    base: str,
    adapters: tuple[str, ...],
    revision: str | None,
    out: str,
    weights: list[float] | None,
    device: str,
    dtype: str | None,
    report_path: str | None,
    show_all: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    unet_only: bool,
    text_encoders_only: bool,
    as_json: bool,
    force: bool,
) -> None:
    """Merge adapters into a base checkpoint, streaming, in the base's own layout.

    BASE is a model folder (single or sharded safetensors with its index), a diffusers pipeline or component
    folder, or one .safetensors file. The output has the same tensor names, dtypes and shards, a correct index,
    and the other files (config, tokenizer, ...) copied, so it loads as the base did. Each targeted weight
    becomes W + sum_i weight_i * delta_i in float32, cast once to its dtype (DoRA: re-scaled to its magnitude;
    modules_to_save tensors replace the base's). The report shows how much of each delta survived that cast.

    --include/--exclude/--unet-only/--text-encoders-only merge part of each adapter (each must keep a module).

    \b
    Example:
      loratools merge ./Llama-3.2-1B fixtures/peft_llama -o merged --report merged.html
      loratools merge base.safetensors a.safetensors b.safetensors --weights 1,0.5 -o out.safetensors
      loratools merge ./sd15 style.safetensors --unet-only -o sd15-unet-merged
    """
    from ..ops.merge import merge

    check_weights(weights, len(adapters), "adapter")
    part = only(unet_only, text_encoders_only)
    origins: dict[str, str] = {}
    base = fetch_if_remote(base, revision, "checkpoint")
    adapters = tuple(fetch_if_remote(a, None, origins=origins) for a in adapters)
    with progress_bar("merging") as progress:
        report = merge(
            base, list(adapters), out, weights, device=device, dtype=dtype,
            force=force, progress=progress, report_path=report_path, origins=origins, include=include,
            exclude=exclude, only=part,
        )  # fmt: skip
    for w in report.warnings:
        warn(w)
    line = left_out_line(report.left_out)
    if line:
        note(line)
    if as_json:
        print_json(report.to_dict())
    else:
        _print(report, show_all)


def _print(report: Any, show_all: bool) -> None:
    from rich.table import Table

    con = out_console()
    tensors = sorted(report.tensors, key=lambda t: t.retained)
    shown = tensors if show_all or len(tensors) <= 20 else tensors[:20]
    table = Table(show_edge=False, header_style="bold")
    for col in ("tensor", "dtype", "|delta|", "rel. change", "max |delta|", "retained", "inf"):
        table.add_column(col, justify="left" if col in ("tensor", "dtype") else "right")
    for t in shown:
        table.add_row(
            t.name + (" (replaced)" if t.replaced else ""), t.dtype, f"{t.delta_norm:.4g}",
            f"{t.relative_change:.2e}", f"{t.max_abs_delta:.2e}", f"{t.retained:.4f}", str(t.overflow),
        )  # fmt: skip
    con.print(table)
    if len(shown) < len(tensors):
        con.print(f"({len(tensors) - len(shown)} more; --all shows every tensor, --report writes them all)")
    s = report.summary
    kept = "-" if s["retained_min"] is None else f"min {s['retained_min']:.4f}, median {s['retained_median']:.4f}"
    con.print(
        f"wrote {report.output}: {s['merged']} tensors merged, {s['copied']} copied; delta retained {kept}; "
        f"{s['overflow']} overflowed to inf",
        highlight=False,
    )
    if s["overflow"]:
        warn(
            f"{s['overflow']} value(s) overflowed to inf in storage: the merged model is broken there; "
            "merge again with --dtype bf16 or --dtype fp32"
        )
