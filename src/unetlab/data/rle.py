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


def _runs(rle: str | None, n_pixels: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Validated 0-based (starts, lengths) of an RLE string."""
    text = "" if rle is None else str(rle).strip()
    if text in ("", "nan", "-"):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    try:
        nums = np.asarray(text.split(), dtype=np.int64)
    except ValueError:
        raise UnetlabError(f"run-length string is not a list of integers: {text[:40]!r}") from None
    if len(nums) % 2:
        raise UnetlabError("run-length string has an odd number of values")
    starts, lengths = nums[0::2] - 1, nums[1::2]
    if len(starts) and (starts.min() < 0 or lengths.min() < 0 or (starts + lengths).max() > n_pixels):
        raise UnetlabError(f"run-length runs fall outside an image of {shape[0]}x{shape[1]}")
    return starts, lengths


def _run_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat pixel indices covered by the runs (one ``np.repeat``, no Python loop over runs)."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    run_begin = np.cumsum(lengths) - lengths  # where each run begins in the output
    return np.arange(total, dtype=np.int64) + np.repeat(starts - run_begin, lengths)


def rle_decode(rle: str, shape: tuple[int, int], order: str = "F") -> np.ndarray:
    """Decode 'start length ...' into a boolean mask of ``shape`` (H, W)."""
    h, w = int(shape[0]), int(shape[1])
    out = np.zeros(h * w, dtype=bool)
    out[_run_indices(*_runs(rle, h * w, (h, w)))] = True
    return out.reshape((h, w), order=order)


def labels_to_rles(labels: np.ndarray, order: str = "F") -> list[str]:
    """One RLE string per object of an instance label image, in label order."""
    return [rle_encode(labels == v, order) for v in np.unique(labels) if v != 0]


def rles_to_labels(rles: list[str], shape: tuple[int, int], order: str = "F", skip_empty: bool = False) -> np.ndarray:
    """Instance label image from one RLE per object, numbered from 1 (earlier objects keep shared pixels).

    With ``skip_empty`` an empty RLE takes no label number; otherwise object i always gets label i.
    """
    h, w = int(shape[0]), int(shape[1])
    runs = [_runs(r, h * w, (h, w)) for r in rles]
    labels = np.arange(1, len(runs) + 1)
    if skip_empty:
        keep = [i for i, (_, n) in enumerate(runs) if n.sum() > 0]
        runs, labels = [runs[i] for i in keep], np.arange(1, len(keep) + 1)
    out = np.zeros(h * w, dtype=np.int32)
    for (starts, lengths), label in zip(reversed(runs), labels[::-1]):  # earlier objects are painted last
        out[_run_indices(starts, lengths)] = label
    return out.reshape((h, w), order=order)
