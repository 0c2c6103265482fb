"""Estimating an image's object size from the network's own features (Cellpose's SizeModel idea).

A run folder may hold ``size_model.json``: a ridge regression from the network's pooled encoder features (the
"style": :func:`~unetlab.models.features.pooled_features`) of an image to the log of its median object diameter,
fitted after training on rescaled crops of the training images (``unetlab.training.sizefit``). It is plain numbers
(weights, bias, feature mean and standard deviation, the training diameter), read as JSON: loading it never runs
code. ``--diameter auto`` uses it when it is there (one network pass at the estimated scale) and falls back to
measuring the model's own objects (:mod:`unetlab.inference.rescale`) when it is not.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UnetlabError
from ..files import write_text
from .rescale import resize_image, scaled_shape

SIZE_MODEL_FILE = "size_model.json"
STYLE_CROP = 256  # the style is the mean over crops of this side (the size the regressor was fitted on)
MAX_STYLE_CROPS = 8  # at most this many crops of an image are encoded (a bounded fraction of one pass)
# new fits read the style from the image at half its size: a quarter of the pixels to encode and a crop that sees
# twice as far (large objects). On the validation images of the shipped nuclei model (DSB 2018 and bitdepth_nucseg
# at x0.5-x4, 2026-12-05) AP@0.5 moved by at most 0.02 either way and auto took 84 s instead of 94 s
STYLE_ZOOM = 0.5
RELOOK = 2.0  # an estimate over this many training diameters is made again on the image shrunk by it (relook)
FORMAT = "unetlab-size-model/1"


@dataclass
class SizeModel:
    """log(diameter) = weights . (style - mean) / std + bias; diameters in pixels of the image as given."""

    weights: list[float]
    bias: float
    mean: list[float]
    std: list[float]
    train_diameter: float
    alpha: float = 1.0
    crop: int = STYLE_CROP
    zoom: float = 1.0  # the image is resized by this factor before its style is read (older fits: 1.0)
    fit: dict = field(default_factory=dict)  # how it was fitted and its validation error (informative only)

    def log_diameters(self, styles: np.ndarray) -> np.ndarray:
        """log(diameter) for (N, F) style vectors."""
        x = (np.asarray(styles, np.float64) - np.asarray(self.mean)) / np.asarray(self.std)
        return x @ np.asarray(self.weights) + self.bias

    def diameter(self, style: np.ndarray) -> float:
        """The estimated median object diameter (pixels) of an image with ``style`` (F,)."""
        return float(math.exp(float(self.log_diameters(np.asarray(style)[None])[0])))

    def save(self, run_dir: str | Path) -> Path:
        """Write ``run_dir/size_model.json`` atomically (JSON numbers only)."""
        obj = {"format": FORMAT, **asdict(self)}
        return write_text(Path(run_dir) / SIZE_MODEL_FILE, json.dumps(obj, indent=1))


def load_size_model(run_dir: str | Path | None) -> SizeModel | None:
    """The run's size regressor, or None when the run folder has none (older runs: --diameter auto measures the
    objects it finds). A malformed file is one UnetlabError line naming it."""
    if run_dir is None:
        return None
    path = Path(run_dir) / SIZE_MODEL_FILE
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
        if obj.get("format") != FORMAT:
            raise ValueError(f"format {obj.get('format')!r}, expected {FORMAT!r}")
        model = SizeModel(weights=[float(v) for v in obj["weights"]], bias=float(obj["bias"]),
                          mean=[float(v) for v in obj["mean"]], std=[float(v) for v in obj["std"]],
                          train_diameter=float(obj["train_diameter"]), alpha=float(obj.get("alpha", 1.0)),
                          crop=int(obj.get("crop", STYLE_CROP)), zoom=float(obj.get("zoom", 1.0)),
                          fit=dict(obj.get("fit", {})))
        if not (len(model.weights) == len(model.mean) == len(model.std)) or min(model.std) <= 0:
            raise ValueError("weights, mean and std must have the same length and std be positive")
        if not 0 < model.zoom <= 1:
            raise ValueError(f"zoom {model.zoom} must be in (0, 1]")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UnetlabError(f"unreadable size model ({exc})", path,
                           "delete it to use the measuring rule of --diameter auto, or fit it again") from None
    return model


def crop_origins(n: int, crop: int, count: int) -> list[int]:
    """Up to ``count`` start positions of crops of ``crop`` pixels that together cover ``n`` pixels."""
    if n <= crop:
        return [0]
    k = min(count, math.ceil(n / crop))
    return sorted({int(round(v)) for v in np.linspace(0, n - crop, k)})


@torch.no_grad()
def image_style(model: nn.Module, image: np.ndarray, crop: int = STYLE_CROP,
                max_crops: int = MAX_STYLE_CROPS, zoom: float = 1.0) -> np.ndarray:
    """The style (F,) of a prepared (C, H, W) image: pooled encoder features (fp32, on the model's device)
    averaged over crops of ``crop`` pixels that cover it (at most ``max_crops``, spread evenly), read from the
    image resized by ``zoom``."""
    from ..models.features import pooled_features

    if zoom != 1.0:
        image = resize_image(image, scaled_shape(image.shape[-2:], zoom))
    h, w = image.shape[-2:]
    ys, xs = crop_origins(h, crop, MAX_STYLE_CROPS), crop_origins(w, crop, MAX_STYLE_CROPS)
    boxes = [(y, x) for y in ys for x in xs]
    if len(boxes) > max_crops:
        boxes = [boxes[int(i)] for i in np.linspace(0, len(boxes) - 1, max_crops).round()]
    ch, cw = min(h, crop), min(w, crop)
    batch = np.stack([image[:, y : y + ch, x : x + cw] for y, x in boxes]).astype(np.float32)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        styles = pooled_features(model, torch.from_numpy(batch).to(device)).cpu().numpy()
    finally:
        model.train(was_training)
    return styles.mean(0)


def size_estimator(model: nn.Module, run_dir: str | Path | None) -> Callable[[np.ndarray], float] | None:
    """A function prepared image -> estimated object diameter (pixels) for ``model`` of the run folder ``run_dir``,
    or None when the folder holds no ``size_model.json`` (or the network has no pooled features)."""
    sm = load_size_model(run_dir)
    if sm is None or not hasattr(model, "encoder_features"):
        return None
    return lambda image: relook(lambda x: sm.diameter(image_style(model, x, sm.crop, zoom=sm.zoom)), image,
                                sm.train_diameter)


def relook(diameter_of: Callable[[np.ndarray], float], image: np.ndarray, train_diameter: float) -> float:
    """``diameter_of(image)``, and when that exceeds ``RELOOK`` x ``train_diameter`` the estimate of the image shrunk
    so that it would show them at the training size (scaled back): objects far larger than any in a style crop
    (nuclei of 150-200 px) make the regression saturate (50-100 px on DSB validation copies at x4), and a pass at
    that scale shows fragments that seem to confirm it; shrunk, they fall where it is accurate. Costs one style of
    a quarter of the pixels or less. ``RELOOK`` is read at each call (benchmarks switch it off)."""
    d = diameter_of(image)
    if d <= RELOOK * train_diameter:
        return d
    shape = scaled_shape(image.shape[-2:], train_diameter / d)
    return diameter_of(resize_image(image, shape)) * image.shape[-2] / shape[0]
