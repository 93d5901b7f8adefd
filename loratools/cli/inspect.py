from __future__ import annotations

import click

from .output import (
    fetch_if_remote,
    format_option,
    human_bytes,
    json_option,
    num,
    out_console,
    print_json,
    revision_option,
)
from .params import PATH


@click.command("inspect")
@click.argument("source", type=PATH)
@revision_option
@format_option
@click.option("--fast", is_flag=True, help="Header only: skip the delta norms (reads no tensor data).")
@click.option(
    "--spectrum", is_flag=True, help="Add each module's singular values, effective rank and 90%/99% energy ranks."
)
@click.option("--metadata", "show_metadata", is_flag=True, help="Also print the header metadata and config.")
@json_option
def inspect_cmd(
    source: str, revision: str | None, fmt: str | None, fast: bool, spectrum: bool, show_metadata: bool, as_json: bool
) -> None:
    """Show what an adapter holds: format, base model, sizes, dtypes, and every module.

    SOURCE is an adapter file or folder (PEFT folder, kohya/LyCORIS .safetensors, diffusers file), or a
    Hub repo id (owner/name, or owner/name/file.safetensors): only the adapter's files are downloaded.
    The table gives each module's type, rank, alpha, scale, delta shape, dtype and the Frobenius norm of
    its delta (computed from the factors, never the dense delta, for plain LoRA).

    \b
    Example:
      loratools inspect fixtures/peft_llama
      loratools inspect fixtures/kohya_sd/lora.safetensors --json
      loratools inspect fixtures/peft_llama_patterns --spectrum
    """
    from ..ops.inspect import inspect

    if fast and spectrum:
        raise click.UsageError("--spectrum reads the tensors; it cannot go with --fast")
    source = fetch_if_remote(source, revision, headers_only=fast)
    rep = inspect(source, fmt, norms=not fast, spectra=spectrum)
    if as_json:
        print_json(rep.to_dict())
        return
    from rich.table import Table

    con = out_console()
    summary = Table.grid(padding=(0, 2))
    summary.add_row("Source", rep.source)
    summary.add_row("Format", rep.format)
    summary.add_row("Base model", rep.base_model or "-")
    summary.add_row("Modules", f"{rep.num_modules} (" + ", ".join(f"{k} {v}" for k, v in rep.types.items()) + ")")
    summary.add_row("Parameters", f"{rep.num_params:,}")
    summary.add_row("Size on disk", human_bytes(rep.size_on_disk))
    summary.add_row("Dtypes", ", ".join(f"{k} x{v}" for k, v in rep.dtypes.items()))
    summary.add_row("Targets", ", ".join(f"{k} x{v}" for k, v in rep.target_modules.items()))
    if rep.made_by:
        from ..ops.provenance import describe

        summary.add_row("Made by", describe(rep.made_by))
    if rep.extras:
        summary.add_row("Extras", ", ".join(f"{e.name} ({e.role})" for e in rep.extras))
    con.print(summary)
    table = Table(show_edge=False, header_style="bold")
    for col, justify in [
        ("module", "left"), ("type", "left"), ("rank", "right"), ("alpha", "right"), ("scale", "right"),
        ("shape", "left"), ("dtype", "left"), ("norm", "right"),
    ]:  # fmt: skip
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    if spectrum:
        for col in ("eff. rank", "r90", "r99", "singular values"):
            table.add_column(col, justify="left" if col == "singular values" else "right")
    for m in rep.modules:
        row = [
            m.name, m.type, num(m.rank), num(m.alpha), num(m.scale), "x".join(map(str, m.shape)), m.dtype,
            "-" if m.norm is None else f"{m.norm:.4g}",
        ]  # fmt: skip
        if m.spectrum is not None:
            sv = m.spectrum.singular_values
            shown = " ".join(f"{x:.3g}" for x in sv[:6]) + (" ..." if len(sv) > 6 else "")
            row += [f"{m.spectrum.effective_rank:.2f}", str(m.spectrum.rank_90), str(m.spectrum.rank_99), shown]
        table.add_row(*row)
    con.print(table)
    if show_metadata:
        meta = Table.grid(padding=(0, 2))
        for k, v in sorted(rep.metadata.items()):
            meta.add_row(k, v if len(v) < 160 else v[:157] + "...")
        for k, v in sorted(rep.config.items()):
            meta.add_row(f"config.{k}", str(v))
        con.print(meta)
