from __future__ import annotations

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
    to_option,
    warn,
)
from .params import PATH, WEIGHTS, check_weights, device_option, filter_options, left_out_line, only, refuse


@click.command("mix")
@click.argument("sources", nargs=-1, required=True, type=PATH)
@revision_option
@click.option("-o", "--output", "out", required=True, type=PATH, help="Where to write the result.")
@click.option(
    "--weights", type=WEIGHTS, help="One weight per input, comma-separated (default 1 each); negative subtracts."
)
@click.option(
    "--method",
    type=click.Choice(["cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]),
    default=None,
    help="cat: exact, rank = sum of ranks (default without --rank). svd: the exact weighted sum re-compressed "
    "to --rank, optimal in Frobenius norm (default with --rank). linear: PEFT's A/B averaging, which is NOT the "
    "weighted sum of the deltas. ties, dare_linear, dare_ties, magnitude_prune: PEFT's task-vector merges on "
    "each module's dense delta (its *_svd variants), with --density.",
)
@click.option(
    "--rank",
    type=click.IntRange(min=1),
    help="Target rank per module for svd and the pruning methods (without it these keep the exact full-rank result).",
)
@click.option(
    "--density",
    type=click.FloatRange(min=0, max=1, min_open=True),
    help="ties, dare_*, magnitude_prune: the fraction of each delta's entries kept (PEFT's density).",
)
@click.option(
    "--majority-sign",
    type=click.Choice(["total", "frequency"]),
    help="ties, dare_ties: elect each entry's sign by the sum of the values (total, default) or of their signs.",
)
@click.option(
    "--seed", type=click.IntRange(min=0), help="dare_*: the seed of the random masks (default: drawn and reported)."
)
@to_option
@dtype_option
@device_option
@click.option("--strict", is_flag=True, help="Refuse inputs made for different base models.")
@filter_options
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@json_option
def mix_cmd(
    sources: tuple[str, ...],
    revision: str | None,
    out: str,
    weights: list[float] | None,
    method: str | None,
    rank: int | None,
    density: float | None,
    majority_sign: str | None,
    seed: int | None,
    to: str | None,
    dtype: str | None,
    device: str,
    strict: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    unet_only: bool,
    text_encoders_only: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Combine adapters into one: the weighted sum of their deltas, exactly (cat) or re-compressed (svd), or a
    TIES / DARE / magnitude-pruned merge of them.

    Inputs may differ in format, rank, alpha, rsLoRA and target modules; a module missing from an input counts
    as zero there. LoHa/LoKr modules take part through exact factors of their dense delta. DoRA inputs are
    refused (their magnitudes are not additive). Every module's SVD is computed from its stacked factors
    (two thin QRs and an R x R SVD), never from the dense delta.

    ties, dare_linear, dare_ties and magnitude_prune act on each module's dense delta, one module at a time, as
    PEFT's ties_svd, dare_linear_svd, dare_ties_svd and magnitude_prune_svd do, and re-compress the result to
    --rank with a randomized SVD. DARE's random masks are reproducible with --seed (docs/mix.md has the math).

    --include/--exclude/--unet-only/--text-encoders-only mix part of each input (each must keep a module). A
    kohya result keeps only the header keys that name the base model (when all inputs agree); its ss_network_*
    keys and sshs_* hashes describe the mix.

    \b
    Example:
      loratools mix fixtures/peft_llama fixtures/peft_llama_patterns --weights 0.7,0.3 -o mixed
      loratools mix style.safetensors character.safetensors --rank 16 -o both.safetensors
      loratools mix style.safetensors character.safetensors --unet-only -o unet-mix.safetensors
      loratools mix fixtures/peft_llama fixtures/peft_llama_patterns --method ties --density 0.5 --rank 8 -o ties
      loratools mix fixtures/peft_llama fixtures/peft_llama_patterns --method dare_ties --density 0.3 --seed 7 -o dare
    """
    from ..ops.mix import mix

    check_weights(weights, len(sources))
    if method == "svd" and rank is None:
        refuse("--method svd needs --rank K (or --method cat, which is exact)")
    if method in ("cat", "linear") and rank is not None:
        refuse(f"--rank applies to --method svd, not {method}: leave out --rank, or use --method svd")
    pruning = method in ("ties", "dare_linear", "dare_ties", "magnitude_prune")
    if pruning and density is None:
        refuse(f"--method {method} needs --density D (the fraction of each delta's entries kept, such as 0.2)")
    if density is not None and not pruning:
        refuse("--density applies to --method ties, dare_linear, dare_ties and magnitude_prune")
    if majority_sign is not None and method not in ("ties", "dare_ties"):
        refuse("--majority-sign applies to --method ties and dare_ties")
    if seed is not None and method not in ("dare_linear", "dare_ties"):
        refuse("--seed applies to --method dare_linear and dare_ties (their random masks)")
    part = only(unet_only, text_encoders_only)
    origins: dict[str, str] = {}
    paths = [fetch_if_remote(s, revision, origins=origins) for s in sources]
    with progress_bar("mixing modules") as progress:
        report = mix(
            paths, out, weights, method, rank,  # type: ignore[arg-type]
            to=to, dtype=dtype, device=device, strict=strict, force=force, progress=progress, origins=origins,
            include=include, exclude=exclude, only=part, density=density, majority_sign=majority_sign, seed=seed,
        )  # fmt: skip
    for w in report.warnings:
        warn(w)
    line = left_out_line(report.left_out)
    if line:
        note(line)
    if as_json:
        print_json(report.to_dict())
        return
    caveat = " (not the weighted sum of the deltas)" if report.method == "linear" else ""
    ranks = sorted({m.rank for m in report.modules})
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    line = f"wrote {report.output} ({report.format}): {len(report.modules)} modules, {report.method}{caveat}, rank {rank_text}"
    energies = [m.energy for m in report.modules if m.energy is not None]
    if report.density is not None:
        line += f", density {report.density:g}"
    if report.seed is not None:
        line += f", seed {report.seed}"
    if energies:
        line += f", energy kept min {min(energies):.4f}"
    out_console().print(line, highlight=False)
