"""Rendering: data on stdout (a Rich table, or JSON with --json), everything else on stderr."""

from __future__ import annotations

import contextlib
import functools
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.text import Text

from ..io import jsonfile
from ..io.progress import Progress, Tick
from ..units import human_bytes as human_bytes  # re-exported for the commands

F = TypeVar("F", bound=Callable[..., Any])


#: C0 and C1 control characters but tab and newline, and the bidirectional overrides: a terminal escape (or a
#: reordering) hidden in a name or a path is shown, not run
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean(text: object) -> str:
    """Text from files, paths and the Hub made safe for a terminal: control characters become ``\\xNN``."""
    return _CONTROL.sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}", str(text)
    )


class SafeConsole(Console):
    """A Rich console that prints data as data: no markup (``[/x]`` in a tensor name is text, not a style
    tag), no ``:emoji:`` codes, no highlighting, and control characters shown as ``\\xNN``. Styles come from
    :class:`rich.text.Text` objects built by the code (see :func:`styled`), never from strings."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(markup=False, emoji=False, highlight=False, **kwargs)

    def render_str(self, text: str, **kwargs: Any) -> Text:
        kwargs.update(markup=False, emoji=False, highlight=False)
        return super().render_str(clean(text), **kwargs)


def styled(*parts: str | tuple[str, str]) -> Text:
    """One line from plain pieces and (text, style) pieces, every piece cleaned: ``styled(("Error:", "bold red"),
    " ", message)``."""
    text = Text()
    for part in parts:
        if isinstance(part, tuple):
            text.append(clean(part[0]), style=part[1])
        else:
            text.append(clean(part))
    return text


@functools.cache
def _err() -> SafeConsole:
    return SafeConsole(stderr=True, soft_wrap=True)


def err_console() -> Console:
    return _err()


def out_console() -> Console:
    # made per call so that click's test runner, which swaps sys.stdout, sees the output
    return SafeConsole(file=sys.stdout, soft_wrap=True, width=None if sys.stdout.isatty() else 200)


def error(message: str, hint: str | None = None) -> None:
    """The one ``Error:`` line (and its ``Hint:``) on stderr."""
    err_console().print(styled(("Error:", "bold red"), " ", message))
    if hint:
        err_console().print(styled(("Hint:", "yellow"), " ", hint))


def note(message: str) -> None:
    err_console().print(styled(("Note:", "yellow"), " ", message))


def print_json(data: Any) -> None:
    click.echo(jsonfile.dumps(data, indent=2, sort_keys=False))


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout instead of a table.")(f)


def format_option(f: F) -> F:
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(["peft", "kohya", "diffusers", "mlx"]),
        default=None,
        help="Read SOURCE as this format instead of detecting it.",
    )(f)


def num(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.4g}"


def _no_tick(done: int = 1, items: int = 0) -> None:
    return None


def _no_bar(total: int, unit: str = "items", items: int = 0) -> Tick:
    return _no_tick


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Progress]:
    """The commands' one progress bar: the :class:`~loratools.io.progress.Progress` to hand to the library, drawn as
    a Rich bar on stderr once the work tells its size (items: done / total and time elapsed; bytes: size, speed,
    tensors and time left). It disappears when the block ends, also on an error (the terminal gets its cursor
    back), and stays silent when stderr is not a terminal (pipes, CI, tests) or the work is a single step."""
    con = err_console()
    if not con.is_terminal:
        yield _no_bar
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.progress import Progress as Bar

    bars: list[Bar] = []

    def start(total: int, unit: str = "items", items: int = 0) -> Tick:
        columns: list[ProgressColumn] = [TextColumn("{task.description}"), BarColumn()]
        if unit == "bytes":
            of = f"/{items}" if items else ""
            columns += [DownloadColumn(), TransferSpeedColumn(), TextColumn("{task.fields[items]}" + of + " tensors")]
            columns.append(TimeRemainingColumn())
        elif total == 1:
            return _no_tick
        else:
            columns += [MofNCompleteColumn() if total > 0 else TextColumn("{task.completed} done"), TimeElapsedColumn()]
        bar = Bar(*columns, console=con, transient=True)
        bars.append(bar)
        bar.start()
        task = bar.add_task(description, total=total if total > 0 else None, items=0)
        finished = [0]

        def tick(done: int = 1, items: int = 0) -> None:
            finished[0] += items
            bar.update(task, advance=done, items=finished[0])

        return tick

    try:
        yield start
    finally:
        for bar in bars:
            bar.stop()


def warn(message: str) -> None:
    err_console().print(styled(("Warning:", "yellow"), " ", message))


def dtype_option(f: F) -> F:
    return click.option(
        "--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
        help="Stored dtype of the result (default: each module's own).",
    )(f)  # fmt: skip


def to_option(f: F) -> F:
    return click.option(
        "--to", "to", type=click.Choice(["peft", "kohya", "diffusers", "mlx"]), default=None,
        help="Output format (default: the first input's).",
    )(f)  # fmt: skip


def revision_option(f: F) -> F:
    return click.option(
        "--revision", help="Branch, tag or commit, when a source is a Hub repo id (owner/name[/file])."
    )(f)


@contextlib.contextmanager
def download_bar() -> Iterator[Callable[[str, int, int | None], None] | None]:
    """A Rich bar per file downloaded from the Hub, on stderr, in the style of :func:`progress_bar` (huggingface_hub's
    own tqdm bars never show: one style per run); None when stderr is not a terminal."""
    con = err_console()
    if not con.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

    with Progress(
        TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeElapsedColumn(), console=con, transient=True,
    ) as bar:  # fmt: skip
        tasks: dict[str, Any] = {}

        def on_bytes(name: str, done: int, total: int | None) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(clean(f"downloading {name}"), total=total)
            bar.update(tasks[name], completed=done, total=total)

        yield on_bytes


def fetch_if_remote(
    arg: str,
    revision: str | None,
    kind: str = "adapter",
    *,
    origins: dict[str, str] | None = None,
    headers_only: bool = False,
) -> str:
    """A SOURCE as a local path: itself, or what it names on the Hub, downloaded (only the files the command needs;
    this may download). With ``headers_only``, a Hub SOURCE becomes a header-only view (tensor names, shapes and
    configs, no weights) in a temporary folder that lives as long as the command. ``origins`` collects the name
    each fetched SOURCE is recorded under in a provenance record (``{local path: repo id}``)."""
    import tempfile

    from .. import hub

    into = None
    ctx = click.get_current_context(silent=True)
    if headers_only and ctx is not None and hub.is_repo_id(arg):
        into = ctx.with_resource(tempfile.TemporaryDirectory(prefix="loratools-headers-"))
    with download_bar() as on_bytes:
        path = str(hub.fetch_if_repo(arg, revision=revision, kind=kind, on_bytes=on_bytes, headers_into=into))  # type: ignore[arg-type]
    name = hub.origin(arg, revision)
    if origins is not None and name is not None:
        origins[path] = name
    return path
