"""Segmentation metrics: pixel Dice/IoU, per-class Dice, batch Dice counts for training, and object matching.

Conventions: a ratio whose denominator is zero is 1.0 when prediction and truth are both empty (nothing to find,
nothing found) and 0.0 otherwise. Object matching follows the 2018 Data Science Bowl and StarDist's ``matching``:
objects pair one-to-one when their IoU is at least the threshold; AP = TP / (TP + FP + FN).
"""

from __future__ import annotations

import numpy as np

from ..labels import instance_labels

DEFAULT_IOU_THRESHOLDS: tuple[float, ...] = tuple(np.round(np.arange(0.5, 1.0, 0.05), 2).tolist())


def _ratio(num: float, den: float, both_empty: bool) -> float:
    if den == 0:
        return 1.0 if both_empty else 0.0
    return float(num) / float(den)


# --- pixel metrics ------------------------------------------------------------------------------------------


def pixel_counts(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> dict[str, int]:
    """True/false positive/negative pixel counts of two boolean masks (optionally only where ``valid``)."""
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from truth shape {t.shape}")
    if valid is not None:
        v = np.asarray(valid, dtype=bool)
        p, t = p[v], t[v]
    n = int(p.size)
    tp = int(np.count_nonzero(p & t))
    ps = int(np.count_nonzero(p))
    ts = int(np.count_nonzero(t))
    fp, fn = ps - tp, ts - tp
    return {"tp": tp, "fp": fp, "fn": fn, "tn": n - tp - fp - fn}


def metrics_from_counts(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """Dice, IoU, precision, recall and accuracy from pixel counts (empty-vs-empty gives 1.0)."""
    empty = tp + fp + fn == 0
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, empty),
        "iou": _ratio(tp, tp + fp + fn, empty),
        "precision": _ratio(tp, tp + fp, empty),
        "recall": _ratio(tp, tp + fn, empty),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn, True),
    }


def pixel_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice, IoU, precision, recall, accuracy of a boolean prediction against a boolean truth (plus the counts)."""
    counts = pixel_counts(pred, truth)
    out: dict = metrics_from_counts(**counts)
    out.update(counts)
    return out


def confusion_matrix(pred_idx: np.ndarray, truth_idx: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) pixel confusion matrix, rows = truth class, columns = predicted class; values outside 0..K-1 ignored."""
    p = np.asarray(pred_idx).ravel().astype(np.int64)
    t = np.asarray(truth_idx).ravel().astype(np.int64)
    if p.shape != t.shape:
        raise ValueError(f"prediction size {p.size} differs from truth size {t.size}")
    ok = (p >= 0) & (p < num_classes) & (t >= 0) & (t < num_classes)
    cm = np.bincount(t[ok] * num_classes + p[ok], minlength=num_classes * num_classes)
    return cm.reshape(num_classes, num_classes)


def dice_per_class(pred_idx: np.ndarray, truth_idx: np.ndarray, num_classes: int) -> list[float]:
    """Dice of each class index 0..K-1 of two class-index images (a class absent from both gets 1.0)."""
    cm = confusion_matrix(pred_idx, truth_idx, num_classes)
    inter = np.diag(cm)
    psum, tsum = cm.sum(axis=0), cm.sum(axis=1)
    return [_ratio(2 * inter[k], psum[k] + tsum[k], psum[k] + tsum[k] == 0) for k in range(num_classes)]


def dice_from_counts(intersection, pred_sum, truth_sum):
    """Dice from (possibly reduced) counts: numpy arrays or torch tensors; 1.0 where both sums are zero."""
    den = pred_sum + truth_sum
    if hasattr(den, "clamp"):  # torch
        d = (2 * intersection).double() / den.double().clamp(min=1)
        return d.masked_fill(den == 0, 1.0)
    den = np.asarray(den, dtype=np.float64)
    d = 2 * np.asarray(intersection, dtype=np.float64) / np.maximum(den, 1)
    return np.where(den == 0, 1.0, d)


