from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import click

from .output import human_bytes, json_option, out_console, print_json, styled

if TYPE_CHECKING:
    from ..hub import PushReport


def publish(
    source: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
    update_card: bool = False,
    allow_pickles: bool = False,
    include: Sequence[str] = (),
) -> PushReport:
    """What ``loratools push`` does: pick the files (``hub.select``), make the model card from what ``inspect``
    reports (``ops.card``), and upload them in one commit (``hub.push``). ``dry_run`` makes no request at all."""
    from .. import hub
    from ..formats import detect, load_adapter
    from ..ops.card import card_body, card_metadata
    from ..ops.inspect import report

    target, _ = hub.target(repo_id, revision, create_pr)  # before anything is read
    env = hub.environment()
    selection = hub.select(source, include=include, allow_pickles=allow_pickles, token=env.token)
    fmt = detect(selection.source)
    facts = report(load_adapter(selection.source, fmt), selection.source, norms=False)
    meta = card_metadata(facts, is_hub_id=hub.is_model_id)
    body = card_body(facts, target, meta, selection.paths, env.endpoint)
    return hub.push(
        selection, repo_id, format=fmt, card=body, metadata=meta, private=private, revision=revision,
        message=message, create_pr=create_pr, dry_run=dry_run, update_card=update_card,
    )  # fmt: skip


def _patterns(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    from ..hub import include_problem

    for pattern in value:
        problem = include_problem(pattern)
        if problem:
            raise click.BadParameter(f"{pattern!r}: {problem}")
    return value


@click.command("push")
@click.argument("source", type=click.Path(exists=True))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", help="Branch to push to, created from main when missing (default: main).")
@click.option("-m", "--message", help="Commit message (default: 'Upload <format> adapter with loratools').")
@click.option("--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it.")
@click.option(
    "--update-card",
    is_flag=True,
    help="Update the metadata block of an existing README.md (the folder's, or else the repo's) instead of "
    "leaving it as it is.",
)
@click.option(
    "--include",
    "include",
    multiple=True,
    metavar="PATTERN",
    callback=_patterns,
    help="Upload the files this pattern names too (relative to SOURCE, fnmatch-style: 'samples/*.png', 'notes.md'; "
    "a folder's name stands for its files). Repeatable. Never a hidden file, a link out of SOURCE, or a pickle "
    "without --allow-pickles.",
)
@click.option(
    "--allow-pickles",
    is_flag=True,
    help="Upload pickle files (.bin, .pt, .pth, .ckpt, .pkl, .joblib, .npy, ...) the adapter is made of or "
    "--include names.",
)
@click.option("--dry-run", is_flag=True, help="Print the files and the model card; upload nothing, send no request.")
@json_option
def push_cmd(
    source: str,
    repo_id: str,
    private: bool,
    revision: str | None,
    message: str | None,
    create_pr: bool,
    update_card: bool,
    include: tuple[str, ...],
    allow_pickles: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Publish an adapter on the Hugging Face Hub, with a model card.

    SOURCE is an adapter folder or file; REPO_ID is owner/name. The repo is created when missing, and what an
    adapter repo is made of goes up in one commit: the adapter's files (a PEFT config and weights, a diffusers or
    kohya .safetensors), README.md, the tokenizer and chat template files saved beside an adapter, a LICENSE, and the
    files --include names. Everything else (notes, training arguments, keys, hidden files...) is left out and listed
    with the reason. A link leading out of SOURCE or to a hidden file is never followed, pickles are refused unless
    --allow-pickles, and a file holding the token in use is refused. When the folder has no README.md, loratools
    writes a model card: YAML metadata (base_model, library_name, tags) and the adapter's facts from `inspect`
    (rank, alpha, targets, size), and for files loratools made, the recipe (e.g. "mix of A (0.7) and B (0.3), svd
    to rank 16"). SOURCE is never modified. The token comes from HF_TOKEN (or `hf auth login`); HF_ENDPOINT picks
    another Hub.

    \b
    Example:
      loratools push fixtures/peft_llama me/llama-lora --dry-run
      loratools push mixed me/style-mix --private -m "mix v2"
      loratools push out me/style --include 'samples/*.png'
    """
    from rich.table import Table
    from rich.text import Text

    from ..hub import printable

    rep = publish(
        source, repo_id, private=private, revision=revision, message=message, create_pr=create_pr,
        dry_run=dry_run, update_card=update_card, allow_pickles=allow_pickles, include=include,
    )  # fmt: skip
    if as_json:
        print_json(rep.to_dict())
        return
    con = out_console()
    target = f"{rep.repo_id} ({'pull request against ' if rep.create_pr else 'branch '}{rep.revision})"
    if rep.dry_run:
        con.print(
            f"would upload {len(rep.files)} file(s), {human_bytes(rep.total_size)}, to {target}",
            highlight=False,
            markup=False,
        )
    table = Table(show_edge=False, header_style="bold")
    for col, justify in [("file", "left"), ("size", "right"), ("from", "left")]:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for f in rep.files:
        table.add_row(Text(printable(f.path)), human_bytes(f.size), Text(printable(f.source)))
    con.print(table)
    if rep.left_out:
        con.print(f"left out ({len(rep.left_out)}):", highlight=False, markup=False)
        for lo in rep.left_out:
            con.print(styled(f"  {printable(lo.path)}: ", (lo.why, "dim")))
    if rep.dry_run:
        notes = {
            "generated": "README.md (model card made by loratools):",
            "updated": "README.md (the folder's, with its metadata block updated):",
            "kept": "README.md: the folder's own, uploaded as it is",
            "filled": "README.md (the folder's PEFT template, its empty base_model filled in):",
        }
        con.print(notes[rep.card_action], highlight=False)
        if rep.card is not None:
            click.echo(rep.card)
        return
    if rep.card_action == "kept-remote":
        con.print("README.md: the repo already has one; it stays (pass --update-card to update its metadata)")
    done = f"opened {rep.pr_url}" if rep.pr_url else f"committed {rep.commit_url}"
    con.print(
        f"pushed {len(rep.files)} file(s), {human_bytes(rep.total_size)}, to {target}: {done}",
        highlight=False,
        markup=False,
    )
