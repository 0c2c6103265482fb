"""Helpers shared by the layout readers: folder lookup, mask readers, image headers, problem messages."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ...errors import ErrorKind, Problem, UnetlabError
from ..io import READ_HINT, describe_read_error, is_image_file, read_label
from ..ome import AxesView, is_ome_tiff, is_zarr_path, open_zarr_image

log = logging.getLogger(__name__)

_PIL_DTYPES = {
    "1": "bool", "L": "uint8", "P": "uint8", "LA": "uint8", "PA": "uint8", "RGB": "uint8", "RGBA": "uint8",
    "CMYK": "uint8", "YCbCr": "uint8", "I;16": "uint16", "I;16B": "uint16", "I;16L": "uint16", "I": "int32",
    "F": "float32",
}


def find_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    """The first subfolder of ``root`` whose name is one of ``names`` (case-insensitive), else None."""
    try:
        subdirs = {e.name.lower(): Path(e.path) for e in os.scandir(root) if e.is_dir()}
    except OSError as exc:
        log.warning("%s: folder not listable (%s); skipping it", root, exc)
        return None
    for n in names:
        if n.lower() in subdirs:
            return subdirs[n.lower()]
    return None


def scan_images(folder: Path) -> list[Path]:
    """Sorted image files (and Zarr / OME-Zarr image directories) directly inside ``folder`` (fast: one
    directory scan, no stat per file but for ``*.zarr`` names)."""
    try:
        return sorted(Path(e.path) for e in os.scandir(folder)
                      if (is_image_file(e.name) and e.is_file()) or (e.name.lower().endswith(".zarr")
                                                                     and is_zarr_path(e.path)))
    except OSError as exc:
        log.warning("%s: folder not listable (%s); no images taken from it", folder, exc)
        return []


def _is_palette_png(path: Path) -> bool:
    """True for a palette PNG (mode P); PIL reads the mode from the header without decoding pixels."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.mode == "P"
    except (OSError, ValueError, SyntaxError):  # not an image or a broken one: read_label reports it in one line
        return False


def read_mask_raw(path: str | Path) -> np.ndarray:
    """Read a mask as integers like :func:`read_label`, but keep the indices of palette PNGs (label = index)."""
    path = Path(path)
    if path.suffix.lower() == ".png" and _is_palette_png(path):
        from PIL import Image

        try:
            with Image.open(path) as im:
                im.load()
                return np.asarray(im).astype(np.int32)
        except Exception as exc:  # read_label below reports the file's problem as one line
            log.warning("%s: palette PNG not readable as class indices (%s); reading it as a label image", path, exc)
    return read_label(path)


def image_header(path: str | Path) -> tuple[int, int, int, str]:
    """(height, width, channels, dtype) from the file header without decoding pixels; alpha is not counted."""
    path = Path(path)
    if not path.exists():
        raise UnetlabError("file not found", path, kind=ErrorKind.UNREADABLE)
    if is_zarr_path(path):
        view = open_zarr_image(path)
        return view.height, view.width, view.channels, str(view.dtype)
    if path.stat().st_size == 0:
        raise UnetlabError("file is empty (0 bytes)", path, READ_HINT, ErrorKind.UNREADABLE)
    try:
        if is_ome_tiff(path):  # by its OME axes; the series is only looked at, not read
            import tifffile

            with tifffile.TiffFile(path) as tf:
                view = AxesView(tf.series[0], tf.series[0].axes, path)
            return view.height, view.width, view.channels, str(view.dtype)
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                series = tf.series[0]
                shape, dtype = tuple(int(s) for s in series.shape), str(series.dtype)
            shape = tuple(s for s in shape if s != 1) or (1, 1)
            if len(shape) == 2:
                return shape[0], shape[1], 1, dtype
            if shape[-1] <= 4 and shape[0] > 4:
                return shape[0], shape[1], shape[2], dtype
            return shape[-2], shape[-1], int(np.prod(shape[:-2])), dtype
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
            bands = len(im.getbands())
            mode = im.mode
        if mode == "P":
            bands = 3
        if mode in ("RGBA", "LA", "PA"):
            bands -= 1
        return h, w, bands, _PIL_DTYPES.get(mode, "uint8")
    except UnetlabError:
        raise
    except Exception as exc:
        raise UnetlabError(f"cannot read image ({describe_read_error(exc, path)})", path, READ_HINT,
                           ErrorKind.UNREADABLE) from exc


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file from its header."""
    h, w, _, _ = image_header(path)
    return h, w


def empty_mask(image: Path) -> np.ndarray:
    """An all-background label image the size of ``image`` (a negative control)."""
    return np.zeros(image_size(image), dtype=np.int32)


def image_without_mask(image: Path, where: Path | str | None) -> Problem:
    """The problem line for an image that has no mask."""
    return Problem(f"{image}: image without a mask (looked in {where})", ErrorKind.UNPAIRED, image=image)


def mask_without_image(mask: Path, where: Path | str | None) -> Problem:
    """The problem line for a mask that has no image."""
    return Problem(f"{mask}: mask without an image (looked in {where})", ErrorKind.UNPAIRED)
