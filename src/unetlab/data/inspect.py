"""Describe a dataset folder and list its problems before anyone trains on it.

:func:`inspect_dataset` reads every image and mask once and returns a plain dict (JSON-ready): the layout,
counts of images, pairs, groups, classes and objects, image sizes, dtypes and channels, foreground fractions,
negative controls (empty masks: valid data, only noted) and the hard problems, each with a kind:
``unpaired``, ``unreadable``, ``shape`` (mask and image sizes differ), ``mask_values`` (e.g. JPEG artefacts
in a binary mask) and ``no_pairs`` (nothing to train on). :func:`format_report` turns the dict into text whose
first line, when there are problems, says how to fix the most common kind.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ErrorKind, UnetlabError, kind_of
from ..labels import instance_labels, suspicious_mask_values
from .io import read_image
from .layouts import load_dataset
from .layouts.common import image_header, read_mask_raw
from .sample import DatasetInfo, Sample

log = logging.getLogger(__name__)

FIXES = {
    "unpaired": "every image needs a mask with the same file name (suffixes _mask, _masks, _label are fine) and "
    "every mask an image: rename them, or move unlabelled images and stray masks out of the folder",
    "unreadable": "re-export or remove the unreadable files listed below (empty, truncated or not an image)",
    "shape": "each mask must have the height and width of its image: re-export the masks at the image size",
    "mask_values": "masks hold in-between values (lossy JPEG?): save masks as PNG or TIFF, or threshold them "
    "(value > half the maximum = object)",
    "empty": "every mask is empty: masks must mark objects with non-zero values (check the mask folder, or "
    "--invert-mask if they mark the background)",
    "channels": "all images need the same number of channels: convert the odd ones, or move them out",
    "no_pairs": "put the images in images/ and their masks, with the same file names, in masks/ (or see "
    "`unetlab inspect --help` for the other layouts)",
    "other": "see the problems listed below",
}
# a run-length CSV holds the masks: its problems are fixed in the CSV (or by adding images), not by re-exporting
RLE_FIXES = {
    "unpaired": "every image id of the CSV needs its image file, named <id>.png (or .tif, .jpg), in the image folder "
    "beside the CSV (images/, train/, ...): add the image, or remove that id's rows from the CSV",
    "unreadable": "fix or remove the CSV rows listed below (run-length strings are 1-indexed 'start length' pairs "
    "of integers inside the image); image files listed below need re-exporting",
    "shape": "the CSV's Height/Width of an image id must be its image's size: correct them, or drop those "
    "columns (the sizes then come from the images)",
}


def _kind(problem: str | UnetlabError) -> str:
    """The report's kind of a layout problem line or a mask's read error: its :class:`ErrorKind`, never its
    wording; a mask that fails for no known reason counts as unreadable."""
    kind = kind_of(problem)
    if kind is ErrorKind.OTHER and isinstance(problem, UnetlabError):
        return ErrorKind.UNREADABLE.value
    return kind.value


def _histogram(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = arr.ravel()
    if flat.size and flat.min() >= 0 and flat.max() < 65536:
        counts = np.bincount(flat)
        values = np.flatnonzero(counts)
        return values, counts[values]
    return np.unique(flat, return_counts=True)


def _count_objects(labels: np.ndarray) -> int:
    """Number of objects of a label image under the one rule (a binary mask counts its components)."""
    return int(np.count_nonzero(np.unique(instance_labels(labels))))


class _Collector:
    """Accumulates per-sample findings (kept private: the public result is a plain dict)."""

    def __init__(self, info: DatasetInfo) -> None:
        self.info = info
        self.problems: list[dict[str, str]] = [
            {"kind": _kind(p), "message": str(p)} for p in info.problems
        ]
        self.sizes: Counter[str] = Counter()
        self.dtypes: Counter[str] = Counter()
        self.channels: Counter[int] = Counter()
        self.channel_files: dict[int, list[str]] = {}
        self.foreground: list[float] = []
        self.objects: list[int] = []
        self.negatives: list[str] = []
        self.overlap_pixels = 0
        self.overlap_images = 0
        self.overlap_names: list[str] = []  # the first few images with overlaps, to name them
        n_cls = len(info.classes)
        self.class_pixels = np.zeros(n_cls, dtype=np.int64)
        self.class_present = np.zeros(n_cls, dtype=np.int64)
        self.total_pixels = 0

    def problem(self, kind: str, message: str) -> None:
        self.problems.append({"kind": kind, "message": message})

    def image(self, sample: Sample) -> tuple[int, int] | None:
        try:
            _, _, _, dtype = image_header(sample.image)
            img = read_image(sample.image)
        except UnetlabError as exc:
            self.problem("unreadable", str(exc))
            return None
        h, w = int(img.shape[1]), int(img.shape[2])
        self.sizes[f"{h}x{w}"] += 1
        self.dtypes[dtype] += 1
        self.channels[int(img.shape[0])] += 1
        self.channel_files.setdefault(int(img.shape[0]), []).append(str(sample.image))
        return h, w

    def _raw_mask(self, path: Path, shape: tuple[int, int], binary: bool) -> np.ndarray | None:
        try:
            raw = read_mask_raw(path)
        except UnetlabError as exc:
            self.problem("unreadable", str(exc))
            return None
        if raw.shape != shape:
            self.problem("shape", f"{path}: mask is {raw.shape[0]}x{raw.shape[1]} but its image is "
                                  f"{shape[0]}x{shape[1]}")
            return None
        if binary:
            why = suspicious_mask_values(*_histogram(raw))
            if why:
                self.problem("mask_values", f"{path}: {why}")
        if Path(path).suffix.lower() in (".jpg", ".jpeg") and binary:
            self.problem("mask_values", f"{path}: mask saved as JPEG (lossy); save masks as PNG or TIFF")
        return raw

    def per_object_masks(self, sample: Sample, shape: tuple[int, int]) -> None:
        """One binary file per object (kaggle_dsb): union, overlaps and object count without merging labels."""
        cover = np.zeros(shape, dtype=np.uint16)
        n = 0
        for p in sample.mask_paths:
            raw = self._raw_mask(p, shape, binary=True)
            if raw is None:
                continue
            m = raw > 0
            if m.any():
                n += 1
                cover += m
        fg = cover > 0
        overlap = int(cover.sum() - fg.sum())
        if overlap:
            self._overlap(sample, overlap)
        self._record(sample, float(fg.mean()), n)

    def _overlap(self, sample: Sample, pixels: int) -> None:
        """Count ``pixels`` of ``sample`` that belong to two masks (and name the first images)."""
        self.overlap_pixels += pixels
        self.overlap_images += 1
        if len(self.overlap_names) < 5:
            self.overlap_names.append(sample.name)

    def label_mask(self, sample: Sample, shape: tuple[int, int]) -> None:
        """One label image per sample (or per-class files merged by the layout's loader)."""
        multiclass = self.info.task == "multiclass"
        if len(sample.mask_paths) > 1:  # per-class files: check each, count overlaps between classes
            cover = np.zeros(shape, dtype=np.uint16)
            for p in sample.mask_paths:
                raw = self._raw_mask(p, shape, binary=True)
                if raw is not None:
                    cover += raw > 0
            overlap = int((cover > 1).sum())
            if overlap:
                self._overlap(sample, overlap)
        try:
            labels = sample.load_mask()
        except UnetlabError as exc:
            self.problem(_kind(exc), str(exc))
            return
        if labels.shape != shape:
            where = sample.mask_paths[0] if sample.mask_paths else sample.image
            self.problem("shape", f"{where}: mask is {labels.shape[0]}x{labels.shape[1]} but its image is "
                                  f"{shape[0]}x{shape[1]}")
            return
        values, counts = _histogram(labels)
        if multiclass:
            self.total_pixels += labels.size
            ok = values < len(self.class_pixels)
            self.class_pixels[values[ok]] += counts[ok]
            self.class_present[values[ok]] += 1
            self._record(sample, float(counts[values != 0].sum() / labels.size), None)
            return
        if len(sample.mask_paths) == 1 and sample.mask_paths[0].suffix.lower() in (".jpg", ".jpeg"):
            self.problem("mask_values", f"{sample.mask_paths[0]}: mask saved as JPEG (lossy); save masks as PNG "
                                        "or TIFF")
        else:
            why = suspicious_mask_values(values, counts)
            if why:
                self.problem("mask_values", f"{sample.mask_paths[0] if sample.mask_paths else sample.name}: {why}")
                return
        self._record(sample, float(counts[values != 0].sum() / labels.size), _count_objects(labels))

    def _record(self, sample: Sample, fg: float, objects: int | None) -> None:
        self.foreground.append(fg)
        if objects is not None:
            self.objects.append(objects)
        if fg == 0.0:
            self.negatives.append(sample.name)


def _summary(values: list[float] | list[int]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {"min": float(a.min()), "median": float(np.median(a)), "mean": float(a.mean()), "max": float(a.max())}


def inspect_dataset(root: str | Path, layout: str | None = None, progress: bool | None = None,
                    **options: Any) -> dict[str, Any]:
    """Read every image and mask of the dataset at ``root`` and return counts, statistics and problems."""
    from tqdm import tqdm

    start = time.perf_counter()
    info = load_dataset(root, layout, **options)
    col = _Collector(info)
    per_object = info.layout == "kaggle_dsb"
    disable = None if progress is None else not progress  # None: only on a terminal
    for sample in tqdm(info.samples, desc="inspect", unit="image", file=sys.stderr, disable=disable, leave=False):
        shape = col.image(sample)
        if shape is None:
            continue
        if per_object:
            col.per_object_masks(sample, shape)
        else:
            col.label_mask(sample, shape)
    if len(col.channels) > 1:  # training needs one channel layout
        usual = col.channels.most_common(1)[0][0]
        for c, files in col.channel_files.items():
            if c != usual:
                for f in files:
                    col.problem("channels", f"{f}: image has {c} channel(s), most images have {usual}")
    if not info.samples:  # nothing to train on is a problem, also when no file is out of place
        col.problem("no_pairs", f"{info.root}: no image with a mask found ({info.layout} layout)")
    if col.foreground and not any(col.foreground):
        col.problem("empty", f"{info.root}: all {len(col.foreground)} masks are empty (no foreground pixels)")
    n_unpaired_images = sum(1 for p in info.problems if getattr(p, "image", None) is not None)
    counts: Counter[str] = Counter(p["kind"] for p in col.problems)
    fix = None
    if col.problems:
        kind, n = counts.most_common(1)[0]
        fixes = {**FIXES, **RLE_FIXES} if info.layout == "rle_csv" else FIXES
        fix = (f"{len(col.problems)} problem{'s' * (len(col.problems) != 1)} (most common: {kind}, {n}). "
               f"Fix: {fixes.get(kind, FIXES['other'])}.")
    report: dict[str, Any] = {
        "root": str(info.root),
        "layout": info.layout,
        "task": info.task,
        "classes": list(info.classes),
        "n_images": len(info.samples) + n_unpaired_images,
        "n_pairs": len(info.samples),
        "n_groups": len(info.groups),
        "n_objects": int(sum(col.objects)) if col.objects else None,
        "objects_per_image": _summary(col.objects),
        "image_sizes": dict(col.sizes.most_common()),
        "dtypes": dict(col.dtypes.most_common()),
        "channels": {str(k): v for k, v in col.channels.most_common()},
        "foreground": _summary(col.foreground),
        "negative_controls": col.negatives,
        "overlap_pixels": col.overlap_pixels,
        "overlap_images": col.overlap_images,
        "overlap_names": col.overlap_names,
        "problems": col.problems,
        "problem_counts": dict(counts),
        "fix": fix,
        "notes": list(info.notes),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if info.task == "multiclass":
        n_img = max(len(col.foreground), 1)
        report["class_fractions"] = {
            c: float(col.class_pixels[i] / max(col.total_pixels, 1)) for i, c in enumerate(info.classes)
        }
        report["class_empty_images"] = {
            c: int(n_img - col.class_present[i]) for i, c in enumerate(info.classes) if i > 0
        }
    return report


def _fmt_counter(d: dict[str, int], limit: int = 8) -> str:
    items = list(d.items())
    text = ", ".join(f"{k} ({v})" for k, v in items[:limit])
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def format_report(d: dict[str, Any]) -> str:
    """Human-readable text of an :func:`inspect_dataset` result; the first line is the fix when there are problems."""
    lines = []
    if d.get("fix"):
        lines.append(d["fix"])
    lines.append(f"dataset      {d['root']}")
    lines.append(f"layout       {d['layout']} (task {d['task']})")
    lines.append(f"images       {d['n_images']} ({d['n_pairs']} with masks), {d['n_groups']} groups")
    if d["task"] == "multiclass":
        names = d["classes"][1:]
        lines.append(f"classes      {len(names)} (+ {d['classes'][0]}): {', '.join(names)}")
        fr = d.get("class_fractions", {})
        lines.append("pixels       " + ", ".join(f"{c} {100 * fr.get(c, 0):.1f}%" for c in d["classes"]))
        empty = {c: n for c, n in d.get("class_empty_images", {}).items() if n}
        if empty:
            lines.append("absent in    " + ", ".join(f"{c}: {n}/{d['n_pairs']} images" for c, n in empty.items()))
    elif d.get("n_objects") is not None:
        o = d["objects_per_image"]
        lines.append(f"objects      {d['n_objects']:,} ({o['min']:.0f} to {o['max']:.0f} per image, "
                     f"median {o['median']:.0f})")
    if d.get("overlap_pixels"):
        names = d.get("overlap_names") or []
        shown = ", ".join(names[:3]) + (", ..." if d["overlap_images"] > 3 else "")
        lines.append(f"overlaps     {d['overlap_pixels']} pixels in {d['overlap_images']} images belong to two "
                     f"masks (resolved deterministically, see notes): {shown}")
    if d["image_sizes"]:  # nothing to describe when no image was read
        lines.append(f"sizes        {_fmt_counter(d['image_sizes'])}")
        lines.append(f"dtypes       {_fmt_counter(d['dtypes'])}; channels {_fmt_counter(d['channels'])}")
    if d.get("foreground"):
        f = d["foreground"]
        lines.append(f"foreground   mean {100 * f['mean']:.1f}%, median {100 * f['median']:.1f}%, "
                     f"min {100 * f['min']:.1f}%, max {100 * f['max']:.1f}%")
    neg = d.get("negative_controls") or []
    if neg:
        shown = ", ".join(neg[:5]) + (", ..." if len(neg) > 5 else "")
        lines.append(f"negatives    {len(neg)} empty masks (negative controls, valid data): {shown}")
    for note in d.get("notes", []):
        lines.append(f"note         {note}")
    lines.append(f"read in      {d['seconds']:.1f} s")
    if d["problems"]:
        lines.append(f"problems     {len(d['problems'])}:")
        lines += [f"  [{p['kind']}] {p['message']}" for p in d["problems"]]
    else:
        lines.append("problems     none")
    return "\n".join(lines)
