"""Targets that separate touching cells, and post-processing from probabilities to instance labels."""

from __future__ import annotations

import numpy as np
import pytest

from unetlab.config import PostprocessConfig
from unetlab.data.targets import make_target, target_channels
from unetlab.errors import UnetlabError
from unetlab.evaluation.metrics import match_objects
from unetlab.inference.postprocess import (
    distance_markers,
    foreground_mask,
    probabilities_to_classes,
    probabilities_to_labels,
)
from unetlab.training.tuning import tune_postprocess


def disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def touching_pair(shape=(40, 60)):
    """Two discs of radius 9 whose centres are 16 px apart: they overlap; the second is drawn under the first."""
    lab = np.zeros(shape, np.int32)
    lab[disc(shape, 20, 20, 9)] = 1
    lab[disc(shape, 20, 36, 9) & (lab == 0)] = 2
    return lab


def one_hot(target, k):
    return np.stack([(target == i).astype(np.float32) for i in range(k)])


# --- targets --------------------------------------------------------------------------------------------------


def test_target_channels():
    assert [target_channels(k) for k in ("binary", "boundary", "distance")] == [1, 3, 2]
    with pytest.raises(UnetlabError):
        target_channels("blobs")


def test_boundary_target_separates_touching_objects():
    lab = touching_pair()
    t = make_target(lab, "boundary")
    assert set(np.unique(t)) == {0, 1, 2}
    # every pixel of object 1 next to object 2 is boundary, and so is its neighbour across the contact
    contact = (lab[:, :-1] == 1) & (lab[:, 1:] == 2)
    ys, xs = np.nonzero(contact)
    assert len(ys) > 0
    assert (t[ys, xs] == 2).all() and (t[ys, xs + 1] == 2).all()
    # the interiors are two separate components
    from scipy import ndimage as ndi

    assert ndi.label(t == 1)[1] == 2
    # a binary mask of the same pair cannot be separated, but its outline is marked
    tb = make_target((lab > 0).astype(np.uint8), "boundary")
    assert ndi.label(tb == 1)[1] == 1 and (tb[lab == 0] == 0).all()


def test_distance_target_per_object_normalised():
    lab = touching_pair()
    d = make_target(lab, "distance")
    assert d.dtype == np.float32
    assert (d[lab == 0] == 0).all() and (d[lab > 0] > 0).all()
    for i in (1, 2):
        assert d[lab == i].max() == pytest.approx(1.0)
    # pixels at the contact are near the object's edge, so low
    assert d[20, 28] < 0.3
    b = make_target(lab, "binary")
    assert b.dtype == np.uint8 and set(np.unique(b)) == {0, 1}


# --- post-processing ------------------------------------------------------------------------------------------


def test_binary_connected_components_fill_holes_and_min_size():
    shape = (50, 50)
    prob = np.zeros(shape, np.float32)
    ring = disc(shape, 15, 15, 8) & ~disc(shape, 15, 15, 3)
    prob[ring] = 0.9
    prob[disc(shape, 38, 38, 6)] = 0.8
    prob[2:4, 45:47] = 0.95  # 4-pixel speck
    lab = probabilities_to_labels(prob, "binary", PostprocessConfig(min_size=10, fill_holes=True))
    assert lab.dtype == np.int32 and lab.max() == 2
    assert lab[15, 15] > 0  # the hole is filled
    assert lab[2, 45] == 0  # the speck is removed
    lab2 = probabilities_to_labels(prob, "binary", PostprocessConfig(min_size=0, fill_holes=False))
    assert lab2.max() == 3 and lab2[15, 15] == 0
    assert probabilities_to_labels(np.zeros(shape), "binary").max() == 0


def test_fill_holes_does_not_fill_gaps_between_objects():
    # a ring made of two touching halves encloses background that is a hole of neither half
    shape = (30, 30)
    ring = disc(shape, 15, 15, 10) & ~disc(shape, 15, 15, 4)
    xx = np.mgrid[:30, :30][1]
    lab = np.where(ring, np.where(xx < 15, 1, 2), 0).astype(np.int32)
    prob = one_hot(make_target(lab, "boundary"), 3)
    out = probabilities_to_labels(prob, "boundary", PostprocessConfig(min_size=0, fill_holes=True))
    assert out.max() == 2
    assert (out[disc(shape, 15, 15, 3)] == 0).all()
    assert match_objects(out, lab, thresholds=[0.9])["tp"] == [2]


def test_boundary_target_round_trip_splits_touching():
    lab = touching_pair()
    prob = one_hot(make_target(lab, "boundary"), 3)
    out = probabilities_to_labels(prob, "boundary", PostprocessConfig(min_size=0))
    assert out.max() == 2
    m = match_objects(out, lab, thresholds=[0.5, 0.9])
    assert m["tp"] == [2, 2]
    # plain components of the foreground merge them
    merged = probabilities_to_labels(prob, "boundary", PostprocessConfig(markers="none", min_size=0))
    assert merged.max() == 1


def test_distance_target_round_trip_splits_touching():
    lab = touching_pair()
    d = make_target(lab, "distance")
    prob = np.stack([(d > 0).astype(np.float32), d])
    out = probabilities_to_labels(prob, "distance", PostprocessConfig(min_size=0))
    assert match_objects(out, lab, thresholds=[0.7])["tp"] == [2]


