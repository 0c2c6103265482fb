"""Samples: one image on disk and a way to get its label image, whatever the layout on disk."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MaskLoader = Callable[[], np.ndarray]


@dataclass(frozen=True)
class Sample:
    """One training/prediction item.

    ``mask_loader`` is a picklable callable (a module-level function or ``functools.partial``) that returns
    the label image as an integer array (H, W): 0 is background; for binary/instance data the values are
    object ids (1 for a plain binary mask), for multiclass data they are class indices.
    ``group`` is what splits keep together (a position folder, an experiment, an image id).
    """

    name: str
    image: Path
    mask_loader: MaskLoader | None = None
    group: str = ""
    mask_paths: tuple[Path, ...] = ()

    def load_mask(self) -> np.ndarray:
        """Return the label image (H, W) of this sample; raises if the sample has no mask."""
        if self.mask_loader is None:
            raise ValueError(f"sample {self.name} has no mask")
        return self.mask_loader()


@dataclass
class DatasetInfo:
    """What a layout reader found in a folder: the samples, the task and the problems it noticed."""

    layout: str
    root: Path
    samples: list[Sample]
    task: str = "binary"  # "binary" (incl. instance labels) or "multiclass"
    classes: list[str] = field(default_factory=lambda: ["background", "foreground"])
    problems: list[str] = field(default_factory=list)  # hard problems (unpaired files, unreadable...)
    notes: list[str] = field(default_factory=list)  # informational (overlaps resolved, negative controls)

    @property
    def groups(self) -> list[str]:
        """Distinct groups in sample order."""
        return list(dict.fromkeys(s.group for s in self.samples))