def batch_dice_counts(logits, target, threshold: float = 0.5):
    """Summed (intersection, pred_sum, truth_sum) int64 tensors over a batch, for exact Dice across images/ranks.

    Binary: ``logits`` (N, 1, H, W), ``target`` (N, 1, H, W) or (N, H, W) in {0, 1}; pixels with target < 0 are
    ignored; the prediction is sigmoid(logits) > ``threshold``; each tensor has shape (1,).
    Multiclass: ``logits`` (N, K, H, W), ``target`` (N, H, W) long class indices (< 0 ignored); the prediction is
    the argmax; each tensor has shape (K,) with the counts of class k.
    Reduce the three tensors (sum over batches, ``all_reduce`` across ranks), then call :func:`dice_from_counts`.
    """
    import torch

    with torch.no_grad():
        k = logits.shape[1]
        if k == 1:
            t = target if target.dim() == logits.dim() else target.unsqueeze(1)
            t = t.to(logits.device)
            valid = t >= 0
            thr = float(np.log(threshold / (1.0 - threshold))) if 0.0 < threshold < 1.0 else 0.0
            pred = (logits > thr) & valid
            truth = (t > 0.5) & valid
            inter = (pred & truth).sum().reshape(1)
            return inter, pred.sum().reshape(1), truth.sum().reshape(1)
        t = target.to(logits.device)
        if t.dim() == logits.dim():  # (N, 1, H, W) class indices
            t = t[:, 0]
        t = t.long()
        valid = t >= 0
        pred = logits.argmax(dim=1)
        inter = torch.zeros(k, dtype=torch.int64, device=logits.device)
        psum = torch.zeros_like(inter)
        tsum = torch.zeros_like(inter)
        for c in range(k):
            pc = (pred == c) & valid
            tc = t == c
            inter[c] = (pc & tc).sum()
            psum[c] = pc.sum()
            tsum[c] = tc.sum()
        return inter, psum, tsum


# --- objects ------------------------------------------------------------------------------------------------


def object_overlaps(pred: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray | int]:
    """Sparse overlaps of two label images (relabelled 1..n): pixel counts of every (pred, truth) pair that meets.

    Returns ``pred_idx``, ``true_idx`` (0-based object indices), ``intersection``, ``iou`` for each touching pair,
    the object ``pred_area`` / ``true_area`` arrays and the counts ``n_pred`` / ``n_true``.
    """
    from skimage.segmentation import relabel_sequential

    p = relabel_sequential(np.asarray(pred))[0].astype(np.intp, copy=False)
    t = relabel_sequential(np.asarray(truth))[0].astype(np.intp, copy=False)
    n_p, n_t = int(p.max(initial=0)), int(t.max(initial=0))
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from truth shape {t.shape}")
    pa = np.bincount(p.ravel(), minlength=n_p + 1)[1:]
    ta = np.bincount(t.ravel(), minlength=n_t + 1)[1:]
    both = (p > 0) & (t > 0)
    keys = p[both].astype(np.int64) * (n_t + 1) + t[both]
    if (n_p + 1) * (n_t + 1) <= 1_000_000:
        counts = np.bincount(keys, minlength=(n_p + 1) * (n_t + 1))
        uk = np.flatnonzero(counts)
        cnt = counts[uk]
    else:
        uk, cnt = np.unique(keys, return_counts=True)
    pi, ti = uk // (n_t + 1) - 1, uk % (n_t + 1) - 1
    iou = cnt / (pa[pi] + ta[ti] - cnt)
    return {
        "pred_idx": pi.astype(np.int64),
        "true_idx": ti.astype(np.int64),
        "intersection": cnt.astype(np.int64),
        "iou": iou.astype(np.float64),
        "pred_area": pa,
        "true_area": ta,
        "n_pred": n_p,
        "n_true": n_t,
    }


def match_pairs(pred_idx: np.ndarray, true_idx: np.ndarray, iou: np.ndarray, threshold: float) -> np.ndarray:
    """Indices (into the pair arrays) of a one-to-one matching with IoU >= ``threshold``.

    Maximises the number of matches, then their total IoU (as StarDist's optimal ``matching``); above 0.5 the
    candidates are already one-to-one and no assignment is solved.
    """
    cand = np.flatnonzero((iou >= threshold) & (iou > 0))
    if len(cand) == 0:
        return cand
    pc, tc = pred_idx[cand], true_idx[cand]
    dup_p = np.bincount(pc)[pc] > 1
    dup_t = np.bincount(tc)[tc] > 1
    conflict = dup_p | dup_t
    if not conflict.any():
        return cand
    from scipy.optimize import linear_sum_assignment

    # pairs touching a conflicting object go to the assignment (with all their candidate pairs)
    bad_p = np.unique(pc[conflict])
    bad_t = np.unique(tc[conflict])
    involved = np.isin(pc, bad_p) | np.isin(tc, bad_t)
    keep = cand[~involved]
    sub = cand[involved]
    rows, r_inv = np.unique(pred_idx[sub], return_inverse=True)
    cols, c_inv = np.unique(true_idx[sub], return_inverse=True)
    n_match = max(1, min(len(rows), len(cols)))
    cost = np.full((len(rows), len(cols)), 0.0)
    cost[r_inv, c_inv] = -1.0 - iou[sub] / (2 * n_match)
    r, c = linear_sum_assignment(cost)
    chosen = cost[r, c] < 0
    lookup = {(a, b): s for a, b, s in zip(r_inv, c_inv, sub)}
    picked = np.array([lookup[(a, b)] for a, b in zip(r[chosen], c[chosen])], dtype=np.int64)
    return np.sort(np.concatenate([keep, picked]))


