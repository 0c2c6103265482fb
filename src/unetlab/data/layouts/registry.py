"""The registry of dataset layouts: a :class:`Layout` per on-disk layout, in detection order.

A module of its own so that the layout modules register themselves without importing the package that
imports them (no import circle).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
