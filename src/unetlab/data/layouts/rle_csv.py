"""Run-length encoded masks in a CSV, one row per object, with the images in a folder beside it.

Two conventions are recognised from the header:

- Data Science Bowl 2018: ``ImageId,EncodedPixels[,Height,Width]``, pixels numbered column-major;
- Sartorius: ``id,annotation,width,height,...``, pixels numbered row-major (as the competition's decoders do).

Runs are 1-indexed ``start length`` pairs. The order can be forced with the ``rle_order`` option ("F" column-major,
"C" row-major). Sizes come from the CSV, else from the image header. Images are ``<folder>/<id>.<ext>`` or
``<folder>/<id>/images/<id>.<ext>`` where the folder is e.g. ``train/``, ``images/`` or ``stage1_train/``.
The CSV is parsed once; each sample keeps its own list of RLE strings. A row with an empty RLE marks an image
without objects (a negative control).
"""

from __future__ import annotations

import csv
import logging
import os
from functools import partial
from pathlib import Path

import numpy as np

from ...errors import ErrorKind, Problem, UnetlabError
from ..io import is_image_file
from ..rle import decode_labels, read_rle_table, rle_convention
from ..sample import DatasetInfo, Sample
from .common import image_size
from .registry import Layout, register_layout

log = logging.getLogger(__name__)

IMAGE_DIRS = ("train", "images", "imgs", "stage1_train", "train_images", "image")


def _header(path: Path) -> list[str]:
    try:
        with open(path, newline="") as fh:
            return [h.strip().lower() for h in next(csv.reader(fh), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def find_csv(root: Path) -> Path | None:
    """The first CSV in ``root`` (sorted) whose header is a known RLE convention."""
    try:
        csvs = sorted(Path(e.path) for e in os.scandir(root) if e.name.lower().endswith(".csv") and e.is_file())
    except OSError as exc:
        log.warning("%s: folder not listable (%s); skipping it", root, exc)
        return None
    for c in csvs:
        if rle_convention(_header(c)) is not None:
            return c
    return None


def detect(root: Path) -> bool:
    """True when ``root`` holds a CSV of run-length encoded masks."""
    return find_csv(root) is not None


def _image_index(root: Path, image_dir: str | None) -> dict[str, Path]:
    """Image id -> path, from the image folder beside the CSV (flat or Kaggle ``<id>/images/<id>.png``)."""
    if image_dir:
        folders = [root / image_dir]
    else:
        subdirs = {e.name.lower(): Path(e.path) for e in os.scandir(root) if e.is_dir()}
        folders = [subdirs[n] for n in IMAGE_DIRS if n in subdirs] + [root]
    index: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for e in sorted(os.scandir(folder), key=lambda e: e.name):
            if e.is_file() and is_image_file(e.name):
                index.setdefault(Path(e.name).stem, Path(e.path))
            elif e.is_dir():
                nested = Path(e.path) / "images"
                for ext in (".png", ".tif", ".tiff", ".jpg"):
                    if (nested / f"{e.name}{ext}").is_file():
                        index.setdefault(e.name, nested / f"{e.name}{ext}")
                        break
        if index:
            return index
    return index


def rle_labels(rles: tuple[str, ...], shape: tuple[int, int] | None, image: Path, order: str, key: str,
               csv_path: Path) -> np.ndarray:
    """Instance label image of one image id (sized by the CSV, else by its image's header)."""
    return decode_labels(rles, shape or image_size(image), order, key, csv_path)


def load(root: Path, csv_file: str | None = None, image_dir: str | None = None, rle_order: str | None = None,
         **_: object) -> DatasetInfo:
    """Parse the CSV once and make one sample per image id, with its RLE strings in the mask loader."""
    root = Path(root)
    path = root / csv_file if csv_file else find_csv(root)
    if path is None or not path.is_file():
        raise UnetlabError("no CSV of run-length encoded masks found", root,
                           "expected columns ImageId,EncodedPixels or id,annotation")
    rles, sizes, order, _ = read_rle_table(path)
    order = (rle_order or order).upper()
    if order not in ("F", "C"):
        raise UnetlabError(f"rle_order must be 'F' (column-major) or 'C' (row-major), got {rle_order!r}")
    images = _image_index(root, image_dir)
    samples, problems, notes = [], [], []
    for key in sorted(rles):
        image = images.get(key)
        if image is None:
            problems.append(Problem(f"{path}: image id {key} has masks but no image file (looked beside the CSV)",
                                    ErrorKind.UNPAIRED))
            continue
        samples.append(
            Sample(
                name=key,
                image=image,
                mask_loader=partial(rle_labels, tuple(rles[key]), sizes.get(key), image, order, key, path),
                group=key,
            )
        )
    unlabelled = sorted(set(images) - set(rles))
    if unlabelled:
        notes.append(f"{len(unlabelled)} images have no row in {path.name} (e.g. {unlabelled[0]}); not used")
    negatives = sum(1 for k in rles if not rles[k] and k in images)
    if negatives:
        notes.append(f"{negatives} images have no objects (negative controls)")
    n_objects = sum(len(v) for v in rles.values())
    notes.append(f"{n_objects} objects in {path.name} ({'column' if order == 'F' else 'row'}-major runs)")
    return DatasetInfo(layout="rle_csv", root=root, samples=samples, problems=problems, notes=notes)


register_layout(Layout("rle_csv", detect, load, "CSV of run-length masks (ImageId,EncodedPixels or id,annotation)"))
