"""Label images: the one rule for "binary mask or instance labels", and the reading of raw mask values.

The rule: a mask with at most one non-zero value ({0, v}, {v}, {0} or bool) is a binary mask, and its objects
are its connected components; a mask with more values holds instance labels, kept as they are. A leaf module
of the core layer: it imports numpy, scipy and :mod:`unetlab.errors` only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .errors import ErrorKind, UnetlabError


def is_binary(mask: np.ndarray) -> bool:
    """True when ``mask`` has at most one non-zero value (bool, {0, v}, {v} or all zero): a binary mask."""
    arr = np.asarray(mask)
    if arr.dtype == bool or arr.size == 0:
        return True
    fg = arr != 0
    if not fg.any():
        return True
    ref = arr.flat[int(np.argmax(fg))]  # the first non-zero value
    return bool(np.all((arr == ref) | ~fg))


def instance_labels(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Instance labels of a mask: a binary mask (see :func:`is_binary`) becomes its connected components
    (``connectivity`` 1: 4-neighbours in 2-D, 2: 8-neighbours), instance labels are kept as they are.

    Returns int32 (int64 when a kept label does not fit int32); component ids are 1..n in raster order.
    """
    arr = np.asarray(mask)
    if is_binary(arr):
        structure = ndi.generate_binary_structure(max(arr.ndim, 1), connectivity)
        out, _ = ndi.label(arr != 0, structure=structure)
        return out.astype(np.int32, copy=False)
    if not np.can_cast(arr.dtype, np.int32) and (int(arr.max()) >= 2**31 or int(arr.min()) < -(2**31)):
        return arr.astype(np.int64, copy=False)
    return arr.astype(np.int32, copy=False)


def resize_nearest(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a (..., H, W) label image to ``shape`` by nearest neighbour at pixel centres: values and dtype kept."""
    h, w = labels.shape[-2:]
    if (h, w) == tuple(shape):
        return labels
    ys = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.int64), w - 1)
    return labels[..., ys[:, None], xs[None, :]]


def suspicious_mask_values(values: np.ndarray, counts: np.ndarray) -> str | None:
    """Why a mask's value histogram looks like a damaged binary mask (e.g. JPEG artefacts), or None.

    A binary mask saved lossily keeps its values near 0 (the background often becomes 1 or 2) and near the top
    value (255), which holds most of the bright pixels, with next to nothing in between; instance labels spread
    over the whole range (about half of their values lie in the middle half) and are not flagged, nor are values
    over 255 (no lossy image format stores them).
    """
    if len(values) <= 2:
        return None
    top = int(values.max())
    others = values[(values != 0) & (values != top)]
    if not 200 <= top <= 255 or len(others) < 2:  # lossy formats (JPEG) are 8-bit: 16-bit ids are labels
        return None
    middle = (values > 0.25 * top) & (values < 0.75 * top)
    high = values >= 0.75 * top
    at_top = counts[values == top].sum()
    if middle.sum() > 0.1 * len(values) or at_top < 0.5 * counts[high].sum():
        return None
    shown = ", ".join(str(int(v)) for v in others[:3]) + (", ..." if len(others) > 3 else "")
    n_px = int(counts[(values != 0) & (values != top)].sum())
    return (f"binary mask with {len(others)} values besides 0 and {top} ({shown}; {n_px} pixels): "
            "looks like JPEG artefacts")


def mask_to_labels(arr: np.ndarray, path: str | Path | None = None) -> np.ndarray:
    """Interpret the raw values of a mask file: a binary mask becomes 0/1, instance labels are kept (int32).

    Many values reaching ~255 that look like a lossily saved binary mask raise :class:`UnetlabError`.
    """
    values, counts = np.unique(arr, return_counts=True)
    if np.count_nonzero(values) <= 1:  # the binary rule of is_binary, on the histogram
        return (np.asarray(arr) != 0).astype(np.int32)
    if values[-1] >= 200:  # many values up to ~255: a binary mask damaged by lossy compression?
        why = suspicious_mask_values(values, counts)
        if why:
            raise UnetlabError(f"mask values fit no mask mode: {why}", path,
                               "save masks as PNG or TIFF, or threshold them: value > half the maximum = object",
                               ErrorKind.MASK_VALUES)
    return np.asarray(arr).astype(np.int32)
