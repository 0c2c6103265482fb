"""Kaggle run-length encoding: 1-indexed 'start length' pairs.

The 2018 Data Science Bowl numbers pixels column-major (top-to-bottom, then left-to-right: ``order="F"``, the
default); the Sartorius competition numbers them row-major (``order="C"``).
"""

from __future__ import annotations

import numpy as np

from ..errors import UnetlabError


def rle_encode(mask: np.ndarray, order: str = "F") -> str:
    """Encode a binary mask (H, W) as 'start length start length ...' (empty string for an empty mask)."""
    pixels = np.asarray(mask, dtype=bool).flatten(order=order)
    padded = np.concatenate([[False], pixels, [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1]) + 1
    starts, ends = changes[::2], changes[1::2]
    runs = np.empty(2 * len(starts), dtype=np.int64)
    runs[0::2], runs[1::2] = starts, ends - starts
    return " ".join(map(str, runs))


def rle_decode(rle: str, shape: tuple[int, int], order: str = "F") -> np.ndarray:
    """Decode 'start length ...' into a boolean mask of ``shape`` (H, W)."""
    h, w = int(shape[0]), int(shape[1])
    text = "" if rle is None else str(rle).strip()
    if text in ("", "nan", "-"):
        return np.zeros((h, w), dtype=bool)
    try:
        nums = np.asarray(text.split(), dtype=np.int64)
    except ValueError:
        raise UnetlabError(f"run-length string is not a list of integers: {text[:40]!r}") from None
    if len(nums) % 2:
        raise UnetlabError("run-length string has an odd number of values")
    starts, lengths = nums[0::2] - 1, nums[1::2]
    if len(starts) and (starts.min() < 0 or lengths.min() < 0 or (starts + lengths).max() > h * w):
        raise UnetlabError(f"run-length runs fall outside an image of {h}x{w}")
    # +1 at each run start, -1 at each run end; a running sum > 0 marks covered pixels (runs may overlap)
    edges = np.zeros(h * w + 1, dtype=np.int32)
    np.add.at(edges, starts, 1)
    np.add.at(edges, starts + lengths, -1)
    out = np.cumsum(edges[:-1]) > 0
    return out.reshape((h, w), order=order)


def labels_to_rles(labels: np.ndarray, order: str = "F") -> list[str]:
    """One RLE string per object of an instance label image, in label order."""
    return [rle_encode(labels == v, order) for v in np.unique(labels) if v != 0]


def rles_to_labels(rles: list[str], shape: tuple[int, int], order: str = "F") -> np.ndarray:
    """Instance label image from one RLE per object (later objects do not overwrite earlier pixels)."""
    out = np.zeros(shape, dtype=np.int32)
    for i, r in enumerate(rles, start=1):
        m = rle_decode(r, shape, order)
        out[m & (out == 0)] = i
    return out
