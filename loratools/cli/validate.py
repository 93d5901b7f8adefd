from __future__ import annotations

import click

from .output import fetch_if_remote, format_option, json_option, out_console, print_json, revision_option, styled
from .params import PATH
from .status import could_not_compare


@click.command("validate")
@click.argument("source", type=PATH)
@revision_option
@click.option("--base", type=PATH, help="Base checkpoint the adapter must fit (file or folder).")
@click.option("--strict", is_flag=True, help="Treat warnings as errors.")
@click.option("--fast", is_flag=True, help="Headers only: skip the NaN/Inf, zero-factor and hash checks.")
@click.option(
    "--for",
    "for_",
    type=click.Choice(["vllm", "tgi", "llama.cpp", "ollama", "diffusers", "comfyui", "mlx"]),
    help="Also check what this consumer refuses or gets wrong, with the command that fixes it.",
)
@format_option
@json_option
def validate_cmd(
    source: str,
    revision: str | None,
    base: str | None,
    strict: bool,
    fast: bool,
    for_: str | None,
    fmt: str | None,
    as_json: bool,
) -> None:
    """Check an adapter: exit 0 when it is sound, 1 with a list of findings, 2 when it cannot be checked.

    Finds truncated files and lying headers, factors without partners, rank mismatches (between factors and
    against the config's rank_pattern), missing or non-positive alphas, NaN/Inf, all-zero up factors,
    mixed dtypes, config target_modules that match nothing, base-modifying inits (PiSSA, LoftQ, ...), stale
    A1111 hashes, and with --base modules the base lacks or whose shapes do not fit it.

    Exit 2, as diff(1) and cmp give it, when there is nothing to judge: SOURCE missing, unreadable or holding no
    adapter (a base checkpoint, a README, an empty folder), a --base that cannot be read, a Hub error, or a
    usage error. Nothing is printed on stdout then (also with --json); the Error line is on stderr.

    \b
    Example:
      loratools validate fixtures/peft_llama
      loratools validate fixtures/peft_gpt2 --strict --json
      loratools validate fixtures/peft_llama_patterns --for llama.cpp
    """
    from ..ops.validate import validate

    with could_not_compare():
        source = fetch_if_remote(source, revision)
        base = fetch_if_remote(base, None, "checkpoint", headers_only=True) if base is not None else None
        rep = validate(source, format=fmt, base=base, strict=strict, fast=fast, for_=for_)
    if as_json:
        print_json(rep.to_dict())
    else:
        con = out_console()
        for f in rep.findings:
            color = "red" if f.severity == "error" else "yellow"
            where = f"{f.module}: " if f.module else ""
            con.print(styled((f"{f.severity:7}", color), " ", (f"{f.code:16}", "dim"), " ", where + f.message))
        n_err = sum(f.severity == "error" for f in rep.findings)
        n_warn = len(rep.findings) - n_err
        verdict = ("OK", "green") if rep.ok else ("FAILED", "red")
        con.print(
            styled(
                verdict,
                f": {rep.format or '?'} adapter, {rep.num_modules} modules, {n_err} error(s), "
                f"{n_warn} warning(s){' (strict)' if strict else ''}",
            )
        )
    if not rep.ok:
        raise SystemExit(1)
