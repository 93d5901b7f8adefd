from __future__ import annotations

import click

from .output import (
    download_bar,
    dtype_option,
    fetch_if_remote,
    json_option,
    note,
    out_console,
    print_json,
    revision_option,
    warn,
)
from .params import FRACTION, PATH, filter_options, left_out_line, only, refuse


@click.command("convert")
@click.argument("source", type=PATH)
@revision_option
@click.option(
    "--to", "to", required=True, type=click.Choice(["peft", "kohya", "diffusers", "mlx", "gguf"]), help="Target format."
)
@click.option("-o", "--output", "out", required=True, type=PATH, help="Where to write the result.")
@dtype_option
@click.option(
    "--rank",
    type=click.IntRange(min=1),
    help="Turn LoHa/LoKr/Tucker/full modules into LoRA of this rank, in every target (kohya included; default: "
    "exact, and kohya keeps them). Plain LoRA is left as it is: use resize.",
)
@click.option(
    "--energy",
    type=FRACTION,
    help="Or: per module, the rank keeping this energy fraction (the same modules as --rank).",
)
@click.option(
    "--alpha-mode",
    type=click.Choice(["keep", "bake"]),
    default="keep",
    show_default=True,
    help="keep: store each module's alpha; bake: fold every module's scale into one factor (LoRA: up; LoHa, LoKr: "
    "the first), alpha = rank.",
)
@click.option(
    "--base", type=PATH, help="Base model (folder, .safetensors or Hub id): its real module names and config.json."
)
@click.option(
    "--base-model",
    help="Hub id of the base model: recorded in the output (kohya ss_sd_model_name, PEFT base_model_name_or_path, "
    "the provenance record), replacing what the source says; for gguf, its config.json is read.",
)
@filter_options
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@json_option
def convert_cmd(
    source: str, revision: str | None, to: str, out: str, dtype: str | None, rank: int | None, energy: float | None, alpha_mode: str,
    base: str | None, base_model: str | None, include: tuple[str, ...], exclude: tuple[str, ...], unet_only: bool,
    text_encoders_only: bool, force: bool, as_json: bool,
) -> None:  # fmt: skip
    """Convert an adapter to another format: peft, kohya, diffusers or gguf (llama.cpp / Ollama).

    Names, alphas (per module, with rank/alpha patterns and rsLoRA), DoRA magnitudes and metadata carry over
    where the target can hold them; where it cannot, the conversion stops and says so. LoHa/LoKr modules
    become LoRA through their dense delta (exact unless --rank/--energy truncate; the energy kept is printed);
    with --rank/--energy they become LoRA in a kohya file too. kohya names are turned back into module paths by a
    table of known names, or against --base. kohya output gets a .alpha per module, ss_network_* keys that
    describe its tensors and freshly computed sshs_* hashes. --include/--exclude/--unet-only/--text-encoders-only
    convert part of the adapter.

    \b
    Example:
      loratools convert fixtures/peft_llama_patterns --to kohya -o patterns.safetensors
      loratools convert fixtures/diffusers_sd --to kohya -o sd.safetensors
      loratools convert fixtures/lycoris_lokr.safetensors --to kohya --rank 4 -o lokr-as-lora.safetensors
      loratools convert fixtures/kohya_sd/lora.safetensors --to kohya --unet-only -o unet.safetensors
    """
    from .. import hub
    from ..ops.convert import convert, reads_base_weights

    if rank is not None and energy is not None:
        refuse("give at most one of --rank and --energy")
    part = only(unet_only, text_encoders_only)
    origins: dict[str, str] = {}
    source = fetch_if_remote(source, revision, origins=origins)
    if base is not None:  # a Hub base: its names and config.json, unless the export compares its tensors
        remote = hub.is_repo_id(base)
        base = fetch_if_remote(base, None, "checkpoint", headers_only=remote and not reads_base_weights(source, to))
    rep = convert(
        source, to, out, rank=rank, energy=energy, alpha_mode=alpha_mode, dtype=dtype, base=base,
        base_model=base_model, base_config=_hub_config(source, to, base, base_model), force=force, origins=origins,
        include=include, exclude=exclude, only=part,
    )  # fmt: skip
    for text in rep.notes:
        warn(text)
    line = left_out_line(rep.left_out)
    if line:
        note(line)
    if rep.overflow or rep.underflow:
        warn(f"{rep.overflow} value(s) overflowed to inf and {rep.underflow} underflowed to 0 in {dtype}")
    if as_json:
        print_json(rep.to_dict())
        return
    con = out_console()
    changed = [m for m in rep.modules if m.note]
    if changed:
        from rich.table import Table

        table = Table(show_edge=False, header_style="bold")
        for col in ("module", "was", "now", "energy kept"):
            table.add_column(col, justify="right" if col == "energy kept" else "left")
        for m in changed:
            table.add_row(m.name, m.kind, f"lora rank {m.rank}", f"{m.energy:.6f}")
        con.print(table)
    con.print(
        f"wrote {rep.output} ({rep.format}) from {rep.source_format}: {len(rep.modules)} modules", highlight=False
    )


def _hub_config(source: str, to: str, base: str | None, base_model: str | None) -> str | None:
    """The base model's config.json from the Hub (that one file), for a GGUF export without --base whose adapter
    (or --base-model) names a Hub model, as llama.cpp's converter does."""
    from .. import hub
    from ..formats import gguf, load_adapter

    if to != "gguf" or base is not None:
        return None
    gguf.require()  # the optional package first, as convert itself checks it before reading anything
    model_id = base_model or load_adapter(source).base_model
    if not model_id or not hub.is_repo_id(model_id):
        return None
    with download_bar() as on_bytes:
        return str(hub.fetch(f"{model_id}/config.json", kind="file", on_bytes=on_bytes))
