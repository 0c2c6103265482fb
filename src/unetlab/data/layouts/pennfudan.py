"""Penn-Fudan pedestrians: ``PNGImages/NAME.png`` with instance labels in ``PedMasks/NAME_mask.png``.

The masks are palette PNGs whose palette index is the instance id (0 = background); they are read as indices.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from ..sample import DatasetInfo, Sample
from .common import find_dir, image_without_mask, mask_without_image, read_mask_raw, scan_images
from .paired import mask_key
from .registry import Layout, register_layout

IMAGE_DIRS = ("PNGImages",)
MASK_DIRS = ("PedMasks",)


def detect(root: Path) -> bool:
    """True when ``root`` has ``PNGImages/`` and ``PedMasks/``."""
    return find_dir(root, IMAGE_DIRS) is not None and find_dir(root, MASK_DIRS) is not None


def load_instances(path: Path) -> np.ndarray:
    """Instance labels of one mask file (palette indices kept)."""
    return read_mask_raw(path).astype(np.int32)


def load(root: Path, **_: object) -> DatasetInfo:
    """Pair ``PNGImages/NAME.*`` with ``PedMasks/NAME_mask.*``."""
    root = Path(root)
    images_dir, masks_dir = find_dir(root, IMAGE_DIRS), find_dir(root, MASK_DIRS)
    masks = {mask_key(m.stem): m for m in scan_images(masks_dir)}
    samples, problems = [], []
    for img in scan_images(images_dir):
        m = masks.pop(img.stem, None)
        if m is None:
            problems.append(image_without_mask(img, masks_dir))
            continue
        samples.append(Sample(name=img.stem, image=img, mask_loader=partial(load_instances, m), group=img.stem,
                              mask_paths=(m,)))
    problems += [mask_without_image(m, images_dir) for m in masks.values()]
    return DatasetInfo(layout="pennfudan", root=root, samples=samples, problems=problems)


register_layout(Layout("pennfudan", detect, load, "PNGImages/NAME.png + PedMasks/NAME_mask.png instance labels"))
