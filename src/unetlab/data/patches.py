"""Cutting datasets into smaller training images on disk: regular patches and one sub-image per object.

Both write a paired layout (``images/`` + ``masks/``, TIFF keeping the image dtype) plus ``groups.csv`` so that
patches of one source image stay on one side of a split, and a ``codes.txt`` when the source is multiclass.
They never write into the input folder and refuse an existing non-empty output unless ``overwrite`` is set.
(Random patch sampling during training is done by the torch Dataset, not here.)

Patches hold real pixels wherever the image allows: along an axis they start every ``stride`` pixels and the last
one ends at the border (:func:`patch_positions`). This is not the prediction tiles' rule
(:mod:`unetlab.inference.tiling` keeps one step aligned to the network and lets the last tile run past the border
into mirrored pixels, whose output it discards); a patch on disk is training data, where mirrored pixels would be
made-up objects. Only an image smaller than a patch is mirror-padded (numpy ``symmetric``) to the patch size,
and there each mirrored copy of an instance label gets its own id (:func:`mirror_pad_labels`), so one id is never
two separate objects; binary and multiclass masks keep their values.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np

from ..errors import UnetlabError
from ..files import write_atomic, write_text
from ..labels import is_binary
from .io import read_image, write_image
from .layouts import load_dataset
from .layouts.common import image_header
from .sample import DatasetInfo, Sample

log = logging.getLogger(__name__)

MANIFEST = "unetlab_patches.json"


def patch_positions(length: int, size: int, stride: int) -> list[int]:
    """Start offsets of patches along one axis: every ``stride`` pixels, the last one ending at the border.

    An axis shorter than ``size`` gets one patch at 0, which runs past the end (filled by mirror padding).
    """
    if size <= 0 or stride <= 0:
        raise UnetlabError(f"patch size and stride must be positive (got size {size}, stride {stride})")
    if length <= size:
        return [0]
    return [*range(0, length - size, stride), length - size]


def mirror_pad_labels(labels: np.ndarray, pad_h: int, pad_w: int, relabel: bool) -> np.ndarray:
    """``labels`` mirror-padded (numpy ``symmetric``) by ``pad_h`` rows and ``pad_w`` columns at the end; with
    ``relabel`` each mirrored copy's objects get ids of their own (the original keeps its ids)."""
    padded = np.pad(labels, ((0, pad_h), (0, pad_w)), mode="symmetric")
    if not relabel or not padded.any():
        return padded
    h, w = labels.shape
    copy_y, copy_x = np.arange(padded.shape[0]) // h, np.arange(padded.shape[1]) // w
    copy = copy_y[:, None] * (copy_x[-1] + 1) + copy_x[None, :]  # 0: the original, 1..: mirrored copies
    out = padded.astype(np.int64) + copy * int(labels.max())
    return np.where(padded > 0, out, 0)


def _prepare_out(root: Path, out: Path, overwrite: bool) -> None:
    src, dst = root.resolve(), out.resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        raise UnetlabError("output folder overlaps the input folder; choose a separate --out", out)
    if dst.exists() and not dst.is_dir():
        raise UnetlabError("output exists and is not a folder", out)
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise UnetlabError("output folder exists and is not empty", out, "use --overwrite or another --out")
        if (dst / MANIFEST).is_file():  # our own earlier output: replace it rather than mix old and new patches
            for sub in ("images", "masks"):
                shutil.rmtree(dst / sub, ignore_errors=True)
        else:
            log.warning("%s: writing into a non-empty folder that unetlab did not create", out)
    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "masks").mkdir(parents=True, exist_ok=True)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "sample"


