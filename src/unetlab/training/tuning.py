"""Tuning instance post-processing on validation images: threshold, min size and marker prominence.

Tuning scores candidate settings with the object metrics of :mod:`unetlab.evaluation`, so it lives in training
(which may use inference and evaluation), not in :mod:`unetlab.inference.postprocess` (which must not).
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import PostprocessConfig, RunConfig
from ..data.channels import apply_channels
from ..data.dataset import SampleCache
from ..data.targets import INSTANCE_KINDS
from ..errors import UnetlabError
from ..evaluation.metrics import match_objects, pixel_counts, pool_matches
from ..inference.postprocess import (
    default_prominence,
    foreground_mask,
    probabilities_to_labels,
    remove_small_objects,
    resolve_markers,
)
from ..inference.rescale import auto_rescales, predict_rescaled, resize_labels
from ..inference.sizemodel import size_estimator
from ..labels import instance_labels
from ..runfolder import checkpoint_path, load_checkpoint
from .validation import predict_prepared_val, predict_val_image, validation_scale

log = logging.getLogger(__name__)

MAX_TUNING_IMAGES = 200  # validation images predicted for tuning after training
# marker prominences tried, as factors of the target's default (distance target: 0.025, 0.05, 0.1). DSB 2018 runs
# choose the top one; a grid up to 6x (0.3) was measured (2026-12-03, benchmarks/README.md): it picks 0.2-0.3 on
# the validation images and raises their scores, but the untouched test images then score lower (AP@0.5 0.801 ->
# 0.771 for the pretrained model of 2026-12-02), so the grid stays where it was. Measured again on the two-lab
# model of 2026-12-05 (benchmarks/bench_prominence.py): its validation and training images prefer 0.15-0.2, the
# tuner with the grid up to 0.2 chose 0.2, and the held-out images lost AP@0.5 again (DSB test 0.814 -> 0.803 with
# --diameter auto, StarDist's image 0.830 -> 0.823): not kept.
PROMINENCE_FACTORS = (0.5, 1.0, 2.0)


def tune_postprocess(
    probs: list[np.ndarray],
    truths: list[np.ndarray],
    kind: str = "binary",
    base: PostprocessConfig | None = None,
    thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7),
    min_sizes: tuple[int, ...] = (0, 10, 25, 50),
    prominence_factors: tuple[float, ...] = PROMINENCE_FACTORS,
    metric: str = "ap_mean",
) -> PostprocessConfig:
    """Grid-search threshold, min_size (and the marker prominence, as factors of the target's default, when
    markers come from distances) on validation predictions against true label images; returns the config with
    the best mean ``metric``
    (``ap_mean``: DSB AP averaged over IoU 0.5..0.95, or ``f1``: F1 at IoU 0.5)."""
    if len(probs) != len(truths) or not probs:
        raise UnetlabError("tune_postprocess needs as many true label images as predictions (at least one)")
    if metric not in ("ap_mean", "f1"):
        raise UnetlabError(f"unknown tuning metric '{metric}' (choose ap_mean or f1)")
    base = base or PostprocessConfig()
    mode = resolve_markers(kind, base.markers)
    prominences = ((base.prominence,) if mode != "distance" else
                   tuple(round(f * default_prominence(kind), 6) for f in prominence_factors))
    truth_labels = [instance_labels(t) for t in truths]
    iou_thr = None if metric == "ap_mean" else (0.5,)
    best: tuple[float, PostprocessConfig] | None = None
    for thr, prom in itertools.product(thresholds, prominences):
        cfg0 = replace(base, threshold=float(thr), prominence=prom, min_size=0)
        raw = [probabilities_to_labels(p, kind, cfg0) for p in probs]
        for ms in min_sizes:
            scores = []
            for lab, truth in zip(raw, truth_labels):
                pred = remove_small_objects(lab, int(ms))
                m = match_objects(pred, truth) if iou_thr is None else match_objects(pred, truth, iou_thr)
                scores.append(m["ap_mean"] if metric == "ap_mean" else m["f1"][0])
            score = float(np.mean(scores))
            log.debug("tune: threshold=%.2f prominence=%s min_size=%d -> %s %.4f", thr, prom, ms, metric, score)
            if best is None or score > best[0] + 1e-12:
                best = (score, replace(cfg0, min_size=int(ms)))
    assert best is not None
    log.debug("tuned post-processing: threshold=%.2f min_size=%d prominence=%s (%s %.4f)",
              best[1].threshold, best[1].min_size, best[1].prominence, metric, best[0])
    return best[1]


def has_object_scores(info: dict, semantic_too: bool = False) -> bool:
    """Whether a run's target separates touching objects (boundary, distance, flow), so that object scores
    (AP, DSB score) and tuned instance post-processing mean something; a binary or multiclass run is semantic
    (``semantic_too``: a binary run counts too, as when ``unetlab tune`` asks for it)."""
    return info.get("task") != "multiclass" and (semantic_too or info.get("target") in INSTANCE_KINDS)


def tune_on_validation(model: nn.Module, out: Path, cfg: RunConfig, info: dict, val_cache: SampleCache,
                       device: torch.device, metric: str = "ap_mean", semantic_too: bool = False,
                       announce: bool = True) -> dict | None:
    """Tune threshold/min size (and marker distance) of instance post-processing on the validation images
    with the run's best weights, and store them in its config.yaml (used by ``predict --instances``).

    Only instance targets are tuned unless ``semantic_too`` (a binary run, when ``unetlab tune`` asks: its
    minimum size only, as its threshold is that of its masks); the
    result is logged once unless not ``announce`` (the caller reports it). Returns the tuned settings with their
    object scores on those images, or None when not tuned."""
    if not has_object_scores(info, semantic_too):
        log.debug("post-processing not tuned: the %s target of this run is semantic", info.get("target"))
        return None
    best = checkpoint_path(out, "best")
    model = copy.deepcopy(model)
    if best.exists():
        model.load_state_dict(load_checkpoint(best)["model"])
    probs, truths = [], []
    for i in range(min(len(val_cache), MAX_TUNING_IMAGES)):
        item = val_cache[i]
        scale = validation_scale(item.labels, cfg, info)  # tuned where predict --diameter post-processes
        prob = predict_val_image(model, item.image, cfg, info, device, val_cache.samples[i].image, scale=scale,
                                 back=False).numpy()
        probs.append(prob)
        truths.append(item.labels if scale == 1.0 else resize_labels(item.labels, prob.shape[-2:]))
    try:
        semantic = info["target"] not in INSTANCE_KINDS  # a binary run's threshold is its masks': it stays
        pp = tune_postprocess(probs, truths, info["target"], base=cfg.postprocess, metric=metric,
                              **({"thresholds": (cfg.postprocess.threshold,)} if semantic else {}))
    except Exception as exc:  # tuning is a convenience: never lose a finished run over it
        log.warning("post-processing was not tuned: %s", exc)
        return None
    cfg.postprocess = pp
    cfg.save(out / "config.yaml")
    pooled = pool_matches([match_objects(probabilities_to_labels(p, info["target"], pp), instance_labels(t))
                           for p, t in zip(probs, truths)])
    scores = {"ap50": pooled["ap"][0], "ap_mean": pooled["ap_mean_pooled"], "dsb_score": pooled["dsb_score"],
              "n_images": len(probs)}
    log.log(logging.INFO if announce else logging.DEBUG,
            "post-processing tuned on %d validation images: threshold %.2f, min size %d%s; pooled object AP@0.5 "
            "%.3f, pooled mean AP@0.5:0.95 %.3f; DSB score (mean over images) %.3f", len(probs), pp.threshold,
            pp.min_size, "" if pp.prominence is None else f", prominence {pp.prominence}", scores["ap50"],
            scores["ap_mean"], scores["dsb_score"])
    return {**asdict(pp), "validation_objects": scores}


def _test_prediction(model: nn.Module, image: np.ndarray, cfg: RunConfig, info: dict, device: torch.device,
                     source, estimate=None) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and instance labels of one test image as ``predict --instances`` makes them with its default
    ``--diameter auto`` (:func:`auto_rescales`; the test labels choose nothing), or at the image's own size."""
    pp, kind = cfg.postprocess, info["target"]

    def predict(x: np.ndarray) -> np.ndarray:
        return predict_prepared_val(model, x, cfg, info, device).numpy()

    def to_labels(p: np.ndarray) -> np.ndarray:
        return probabilities_to_labels(p, kind, pp)

    if not auto_rescales(info, cfg.data.size_normalize, want_labels=True):
        prob = predict_val_image(model, image, cfg, info, device, source).numpy()
        return prob, to_labels(prob)
    x = apply_channels(image, cfg.data, None, source=source)
    prob, labels, _choice = predict_rescaled(predict, x, float(info["diameter"]), "auto", to_labels=to_labels,
                                             foreground=lambda p: foreground_mask(p, kind, pp.threshold),
                                             estimate=estimate)
    return prob, labels


