"""Kaggle Data Science Bowl 2018: ``<id>/images/<id>.png`` with one binary PNG per object in ``<id>/masks/``.

Loading lists files only; the object masks are read when a sample's mask is asked for, and merged into one
instance label image (int32, objects numbered in sorted file-name order). Where objects overlap, the object
that comes first in that order keeps the pixel (``unetlab inspect`` counts such pixels). Group = image id.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path

import numpy as np

from ...errors import ErrorKind, Problem, UnetlabError
from ..io import is_image_file
from ..sample import DatasetInfo, Sample
from .common import empty_mask, read_mask_raw
from .registry import Layout, register_layout

log = logging.getLogger(__name__)


def _sorted_images(folder: Path) -> list[Path]:
    try:
        return sorted(Path(e.path) for e in os.scandir(folder) if is_image_file(e.name))
    except OSError:
        return []


def _id_image(folder: Path) -> Path | None:
    """``<id>/images/<id>.<ext>``, or the only image in ``<id>/images``."""
    images = _sorted_images(folder / "images")
    for p in images:
        if p.stem == folder.name:
            return p
    return images[0] if len(images) == 1 else None


def detect(root: Path) -> bool:
    """True when the first sub-folders of ``root`` look like ``<id>/images/<id>.png``."""
    checked = 0
    try:
        it = os.scandir(root)
    except OSError:
        return False
    with it:
        for e in it:
            if not e.is_dir() or e.name.startswith("."):
                continue
            if (Path(e.path) / "images").is_dir():
                checked += 1
                if _id_image(Path(e.path)) is not None and (Path(e.path) / "masks").is_dir():
                    return True
            if checked >= 5:
                break
    return False


def merge_object_masks(paths: tuple[Path, ...], image: Path) -> np.ndarray:
    """One instance label image from one binary mask file per object; the first object keeps shared pixels."""
    if not paths:
        return empty_mask(image)
    out: np.ndarray | None = None
    overlap = 0
    for i, p in enumerate(paths, start=1):
        m = read_mask_raw(p) > 0
        if out is None:
            out = np.zeros(m.shape, dtype=np.int32)
        elif m.shape != out.shape:
            raise UnetlabError(f"object mask is {m.shape[0]}x{m.shape[1]}, others are {out.shape[0]}x{out.shape[1]}", p,
                               kind=ErrorKind.SHAPE)
        ys, xs = np.nonzero(m)
        free = out[ys, xs] == 0
        overlap += int((~free).sum())
        out[ys[free], xs[free]] = i
    if overlap:
        log.debug("%s: %d pixels in more than one object mask; the first object keeps them", image, overlap)
    return out


def load(root: Path, **_: object) -> DatasetInfo:
    """One sample per ``<id>`` folder; masks are listed, not read."""
    root = Path(root)
    samples, problems, notes = [], [], []
    negatives = 0
    with os.scandir(root) as it:
        folders = sorted(Path(e.path) for e in it if e.is_dir() and not e.name.startswith("."))
    for folder in folders:
        image = _id_image(folder)
        if image is None:
            if (folder / "images").is_dir():
                problems.append(Problem(f"{folder / 'images'}: no image named {folder.name}.png (or a single image) "
                                        "in it", ErrorKind.UNPAIRED))
            else:
                notes.append(f"{folder}: no images/ folder; skipped")
            continue
        masks = tuple(_sorted_images(folder / "masks"))
        negatives += not masks
        samples.append(
            Sample(
                name=folder.name,
                image=image,
                mask_loader=partial(merge_object_masks, masks, image),
                group=folder.name,
                mask_paths=masks,
            )
        )
    n_objects = sum(len(s.mask_paths) for s in samples)
    notes.append(f"{n_objects} object masks; where objects overlap, the first in file-name order keeps the pixel")
    if negatives:
        notes.append(f"{negatives} images without object masks (negative controls)")
    return DatasetInfo(layout="kaggle_dsb", root=root, samples=samples, problems=problems, notes=notes)


register_layout(Layout("kaggle_dsb", detect, load, "<id>/images/<id>.png + <id>/masks/*.png (one per object)"))
