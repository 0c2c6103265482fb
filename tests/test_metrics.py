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


# --- objects ----------------------------------------------------------------------------------------------------

from pathlib import Path  # noqa: E402

from scipy import ndimage as ndi  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402
from skimage.segmentation import relabel_sequential  # noqa: E402

from unetlab.evaluation.metrics import (  # noqa: E402
    DEFAULT_IOU_THRESHOLDS,
    adapted_rand_error,
    match_objects,
    object_overlaps,
    pool_matches,
)
from unetlab.labels import instance_labels  # noqa: E402

STARDIST = Path(__file__).resolve().parents[1] / "../shared/data/stardist_nuclei"


def square(lab, y, x, size, value):
    lab[y : y + size, x : x + size] = value


def test_match_objects_hand_made_exact_shift_and_false_positive():
    truth = np.zeros((40, 40), np.int32)
    square(truth, 2, 2, 10, 1)
    square(truth, 20, 20, 10, 2)
    pred = np.zeros_like(truth)
    square(pred, 2, 2, 10, 7)  # exact (label values need not agree)
    pred[20:30, 22:32] = 3  # shifted by 2 columns: overlap 80, union 120, IoU 2/3
    square(pred, 2, 30, 5, 9)  # a false positive
    m = match_objects(pred, truth)
    assert m["n_pred"] == 3 and m["n_true"] == 2 and m["count_error"] == 1
    for thr, tp, ap in zip(m["thresholds"], m["tp"], m["ap"]):
        if thr <= 2 / 3:
            assert (tp, ap) == (2, pytest.approx(2 / 3))  # TP 2, FP 1, FN 0
        else:
            assert (tp, ap) == (1, pytest.approx(1 / 4))  # TP 1, FP 2, FN 1
    assert m["ap_mean"] == pytest.approx((4 * 2 / 3 + 6 * 1 / 4) / 10)
    i50 = m["thresholds"].index(0.5)
    assert m["mean_matched_iou"][i50] == pytest.approx((1 + 2 / 3) / 2)
    assert m["pq"][i50] == pytest.approx((1 + 2 / 3) / (2 + 0.5))
    assert m["f1"][i50] == pytest.approx(2 * 2 / (3 + 2))


def test_merged_objects_match_only_once():
    truth = np.zeros((20, 30), np.int32)
    truth[5:15, 5:15] = 1
    truth[5:15, 15:25] = 2
    pred = (truth > 0).astype(np.int32)  # one object covering both: IoU exactly 0.5 with each
    m = match_objects(pred, truth, thresholds=[0.3, 0.5, 0.55])
    assert m["tp"] == [1, 1, 0] and m["fn"] == [1, 1, 2] and m["fp"] == [0, 0, 1]


def test_low_threshold_assignment_prefers_more_matches_then_higher_iou():
    truth = np.zeros((10, 40), np.int32)
    truth[0:10, 0:10] = 1
    truth[0:10, 10:20] = 2
    pred = np.zeros_like(truth)
    pred[0:10, 4:14] = 1  # IoU with t1: 60/140, with t2: 40/160
    pred[0:10, 14:20] = 2  # IoU with t2: 60/100
    m = match_objects(pred, truth, thresholds=[0.2])
    # greedy by IoU would pair p1-t1 and p2-t2 as well; the count-maximising answer is 2 matches
    assert m["tp"] == [2]
    assert m["sum_iou"][0] == pytest.approx(60 / 140 + 60 / 100)
    pred2 = np.zeros_like(truth)
    pred2[0:10, 5:20] = 1  # IoU with t1 50/150, with t2 100/150 -> best single match t2
    m2 = match_objects(pred2, truth, thresholds=[0.25])
    assert m2["tp"] == [1] and m2["sum_iou"][0] == pytest.approx(100 / 150)


def test_empty_images():
    z = np.zeros((8, 8), np.int32)
    one = z.copy()
    one[2:4, 2:4] = 5
    m = match_objects(z, z)
    assert m["ap"] == [1.0] * len(DEFAULT_IOU_THRESHOLDS) and m["ap_mean"] == 1.0
    assert match_objects(z, one)["ap_mean"] == 0.0 and match_objects(one, z)["fp"][0] == 1


def test_relabel_and_instance_labels():
    lab = np.array([[0, 70000, 70000], [5, 0, 2**30]], dtype=np.int64)
    seq = relabel_sequential(lab)[0]
    assert seq.max() == 3 and seq.tolist() == [[0, 2, 2], [1, 0, 3]]
    small = np.array([[3, 0, 9], [3, 0, 0]])
    assert relabel_sequential(small)[0].tolist() == [[1, 0, 2], [1, 0, 0]]
    binary = np.array([[255, 0, 255], [255, 0, 0]], dtype=np.uint8)
    assert instance_labels(binary).max() == 2