def score_test_split(model: nn.Module, out: Path, cfg: RunConfig, info: dict, samples: list,
                     device: torch.device, semantic_too: bool = False) -> dict | None:
    """Score the run's best weights once on the held-out test images (never used for training, checkpoint choice
    or tuning): pixel Dice pooled over the images, and for instance targets (or, ``semantic_too``, a binary
    one) the object scores with the tuned post-processing (AP@0.5, mean AP@0.5:0.95, DSB score). None when
    the run has no test split or ``train.score_test`` is off (the test images then stay unseen)."""
    if not samples:
        return None
    if not cfg.train.score_test:
        log.info("test split: %d image(s) held out, not scored (--score-test false)", len(samples))
        return None
    best = checkpoint_path(out, "best")
    model = copy.deepcopy(model)
    if best.exists():
        model.load_state_dict(load_checkpoint(best)["model"])
    cache = SampleCache(samples, replace(cfg.data, cache=False))
    tp = fp = fn = 0
    matches = []
    multiclass = info["task"] == "multiclass"
    objects = has_object_scores(info, semantic_too)
    estimate = size_estimator(model, out)  # the run's size_model.json, as predict --diameter auto uses it
    for i in range(len(cache)):
        item = cache[i]
        if multiclass:
            prob = predict_val_image(model, item.image, cfg, info, device, samples[i].image).numpy()
            pred, truth = prob.argmax(0) > 0, item.labels > 0
        else:
            prob, labels = _test_prediction(model, item.image, cfg, info, device, samples[i].image, estimate)
            pred, truth = foreground_mask(prob, info["target"], cfg.postprocess.threshold), item.labels > 0
            if objects:
                matches.append(match_objects(labels, instance_labels(item.labels)))
        c = pixel_counts(pred, truth)
        tp, fp, fn = tp + c["tp"], fp + c["fp"], fn + c["fn"]
    diameter = "auto" if not multiclass and auto_rescales(info, cfg.data.size_normalize, True) else "none"
    scores: dict = {"n_images": len(cache), "dice": 2 * tp / max(2 * tp + fp + fn, 1), "diameter": diameter}
    if matches:
        pooled = pool_matches(matches)
        scores.update(ap50=pooled["ap"][0], ap_mean=pooled["ap_mean_pooled"], dsb_score=pooled["dsb_score"],
                      n_objects=int(sum(m["n_true"] for m in matches)))
    log.info("test split (%d images, untouched by training and tuning; --diameter %s as predict): pooled Dice "
             "%.4f%s", len(cache), diameter, scores["dice"], f", object AP@0.5 {scores['ap50']:.3f}, DSB score "
             f"{scores['dsb_score']:.3f}" if matches else "")
    return scores


