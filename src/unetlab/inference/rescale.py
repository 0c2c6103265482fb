"""Predicting at the training object size: rescale an image so its objects match the size the model was
trained on, predict, and map the result back to the image's own pixels.

``scale`` is the factor applied to the image: ``train_diameter / object_diameter``. An image whose nuclei are
twice the training size is predicted at scale 0.5; its probabilities are resized back to the original size,
and instance labels found at the training size are mapped back by nearest neighbour and trimmed to the
foreground of the resized-back probabilities.

``--diameter auto`` takes the object size from the run's size model (``size_model.json``,
:mod:`unetlab.inference.sizemodel`) when its folder has one: one pass at the estimated scale, and at most one
more when the objects of that pass disagree with the estimate (:func:`_estimate_scale`). Runs without it measure
the objects the model finds at the image's own size and predict once more at their size (:func:`_measure_scale`),
which objects far larger than trained can fool (they fragment); ``unetlab size-model RUN`` fits a run's size model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from ..data.sizes import median_diameter, zoom_to
from ..errors import UnetlabError
from ..labels import resize_nearest

log = logging.getLogger(__name__)

AUTO_TOLERANCE = 0.2  # --diameter auto predicts again when the measured size is off by more than this
MIN_SCALE, MAX_SCALE = 0.125, 8.0
MIN_SIDE = 16  # a rescaled image is never smaller than this (pixels) on either side
# with a size model, measure the objects of the pass at the estimated scale and predict once more when they
# disagree with the estimate (at most two passes); chosen on the DSB validation split (benchmarks/README.md)
REFINE = True


@dataclass
class ScaleChoice:
    """How one image was predicted: the scale applied, the object diameter it assumed and how it was found."""

    scale: float
    diameter: float | None  # objects' diameter in the original image (pixels), None when unknown
    how: str  # "training size", "given", "estimated", "estimated, measured", "estimated, refined", "measured",
    # "measured (no objects)"


def auto_rescales(info: dict, size_normalize: bool, want_labels: bool) -> bool:
    """Whether ``--diameter auto`` rescales a model's images: an instance model (boundary, distance, flow) that
    knows its training objects' size (``info['diameter']``), when labels are made or it was trained size-normalised.
    Predict and the end-of-training test score both follow it."""
    from ..data.targets import INSTANCE_KINDS

    return bool((want_labels or size_normalize) and info.get("diameter")
                and info.get("target", "binary") in INSTANCE_KINDS)


def parse_diameter(value: str | float | None) -> float | str | None:
    """``--diameter`` as given: None (predict at the image's own size), 'auto', or a positive number of pixels."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        d = float(value)
    except (TypeError, ValueError):
        raise UnetlabError(f"--diameter must be a number of pixels, 'auto' or 'none', not {value!r}") from None
    if not d > 0:
        raise UnetlabError(f"--diameter must be positive, not {value!r}")
    return d


def scale_for(train_diameter: float, diameter: float) -> float:
    """The factor that brings objects of ``diameter`` pixels to ``train_diameter``, kept within [1/8, 8]."""
    return zoom_to(train_diameter, diameter, (MIN_SCALE, MAX_SCALE))


def scaled_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """(H, W) of an image of ``shape`` rescaled by ``scale`` (at least MIN_SIDE pixels a side)."""
    return tuple(max(MIN_SIDE, int(round(s * scale))) for s in shape)  # type: ignore[return-value]


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a float (C, H, W) array to ``shape`` with bilinear interpolation (antialiased when shrinking)."""
    if tuple(image.shape[-2:]) == tuple(shape):
        return image
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    shrink = shape[0] < image.shape[-2] or shape[1] < image.shape[-1]
    y = F.interpolate(x, size=tuple(int(s) for s in shape), mode="bilinear", align_corners=False, antialias=shrink)
    return y[0].numpy()


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize an integer (H, W) label image to ``shape`` by nearest neighbour (pixel centres)."""
    return resize_nearest(labels, shape)


def map_labels_back(labels: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Labels found at another scale, brought to ``foreground``'s shape: nearest-neighbour resize, then every
    foreground pixel takes the label of the nearest labelled pixel and background pixels lose theirs, so the
    outlines follow the full-resolution probabilities instead of the coarse grid."""
    up = resize_labels(labels, foreground.shape)
    if not up.any():
        return up
    _d, (iy, ix) = ndi.distance_transform_edt(up == 0, return_indices=True)
    near = up[iy, ix]
    kept = np.isin(near, np.unique(up[up > 0]))  # every object keeps its identity
    return np.where(foreground & kept, near, 0).astype(up.dtype)


def _estimate_scale(run: Callable[[float], tuple[np.ndarray, np.ndarray | None]], estimated: float,
                    train_diameter: float, tolerance: float, refine: bool) -> ScaleChoice:
    """The scale for ``diameter='auto'`` from a size estimate that does not come from the model's objects
    (:mod:`unetlab.inference.sizemodel`): one pass at the scale that brings ``estimated`` to ``train_diameter``.
    With ``refine``, the objects of that pass, seen near the training size, are measured, and when their median
    diameter differs from the estimate by more than ``tolerance`` a second pass is made at their size (as
    Cellpose does): at most two passes. The diameter reported is then that of the last pass's objects (near the
    training size they are better evidence of it than the estimate), the estimate's when the pass found none."""
    scale = scale_for(train_diameter, estimated)
    d = _measured(run, scale) if refine else None
    if d is None:
        return ScaleChoice(scale, estimated, "estimated")
    if abs(math.log(d / estimated)) <= math.log1p(tolerance):
        return ScaleChoice(scale, d, "estimated, measured")
    refined = scale_for(train_diameter, d)
    return ScaleChoice(refined, _measured(run, refined) or d, "estimated, refined")


def _measured(run: Callable[[float], tuple[np.ndarray, np.ndarray | None]], scale: float) -> float | None:
    """The median diameter, in the image's own pixels, of the objects of the pass at ``scale`` (None: none)."""
    d = median_diameter([run(scale)[1]])
    return None if d is None else d / scale


# --- runs without a size model (size_model.json): measure the objects of one pass --------------------------------


def _measure_scale(run: Callable[[float], tuple[np.ndarray, np.ndarray | None]], train_diameter: float,
                   tolerance: float) -> ScaleChoice:
    """The scale for ``diameter='auto'`` of a run without a size model: the median diameter of the objects found
    at the image's own size, and a second pass at the scale that brings it to ``train_diameter`` when it is off by
    more than ``tolerance``: at most two passes. Objects far larger than the network was trained on can come out
    as fragments that look the training size; a size model (``unetlab size-model RUN``) is not fooled by them.
    ``run(scale)`` returns (probabilities, labels) of the image at ``scale``."""
    d = median_diameter([run(1.0)[1]])
    if d is None:
        return ScaleChoice(1.0, None, "measured (no objects)")
    if abs(math.log(d / train_diameter)) <= math.log1p(tolerance):
        return ScaleChoice(1.0, d, "measured")
    return ScaleChoice(scale_for(train_diameter, d), d, "measured")


def predict_rescaled(
    predict: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    train_diameter: float | None,
    diameter: float | str | None,
    to_labels: Callable[[np.ndarray], np.ndarray] | None = None,
    foreground: Callable[[np.ndarray], np.ndarray] | None = None,
    tolerance: float = AUTO_TOLERANCE,
    estimate: Callable[[np.ndarray], float] | None = None,
    refine: bool | None = None,
) -> tuple[np.ndarray, np.ndarray | None, ScaleChoice]:
    """Probabilities (K, H, W) and, with ``to_labels``, instance labels of a prepared (C, H, W) ``image``,
    predicted with its objects at the training size. Returns them at the image's own size with the choice made.

    ``predict`` maps a prepared image to probabilities of the same size; ``to_labels`` turns probabilities
    into labels (the run's tuned post-processing) and ``foreground`` probabilities into the boolean mask that
    the labels' outlines follow at full size (default: the coarse labels' own footprint). ``diameter``: None
    (as it is), pixels, or 'auto': with ``estimate`` (prepared image -> object diameter, the run's size model)
    see :func:`_estimate_scale`, without it :func:`_measure_scale`.
    """
    refine = REFINE if refine is None else refine
    if (diameter == "auto") and to_labels is None and (estimate is None or refine):
        raise ValueError("diameter 'auto' measures objects: it needs to_labels")
    shape = tuple(image.shape[-2:])
    passes: dict[float, tuple[np.ndarray, np.ndarray | None]] = {}

    def run(scale: float) -> tuple[np.ndarray, np.ndarray | None]:
        if scale not in passes:
            prob = predict(resize_image(image, scaled_shape(shape, scale)))
            passes[scale] = (prob, to_labels(prob) if to_labels is not None else None)
        return passes[scale]

    if diameter is None or train_diameter is None:
        choice = ScaleChoice(1.0, None, "training size")
    elif diameter != "auto":
        choice = ScaleChoice(scale_for(train_diameter, float(diameter)), float(diameter), "given")
    elif estimate is not None:
        choice = _estimate_scale(run, float(estimate(image)), float(train_diameter), tolerance, refine)
    else:
        choice = _measure_scale(run, float(train_diameter), tolerance)
    prob_s, labels_s = run(choice.scale)
    if choice.scale == 1.0 and tuple(prob_s.shape[-2:]) == shape:
        return prob_s, labels_s, choice
    prob = resize_image(prob_s, shape)
    labels = None
    if labels_s is not None:
        coarse = resize_labels(labels_s, shape) > 0
        if foreground is None:
            fg = coarse
        else:  # full-resolution outlines, but only next to objects the post-processing kept
            reach = int(np.ceil(1.0 / choice.scale)) + 1
            fg = foreground(prob) & ndi.binary_dilation(coarse, iterations=reach)
        labels = map_labels_back(labels_s, fg)
    log.debug("predicted at scale %.3f (%s, diameter %s)", choice.scale, choice.how, choice.diameter)
    return prob, labels, choice
