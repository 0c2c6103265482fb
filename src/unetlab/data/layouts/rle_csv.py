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


def find_csvs(root: Path) -> list[Path]:
    """The CSVs in ``root`` (sorted) whose header is a known RLE convention."""
    try:
        csvs = sorted(Path(e.path) for e in os.scandir(root) if e.name.lower().endswith(".csv") and e.is_file())
    except OSError as exc:
        log.warning("%s: folder not listable (%s); skipping it", root, exc)
        return []
    return [c for c in csvs if rle_convention(_header(c)) is not None]


def detect(root: Path) -> bool:
    """True when ``root`` holds a CSV of run-length encoded masks."""
    return bool(find_csvs(root))


def the_csv(root: Path) -> Path:
    """The one run-length CSV in ``root``; a one-line error when there is none or several (which is the truth?)."""
    csvs = find_csvs(root)
    if not csvs:
        raise UnetlabError("no CSV of run-length encoded masks found", root,
                           "expected columns ImageId,EncodedPixels or id,annotation")
    if len(csvs) > 1:
        names = " and ".join(c.name for c in csvs) if len(csvs) == 2 else ", ".join(c.name for c in csvs)
        others = "the other" if len(csvs) == 2 else "the others"
        raise UnetlabError(f"{len(csvs)} CSVs of run-length masks ({names}): which one is the ground truth?", root,
                           f"keep only the ground-truth CSV in this folder and move {others} (a submission, a "
                           "prediction) elsewhere")
    return csvs[0]


def _image_folders(root: Path, image_dir: str | None) -> list[Path]:
    """Where the images may be: ``image_dir``, else the usual image subfolders, then ``root`` itself."""
    if image_dir:
        return [root / image_dir]
    subdirs = {e.name.lower(): Path(e.path) for e in os.scandir(root) if e.is_dir()}
    return [subdirs[n] for n in IMAGE_DIRS if n in subdirs] + [root]


def _image_index(root: Path, image_dir: str | None) -> tuple[dict[str, Path], Path]:
    """(image id -> path, the folder they are in), from the first image folder beside the CSV that has images
    (flat or Kaggle ``<id>/images/<id>.png``)."""
    folders = _image_folders(root, image_dir)
    for folder in folders:
        if not folder.is_dir():
            continue
        index: dict[str, Path] = {}
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
            return index, folder
    return {}, folders[0]


def rle_labels(rles: tuple[str, ...], shape: tuple[int, int] | None, image: Path, order: str, key: str,
               csv_path: Path, lines: tuple[int, ...] | None = None) -> np.ndarray:
    """Instance label image of one image id (sized by the CSV, else by its image's header)."""
    return decode_labels(rles, shape or image_size(image), order, key, csv_path, lines)


def _no_image(path: Path, key: str, lines: list[int], folder: Path) -> Problem:
    """The problem line of an image id of the CSV whose image file is missing."""
    at = f"line {lines[0]}: " if lines else ""
    return Problem(f"{path}: {at}image id {key} has masks but no image file {key}.* in {folder}",
                   ErrorKind.UNPAIRED)


def load(root: Path, csv_file: str | None = None, image_dir: str | None = None, rle_order: str | None = None,
         **_: object) -> DatasetInfo:
    """Parse the CSV once and make one sample per image id, with its RLE strings in the mask loader."""
    root = Path(root)
    path = root / csv_file if csv_file else the_csv(root)
    if not path.is_file():
        raise UnetlabError("run-length CSV not found", path)
    rles, sizes, order, _, lines = read_rle_table(path)
    order = (rle_order or order).upper()
    if order not in ("F", "C"):
        raise UnetlabError(f"rle_order must be 'F' (column-major) or 'C' (row-major), got {rle_order!r}")
    images, folder = _image_index(root, image_dir)
    samples, problems, notes = [], [], []
    for key in sorted(rles):
        image = images.get(key)
        if image is None:
            problems.append(_no_image(path, key, lines[key], folder))
            continue
        samples.append(
            Sample(
                name=key,
                image=image,
                mask_loader=partial(rle_labels, tuple(rles[key]), sizes.get(key), image, order, key, path,
                                    tuple(lines[key])),
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
