"""Paired folders: ``images/`` and ``masks/`` whose files pair up by name stem (with optional mask suffixes)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from ..io import list_images, mask_to_labels, read_label
from ..sample import DatasetInfo, Sample
from . import Layout, register_layout

IMAGE_DIRS = ("images", "imgs", "image", "img", "raw")
MASK_DIRS = ("masks", "mask", "labels", "label", "gt", "annotations")
MASK_SUFFIXES = ("", "_mask", "_masks", "_label", "_labels", "_seg", "_gt")


def load_binary_or_instance(path: Path, invert: bool = False) -> np.ndarray:
    """Read a mask file as labels: binary masks -> {0,1}, instance label images kept as they are."""
    labels = mask_to_labels(read_label(path), path)
    if invert:
        labels = (labels == 0).astype(np.int32)
    return labels


def _find_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        if (root / n).is_dir():
            return root / n
    return None


def detect(root: Path) -> bool:
    """True when ``root`` has an images folder and a masks folder."""
    return _find_dir(root, IMAGE_DIRS) is not None and _find_dir(root, MASK_DIRS) is not None


def mask_key(stem: str) -> str:
    """The image stem a mask stem belongs to (strips the known mask suffixes)."""
    for suf in sorted(MASK_SUFFIXES, key=len, reverse=True):
        if suf and stem.endswith(suf):
            return stem[: -len(suf)]
    return stem


def load(
    root: Path,
    image_dir: str | None = None,
    mask_dir: str | None = None,
    invert_mask: bool = False,
    **_: object,
) -> DatasetInfo:
    """Pair ``root/images/*`` with ``root/masks/*`` by stem; unpaired files are reported as problems."""
    root = Path(root)
    images_dir = root / image_dir if image_dir else _find_dir(root, IMAGE_DIRS)
    masks_dir = root / mask_dir if mask_dir else _find_dir(root, MASK_DIRS)
    if images_dir is None or not images_dir.is_dir():
        images_dir = root
    images = list_images(images_dir)
    masks = list_images(masks_dir) if masks_dir is not None and masks_dir.is_dir() else []
    by_key: dict[str, Path] = {}
    for m in masks:
        by_key.setdefault(mask_key(m.stem), m)
        by_key.setdefault(m.stem, m)
    samples, problems = [], []
    used: set[Path] = set()
    for img in images:
        m = by_key.get(img.stem)
        if m is None:
            problems.append(f"{img}: no mask with the same name in {masks_dir}")
            continue
        used.add(m)
        samples.append(
            Sample(
                name=img.stem,
                image=img,
                mask_loader=partial(load_binary_or_instance, m, invert_mask),
                group=img.stem,
                mask_paths=(m,),
            )
        )
    for m in masks:
        if m not in used:
            problems.append(f"{m}: mask without an image in {images_dir}")
    return DatasetInfo(layout="paired", root=root, samples=samples, problems=problems)


register_layout(Layout("paired", detect, load, "images/ + masks/ paired by file stem"))
