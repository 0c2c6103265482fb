"""Time-lapse experiments: ``<exp>_raw_data/PosNNN/...`` paired frame by frame with ``<exp>_masks/PosNNN/...``.

Frames may sit directly in the position folder or in a channel subfolder (``Pos001/aphase/img_000000123.tif``,
``Pos001/PreprocessedPhase/...``); masks likewise (``Pos001/PreprocessedPhaseMasks/MASK_img_000000123.tiff``).
A frame and its mask pair by frame name: a ``MASK_`` prefix, the usual mask suffixes and the extension
(.tif vs .tiff vs .png) are ignored. Several experiments may sit under one root. The split group of a frame is
``<exp>/PosNNN``, so frames of one position never end up on both sides of a split.

Frames without a mask are normal in time-lapse data (only some are annotated): they are counted in the notes,
not reported as problems. A mask without a frame is a problem.
"""

from __future__ import annotations

import os
import re
from functools import partial
from pathlib import Path

from ..io import is_image_file
from ..sample import DatasetInfo, Sample
from .common import mask_without_image
from .paired import load_binary_or_instance, mask_key
from .registry import Layout, register_layout

RAW_SUFFIX = "_raw_data"
MASK_SUFFIX = "_masks"
_POS = re.compile(r"^pos(ition)?[_-]?\d+$", re.IGNORECASE)
_MASK_PREFIX = re.compile(r"^mask[_-]?", re.IGNORECASE)


def frame_key(stem: str) -> str:
    """The frame name a mask or image file stands for (no MASK_ prefix, no mask suffix)."""
    return mask_key(_MASK_PREFIX.sub("", stem))


def experiments(root: Path) -> list[tuple[str, Path, Path | None]]:
    """(experiment name, raw folder, mask folder or None) for every ``<exp>_raw_data`` under ``root``."""
    out = []
    try:
        entries = sorted((e.name, Path(e.path)) for e in os.scandir(root) if e.is_dir())
    except OSError:
        return []
    names = {n.lower(): p for n, p in entries}
    for name, path in entries:
        if name.lower().endswith(RAW_SUFFIX):
            exp = name[: -len(RAW_SUFFIX)]
            out.append((exp, path, names.get((exp + MASK_SUFFIX).lower())))
    return out


def detect(root: Path) -> bool:
    """True when ``root`` holds at least one ``<exp>_raw_data`` folder with a matching ``<exp>_masks``."""
    return any(masks is not None for _, _, masks in experiments(root))


def _positions(folder: Path) -> dict[str, Path]:
    try:
        return {e.name: Path(e.path) for e in os.scandir(folder) if e.is_dir() and _POS.match(e.name)}
    except OSError:
        return {}


def _frames(folder: Path) -> list[Path]:
    """Image files anywhere under ``folder`` (position folder, channel subfolders), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in filenames if is_image_file(f)]
    return sorted(out)


def _pick(candidates: list[Path], position: Path, channel: str | None) -> Path:
    """One image among frames of the same name in several channel folders."""
    if len(candidates) == 1:
        return candidates[0]

    def rel(p: Path) -> str:
        return str(p.parent.relative_to(position)).lower()

    if channel:
        for c in candidates:
            if channel.lower() in (rel(c), c.parent.name.lower()):
                return c
    for c in candidates:
        if "phase" in rel(c):
            return c
    return candidates[0]


def load(root: Path, invert_mask: bool = False, channel: str | None = None, **_: object) -> DatasetInfo:
    """Pair frames and masks position by position in every experiment under ``root``.

    ``channel`` picks the channel subfolder when a frame exists in several (default: one with 'phase' in its name,
    else the first in sorted order).
    """
    root = Path(root)
    samples: list[Sample] = []
    problems: list[str] = []
    notes: list[str] = []
    unannotated = 0
    several_channels = 0
    for exp, raw_dir, mask_dir in experiments(root):
        if mask_dir is None:
            notes.append(f"{raw_dir}: no {exp}{MASK_SUFFIX} folder beside it; experiment skipped")
            continue
        raw_pos, mask_pos = _positions(raw_dir), _positions(mask_dir)
        if not raw_pos and not mask_pos:  # frames directly under the experiment folders
            raw_pos, mask_pos = {"": raw_dir}, {"": mask_dir}
        for pos in sorted(set(raw_pos) | set(mask_pos)):
            group = f"{exp}/{pos}" if pos else exp
            if pos not in mask_pos:
                notes.append(f"{raw_pos[pos]}: position has no mask folder in {mask_dir}")
                continue
            masks_by_key: dict[str, Path] = {}
            for m in _frames(mask_pos[pos]):
                masks_by_key.setdefault(frame_key(m.stem), m)
            if pos not in raw_pos:
                problems += [mask_without_image(m, raw_dir) for m in masks_by_key.values()]
                continue
            frames_by_key: dict[str, list[Path]] = {}
            for f in _frames(raw_pos[pos]):
                frames_by_key.setdefault(f.stem, []).append(f)
            for key, mask in sorted(masks_by_key.items()):
                candidates = frames_by_key.get(key)
                if not candidates:
                    problems.append(mask_without_image(mask, raw_pos[pos]))
                    continue
                several_channels += len(candidates) > 1
                image = _pick(candidates, raw_pos[pos], channel)
                samples.append(
                    Sample(
                        name=f"{group}/{key}",
                        image=image,
                        mask_loader=partial(load_binary_or_instance, mask, invert_mask),
                        group=group,
                        mask_paths=(mask,),
                    )
                )
            unannotated += sum(1 for k in frames_by_key if k not in masks_by_key)
    if unannotated:
        notes.append(f"{unannotated} frames have no mask (not annotated); they are not used for training")
    if several_channels:
        notes.append(f"{several_channels} frames exist in several channel folders; one was picked "
                     "(a folder with 'phase' in its name, or the `channel` option)")
    return DatasetInfo(layout="timelapse", root=root, samples=samples, problems=problems, notes=notes)


register_layout(Layout("timelapse", detect, load, "<exp>_raw_data/PosNNN frames + <exp>_masks/PosNNN masks"))