def test_binary_distance_markers_split_overlapping_discs():
    lab = touching_pair()
    prob = (lab > 0).astype(np.float32)
    plain = probabilities_to_labels(prob, "binary", PostprocessConfig(min_size=0))
    split = probabilities_to_labels(prob, "binary", PostprocessConfig(min_size=0, markers="distance"))
    assert plain.max() == 1 and split.max() == 2
    assert match_objects(split, lab, thresholds=[0.8])["tp"] == [2]


def two_bumps(h1, h2, width=6.0):
    """A 1-D ridge of two Gaussian bumps (heights h1, h2) 20 px apart, as a (1, 60) image."""
    x = np.arange(60, dtype=np.float64)
    return (h1 * np.exp(-((x - 20) ** 2) / (2 * width**2)) + h2 * np.exp(-((x - 40) ** 2) / (2 * width**2)))[None]


def test_distance_markers_count_peaks_by_prominence():
    ridge = two_bumps(1.0, 0.8)
    fg = np.ones(ridge.shape, bool)
    saddle = ridge[0, 20:41].min()
    dip = 0.8 - saddle  # how far the lower peak stands above the saddle
    assert 0.05 < dip < 0.5
    assert distance_markers(ridge, fg, dip / 2).max() == 2
    one = distance_markers(ridge, fg, dip * 2)
    assert one.max() == 1 and one[0, 20] == 1  # the surviving marker sits on the higher peak
    # twin peaks of equal height with a shallow saddle are one plateau, so one marker, not one per tip
    twins = two_bumps(1.0, 1.0)
    assert distance_markers(twins, fg, 1.0 - twins[0, 30] + 0.05).max() == 1
    assert distance_markers(twins, fg, 1.0 - twins[0, 30] - 0.05).max() == 2
    # nothing outside the foreground seeds anything
    assert distance_markers(ridge, np.zeros_like(fg), 0.01).max() == 0


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(UnetlabError, match="interior"):
        probabilities_to_labels(np.zeros((8, 8)), "binary", PostprocessConfig(markers="interior"))
    with pytest.raises(UnetlabError, match="3 channel"):
        probabilities_to_labels(np.zeros((2, 8, 8)), "boundary")
    with pytest.raises(UnetlabError, match="markers"):
        probabilities_to_labels(np.zeros((8, 8)), "binary", PostprocessConfig(markers="seeds"))


def test_foreground_mask_and_classes():
    p = np.zeros((3, 4, 4), np.float32)
    p[0] = 1.0
    p[:, 1, 1] = [0.2, 0.5, 0.3]
    assert foreground_mask(p, "boundary").sum() == 1
    assert probabilities_to_classes(p)[1, 1] == 1 and probabilities_to_classes(p)[0, 0] == 0


def test_one_foreground_rule_for_masks_streams_and_labels():
    """predict's masks (also streamed) and the labels use foreground_mask; for the boundary target it is
    p(interior) + p(boundary), the rule predict always used (and 1 - p(background) to within float rounding)."""
    from unetlab.inference.predict import _foreground

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (3, 32, 32)).astype(np.float32)
    p = np.exp(logits) / np.exp(logits).sum(0)
    for thr in (0.3, 0.5, 0.7):
        fg = foreground_mask(p, "boundary", thr)
        assert np.array_equal(fg, p[1:].sum(0) > thr)
        assert np.array_equal(_foreground(p, {"target": "boundary"}, thr), fg)
        assert np.count_nonzero(fg != ((1.0 - p[0]) > thr)) <= 2  # only pixels within rounding of thr
        assert np.array_equal(_foreground(p[:1], {"target": "binary"}, thr), p[0] > thr)
        assert np.array_equal(_foreground(p[:2], {"target": "distance"}, thr), p[0] > thr)
        assert np.array_equal(probabilities_to_labels(p, "boundary", PostprocessConfig(threshold=thr, min_size=0,
                                                                                        fill_holes=False)) > 0,
                              fg)
    assert np.array_equal(_foreground(p, {"task": "multiclass"}, 0.5), p.argmax(0))


def test_tune_postprocess_finds_threshold_and_min_size():
    shape = (64, 64)
    truths, probs = [], []
    rng = np.random.default_rng(1)
    for k in range(2):
        lab = np.zeros(shape, np.int32)
        prob = np.zeros(shape, np.float32)
        for i, (cy, cx) in enumerate([(12, 12), (12, 48), (48, 12)], start=1):
            lab[disc(shape, cy + k, cx, 6)] = i
        prob[lab > 0] = 0.9
        prob[disc(shape, 48, 48, 6)] = 0.65  # a confident-looking false object, below 0.7
        prob[30 + k : 32 + k, 30:32] = 0.95  # a 4-pixel speck
        prob += rng.uniform(0, 0.02, shape).astype(np.float32)
        truths.append(lab)
        probs.append(prob)
    cfg = tune_postprocess(probs, truths, "binary", thresholds=(0.5, 0.7), min_sizes=(0, 10))
    assert cfg.threshold == 0.7 and cfg.min_size == 10
    for p, t in zip(probs, truths):
        assert match_objects(probabilities_to_labels(p, "binary", cfg), t)["ap"][0] == 1.0
    with pytest.raises(UnetlabError):
        tune_postprocess(probs, truths[:1], "binary")
