"""Kaggle run-length encoding: column-major (top-to-bottom, then left-to-right), 1-indexed 'start length' pairs."""

from __future__ import annotations

import numpy as np

from ..errors import UnetlabError


def rle_encode(mask: np.ndarray) -> str:
    """Encode a binary mask (H, W) as 'start length start length ...' (empty string for an empty mask)."""
    pixels = np.asarray(mask, dtype=bool).flatten(order="F")
    padded = np.concatenate([[False], pixels, [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1]) + 1
    starts, ends = changes[::2], changes[1::2]
    runs = np.empty(2 * len(starts), dtype=np.int64)
    runs[0::2], runs[1::2] = starts, ends - starts
    return " ".join(map(str, runs))


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode 'start length ...' into a boolean mask of ``shape`` (H, W)."""
    h, w = int(shape[0]), int(shape[1])
    out = np.zeros(h * w, dtype=bool)
    text = "" if rle is None else str(rle).strip()
    if text in ("", "nan", "-"):
        return out.reshape((h, w), order="F")
    try:
        nums = np.asarray(text.split(), dtype=np.int64)
    except ValueError:
        raise UnetlabError(f"run-length string is not a list of integers: {text[:40]!r}") from None
    if len(nums) % 2:
        raise UnetlabError("run-length string has an odd number of values")
    starts, lengths = nums[0::2] - 1, nums[1::2]
    if len(starts) and (starts.min() < 0 or (starts + lengths).max() > h * w):
        raise UnetlabError(f"run-length runs fall outside an image of {h}x{w}")
    for s, n in zip(starts, lengths):
        out[s : s + n] = True
    return out.reshape((h, w), order="F")


def labels_to_rles(labels: np.ndarray) -> list[str]:
    """One RLE string per object of an instance label image, in label order."""
    return [rle_encode(labels == v) for v in np.unique(labels) if v != 0]


def rles_to_labels(rles: list[str], shape: tuple[int, int]) -> np.ndarray:
    """Instance label image from one RLE per object (later objects do not overwrite earlier pixels)."""
    out = np.zeros(shape, dtype=np.int32)
    for i, r in enumerate(rles, start=1):
        m = rle_decode(r, shape)
        out[m & (out == 0)] = i
    return out
