"""Option types the commands share, so that a value that cannot be honoured is a usage error (exit 2, click's
``Usage: ... Error: Invalid value for '--X': ...``) before anything is read or downloaded.

The library checks the same values again (:mod:`loratools.ops.args`); these give the CLI click's messages.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


class PathText(click.ParamType):  # type: ignore[type-arg]
    """A path (or a Hub repo id, where the command takes one), as given: never empty, which would stand for the
    current folder, and without a NUL character, which no file system accepts."""

    name = "path"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = os.fsdecode(value) if isinstance(value, (bytes, os.PathLike)) else str(value)
        if not text:
            self.fail("an empty path (give . for the current folder)", param, ctx)
        if "\0" in text:
            self.fail(f"{text!r} holds a NUL character", param, ctx)
        return text

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
        """File and folder names, completed by the shell itself (bash, zsh, fish)."""
        from click.shell_completion import CompletionItem

        return [CompletionItem(incomplete, type="file")]


PATH = PathText()


class WeightList(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.4; the floor is 8.1
    """``0.7,0.3``: comma-separated finite numbers (negative ones subtract). Empty items, NaN and Inf are
    refused; that the count matches the inputs is :func:`check_weights`' to say."""

    name = "weights"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:  # ctx: click >= 8.2
        return "W1,W2,..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[float]:
        if isinstance(value, list):
            return value
        text = str(value)
        out = []
        for i, item in enumerate(text.split(","), 1):
            item = item.strip()
            if not item:
                self.fail(f"{text!r}: weight {i} is empty", param, ctx)
            try:
                w = float(item)
            except ValueError:
                self.fail(f"{text!r}: {item!r} is not a number", param, ctx)
            if not math.isfinite(w):
                self.fail(f"{text!r}: weight {i} is {item}, not a finite number", param, ctx)
            out.append(w)
        return out


WEIGHTS = WeightList()


def check_weights(weights: list[float] | None, count: int, what: str = "input") -> None:
    """One weight per input, told before anything is read."""
    if weights is not None and len(weights) != count:
        raise click.BadParameter(
            f"{len(weights)} weight(s) for {count} {what}(s): give one weight per {what}",
            ctx=click.get_current_context(silent=True),
            param_hint="'--weights'",
        )


class Number(click.FloatRange):
    """click's FloatRange, which lets NaN through every bound (NaN compares false), without it."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if isinstance(rv, float) and math.isnan(rv):
            self.fail(f"{value} is not a number in the range {self._describe_range()}.", param, ctx)
        return rv


#: a fraction of the Frobenius energy: (0, 1]
FRACTION = Number(0, 1, min_open=True)
#: a tolerance: >= 0 (inf allowed: then only names, shapes, dtypes and NaN against a number can differ)
TOLERANCE = Number(min=0)


class Regex(click.ParamType):  # type: ignore[type-arg]
    """A Python regular expression (compiled here only to refuse a broken one early; the string is passed on)."""

    name = "regex"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            re.compile(value)
        except re.error as e:
            self.fail(f"{value!r} is not a regular expression ({e})", param, ctx)
        return str(value)


REGEX = Regex()


class Device(click.ParamType):  # type: ignore[type-arg]
    """``cpu``, ``cuda`` or ``cuda:N`` (and ``auto`` where allowed). Whether a GPU is there is the library's to
    say, before it reads anything."""

    name = "device"

    def __init__(self, auto: bool = False) -> None:
        self.auto = auto

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:  # ctx: click >= 8.2
        return "[cpu|cuda|cuda:N" + ("|auto]" if self.auto else "]")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from ..ops.args import DEVICE

        if not (DEVICE.fullmatch(value) or (self.auto and value == "auto")):
            self.fail(f"{value!r}: use cpu, cuda or cuda:N{' or auto' if self.auto else ''}", param, ctx)
        return str(value)


def device_option(f: F) -> F:
    return click.option(
        "--device", type=Device(), default="cpu", show_default=True, help="Where the linear algebra runs."
    )(f)


def one_of(a: str, a_value: Any, b: str, b_value: Any) -> None:
    """Exactly one of two options."""
    if (a_value is None) == (b_value is None):
        raise click.UsageError(f"give exactly one of {a} and {b}", ctx=click.get_current_context(silent=True))


def refuse(message: str) -> None:
    """A usage error in click's style (exit 2)."""
    raise click.UsageError(message, ctx=click.get_current_context(silent=True))


def filter_options(f: F) -> F:
    """``--include`` / ``--exclude`` / ``--unet-only`` / ``--text-encoders-only``: which modules a command works on
    (:mod:`loratools.ops.select`). The command gets ``include``, ``exclude`` (tuples), ``unet_only`` and
    ``text_encoders_only``, and passes ``only(unet_only, text_encoders_only)`` on."""
    names = (
        "module names as the adapter names them, as `loratools inspect` lists them (kohya lora_unet_..., "
        "diffusers unet.down_blocks..., PEFT model.layers.0...)"
    )
    f = click.option(
        "--text-encoders-only", is_flag=True, help="Only the text encoders (diffusers text_encoder*, kohya lora_te*_)."
    )(f)
    f = click.option(
        "--unet-only", is_flag=True,
        help="Only the denoiser, the UNet or transformer (diffusers unet / transformer, kohya lora_unet_ / "
        "lora_transformer_). An adapter without pipeline components (an LLM's) is refused.",
    )(f)  # fmt: skip
    f = click.option(
        "--exclude", multiple=True, type=REGEX, metavar="REGEX",
        help="Leave out modules whose name matches (repeatable).",
    )(f)  # fmt: skip
    return click.option(
        "--include", multiple=True, type=REGEX, metavar="REGEX",
        help=f"Only modules whose name matches one of these (Python re, searched; repeatable). Names: {names}.",
    )(f)  # fmt: skip


def only(unet_only: bool, text_encoders_only: bool) -> str | None:
    """The ``only`` argument of the library from the two shorthands (both at once is a usage error)."""
    if unet_only and text_encoders_only:
        refuse("give at most one of --unet-only and --text-encoders-only")
    return "unet" if unet_only else "text_encoders" if text_encoders_only else None


def left_out_line(left_out: list[Any]) -> str | None:
    """One line for what a filter left out (``LeftOut`` items), or None when it left nothing out."""
    counts = [len(x.modules) for x in left_out]
    total = sum(counts)
    if not total:
        return None
    if len(counts) == 1:
        return f"left out {total} module(s) by the module filter (--json lists them)"
    each = ", ".join(f"{n} of input {i}" for i, n in enumerate(counts, 1))
    return f"left out {total} module(s) by the module filter ({each}; --json lists them)"


def report_option(f: F) -> F:
    """``--report PATH``: also write the command's report, a page to open in a browser (``.html``) or JSON (``.json``);
    the command gets ``report_path``."""
    return click.option(
        "--report", "report_path", type=click.Path(),
        help="Also write the report: a page to open in a browser (.html: charts, sortable table) or JSON (.json).",
    )(f)  # fmt: skip
