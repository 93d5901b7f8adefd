"""The ``loratools`` command. Known errors become one ``Error:`` line (and a ``Hint:``) on stderr, exit 1;
anything else is a bug and keeps its traceback."""

from __future__ import annotations

import logging
from typing import Any

import click

from ..errors import LoratoolsError
from .output import err_console


class Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LoratoolsError as e:
            err_console().print(f"[bold red]Error:[/] {e.message}", highlight=False, markup=True)
            if e.hint:
                err_console().print(f"[yellow]Hint:[/] {e.hint}", highlight=False, markup=True)
            ctx.exit(1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loratools")
def cli() -> None:
    """Inspect, validate, convert, mix and merge LoRA adapters (PEFT, kohya, diffusers, LyCORIS).

    \b
    Example:
      loratools inspect fixtures/peft_llama
    """


def _register() -> None:
    from . import convert, diff, extract, inspect, merge, mix, push, resize, validate

    cli.add_command(inspect.inspect_cmd)
    cli.add_command(validate.validate_cmd)
    cli.add_command(mix.mix_cmd)
    cli.add_command(resize.resize_cmd)
    cli.add_command(merge.merge_cmd)
    cli.add_command(diff.diff_cmd)
    cli.add_command(convert.convert_cmd)
    cli.add_command(extract.extract_cmd)
    cli.add_command(push.push_cmd)


_register()


class _NoteHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        err_console().print(f"[yellow]Note:[/] {record.getMessage()}", highlight=False)


def main() -> None:
    log = logging.getLogger("loratools")
    if not any(isinstance(h, _NoteHandler) for h in log.handlers):
        log.addHandler(_NoteHandler())
        log.propagate = False
    cli(prog_name="loratools")
