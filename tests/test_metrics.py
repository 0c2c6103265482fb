"""Pixel metrics, per-class Dice, batch Dice counts and object matching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unetlab.evaluation.metrics import (
    batch_dice_counts,
    dice_from_counts,
    dice_per_class,
    pixel_metrics,
)


def test_pixel_metrics_hand_counts():
    truth = np.zeros((4, 5), bool)
    truth[0, :4] = True  # 4 pixels
    pred = np.zeros((4, 5), bool)
    pred[0, 2:5] = True  # 3 pixels, 2 overlap
    m = pixel_metrics(pred, truth)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 2, 15)
    assert m["dice"] == pytest.approx(2 * 2 / (3 + 4))
    assert m["iou"] == pytest.approx(2 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["accuracy"] == pytest.approx(17 / 20)


def test_pixel_metrics_empty_cases():
    z = np.zeros((3, 3), bool)
    one = z.copy()
    one[1, 1] = True
    both_empty = pixel_metrics(z, z)
    assert all(both_empty[k] == 1.0 for k in ("dice", "iou", "precision", "recall", "accuracy"))
    missed = pixel_metrics(z, one)
    assert missed["dice"] == 0.0 and missed["recall"] == 0.0 and missed["precision"] == 0.0
    assert missed["accuracy"] == pytest.approx(8 / 9)
    with pytest.raises(ValueError):
        pixel_metrics(z, np.zeros((2, 2), bool))


def test_dice_per_class():
    truth = np.array([[0, 0, 1, 1], [2, 2, 2, 0]])
    pred = np.array([[0, 1, 1, 1], [2, 2, 0, 0]])
    d = dice_per_class(pred, truth, 4)
    # class 0: truth 3 px, pred 3 px, overlap 2 ; class 1: truth 2, pred 3, overlap 2 ; class 2: 3 vs 2, overlap 2
    assert d[0] == pytest.approx(4 / 6)
    assert d[1] == pytest.approx(4 / 5)
    assert d[2] == pytest.approx(4 / 5)
    assert d[3] == 1.0  # absent from both


def test_batch_dice_counts_binary_with_ignore():
    logits = torch.full((2, 1, 2, 3), -5.0)
    target = torch.zeros((2, 1, 2, 3))
    logits[0, 0, 0, :2] = 5.0  # predicted 2 px in image 0
    target[0, 0, 0, 1:] = 1.0  # truth 2 px, overlap 1
    logits[1, 0, 1, 0] = 5.0  # predicted 1 px in image 1, but ignored
    target[1, 0, 1, 0] = -1
    target[1, 0, 1, 2] = 1.0
    inter, ps, ts = batch_dice_counts(logits, target)
    assert inter.tolist() == [1] and ps.tolist() == [2] and ts.tolist() == [3]
    assert float(dice_from_counts(inter, ps, ts)[0]) == pytest.approx(2 / 5)
    # summing the counts of single images equals the counts of the batch (exact reduction)
    parts = [batch_dice_counts(logits[i : i + 1], target[i : i + 1]) for i in range(2)]
    assert sum(p[0] for p in parts).item() == inter.item() and sum(p[1] for p in parts).item() == ps.item()


def test_batch_dice_counts_multiclass_matches_numpy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn((3, 4, 8, 8), generator=g)
    target = torch.randint(0, 4, (3, 8, 8), generator=g)
    target[0, 0, :] = -1
    inter, ps, ts = batch_dice_counts(logits, target)
    assert inter.shape == (4,) and inter.dtype == torch.int64
    pred = logits.argmax(1).numpy()
    t = target.numpy()
    valid = t >= 0
    for c in range(4):
        assert ps[c].item() == np.count_nonzero((pred == c) & valid)
        assert ts[c].item() == np.count_nonzero(t == c)
        assert inter[c].item() == np.count_nonzero((pred == c) & (t == c))
    d = dice_from_counts(inter, ps, ts)
    p_valid = np.where(valid, pred, -1)
    assert np.allclose(d.numpy(), dice_per_class(p_valid, np.where(valid, t, -1), 4))


def test_dice_from_counts_empty_is_one():
    d = dice_from_counts(np.array([0, 1]), np.array([0, 1]), np.array([0, 3]))
    assert d.tolist() == [1.0, 0.5]
