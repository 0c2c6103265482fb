"""Fitting a run's size model (``size_model.json``) after training: a ridge regression in numpy from the network's
pooled encoder features of randomly rescaled crops of the training images to the log of their object diameter.

Each crop shows the objects of one training image at a size drawn log-uniformly between x1/8 and x8 of the
training diameter; its target is the image's median object diameter (from its instance labels, ``data.sizes``)
times the zoom applied. Crops are spread evenly over collections (when the caller names them), then over images.
The ridge penalty is chosen on crops of the validation images, never on test images.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..data.io import read_image
from ..data.sizes import median_diameter
from ..errors import UnetlabError
from ..inference.predictor import Predictor
from ..inference.rescale import MAX_SCALE, MIN_SCALE, MIN_SIDE, resize_image
from ..inference.sizemodel import STYLE_CROP, STYLE_ZOOM, SizeModel, image_style
from ..labels import instance_labels
from .tuning import has_object_scores

log = logging.getLogger(__name__)

# the crops' objects span this range of the training diameter (log-uniform): every size predict can bring to the
# training size (rescale's scale limits). Fitted on x0.25-x4 only, the estimate of DSB test nuclei copied at x4
# (up to 8x the training size) saturated near 4x: one image of 24 nuclei of 164 px came out as 177 fragments.
ZOOM_RANGE = (MIN_SCALE, MAX_SCALE)
# the share of crops taken as they are: resampling smooths (enlarging) or averages (shrinking) a camera's pixel
# noise, so a fit on resampled crops only misjudged images at their own size (bitdepth_nucseg validation images,
# 2026-12-05: within 25% of the true diameter on 4 of 8 at x1, on 7 of 8 at x0.5 and x4)
NATIVE_SHARE = 0.3
ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)  # ridge penalties tried (features are standardised)
DEFAULT_ALPHA = 10.0  # used when there are no validation images to choose on


def size_crops(run, samples: list, crops: int, seed: int, crop: int = STYLE_CROP, native: float = NATIVE_SHARE,
               zoom: float = STYLE_ZOOM):
    """Yield (style (F,), log diameter) of ``crops`` crops in all, spread evenly over ``samples``: each a random
    window of ``crop / zoom`` pixels of a training image zoomed so its objects are x1/8-x8 the run's training
    diameter, or with probability ``native`` not resampled at all (the image's own pixels, noise and texture as a
    microscope gives them); its style is read as predict reads an image's (:func:`image_style` at ``zoom``)."""
    prep = Predictor(run, torch.device("cpu"))
    train_d = float(run.info["diameter"])
    rng = np.random.default_rng(seed)
    per_image = max(1, math.ceil(crops / max(1, len(samples))))
    lo, hi = (math.log(z) for z in ZOOM_RANGE)
    window = round(crop / zoom)
    for s in samples:
        d = median_diameter([instance_labels(s.load_mask())])
        if d is None:
            continue
        image = prep.prepare(read_image(s.image), s.image)
        h, w = image.shape[-2:]
        for _ in range(per_image):
            f = 1.0 if rng.random() < native else train_d * math.exp(rng.uniform(lo, hi)) / d  # zoom of the image
            rh, rw = min(h, max(1, math.ceil(window / f))), min(w, max(1, math.ceil(window / f)))
            y, x = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
            shape = (max(MIN_SIDE, min(window, round(rh * f))), max(MIN_SIDE, min(window, round(rw * f))))
            part = resize_image(image[:, y : y + rh, x : x + rw], shape)
            yield image_style(run.model, part, crop=crop, zoom=zoom), math.log(d * shape[0] / rh)


