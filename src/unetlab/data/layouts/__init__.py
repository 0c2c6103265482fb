"""Dataset layouts: each module turns a folder into a :class:`DatasetInfo`; a small registry picks one.

A layout module registers a ``detect(root) -> bool`` and a ``load(root, **options) -> DatasetInfo``.
Detection tries layouts in registration order (most specific first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...errors import UnetlabError
from ..sample import DatasetInfo


@dataclass(frozen=True)
class Layout:
    """A named reader of one on-disk dataset layout."""

    name: str
    detect: Callable[[Path], bool]
    load: Callable[..., DatasetInfo]
    description: str = ""


LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> Layout:
    """Add a layout to the registry (later registrations are tried after earlier ones)."""
    LAYOUTS[layout.name] = layout
    return layout


def detect_layout(root: str | Path) -> str:
    """Name of the first registered layout that recognises ``root``; raises a one-line error if none does."""
    root = Path(root)
    if not root.exists():
        raise UnetlabError("data folder not found", root)
    if not root.is_dir():
        raise UnetlabError("expected a folder of images and masks", root)
    for layout in LAYOUTS.values():
        if layout.detect(root):
            return layout.name
    raise UnetlabError(
        "no known dataset layout found",
        root,
        "expected e.g. images/ and masks/ subfolders; see `unetlab inspect --help` for the layouts",
    )


def load_dataset(root: str | Path, layout: str | None = None, **options) -> DatasetInfo:
    """Read ``root`` with the named layout (auto-detected when None) into a DatasetInfo."""
    root = Path(root)
    name = layout or detect_layout(root)
    if name not in LAYOUTS:
        raise UnetlabError(f"unknown layout '{name}' (known: {', '.join(LAYOUTS)})")
    if not root.is_dir():
        raise UnetlabError("data folder not found", root)
    return LAYOUTS[name].load(root, **options)


from . import paired  # noqa: E402,F401  (registers itself; more specific layouts must be imported before it)
