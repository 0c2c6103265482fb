"""Multi-class masks, in one of two shapes:

- one folder of binary masks per class: ``masks_<class>/NAME.png`` beside ``images/`` (the EPFL EM layout), or
  ``masks/<class>/NAME.png``; classes in case-insensitive name order, where classes overlap the later class wins;
- one folder of class-index masks with a ``codes.txt`` naming the classes, one per line, line 1 = value 0
  (``FullImage/`` + ``Mask_Norm/`` + ``codes.txt``; any image/mask folder names of the paired layout work too).

The mask loader returns class indices (H, W). The ``classes`` option picks a subset by name, e.g.
``classes=["membranes", "mitochondrion"]``: the chosen classes become 1..K in the given order (later wins where
they overlap), everything else is background (0), and ``DatasetInfo.classes`` is ``["background", *classes]``.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np

from ...errors import ErrorKind, UnetlabError
from ..sample import DatasetInfo, Sample
from .common import empty_mask, find_dir, image_without_mask, mask_without_image, read_mask_raw, scan_images
from .paired import IMAGE_DIRS, MASK_DIRS, mask_key
from .registry import Layout, register_layout

MC_IMAGE_DIRS = (*IMAGE_DIRS, "FullImage", "full_image", "full_images")
MC_MASK_DIRS = ("Mask_Norm", "masks_norm", *MASK_DIRS)
CODES_FILES = ("codes.txt", "classes.txt")
CLASS_DIR_PREFIXES = ("masks_", "mask_", "labels_", "label_")


def _class_dirs(root: Path) -> dict[str, Path]:
    """Class name -> folder of binary masks, from ``masks_<class>/`` folders or ``masks/<class>/`` subfolders."""
    try:
        subdirs = sorted((e.name, Path(e.path)) for e in os.scandir(root) if e.is_dir())
    except OSError:
        return {}
    found = {}
    for name, path in subdirs:
        for prefix in CLASS_DIR_PREFIXES:
            if name.lower().startswith(prefix) and len(name) > len(prefix):
                found[name[len(prefix):]] = path
                break
    if not found:
        masks = find_dir(root, MASK_DIRS)
        if masks is not None:
            inner = sorted((e.name, Path(e.path)) for e in os.scandir(masks) if e.is_dir())
            if inner and not scan_images(masks):
                found = dict(inner)
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


def _codes_file(root: Path) -> Path | None:
    for n in CODES_FILES:
        if (root / n).is_file():
            return root / n
    return None


def read_codes(path: Path) -> list[str]:
    """Class names from a codes file, one per line (blank lines ignored)."""
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) < 2:
        raise UnetlabError("a codes file needs at least two class names, one per line", path)
    return names


def detect(root: Path) -> bool:
    """True for per-class mask folders beside an image folder, or a codes.txt beside image and mask folders."""
    if find_dir(root, MC_IMAGE_DIRS) is None:
        return False
    if _class_dirs(root):
        return True
    return _codes_file(root) is not None and find_dir(root, MC_MASK_DIRS) is not None


def _select(all_classes: list[str], chosen: list[str] | None, root: Path) -> list[str] | None:
    if not chosen:
        return None
    lower = {c.lower(): c for c in all_classes}
    unknown = [c for c in chosen if c.lower() not in lower]
    if unknown:
        raise UnetlabError(f"unknown class {unknown[0]!r} (known: {', '.join(all_classes)})", root)
    return [lower[c.lower()] for c in chosen]


def load_class_folder_masks(paths: tuple[Path | None, ...], image: Path) -> np.ndarray:
    """Class indices from one binary mask per class (index i + 1 for ``paths[i]``; later classes win)."""
    out: np.ndarray | None = None
    for i, p in enumerate(paths, start=1):
        if p is None:
            continue
        m = read_mask_raw(p) > 0
        if out is None:
            out = np.zeros(m.shape, dtype=np.int32)
        elif m.shape != out.shape:
            raise UnetlabError(f"class mask is {m.shape[0]}x{m.shape[1]}, others are "
                               f"{out.shape[0]}x{out.shape[1]}", p, kind=ErrorKind.SHAPE)
        out[m] = i
    return empty_mask(image) if out is None else out


def load_class_index_mask(path: Path, n_classes: int, keep: tuple[int, ...] | None = None) -> np.ndarray:
    """Class indices from a mask of values 0..n_classes-1; with ``keep``, class keep[i] becomes i + 1, others 0."""
    raw = read_mask_raw(path)
    top = int(raw.max()) if raw.size else 0
    if top >= n_classes:
        raise UnetlabError(f"mask value {top} but only {n_classes} classes in the codes file", path,
                           "values must be class indices 0..N-1", ErrorKind.MASK_VALUES)
    if keep is None:
        return raw.astype(np.int32)
    lut = np.zeros(n_classes, dtype=np.int32)
    for new, old in enumerate(keep, start=1):
        lut[old] = new
    return lut[raw]


def _load_folders(root: Path, class_dirs: dict[str, Path], classes: list[str] | None) -> DatasetInfo:
    images_dir = find_dir(root, MC_IMAGE_DIRS)
    names = list(class_dirs)
    chosen = _select(names, classes, root) or names
    by_class = {c: {mask_key(m.stem): m for m in scan_images(class_dirs[c])} for c in names}
    samples, problems, notes = [], [], []
    missing = {c: 0 for c in chosen}
    used: set[Path] = set()
    for img in scan_images(images_dir):
        paths = tuple(by_class[c].get(img.stem) for c in chosen)
        all_paths = [by_class[c].get(img.stem) for c in names]
        used.update(p for p in all_paths if p is not None)
        if all(p is None for p in all_paths):
            problems.append(image_without_mask(img, ", ".join(str(d) for d in class_dirs.values())))
            continue
        for c, p in zip(chosen, paths):
            missing[c] += p is None
        samples.append(
            Sample(
                name=img.stem,
                image=img,
                mask_loader=partial(load_class_folder_masks, paths, img),
                group=img.stem,
                mask_paths=tuple(p for p in paths if p is not None),
            )
        )
    for c in names:
        problems += [mask_without_image(m, images_dir) for m in by_class[c].values() if m not in used]
    for c, n in missing.items():
        if n:
            notes.append(f"class {c}: no mask file for {n} images; taken as absent there")
    notes.append(f"classes from folders: {', '.join(chosen)}; where classes overlap the later one wins")
    if classes:
        notes.append(f"class subset {chosen}; the other classes ({len(names) - len(chosen)}) are background")
    return DatasetInfo(layout="multiclass", root=root, samples=samples, task="multiclass",
                       classes=["background", *chosen], problems=problems, notes=notes)


def _load_codes(root: Path, codes: Path, classes: list[str] | None, mask_dir: str | None) -> DatasetInfo:
    names = read_codes(codes)
    chosen = _select(names, classes, root)
    images_dir = find_dir(root, MC_IMAGE_DIRS)
    masks_dir = root / mask_dir if mask_dir else find_dir(root, MC_MASK_DIRS)
    if masks_dir is None or not masks_dir.is_dir():
        raise UnetlabError("no mask folder beside the codes file", root, f"expected one of {', '.join(MC_MASK_DIRS)}")
    masks: dict[str, Path] = {}
    for m in scan_images(masks_dir):
        masks.setdefault(m.stem, m)
    for m in scan_images(masks_dir):
        masks.setdefault(mask_key(m.stem), m)
    keep = tuple(names.index(c) for c in chosen) if chosen else None
    samples, problems = [], []
    used: set[Path] = set()
    for img in scan_images(images_dir):
        m = masks.get(img.stem)
        if m is None:
            problems.append(image_without_mask(img, masks_dir))
            continue
        used.add(m)
        samples.append(Sample(name=img.stem, image=img, group=img.stem, mask_paths=(m,),
                              mask_loader=partial(load_class_index_mask, m, len(names), keep)))
    problems += [mask_without_image(m, images_dir) for m in scan_images(masks_dir) if m not in used]
    notes = [f"classes from {codes.name}: {', '.join(names)} (line 1 = value 0)"]
    if chosen:
        notes.append(f"class subset {chosen}; the other classes are background")
    return DatasetInfo(layout="multiclass", root=root, samples=samples, task="multiclass",
                       classes=["background", *chosen] if chosen else names, problems=problems, notes=notes)


def load(root: Path, classes: list[str] | None = None, mask_dir: str | None = None, **_: object) -> DatasetInfo:
    """Read per-class mask folders or class-index masks with a codes file; ``classes`` picks a subset."""
    root = Path(root)
    if isinstance(classes, str):
        classes = [c for c in classes.replace(" ", "").split(",") if c]
    codes = _codes_file(root)
    class_dirs = {} if codes is not None else _class_dirs(root)
    if class_dirs:
        return _load_folders(root, class_dirs, classes)
    if codes is None:
        raise UnetlabError("no per-class mask folders (masks_<class>/) and no codes.txt", root)
    return _load_codes(root, codes, classes, mask_dir)


register_layout(Layout("multiclass", detect, load, "masks_<class>/ folders, or class-index masks + codes.txt"))