def _dense_reference(pred, truth, thr):
    """Dense IoU matrix and StarDist-style optimal assignment, computed independently."""
    p, t = relabel_sequential(pred)[0], relabel_sequential(truth)[0]
    n_p, n_t = int(p.max()), int(t.max())
    iou = np.zeros((n_p, n_t))
    for i in range(1, n_p + 1):
        for j in range(1, n_t + 1):
            a, b = p == i, t == j
            inter = np.count_nonzero(a & b)
            iou[i - 1, j - 1] = inter / np.count_nonzero(a | b) if inter else 0.0
    if n_p == 0 or n_t == 0:
        return 0
    ok = (iou >= thr) & (iou > 0)
    cost = -(ok.astype(float)) - iou * ok / (2 * max(1, min(n_p, n_t)))
    r, c = linear_sum_assignment(cost)
    return int(ok[r, c].sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_matching_agrees_with_dense_reference(seed):
    rng = np.random.default_rng(seed)

    def random_labels():
        lab = np.zeros((48, 48), np.int32)
        for i in range(1, 16):
            y, x = rng.integers(0, 40, 2)
            h, w = rng.integers(3, 12, 2)
            lab[y : y + h, x : x + w] = i
        return lab

    truth = random_labels()
    pred = random_labels()
    pred[truth > 0] = np.where(rng.random(np.count_nonzero(truth)) < 0.5, truth[truth > 0] + 20, pred[truth > 0])
    thresholds = [0.1, 0.3, 0.5, 0.7]
    m = match_objects(pred, truth, thresholds)
    assert m["tp"] == [_dense_reference(pred, truth, t) for t in thresholds]
    ov = object_overlaps(pred, truth)
    assert len(ov["iou"]) > 0 and (ov["iou"] > 0).all() and (ov["iou"] <= 1).all()


def test_pool_matches_sums_counts():
    truth = np.zeros((20, 20), np.int32)
    square(truth, 0, 0, 5, 1)
    square(truth, 10, 10, 5, 2)
    pred = truth.copy()
    pred[truth == 2] = 0
    a = match_objects(truth, truth, [0.5])
    b = match_objects(pred, truth, [0.5])
    pooled = pool_matches([a, b])
    assert pooled["tp"] == [3] and pooled["fn"] == [1] and pooled["fp"] == [0]
    assert pooled["ap"][0] == pytest.approx(3 / 4)
    assert pooled["dsb_score"] == pytest.approx((1.0 + 0.5) / 2)


def test_adapted_rand_error():
    truth = np.zeros((20, 30), np.int32)
    truth[5:15, 2:12] = 1
    truth[5:15, 14:24] = 2
    assert adapted_rand_error(truth, truth) == 0.0
    assert adapted_rand_error(truth > 0, truth) == 0.0  # separated objects: components recover them
    merged = (truth > 0).astype(np.int32)
    merged[5:15, 12:14] = 1  # a bridge joins the two objects
    assert adapted_rand_error(merged, truth) > 0.1
    assert np.isnan(adapted_rand_error(truth, np.zeros_like(truth)))


# --- real data: stardist nuclei ---------------------------------------------------------------------------------


def _adjacent_pairs(lab):
    pairs = set()
    for a, b in ((lab[1:, :], lab[:-1, :]), (lab[:, 1:], lab[:, :-1])):
        m = (a != b) & (a > 0) & (b > 0)
        pairs |= {(min(x, y), max(x, y)) for x, y in zip(a[m].tolist(), b[m].tolist())}
    return sorted(pairs)


def perturb_stardist(truth):
    """Merge 3 pairs of touching nuclei, remove 5 and shift 4 isolated ones by 3 px; return (pred, expected TP
    per threshold computed from the object areas alone)."""
    pred = truth.copy()
    used: set[int] = set()
    merges = []
    for a, b in _adjacent_pairs(truth):
        if a in used or b in used or len(merges) == 3:
            continue
        merges.append((a, b))
        used |= {a, b}
        pred[truth == b] = a
    ids = [i for i in np.unique(truth) if i and i not in used]
    removed = ids[:5]
    used |= set(removed)
    for i in removed:
        pred[truth == i] = 0
    shifted = []
    for i in ids[5:]:
        obj = truth == i
        ring = ndi.binary_dilation(obj, iterations=5) & ~obj
        ys, xs = np.nonzero(obj)
        if truth[ring].any() or ys.min() < 5 or xs.max() > truth.shape[1] - 6:
            continue
        shifted.append(i)
        used.add(i)
        pred[obj] = 0
        pred[ys, xs + 3] = i
        if len(shifted) == 4:
            break
    assert len(merges) == 3 and len(shifted) == 4

    def expected_tp(thr):
        n_unchanged = len(np.unique(truth)) - 1 - 2 * len(merges) - len(removed) - len(shifted)
        tp = n_unchanged
        for a, b in merges:
            na, nb = np.count_nonzero(truth == a), np.count_nonzero(truth == b)
            tp += max(na, nb) / (na + nb) >= thr  # the merged object can match the larger part only
        for i in shifted:
            obj = truth == i
            inter = np.count_nonzero(obj[:, 3:] & obj[:, :-3])  # overlap of the object with itself moved 3 px
            tp += inter / (2 * np.count_nonzero(obj) - inter) >= thr
        return int(tp)

    n_pred = len(np.unique(truth)) - 1 - len(merges) - len(removed)
    return pred, expected_tp, n_pred


@pytest.mark.realdata
@pytest.mark.skipif(not STARDIST.is_dir(), reason="../shared/data/stardist_nuclei not available")
def test_stardist_self_and_perturbed():
    from unetlab.data.io import read_label

    truth = read_label(STARDIST / "masks" / "img2d.tif")
    m = match_objects(truth, truth)
    assert m["ap"] == [1.0] * 10 and m["n_true"] == 125
    pred, expected_tp, n_pred = perturb_stardist(truth)
    m = match_objects(pred, truth)
    assert m["n_pred"] == n_pred
    exp = [expected_tp(t) for t in m["thresholds"]]
    assert m["tp"] == exp
    assert m["fp"] == [n_pred - e for e in exp] and m["fn"] == [125 - e for e in exp]
    assert m["ap"] == pytest.approx([e / (n_pred + 125 - e) for e in exp])
    assert exp[0] > exp[-1]  # the shifted nuclei stop matching at high thresholds
