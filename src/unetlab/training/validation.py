"""Validation during training: whole images through the tiled predictor, Dice and IoU reduced over ranks."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .. import distributed as D
from .._runtime import use_channels_last
from ..config import RunConfig
from ..data.channels import apply_channels
from ..data.dataset import SampleCache
from ..data.sizes import median_diameter, size_factor
from ..evaluation.metrics import batch_dice_counts, dice_from_counts
from ..inference.options import PredictOptions
from ..inference.predictor import make_predict_fn
from ..inference.rescale import resize_image, scaled_shape
from ..inference.tiling import model_tiling, tile_predict
from ..runfolder import activation_for

log = logging.getLogger(__name__)


def foreground_counts(prob: torch.Tensor, labels: np.ndarray, info: dict) -> tuple[torch.Tensor, ...]:
    """(intersection, pred_sum, truth_sum) per evaluated class of one whole-image prediction."""
    from ..data.targets import make_target

    if info["task"] == "multiclass":
        logits = prob[None]
        target = torch.from_numpy(labels.astype(np.int64))[None]
        i, p, t = batch_dice_counts(logits, target)
        return i[1:], p[1:], t[1:]  # background excluded
    fg_prob = prob[1:].sum(0) if info["target"] == "boundary" else prob[0]
    target = torch.from_numpy(make_target(labels, "binary").astype(np.float32))
    logit = torch.logit(fg_prob.clamp(1e-6, 1 - 1e-6))
    return batch_dice_counts(logit[None, None], target[None, None])


def _val_predict_fn(model: nn.Module, cfg: RunConfig, info: dict, device: torch.device) -> Callable:
    """The batch predictor validation uses: the task's activation, the run's precision and memory format."""
    return make_predict_fn(model, activation_for(info["task"], info["target"]), device,
                           precision=cfg.train.precision,
                           channels_last=use_channels_last(cfg.train.channels_last, device, training=False))


def validation_scale(labels: np.ndarray, cfg: RunConfig, info: dict) -> float:
    """The zoom a validation image is predicted at: with ``size_normalize``, the one that brings its true objects
    to the training diameter (as the training images were drawn), else 1."""
    if not cfg.data.size_normalize or info["task"] == "multiclass":
        return 1.0
    return size_factor(median_diameter([labels]), info.get("diameter"))


def predict_val_image(model: nn.Module, image: np.ndarray, cfg: RunConfig, info: dict, device: torch.device,
                      source, predict: Callable | None = None, scale: float = 1.0,
                      back: bool = True) -> torch.Tensor:
    """Probabilities (K, H, W) on CPU of one normalised validation image with the tiled predictor, predicted
    zoomed by ``scale`` and (``back``) resized back to the image's own size."""
    image = apply_channels(image, cfg.data, None, source=source)
    shape = tuple(image.shape[-2:])
    if scale != 1.0:
        image = resize_image(image, scaled_shape(shape, scale))
    prob = predict_prepared_val(model, image, cfg, info, device, predict)
    if scale != 1.0 and back:
        prob = torch.from_numpy(resize_image(prob.numpy(), shape))
    return prob


def predict_prepared_val(model: nn.Module, image: np.ndarray, cfg: RunConfig, info: dict, device: torch.device,
                         predict: Callable | None = None) -> torch.Tensor:
    """Probabilities (K, H, W) on CPU of an image whose channels are already those the network takes."""
    model.eval()
    if predict is None:
        predict = _val_predict_fn(model, cfg, info, device)
    o = PredictOptions()  # tiled exactly as `unetlab predict` tiles by default, so a model has one score
    return tile_predict(predict, image, info["out_channels"], batch_size=o.batch_size, device=device,
                        **model_tiling(model, o.tile, o.overlap)).cpu()


def validate(
    model: nn.Module, cache: SampleCache, indices: list[int], cfg: RunConfig, info: dict, device: torch.device,
    dist_info: D.DistInfo,
) -> dict:
    """Whole-image validation with the tiled predictor: Dice and IoU reduced exactly over images and ranks."""
    model.eval()
    predict = _val_predict_fn(model, cfg, info, device)
    n = info["out_channels"] - 1 if info["task"] == "multiclass" else 1
    counts = torch.zeros(3, n, dtype=torch.float64)
    truth_fg = torch.zeros(2, dtype=torch.float64)  # (truth pixels, all pixels) for the all-foreground Dice
    for i in indices:
        item = cache[i]
        prob = predict_val_image(model, item.image, cfg, info, device, cache.samples[i].image, predict,
                                 scale=validation_scale(item.labels, cfg, info))
        c = foreground_counts(prob, item.labels, info)
        counts += torch.stack([x.double().reshape(-1) for x in c])
        truth_fg += torch.tensor([float((item.labels > 0).sum()), float(item.labels.size)], dtype=torch.float64)
    counts = D.all_reduce_sum(counts, dist_info)
    truth_fg = D.all_reduce_sum(truth_fg, dist_info)
    inter, psum, tsum = counts
    dice = dice_from_counts(inter, psum, tsum)
    iou = torch.where(psum + tsum - inter > 0, inter / (psum + tsum - inter).clamp_min(1), torch.ones_like(inter))
    out = {"val_dice": float(dice.mean()), "val_iou": float(iou.mean())}
    if info["task"] == "multiclass":
        for name, d in zip(info["classes"][1:], dice.tolist()):
            out[f"val_dice_{name}"] = float(d)
    t, total = truth_fg.tolist()
    out["all_foreground_dice"] = 2 * t / (total + t) if total else 0.0
    out["baseline_dice"] = constant_prediction_dice(tsum.tolist(), total)
    return out


def constant_prediction_dice(truth_sums: list[float], total: float) -> float:
    """The best val Dice a model that learnt nothing gets: every pixel one class (all foreground, all background
    or, multiclass, all one class), the mean Dice over the evaluated classes of ``truth_sums`` pixels each."""
    if not total or not truth_sums:
        return 0.0
    best = 0.0
    for c in range(-1, len(truth_sums)):  # -1: every pixel background
        d = [2 * t / (total + t) if j == c else (0.0 if t else 1.0) for j, t in enumerate(truth_sums)]
        best = max(best, sum(d) / len(d))
    return best


__all__ = ["constant_prediction_dice", "foreground_counts", "predict_prepared_val", "predict_val_image", "validate", "validation_scale"]
