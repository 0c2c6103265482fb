"""Paired folders: ``images/`` and ``masks/`` whose files pair up by name stem (with optional mask suffixes).

Also the Cellpose habit of one flat folder holding ``img.tif`` beside ``img_masks.tif``, and a mask folder with any
name (``mask_dir``). A ``groups.csv`` (``name,group``) in the root, as written by ``unetlab patchify``, sets the
split groups; otherwise each image is its own group.
"""

from __future__ import annotations

import csv
import logging
from functools import partial
from pathlib import Path

import numpy as np

from ...errors import UnetlabError
from ...labels import mask_to_labels
from ..io import image_stem
from ..sample import DatasetInfo, Sample
from .common import find_dir, image_without_mask, mask_without_image, read_mask_raw, scan_images
from .registry import Layout, register_layout
from .rle_csv import find_csvs

log = logging.getLogger(__name__)

IMAGE_DIRS = ("images", "imgs", "image", "img", "raw")
MASK_DIRS = ("masks", "mask", "labels", "label", "gt", "annotations")
MASK_SUFFIXES = ("", "_mask", "_masks", "_label", "_labels", "_seg", "_gt")
GROUPS_FILE = "groups.csv"


def load_binary_or_instance(path: Path, invert: bool = False) -> np.ndarray:
    """Read a mask file as labels: binary masks -> {0,1}, instance label images kept as they are."""
    labels = mask_to_labels(read_mask_raw(path), path)
    if invert:
        labels = (labels == 0).astype(np.int32)
    return labels


def _find_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    return find_dir(root, names)


def mask_key(stem: str) -> str:
    """The image stem a mask stem belongs to (strips the known mask suffixes)."""
    for suf in sorted(MASK_SUFFIXES, key=len, reverse=True):
        if suf and stem.lower().endswith(suf):
            return stem[: -len(suf)]
    return stem


def _flat_split(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """Split one folder's files into (images, masks): masks carry a mask suffix and match an image stem."""
    stem = {f: image_stem(f) for f in files}
    stems = set(stem.values())
    masks = [f for f in files if mask_key(stem[f]) != stem[f] and mask_key(stem[f]) in stems]
    mask_set = set(masks)
    return [f for f in files if f not in mask_set], masks


def detect(root: Path) -> bool:
    """True when ``root`` has an images folder and a masks folder, or is a flat Cellpose-style folder."""
    if _find_dir(root, IMAGE_DIRS) is not None and _find_dir(root, MASK_DIRS) is not None:
        return True
    _, masks = _flat_split(scan_images(root))
    return bool(masks)


def read_groups(root: Path) -> dict[str, str]:
    """Sample name -> group from ``root/groups.csv`` (empty when the file is absent)."""
    path = root / GROUPS_FILE
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {row["name"]: row["group"] for row in csv.DictReader(fh) if row.get("name") and row.get("group")}


def _no_mask_folder(root: Path, named: Path | None) -> UnetlabError:
    """The error for a paired folder without its mask folder (a run-length CSV beside the images is named)."""
    csvs = find_csvs(root)
    if csvs:
        hint = f"{csvs[0].name} holds run-length masks: leave --layout out, or pass --layout rle_csv"
    else:
        hint = "put the masks in masks/, or name their folder with --mask-dir"
    if named is not None:
        return UnetlabError(f"mask folder {named.name}/ not found", root, hint)
    return UnetlabError(f"no mask folder ({'/, '.join(MASK_DIRS)}/) beside the images", root, hint)


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
    notes: list[str] = []
    if masks_dir is None and images_dir is None:  # flat folder: img.tif beside img_masks.tif
        images, masks = _flat_split(scan_images(root))
        images_dir = masks_dir = root
        notes.append("flat folder: masks recognised by their suffix (_masks, _mask, _label ...)")
    else:
        if images_dir is None or not images_dir.is_dir():
            images_dir = root
        if masks_dir is None or not masks_dir.is_dir():
            raise _no_mask_folder(root, masks_dir)
        images = scan_images(images_dir)
        masks = scan_images(masks_dir)
    by_key: dict[str, Path] = {}
    for m in masks:
        by_key.setdefault(image_stem(m), m)
    for m in masks:
        by_key.setdefault(mask_key(image_stem(m)), m)
    groups = read_groups(root)
    samples, problems = [], []
    used: set[Path] = set()
    for img in images:
        name = image_stem(img)
        m = by_key.get(name)
        if m is None:
            problems.append(image_without_mask(img, masks_dir))
            continue
        used.add(m)
        samples.append(
            Sample(
                name=name,
                image=img,
                mask_loader=partial(load_binary_or_instance, m, invert_mask),
                group=groups.get(name, name),
                mask_paths=(m,),
            )
        )
    for m in masks:
        if m not in used:
            problems.append(mask_without_image(m, images_dir))
    if groups:
        notes.append(f"groups from {root / GROUPS_FILE}: {len(set(s.group for s in samples))} groups")
    nested = [d.name for d in sorted(images_dir.iterdir()) if d.is_dir() and not d.name.startswith(".")
              and d not in (masks_dir, root) and scan_images(d)] if images_dir != root else []
    if nested:
        notes.append(f"subfolders of {images_dir.name}/ are not part of the dataset: {', '.join(nested[:3])}"
                     + (" ..." if len(nested) > 3 else ""))
    return DatasetInfo(layout="paired", root=root, samples=samples, problems=problems, notes=notes)


register_layout(Layout("paired", detect, load, "images/ + masks/ paired by file stem (or img + img_masks)"))