def scores_from_counts(tp: int, fp: int, fn: int, sum_iou: float) -> dict[str, float]:
    """Object precision, recall, F1, DSB AP = TP/(TP+FP+FN), mean matched IoU and panoptic quality."""
    empty = tp + fp + fn == 0
    return {
        "precision": _ratio(tp, tp + fp, empty),
        "recall": _ratio(tp, tp + fn, empty),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, empty),
        "ap": _ratio(tp, tp + fp + fn, empty),
        "mean_matched_iou": _ratio(sum_iou, tp, empty),
        "pq": _ratio(sum_iou, tp + 0.5 * fp + 0.5 * fn, empty),
    }


def match_objects(
    pred: np.ndarray, truth: np.ndarray, thresholds=DEFAULT_IOU_THRESHOLDS
) -> dict[str, object]:
    """Match predicted and true objects of two label images at each IoU threshold.

    Returns ``n_pred``, ``n_true``, ``count_error`` (n_pred - n_true), ``thresholds`` and, per threshold, lists
    ``tp``, ``fp``, ``fn``, ``sum_iou``, ``precision``, ``recall``, ``f1``, ``ap``, ``mean_matched_iou``, ``pq``;
    plus ``ap_mean`` (the image's DSB 2018 score: AP averaged over the thresholds).
    """
    ov = object_overlaps(pred, truth)
    thresholds = [float(t) for t in np.atleast_1d(thresholds)]
    n_p, n_t = int(ov["n_pred"]), int(ov["n_true"])
    out: dict[str, object] = {"n_pred": n_p, "n_true": n_t, "count_error": n_p - n_t, "thresholds": thresholds}
    keys = ("tp", "fp", "fn", "sum_iou", "precision", "recall", "f1", "ap", "mean_matched_iou", "pq")
    lists: dict[str, list] = {k: [] for k in keys}
    for thr in thresholds:
        sel = match_pairs(ov["pred_idx"], ov["true_idx"], ov["iou"], thr)
        tp = len(sel)
        s_iou = float(ov["iou"][sel].sum())
        row = {"tp": tp, "fp": n_p - tp, "fn": n_t - tp, "sum_iou": s_iou}
        row.update(scores_from_counts(tp, n_p - tp, n_t - tp, s_iou))
        for k in keys:
            lists[k].append(row[k])
    out.update(lists)
    out["ap_mean"] = float(np.mean(lists["ap"])) if thresholds else float("nan")
    return out


def pool_matches(results: list[dict]) -> dict[str, object]:
    """Combine per-image :func:`match_objects` results: summed TP/FP/FN per threshold and the scores of the sums.

    ``dsb_score`` is the mean over images of each image's ``ap_mean`` (the DSB 2018 leaderboard score).
    """
    if not results:
        return {}
    thresholds = results[0]["thresholds"]
    out: dict[str, object] = {"thresholds": thresholds, "n_images": len(results)}
    for k in ("n_pred", "n_true"):
        out[k] = int(sum(r[k] for r in results))
    out["count_error"] = out["n_pred"] - out["n_true"]
    out["mean_abs_count_error"] = float(np.mean([abs(r["count_error"]) for r in results]))
    score_keys = ("precision", "recall", "f1", "ap", "mean_matched_iou", "pq")
    lists: dict[str, list] = {k: [] for k in ("tp", "fp", "fn", "sum_iou", *score_keys)}
    for i in range(len(thresholds)):
        tp = int(sum(r["tp"][i] for r in results))
        fp = int(sum(r["fp"][i] for r in results))
        fn = int(sum(r["fn"][i] for r in results))
        s = float(sum(r["sum_iou"][i] for r in results))
        sc = scores_from_counts(tp, fp, fn, s)
        for k, v in (("tp", tp), ("fp", fp), ("fn", fn), ("sum_iou", s), *sc.items()):
            lists[k].append(v)
    out.update(lists)
    out["dsb_score"] = float(np.mean([r["ap_mean"] for r in results]))
    out["ap_mean_pooled"] = float(np.mean(lists["ap"])) if thresholds else float("nan")
    return out


def adapted_rand_error(pred: np.ndarray, truth: np.ndarray) -> float:
    """ISBI 2012 adapted Rand error (1 - Rand F-score) of two segmentations; binary masks get connected components.

    Truth background (0) is ignored, as in ``skimage.metrics.adapted_rand_error``; NaN when the truth is empty.
    """
    from skimage.metrics import adapted_rand_error as _are

    t = instance_labels(truth)
    if not t.any():
        return float("nan")
    p = instance_labels(pred)
    err, _prec, _rec = _are(t, p)
    return float(err)
