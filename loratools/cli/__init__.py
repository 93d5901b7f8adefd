"""The ``loratools`` command. Known errors become one ``Error:`` line (and a ``Hint:``) on stderr, exit 1;
what the system refuses (a full disk, a read-only folder, no permission) likewise; Ctrl-C and SIGTERM stop the
work cleanly (threads joined, temps removed) with exit 130 and 143. Anything else is a bug and keeps its
traceback."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any, NoReturn

import click

from ..errors import LoratoolsError, from_os_error
from ..io import interrupts
from ..io.atomic import COMMITTED
from .output import error, note


class Interrupted(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that the same clean-up
    runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


#: a stop that came once every output was written: said as the command ends (raised then, not where it landed)
_LATE: list[BaseException] = []


class Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            try:
                result = super().invoke(ctx)
                _ignore_signals()  # the work is done and reported: a signal from now on changes nothing
                if _LATE:
                    raise _LATE.pop()
                return result
            except RuntimeError as e:  # a stop that landed inside an import is wrapped (dataclass __set_name__)
                if isinstance(e.__cause__, (KeyboardInterrupt, Interrupted)):
                    raise e.__cause__ from None
                raise
        except LoratoolsError as e:
            error(e.message, e.hint)
            ctx.exit(e.exit_code)
        except ModuleNotFoundError as e:
            if (e.name or "").partition(".")[0] != "torch":
                raise
            error(
                f"{ctx.invoked_subcommand or 'this command'} needs PyTorch, which is not installed here "
                "(only --help, inspect --fast, validate --fast and push --dry-run work without it)",
                "pip install torch (CPU only: pip install torch --index-url https://download.pytorch.org/whl/cpu)",
            )
            ctx.exit(1)
        except OSError as e:
            if isinstance(e, BrokenPipeError):
                raise
            known = from_os_error(e)
            error(known.message, known.hint)
            ctx.exit(1)
        except KeyboardInterrupt:
            error(f"interrupted (Ctrl-C); {_what_was_left()}")
            ctx.exit(130)
        except Interrupted as e:
            error(f"stopped by {signal.Signals(e.signum).name}; {_what_was_left()}")
            ctx.exit(128 + e.signum)


def _what_was_left() -> str:
    done = COMMITTED
    if not done:
        return "no output was left behind"
    return "it had already written " + ", ".join(str(p) for p in done)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loratools")
def cli() -> None:
    """Inspect, validate, convert, mix and merge LoRA adapters (PEFT, kohya, diffusers, LyCORIS).

    \b
    Example:
      loratools inspect fixtures/peft_llama
    """
    COMMITTED.clear()  # (several invocations in one process: tests)
    _LATE.clear()
    interrupts.reset()
    log = logging.getLogger("loratools")
    if not any(isinstance(h, _NoteHandler) for h in log.handlers):  # notes (a cleaned-up temp, ...) on stderr
        log.addHandler(_NoteHandler())
        log.propagate = False


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
        note(record.getMessage())


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _ignore_signals() -> None:
    """Ignore further stops, where main() installed loratools' handlers (not in a host program or a test)."""
    if threading.current_thread() is threading.main_thread():
        for s in _SIGNALS:
            if signal.getsignal(s) is _stop:
                signal.signal(s, signal.SIG_IGN)


def _stop(signum: int, frame: FrameType | None) -> None:
    """The first SIGINT/SIGTERM/SIGHUP raises in the main thread; later ones are ignored, so the clean-up it
    starts (bounded: threads finish their chunk, temps are removed) runs to its end."""
    for s in _SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    stop = KeyboardInterrupt() if signum == signal.SIGINT else Interrupted(signum)
    if COMMITTED:  # every output is written: nothing is left to stop, and raising here could land inside an import
        _LATE.append(stop)
        return
    # inside a rename or a temp's creation, the interruption waits for that step to end (milliseconds)
    interrupts.interrupt(stop)


def _quiet_broken_pipe() -> NoReturn:
    """stdout closed by the reader (``loratools inspect ... | head``): stop quietly, as cat does."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(141)


def main() -> None:
    for s in _SIGNALS:
        signal.signal(s, _stop)
    try:
        cli(prog_name="loratools")
    except BrokenPipeError:
        _quiet_broken_pipe()


def entry() -> None:
    """The ``loratools`` program (``python -m loratools`` too): :func:`main`, and after a success, an exit that
    skips the interpreter's teardown of torch's modules (0.3 s on two cores, after all the work is done).

    Only then: the command returned 0, so every output is committed (renamed and fsynced) and nothing is left to
    clean up; stdout, stderr and logging are flushed first, and where another thread still runs (a library's), or
    torch was never imported, the ordinary exit runs instead. :func:`main` itself always returns or raises, for
    host programs and tests."""
    # the collector walks the objects each time a few hundred more exist; importing torch makes hundreds of
    # thousands (0.1 s of collections on two cores): young objects are collected less often, old ones all but
    # never in a run of one command (its cyclic garbage is small; memory stays bounded)
    gc.set_threshold(100_000, 50, 100)
    try:
        main()
    except SystemExit as e:
        if e.code not in (None, 0) or "torch" not in sys.modules or threading.active_count() > 1:
            raise
    else:
        if "torch" not in sys.modules or threading.active_count() > 1:
            return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        _quiet_broken_pipe()
    logging.shutdown()
    os._exit(0)