def _read_pair(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """The image in its own dtype, channels-last when it has 2-4 channels, and its label image."""
    _, _, _, dtype = image_header(sample.image)
    img = read_image(sample.image)
    if dtype not in ("float32", "float64", "bool"):
        img = img.astype(dtype)
    labels = sample.load_mask()
    if labels.shape != img.shape[1:]:
        where = sample.mask_paths[0] if sample.mask_paths else sample.image
        raise UnetlabError(f"mask is {labels.shape[0]}x{labels.shape[1]} but its image is "
                           f"{img.shape[1]}x{img.shape[2]}", where)
    return img, labels


def _mask_for_disk(mask: np.ndarray, multiclass: bool) -> np.ndarray:
    if multiclass:
        return mask.astype(np.uint8 if mask.max() < 256 else np.uint16)
    if mask.max() <= 1:
        return (mask > 0).astype(np.uint8) * 255
    return mask.astype(np.uint16 if mask.max() < 65536 else np.int32)


def _write_pair(out: Path, name: str, image: np.ndarray, mask: np.ndarray, multiclass: bool) -> None:
    img = image[0] if image.shape[0] == 1 else (np.moveaxis(image, 0, -1) if image.shape[0] <= 4 else image)
    write_image(out / "images" / f"{name}.tif", np.ascontiguousarray(img))
    write_image(out / "masks" / f"{name}.tif", _mask_for_disk(mask, multiclass))


def _finish(out: Path, info: DatasetInfo, groups: list[tuple[str, str]], params: dict) -> None:
    def write_groups(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["name", "group"])
            w.writerows(groups)

    write_atomic(out / "groups.csv", write_groups)
    if info.task == "multiclass":
        write_text(out / "codes.txt", "\n".join(info.classes) + "\n")
    doc = {"source": str(info.root), "layout": info.layout, "count": len(groups), **params}
    write_text(out / MANIFEST, json.dumps(doc, indent=1))


def patchify(root: str | Path, size: int, stride: int, out: str | Path, layout: str | None = None,
             overwrite: bool = False, **options: object) -> int:
    """Write every image/mask pair of ``root`` as ``size`` x ``size`` patches every ``stride`` pixels to ``out``.

    The last patch of a row or column ends at the border; only images smaller than ``size`` are mirror-padded
    (see the module doc). Returns the number of patches written.
    """
    root, out = Path(root), Path(out)
    info = load_dataset(root, layout, **options)
    if not info.samples:
        raise UnetlabError("no image/mask pairs to cut", root, "run `unetlab inspect` on it")
    _prepare_out(root, out, overwrite)
    multiclass = info.task == "multiclass"
    groups: list[tuple[str, str]] = []
    for sample in info.samples:
        img, labels = _read_pair(sample)
        h, w = labels.shape
        ys, xs = patch_positions(h, size, stride), patch_positions(w, size, stride)
        pad_h, pad_w = ys[-1] + size - h, xs[-1] + size - w
        if pad_h or pad_w:
            img = np.pad(img, ((0, 0), (0, pad_h), (0, pad_w)), mode="symmetric")
            labels = mirror_pad_labels(labels, pad_h, pad_w, relabel=not multiclass and not is_binary(labels))
        base = _safe(sample.name)
        for y in ys:
            for x in xs:
                name = f"{base}_y{y:05d}_x{x:05d}"
                _write_pair(out, name, img[:, y:y + size, x:x + size], labels[y:y + size, x:x + size], multiclass)
                groups.append((name, sample.group))
    _finish(out, info, groups, {"kind": "patches", "size": size, "stride": stride})
    log.debug("%d patches from %d images written to %s", len(groups), len(info.samples), out)  # the CLI prints it
    return len(groups)


def _objects(labels: np.ndarray, multiclass: bool) -> tuple[np.ndarray, int]:
    """An instance image to cut by: labels as they are, or connected components of binary/multiclass masks."""
    from scipy import ndimage

    if multiclass or labels.max() <= 1:
        comp, n = ndimage.label(labels > 0)
        return comp, int(n)
    return labels, int(labels.max())


def cut_subimages(root: str | Path, margin: int, out: str | Path, layout: str | None = None,
                  overwrite: bool = False, **options: object) -> int:
    """Write one sub-image per object of ``root`` (its bounding box plus ``margin``, clipped) with its mask.

    The mask holds only that object (0/255; class indices for multiclass data); returns the number written.
    """
    from scipy import ndimage

    root, out = Path(root), Path(out)
    if margin < 0:
        raise UnetlabError(f"margin must be >= 0, got {margin}")
    info = load_dataset(root, layout, **options)
    if not info.samples:
        raise UnetlabError("no image/mask pairs to cut", root, "run `unetlab inspect` on it")
    _prepare_out(root, out, overwrite)
    multiclass = info.task == "multiclass"
    groups: list[tuple[str, str]] = []
    empty: list[str] = []
    for sample in info.samples:
        img, labels = _read_pair(sample)
        objects, _ = _objects(labels, multiclass)
        if not objects.any():
            empty.append(sample.name)
        h, w = labels.shape
        base = _safe(sample.name)
        for k, sl in enumerate(ndimage.find_objects(objects), start=1):
            if sl is None:
                continue
            y0, y1 = max(sl[0].start - margin, 0), min(sl[0].stop + margin, h)
            x0, x1 = max(sl[1].start - margin, 0), min(sl[1].stop + margin, w)
            own = objects[y0:y1, x0:x1] == k
            mask = np.where(own, labels[y0:y1, x0:x1], 0) if multiclass else own.astype(np.uint8)
            name = f"{base}_obj{k:05d}"
            _write_pair(out, name, img[:, y0:y1, x0:x1], mask, multiclass)
            groups.append((name, sample.group))
    if empty:  # negative controls have no object to cut around
        log.warning("%d image(s) without objects (negative controls?) give no sub-image: %s", len(empty),
                    ", ".join(empty[:3]) + (", ..." if len(empty) > 3 else ""))
    _finish(out, info, groups, {"kind": "subimages", "margin": margin})
    log.debug("%d sub-images from %d images written to %s", len(groups), len(info.samples), out)  # the CLI prints it
    return len(groups)
