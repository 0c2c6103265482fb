"""The U-Net border weight map (Ronneberger et al. 2015, eq. 2).

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

``w_c`` balances the class frequencies, ``d1``/``d2`` are the distances to the nearest and second-nearest
object; the border term is added on background pixels only, so thin gaps between touching cells get large
weights and the network learns to separate them.

Touching nuclei often have no background between them at all. With ``objects=True`` the border term is also
added on object pixels (there ``d1`` is 0 and ``d2`` the distance to the nearest other object), so the contact
line of two touching objects weighs ``1 + w0`` and an isolated object 1: :func:`contact_weight_map`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..labels import instance_labels

log = logging.getLogger(__name__)

CUTOFF_SIGMAS = 6.0  # d1 + d2 beyond this many sigma adds < w0 * 1.6e-8: distances further out are not needed
MAX_CLASS_WEIGHT = 10.0


def class_balance_weights(foreground: np.ndarray, max_weight: float = MAX_CLASS_WEIGHT) -> np.ndarray:
    """w_c: inverse class frequency normalised to a pixel mean of 1 (clipped to [1/max, max])."""
    n = foreground.size
    n_fg = int(foreground.sum())
    n_bg = n - n_fg
    if n_fg == 0 or n_bg == 0:
        return np.ones(foreground.shape, dtype=np.float32)
    w_fg = np.clip(n / (2.0 * n_fg), 1.0 / max_weight, max_weight)
    w_bg = np.clip(n / (2.0 * n_bg), 1.0 / max_weight, max_weight)
    return np.where(foreground, w_fg, w_bg).astype(np.float32)


def nearest_two_distances(labels: np.ndarray, cutoff: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel Euclidean distances (d1, d2) to the nearest and second-nearest object of an instance image.

    With ``cutoff`` each object's distance transform is computed only in a window of its bounding box grown by
    ``cutoff`` pixels (distances beyond it are reported as inf); None computes them on the full image.
    """
    h, w = labels.shape
    d1 = np.full((h, w), np.inf, dtype=np.float32)
    d2 = np.full((h, w), np.inf, dtype=np.float32)
    margin = h + w if cutoff is None else int(math.ceil(cutoff)) + 1
    for idx, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        ys, xs = box
        win = (slice(max(ys.start - margin, 0), min(ys.stop + margin, h)),
               slice(max(xs.start - margin, 0), min(xs.stop + margin, w)))
        d = ndimage.distance_transform_edt(labels[win] != idx).astype(np.float32)
        if cutoff is not None:
            d[d > cutoff] = np.inf
        w1, w2 = d1[win], d2[win]
        np.minimum(w2, np.maximum(w1, d), out=w2)
        np.minimum(w1, d, out=w1)
    return d1, d2


def border_weight_map(
    labels: np.ndarray, w0: float = 10.0, sigma: float = 5.0, class_balance: bool = True, objects: bool = False
) -> np.ndarray:
    """The U-Net weight map (H,W) float32 of a label image (instance ids, or a binary mask -> objects);
    ``objects`` adds the border term on object pixels too (see the module doc).

    Distances are computed per object within a window of ``CUTOFF_SIGMAS * sigma`` around it; the result
    differs from the exact map by less than ``w0 * 1.6e-8``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected a 2-D label image, got shape {labels.shape}")
    from skimage.segmentation import relabel_sequential

    # a binary mask (one non-zero value, e.g. 0/255) -> its 4-connected objects; ids made 1..n, so that
    # sparse ids (e.g. 10**6) do not make find_objects list every unused id (the map does not depend on ids)
    inst = relabel_sequential(instance_labels(labels))[0]
    foreground = inst > 0
    weights = class_balance_weights(foreground) if class_balance else np.ones(inst.shape, np.float32)
    if w0 <= 0 or sigma <= 0 or inst.max() < 2:
        return weights
    d1, d2 = nearest_two_distances(inst, cutoff=CUTOFF_SIGMAS * sigma)
    total = d1 + d2
    near = np.isfinite(total) if objects else ~foreground & np.isfinite(total)
    weights[near] += (w0 * np.exp(-(total[near] ** 2) / (2.0 * sigma**2))).astype(np.float32)
    return weights


def contact_weight_map(labels: np.ndarray, w0: float = 10.0, sigma: float = 2.0) -> np.ndarray:
    """Weights (H,W) float32 that stress where objects meet: ``1 + w0 * exp(-(d1 + d2)^2 / (2 sigma^2))`` on
    every pixel, so the contact line of two touching objects (and a thin gap) weighs about ``1 + w0``."""
    return border_weight_map(labels, w0=w0, sigma=sigma, class_balance=False, objects=True)


def weight_map_rgb(weights: np.ndarray, cmap: str = "magma", vmax: float | None = None) -> np.ndarray:
    """Colour-map a weight map to RGB uint8 (H,W,3) from 0 to ``vmax`` (its maximum by default)."""
    import matplotlib

    top = float(weights.max()) if vmax is None else float(vmax)
    scaled = np.clip(weights / max(top, 1e-6), 0.0, 1.0)
    rgba = matplotlib.colormaps[cmap](scaled)
    return (rgba[..., :3] * 255 + 0.5).astype(np.uint8)


def write_weight_map_png(
    mask_path: str | Path, out: str | Path, w0: float = 10.0, sigma: float = 5.0, class_balance: bool = True,
    objects: bool = False,
) -> dict[str, float]:
    """Read a mask file, compute its border weight map and write it as a colour-mapped PNG; returns stats."""
    from ..data.io import read_label, write_image

    weights = border_weight_map(read_label(mask_path), w0=w0, sigma=sigma, class_balance=class_balance,
                                objects=objects)
    write_image(out, np.moveaxis(weight_map_rgb(weights), -1, 0))
    stats = {"min": float(weights.min()), "max": float(weights.max()), "mean": float(weights.mean())}
    log.debug("weight map of %s written to %s (min %.2f, max %.2f)", mask_path, out, stats["min"],
              stats["max"])
    return stats
