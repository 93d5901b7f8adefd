"""How long work says how far it is, to whoever shows it: one type for every operation (mix, resize, diff,
extract, merge) and every front end (the CLI's bars, a notebook's, a log).

The work calls its :class:`Progress` once, when it knows its size, and advances the :class:`Tick` it gets back as it
goes. Nothing here draws anything: the CLI's one bar builder is ``loratools.cli.output.progress_bar``.
"""

from __future__ import annotations

from typing import Protocol


class Tick(Protocol):
    """Advances the work's progress: ``done`` units of its total finished in this step; where the unit is bytes,
    ``items`` tensors finished with them."""

    def __call__(self, done: int = 1, items: int = 0) -> None: ...


class Progress(Protocol):
    """Told the size of the work once it is known: ``total`` units (0: not known in advance) of ``unit``,
    ``"items"`` (modules, tensor pairs) or ``"bytes"`` (then ``items`` says how many tensors those bytes hold).
    Returns the :class:`Tick` the work advances.

    ``progress=lambda total, unit="items", items=0: lambda done=1, items=0: None`` is the smallest one."""

    def __call__(self, total: int, unit: str = "items", items: int = 0) -> Tick: ...