def retune_run(run_dir: str | Path, data: str | Path | None = None, device: str = "auto",
               metric: str = "ap_mean") -> dict:
    """Tune a finished run's instance post-processing again on its validation images (from ``split.json``),
    then score its untouched test images once more; ``data`` replaces the dataset folder of its config and
    ``metric`` is what tuning maximises (see :func:`tune_postprocess`).

    Writes the tuned settings into ``config.yaml`` and, when the run has one, ``summary.json`` (``postprocess``,
    ``test``); returns ``{"postprocess": ..., "test": ...}``."""
    from .._runtime import resolve_device
    from ..data.layouts import load_from_config
    from ..runfolder import load_run, own_run_dir, read_json, write_json

    run_dir = own_run_dir(run_dir, "tune")
    run = load_run(run_dir)
    cfg, info = run.config, run.info
    if info.get("task") == "multiclass":
        raise UnetlabError("a multiclass run has no instance post-processing to tune", run_dir)
    split_file = run_dir / "split.json"
    if not split_file.exists():
        raise UnetlabError("no split.json: the validation images are not known", run_dir)
    split = read_json(split_file)
    data_cfg = replace(cfg.data, root=str(data) if data is not None else cfg.data.root, include=None)
    if not Path(data_cfg.root).exists():
        raise UnetlabError(f"dataset folder {data_cfg.root} not found", run_dir / "config.yaml",
                           "give the folder the run was trained on with --data")
    by_name = {s.name: s for s in load_from_config(data_cfg).samples}
    chosen = {}
    for part in ("val", "test"):
        names = list(split.get(part) or [])
        missing = [n for n in names if n not in by_name]
        if missing:
            raise UnetlabError(f"{len(missing)} {part} image(s) of split.json are not in {data_cfg.root} "
                               f"(e.g. {missing[0]})", split_file)
        chosen[part] = [by_name[n] for n in names]
    if not chosen["val"]:
        raise UnetlabError("split.json lists no validation images to tune on", split_file)
    dev = resolve_device(device)
    run.model.to(dev)
    tune_cfg = replace(cfg, data=data_cfg)
    tuned = tune_on_validation(run.model, run_dir, tune_cfg, info, SampleCache(chosen["val"], data_cfg), dev,
                               metric=metric, semantic_too=True, announce=False)  # the caller prints it
    if tuned is None:
        raise UnetlabError("post-processing could not be tuned (see the warning above)", run_dir)
    cfg.postprocess = tune_cfg.postprocess
    cfg.save(run_dir / "config.yaml")  # with the run's own dataset folder, not the one given here
    test = score_test_split(run.model, run_dir, tune_cfg, info, chosen["test"], dev, semantic_too=True)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = read_json(summary_path)
        summary.update(postprocess=tuned, test=test)
        write_json(summary_path, summary)
    return {"postprocess": tuned, "test": test}


__all__ = ["PROMINENCE_FACTORS", "has_object_scores", "retune_run", "score_test_split", "tune_on_validation", "tune_postprocess"]
