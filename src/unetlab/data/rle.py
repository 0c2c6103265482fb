"""Kaggle run-length encoding: 1-indexed 'start length' pairs.

The 2018 Data Science Bowl numbers pixels column-major (top-to-bottom, then left-to-right: ``order="F"``, the
default); the Sartorius competition numbers them row-major (``order="C"``).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import ErrorKind, UnetlabError


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


# The one table of run-length CSV conventions: style -> (id column, rle column, pixel order). The DSB 2018
# numbers pixels column-major, Sartorius row-major (its submissions say "predicted", its train.csv
# "annotation"). Writers use the column names as written here; readers match headers case-insensitively.
RLE_STYLES: dict[str, tuple[str, str, str]] = {
    "dsb": ("ImageId", "EncodedPixels", "F"),
    "sartorius": ("id", "predicted", "C"),
    "sartorius_train": ("id", "annotation", "C"),
}


def rle_convention(header: list[str]) -> tuple[str, str, str] | None:
    """The (id column, rle column, order) a CSV header follows (names lower-cased), or None when it is no
    run-length table."""
    low = [h.strip().lower() for h in header]
    for id_col, rle_col, order in RLE_STYLES.values():
        if id_col.lower() in low and rle_col.lower() in low:
            return id_col.lower(), rle_col.lower(), order
    return None


def _rle_columns(header: list[str], path: Path) -> tuple[int, int, str]:
    """Indices of the id and run-length columns of ``header`` and the pixel order; a user error otherwise."""
    conv = rle_convention(header)
    if conv is not None:
        low = [h.strip().lower() for h in header]
        return low.index(conv[0]), low.index(conv[1]), conv[2]
    raise UnetlabError(
        f"CSV header {','.join(header[:4])!r} is not a run-length table",
        path,
        "expected ImageId,EncodedPixels (DSB) or id,predicted / id,annotation (Sartorius)",
    )


class RleTable(NamedTuple):
    """A parsed run-length CSV: image id -> RLE strings, the sizes the CSV gives, the pixel order, the file, and
    the CSV line of each RLE string (image id -> line numbers, in the order of its strings)."""

    rles: dict[str, list[str]]
    sizes: dict[str, tuple[int, int]]
    order: str
    path: Path
    lines: dict[str, list[int]] | None = None

    def labels(self, key: str, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Instance labels of image ``key``, sized by the CSV, else by ``shape`` (see :func:`decode_labels`)."""
        lines = (self.lines or {}).get(key)
        return decode_labels(self.rles[key], self.sizes.get(key, shape), self.order, key, self.path, lines)


def _first_bad(rles: Sequence[str], shape: tuple[int, int]) -> int:
    """Index of the first RLE string that does not decode in an image of ``shape`` (0 when all do)."""
    for i, rle in enumerate(rles):
        try:
            _runs(rle, int(shape[0]) * int(shape[1]), shape)
        except UnetlabError:
            return i
    return 0


def decode_labels(rles: Sequence[str], shape: tuple[int, int] | None, order: str, key: str,
                  source: str | Path, lines: Sequence[int] | None = None) -> np.ndarray:
    """The one decoding of an image's rows of a run-length CSV: objects numbered in row order (rows without runs
    take no number, earlier objects keep shared pixels); a missing size or a broken run is one error line naming
    the CSV ``source``, the line of the broken run (``lines``: the CSV line of each string) and the image id."""
    if shape is None:
        raise UnetlabError(f"no image size known for image id {key}", source,
                           "the CSV has no Height/Width columns and no image gives the size")
    try:
        return rles_to_labels(list(rles), shape, order, skip_empty=True)
    except UnetlabError as exc:
        at = f"line {lines[_first_bad(rles, shape)]}: " if lines else ""
        raise UnetlabError(f"{at}bad run-length mask for image id {key}: {exc}", source,
                           "runs are 1-indexed 'start length' pairs inside the image; fix or remove that row",
                           kind=ErrorKind.UNREADABLE) from None


def read_rle_table(path: str | Path) -> RleTable:
    """Parse a run-length CSV (DSB or Sartorius header): image id -> RLE strings (images with only empty rows map
    to []), the sizes where the CSV gives Height/Width, and the pixel order ("F" DSB, "C" Sartorius)."""
    path = Path(path)
    if not path.is_file():
        raise UnetlabError("run-length CSV not found", path)
    rles: dict[str, list[str]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    lines: dict[str, list[int]] = {}
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise UnetlabError("run-length CSV is empty", path)
        i_id, i_rle, order = _rle_columns(header, path)
        low = [h.strip().lower() for h in header]
        i_h = low.index("height") if "height" in low else None
        i_w = low.index("width") if "width" in low else None
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                key, rle = row[i_id].strip(), row[i_rle].strip()
                if i_h is not None and i_w is not None and key not in sizes and row[i_h] and row[i_w]:
                    sizes[key] = (int(float(row[i_h])), int(float(row[i_w])))
            except (IndexError, ValueError):
                raise UnetlabError(f"line {line}: malformed row {','.join(row)[:60]!r}", path) from None
            rles.setdefault(key, [])
            lines.setdefault(key, [])
            if rle:
                rles[key].append(rle)
                lines[key].append(line)
    return RleTable(rles, sizes, order, path, lines)
