from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import click
from rich import box

from .output import (
    fetch_if_remote,
    format_option,
    human_bytes,
    json_option,
    num,
    out_console,
    print_json,
    revision_option,
    styled,
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
    The base model is the one the metadata names, with the model family the module names are for (SD 1.x,
    SDXL, Flux.1, SD3, or an LLM layout); image LoRAs count their targets by component and block kind.
    The table gives each module's type, rank, alpha, scale, delta shape, dtype and the Frobenius norm of
    its delta (computed from the factors, never the dense delta, for plain LoRA); module names are grouped
    under their block (the common part printed once).

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
    summary.add_row("Base model", base_model(rep.base_model, rep.family))
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
    table = Table(show_edge=False, header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("module", overflow="fold")
    for col, justify in [
        ("type", "left"), ("rank", "right"), ("alpha", "right"), ("scale", "right"), ("shape", "left"),
        ("dtype", "left"), ("norm", "right"),
    ]:  # fmt: skip
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    if spectrum:
        for col in ("eff. rank", "r90", "r99", "singular values"):
            table.add_column(col, justify="left" if col == "singular values" else "right")
    blank = [""] * (len(table.columns) - 1)
    for (headers, leaf), m in zip(folded(m.name for m in rep.modules), rep.modules, strict=True):
        for header in headers:
            table.add_row(styled((header, "dim")), *blank)
        row = [
            leaf, m.type, num(m.rank), num(m.alpha), num(m.scale), "x".join(map(str, m.shape)), m.dtype,
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


def base_model(name: str | None, family: dict[str, Any] | None) -> str:
    """The metadata's base model, with the family the module names are for (``SDXL (from the module names)``)."""
    if not family:
        return name or "-"
    sources = {"keys": "module names", "metadata": "metadata", "config": "base's config"}
    told = f"{family['name']} (from the {' and '.join(sources.get(w, w) for w in family['from'].split('+'))})"
    if family.get("note"):
        told += f"; {family['note']}"
    return f"{name} - {told}" if name else told


#: the end of a block in a module path: a number segment followed by more path (not ``ff.net.0.proj``'s)
_BLOCK = re.compile(
    r"(?<!net)[._]\d+[._](?=[A-Za-z])|^(lora_[a-z0-9]+|lycoris)_|^(unet|transformer|text_encoder(_\d)?)\."
)


def folded(names: Iterable[str]) -> list[tuple[list[str], str]]:
    """Each module name as a tree row: (the block headers it opens, each indented by its depth; the rest, indented
    below them). A block shared with the name before is not printed again, so rows stay readable in 80 columns."""
    out: list[tuple[list[str], str]] = []
    previous: list[str] = []
    for name in names:
        cuts = [m.end() for m in _BLOCK.finditer(name)]
        blocks = [name[a:b] for a, b in zip([0, *cuts], cuts, strict=False)]
        same = 0
        while same < min(len(blocks), len(previous)) and blocks[same] == previous[same]:
            same += 1
        headers = [" " * d + blocks[d] for d in range(same, len(blocks))]
        out.append((headers, " " * len(blocks) + name[cuts[-1] if cuts else 0 :]))
        previous = blocks
    return out