def balanced_crops(run, samples: list, crops: int, seed: int, collection: Callable[[str], str] | None = None):
    """:func:`size_crops` with the ``crops`` shared equally by the collections of ``samples`` (``collection``:
    sample name -> collection name; None: one collection), so that a small collection teaches as much as a large
    one (bitdepth_nucseg's 30 tissue images beside DSB 2018's 346, 2026-12-05: the regression alone put 5 of its 8
    validation images copied at x4 within 25% of their size with 2,070 tissue crops beside 3,114 DSB crops, 3 of
    8 with 270)."""
    groups: dict[str, list] = {}
    for s in samples:
        groups.setdefault(collection(s.name) if collection else "", []).append(s)
    for i, (_, part) in enumerate(sorted(groups.items())):
        yield from size_crops(run, part, max(1, crops // len(groups)), seed + 1000 * i)


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Weights and bias of a ridge regression on standardised features ``x`` (bias not penalised)."""
    ym = float(y.mean())
    a = x.T @ x + alpha * np.eye(x.shape[1])
    return np.linalg.solve(a, x.T @ (y - ym)), ym


def fit_ridge(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray] | None,
              alphas=ALPHAS) -> tuple[np.ndarray, float, np.ndarray, np.ndarray, float, dict]:
    """Standardise, fit a ridge for each alpha on ``train`` and keep the one with the smallest median
    |log error| on ``val`` (``DEFAULT_ALPHA`` without it). Returns weights, bias, mean, std, alpha, errors."""
    xt, yt = train
    mean, std = xt.mean(0), xt.std(0)
    std = np.where(std > 1e-6, std, 1.0)  # a feature that never varies (a dead channel) gets weight ~0
    z = (xt - mean) / std
    errors: dict[str, float] = {}
    best = DEFAULT_ALPHA
    if val is not None and len(val[1]):
        zv = (val[0] - mean) / std
        for alpha in alphas:
            w, b = _ridge(z, yt, alpha)
            errors[f"{alpha:g}"] = float(np.median(np.abs(zv @ w + b - val[1])))
        best = min(alphas, key=lambda a: errors[f"{a:g}"])
    w, b = _ridge(z, yt, best)
    return w, b, mean, std, best, errors


def fit_size_model(run_dir: str | Path, train_samples: list, val_samples: list, crops: int = 256,
                   val_crops: int = 64, seed: int = 0, collection: Callable[[str], str] | None = None) -> SizeModel:
    """Fit the size model of the run in ``run_dir`` (its best weights) on ``train_samples``, choose the ridge
    penalty on ``val_samples`` (the run's validation images; never its test images), and write
    ``run_dir/size_model.json``. ``crops``/``val_crops``: how many rescaled crops in all, shared equally by the
    ``collection`` of each sample name (see :func:`balanced_crops`)."""
    from ..runfolder import load_run

    run = load_run(run_dir)
    if not run.info.get("diameter"):
        raise UnetlabError("the run does not know its training objects' size (model.json 'diameter')",
                           Path(run_dir) / "model.json")
    if not hasattr(run.model, "encoder_features"):
        raise UnetlabError(f"{type(run.model).__name__} has no pooled features (encoder_features) to fit a size model on")
    torch.manual_seed(seed)
    train = [np.array(v) for v in zip(*balanced_crops(run, train_samples, crops, seed, collection))]
    if not train or len(train[1]) < 8:
        raise UnetlabError("too few training images with objects to fit a size model", Path(run_dir))
    val_rows = list(balanced_crops(run, val_samples, val_crops, seed + 1, collection)) if val_samples else []
    val = tuple(np.array(v) for v in zip(*val_rows)) if val_rows else None
    w, b, mean, std, alpha, errors = fit_ridge((train[0], train[1]), val)  # type: ignore[arg-type]
    val_err = errors.get(f"{alpha:g}")
    model = SizeModel(weights=w.tolist(), bias=b, mean=mean.tolist(), std=std.tolist(),
                      train_diameter=float(run.info["diameter"]), alpha=alpha, zoom=STYLE_ZOOM,
                      fit={"train_crops": len(train[1]), "val_crops": len(val_rows), "zoom_range": list(ZOOM_RANGE),
                           "val_median_abs_log_error": val_err, "seed": seed})
    model.save(run_dir)
    log.info("size model fitted on %d crops of %d training images (ridge alpha %g; median |log error| on %d "
             "validation crops %s)", len(train[1]), len(train_samples), alpha, len(val_rows),
             f"{val_err:.3f}" if val_err is not None else "-")
    return model


def fit_size_model_for_run(run_dir: str | Path, data: str | Path | None = None, crops: int = 1024,
                           val_crops: int = 256, seed: int = 0,
                           collection: Callable[[str], str] | None = None) -> SizeModel:
    """Fit (again) the size model of a finished run from its ``split.json``: its training images train, its
    validation images choose the penalty, its test images are not read. ``data`` replaces the dataset folder
    of its config (a pretrained model's config names where its data came from, not a folder here)."""
    from ..config import RunConfig
    from ..data.layouts import load_dataset
    from ..runfolder import own_run_dir, read_json

    if crops < 1 or val_crops < 1:
        raise UnetlabError(f"--crops and --val-crops must be at least 1, not {crops} and {val_crops}")
    run_dir = own_run_dir(run_dir, "fit the size model of")
    split_file = run_dir / "split.json"
    if not split_file.is_file():
        raise UnetlabError("no split.json: the run's training images are not known", run_dir)
    split = read_json(split_file)
    root = Path(data) if data is not None else Path(RunConfig.load(run_dir / "config.yaml").data.root)
    if not root.exists():
        raise UnetlabError(f"dataset folder {root} not found", run_dir / "config.yaml",
                           "give the folder the run was trained on (--data)")
    by_name = {s.name: s for s in load_dataset(root).samples}
    parts = {p: [by_name[n] for n in split.get(p) or [] if n in by_name] for p in ("train", "val")}
    if len(parts["train"]) < len(split.get("train") or []):
        log.warning("%d of the run's training images are not in %s", len(split["train"]) - len(parts["train"]), root)
    return fit_size_model(run_dir, parts["train"], parts["val"], crops, val_crops, seed, collection)


def fit_size_model_after_training(out: Path, cfg, info: dict, train_samples: list, val_samples: list) -> None:
    """The end-of-training step: fit ``size_model.json`` for instance targets whose objects' size is known;
    a failure is a warning (the run keeps predicting with the measuring rule), never a lost run."""
    if not has_object_scores(info) or not info.get("diameter"):
        return
    try:
        fit_size_model(out, train_samples, val_samples, seed=int(cfg.train.seed))
    except (UnetlabError, ValueError, RuntimeError, np.linalg.LinAlgError) as exc:
        log.warning("no size model fitted (--diameter auto measures objects instead): %s", exc)
