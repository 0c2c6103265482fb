"""Segmentation metrics: pixel Dice/IoU, per-class Dice, batch Dice counts for training, and object matching.

Conventions: a ratio whose denominator is zero is 1.0 when prediction and truth are both empty (nothing to find,
nothing found) and 0.0 otherwise. Object matching follows the 2018 Data Science Bowl and StarDist's ``matching``:
objects pair one-to-one when their IoU is at least the threshold; AP = TP / (TP + FP + FN).
"""

from __future__ import annotations

import numpy as np

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
