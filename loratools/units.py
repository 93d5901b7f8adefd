"""Numbers, and lists of names, for people."""

from __future__ import annotations

from collections.abc import Sequence


def human_bytes(n: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def few(names: Sequence[str], n: int) -> str:
    """The first ``n`` of ``names``, and how many more: ``a, b, c (and 2 more)``."""
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
