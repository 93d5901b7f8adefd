"""Name maps per model family: one table per family, read by every command.

Each family (:data:`BUILDERS`) is a set of :class:`Part` tables, one per diffusers component, each linking the
component's diffusers module paths to kohya's names and to single-file checkpoint names. Adding a family is one
more table (a module here with its links and a builder); the planning, the lookups and the detection read any.

* :func:`family` - a family's tables (a UNet family's block numbering from a UNet config when given);
* :func:`detect` - which family an adapter is for, from its names, shapes, metadata and a base's config;
* :func:`plan_from_kohya` / :func:`plan_to_kohya` - the name plan for a set of modules under a detection;
* :func:`single_file_location` - where a diffusers tensor lives in the family's single-file checkpoint;
* :func:`single_files` - which family's single-file checkpoint a base is, and where its components sit;
* :func:`block_kind` - the component and block kind of a module name (inspect's grouping).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from typing import Any

from ...errors import ShapeError
from .checkpoint import SingleFile, single_files
from .core import EQUAL, Link, Space, Split
from .detect import IMAGE, TITLES, Detection, detect
from .family import Family, Part, Plan, SingleFileLocation, Step, from_kohya, single_file_location, to_kohya
from .flux import MLP_RATIO, flux1, xlabs_name
from .sd import sd1, sd2, sdxl
from .sd3 import sd3
from .unet import UNetLayout

__all__ = [
    "BUILDERS", "EQUAL", "IMAGE", "MLP_RATIO", "TITLES", "Detection", "Family", "Link", "Part", "Plan",
    "SingleFile", "SingleFileLocation", "Space", "Split", "Step", "UNetLayout", "block_kind", "detect", "family",
    "from_kohya", "plan_from_kohya", "plan_to_kohya", "single_file_location", "single_files", "xlabs_name",
]  # fmt: skip

BUILDERS: dict[str, Callable[..., Family]] = {"sd1": sd1, "sd2": sd2, "sdxl": sdxl, "flux1": flux1, "sd3": sd3}
#: the families whose UNet block numbering a config can change
UNET_FAMILIES = ("sd1", "sd2", "sdxl")


@lru_cache(maxsize=32)
def _built(fid: str, layout: UNetLayout | None) -> Family:
    return BUILDERS[fid](layout) if fid in UNET_FAMILIES else BUILDERS[fid]()


def family(fid: str, unet_config: Mapping[str, Any] | None = None, layout: UNetLayout | None = None) -> Family:
    """The tables of family ``fid`` (one of :data:`BUILDERS`); a UNet family numbers its single-file blocks by
    ``layout`` or ``unet_config`` (a diffusers UNet config.json) when given, else by the family's own config."""
    if fid not in BUILDERS:
        raise ShapeError(f"no name tables for {fid!r}", "known: " + ", ".join(BUILDERS))
    if layout is None and unet_config is not None and fid in UNET_FAMILIES:
        try:
            layout = UNetLayout.from_config(unet_config)
        except (KeyError, TypeError, ValueError) as e:
            raise ShapeError(f"the UNet config cannot number the blocks: {e}") from None
    return _built(fid, layout)


def _plans(
    detection: Detection | None,
    names: list[str],
    shapes: Mapping[str, tuple[int, ...]],
    plan: Callable[[Family, Iterable[str], Mapping[str, tuple[int, ...]]], Plan],
    unet_config: Mapping[str, Any] | None,
) -> tuple[Plan, Family] | None:
    """The plan every remaining candidate family agrees on (the only one's, when one remains); None when there is
    no candidate or they disagree (the caller names them)."""
    if detection is None:
        return None
    ids = (detection.family,) if detection.family else detection.candidates
    found: list[tuple[Plan, Family]] = []
    for fid in ids:
        if fid in BUILDERS:
            fam = family(fid, unet_config)
            found.append((plan(fam, names, shapes), fam))
    if not found:
        return None
    first = found[0][0]
    if any(p.steps != first.steps or p.unresolved != first.unresolved for p, _ in found[1:]):
        return None
    return found[0]


def plan_from_kohya(
    detection: Detection | None, names: list[str], shapes: Mapping[str, tuple[int, ...]],
    unet_config: Mapping[str, Any] | None = None,
) -> tuple[Plan, Family] | None:  # fmt: skip
    """kohya names -> diffusers paths under the detected family (or every candidate, when they agree)."""
    return _plans(detection, names, shapes, from_kohya, unet_config)


def plan_to_kohya(
    detection: Detection | None, names: list[str], shapes: Mapping[str, tuple[int, ...]],
    unet_config: Mapping[str, Any] | None = None,
) -> tuple[Plan, Family] | None:  # fmt: skip
    """diffusers paths -> kohya names under the detected family (or every candidate, when they agree)."""
    return _plans(detection, names, shapes, to_kohya, unet_config)


def block_kind(detection: Detection | None, name: str) -> tuple[str, str] | None:
    """(component, block kind) of a module name under the detected family (or any candidate that knows it)."""
    if detection is None:
        return None
    for fid in (detection.family,) if detection.family else detection.candidates:
        if fid in BUILDERS:
            hit = family(fid).kind_of(name)
            if hit:
                return hit
    return None
