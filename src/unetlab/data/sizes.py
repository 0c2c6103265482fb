"""Object size as a first-class quantity: equivalent diameters of the objects in label images.

The equivalent diameter of an object is that of the disc with its area, ``2 * sqrt(area / pi)``, the
convention of Cellpose and of ``skimage.measure.regionprops``. A binary mask's objects are its connected
components (4-connected, as everywhere in unetlab).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from ..labels import instance_labels

MIN_OBJECT_PIXELS = 9  # fragments below this are noise, not objects, for size estimates


def object_areas(labels: np.ndarray) -> np.ndarray:
    """Pixel areas of the objects of an instance label image (0 = background); binary masks are labelled first."""
    labels = instance_labels(labels)
    counts = np.bincount(labels.ravel().astype(np.int64))
    counts = counts[1:]
    return counts[counts > 0]


def object_diameters(labels: np.ndarray, min_pixels: int = MIN_OBJECT_PIXELS) -> np.ndarray:
    """Equivalent diameters (pixels) of the objects of ``labels`` that have at least ``min_pixels`` pixels."""
    areas = object_areas(labels)
    areas = areas[areas >= min_pixels]
    return 2.0 * np.sqrt(areas / math.pi)


def median_diameter(label_images: Iterable[np.ndarray], min_pixels: int = MIN_OBJECT_PIXELS) -> float | None:
    """Median equivalent diameter over all objects of all ``label_images`` (None when there is no object)."""
    parts = [object_diameters(lab, min_pixels) for lab in label_images]
    all_d = np.concatenate(parts) if parts else np.zeros(0)
    return float(np.median(all_d)) if len(all_d) else None


def zoom_to(train_diameter: float, diameter: float, limits: tuple[float, float]) -> float:
    """The zoom that brings objects of ``diameter`` pixels to ``train_diameter``, kept within ``limits``."""
    return float(np.clip(train_diameter / diameter, *limits))


SIZE_FACTOR_RANGE = (0.25, 4.0)  # size normalisation never zooms an image by more than this


def size_factor(diameter: float | None, train_diameter: float | None) -> float:
    """Size normalisation's zoom for an image whose median object is ``diameter`` pixels: the one that brings it
    to ``train_diameter`` (1 without objects or without a training size), within :data:`SIZE_FACTOR_RANGE`."""
    if not diameter or not train_diameter:
        return 1.0
    return zoom_to(train_diameter, diameter, SIZE_FACTOR_RANGE)
