"""unetlab.labels: the one "binary mask or instance labels" rule, against the three rules it replaced, and the
skimage functions that replaced hand-written label code, against the old code (kept here as references)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries, relabel_sequential

from unetlab.data.targets import make_target
from unetlab.evaluation.metrics import adapted_rand_error, match_objects
from unetlab.inference.postprocess import remove_small_objects
from unetlab.labels import instance_labels, is_binary, mask_to_labels
from unetlab.training.weightmap import border_weight_map

# --- the old rules, as they were -------------------------------------------------------------------------------


def old_targets_instance_labels(labels):
    """data.targets.instance_labels (used by make_target): max <= 1 -> 4-connected components, else kept."""
    lab = np.asarray(labels)
    if lab.dtype == bool or int(lab.max(initial=0)) <= 1:
        return ndi.label(lab > 0)[0].astype(np.int32)
    return lab.astype(np.int32, copy=False)


def old_weightmap_instance_labels(labels):
    """training.weightmap.instance_labels (used by border_weight_map): one non-zero value -> components,
    sparse ids -> 1..n, else kept."""
    labels = np.asarray(labels)
    values = np.unique(labels)
    fg_values = values[values != 0]
    if len(fg_values) <= 1:
        return ndi.label(labels != 0)[0].astype(np.int32)
    if fg_values[-1] > 2 * len(fg_values):
        out = np.searchsorted(values, labels).astype(np.int32)
        if values[0] != 0:
            out += 1
        return out
    return labels.astype(np.int32)


def old_relabel_sequential(labels):
    """evaluation.metrics.relabel_sequential: labels renumbered 1..n in order of their values; (labels, n)."""
    lab = np.asarray(labels)
    if lab.size == 0:
        return lab.astype(np.int32), 0
    top = int(lab.max())
    if top == 0:
        return np.zeros(lab.shape, np.int32), 0
    if top < 2**24:
        present = np.bincount(lab.ravel().astype(np.int64), minlength=top + 1) > 0
        present[0] = False
        lut = np.cumsum(present).astype(np.int32)
        lut[~present] = 0
        return lut[lab], int(present.sum())
    values, inverse = np.unique(lab, return_inverse=True)
    inverse = inverse.reshape(lab.shape).astype(np.int32)
    if values[0] != 0:
        inverse += 1
    return inverse, int(np.count_nonzero(values))


def old_as_instance_labels(mask, connectivity=1):
    """evaluation.metrics.as_instance_labels (evaluate, adapted Rand error, tuning): at most 2 values ->
    components, else relabelled 1..n."""
    arr = np.asarray(mask)
    if arr.dtype == bool or int(arr.max(initial=0)) <= 1 or len(np.unique(arr)) <= 2:
        structure = ndi.generate_binary_structure(2, connectivity)
        return ndi.label(arr > 0, structure=structure)[0].astype(np.int32)
    return old_relabel_sequential(arr)[0]


def old_object_boundaries(labels):
    """data.targets.object_boundaries: object pixels with a 4-neighbour of another label (borders do not count)."""
    lab = np.asarray(labels)
    edge = np.zeros(lab.shape, bool)
    d = lab[1:, :] != lab[:-1, :]
    edge[1:, :] |= d
    edge[:-1, :] |= d
    d = lab[:, 1:] != lab[:, :-1]
    edge[:, 1:] |= d
    edge[:, :-1] |= d
    return edge & (lab > 0)


def old_remove_small_objects(labels, min_size):
    """inference.postprocess.remove_small_objects: objects of fewer than min_size pixels removed, then 1..n."""
    lab = np.asarray(labels)
    if min_size > 1 and lab.any():
        areas = np.bincount(lab.ravel())
        small = areas < min_size
        small[0] = False
        if small.any():
            lab = np.where(small[lab], 0, lab)
    return old_relabel_sequential(lab)[0]


def old_mask_to_labels(arr):
    """data.io.mask_to_labels without its JPEG check: at most two values -> 0/1, else kept."""
    if len(np.unique(arr)) <= 2:
        return (arr > 0).astype(np.int32)
    return arr.astype(np.int32)


# --- inputs ------------------------------------------------------------------------------------------------------


def cells(seed: int = 0, shape=(40, 48), n: int = 9) -> np.ndarray:
    """Instance labels 1..n of random rectangles: some touch, some overlap (later wins), some at the border."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int32)
    for i in range(1, n + 1):
        y, x = rng.integers(-3, shape[0] - 2), rng.integers(-3, shape[1] - 2)
        h, w = rng.integers(1, 12, 2)
        lab[max(y, 0): y + h, max(x, 0): x + w] = i
    return lab


def same_objects(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label images hold the same objects (ids may differ, in the same order of first value)."""
    return np.array_equal(relabel_sequential(np.asarray(a))[0], relabel_sequential(np.asarray(b))[0])


def binary_masks() -> list[np.ndarray]:
    lab = cells(1)
    diagonal = np.eye(6, dtype=np.uint8)  # 4-connected: six objects, 8-connected: one
    return [
        (lab > 0).astype(np.uint8),  # 0/1, as mask_to_labels returns binary masks
        (lab > 0).astype(np.uint8) * 255,  # 0/255, as read_label returns them
        lab > 0,  # bool
        diagonal,
        np.zeros((5, 7), np.int32),  # empty: a negative control
        np.ones((5, 7), np.uint8),  # all foreground
    ]


def label_images() -> list[np.ndarray]:
    sparse = cells(2) * 1000  # ids 1000..9000
    dense = cells(3)
    return [dense, sparse, dense.astype(np.uint16), np.where(dense == 4, 0, dense)]


# --- the one rule against the old ones ---------------------------------------------------------------------------


def test_is_binary():
    assert is_binary(np.array([[0, 255], [255, 0]])) and is_binary(np.zeros((2, 2)))
    assert is_binary(np.full((2, 2), 7)) and is_binary(np.zeros((2, 2), bool)) and is_binary(np.zeros(0))
    assert not is_binary(np.array([[0, 1], [2, 0]])) and not is_binary(np.array([[3, 5]]))


@pytest.mark.parametrize("mask", [m for m in binary_masks() + label_images()
                                  if m.dtype == bool or m.max() <= 1 or not is_binary(m)],  # {0, v > 1}: below
                         ids=lambda m: f"{m.dtype}-{len(np.unique(m))}")
def test_make_target_inputs_give_the_old_instance_labels(mask):
    """make_target gets 0/1 masks (mask_to_labels) and instance labels: the old rule's labels, exactly.
    ({0, v > 1} masks are where the rules differ: test_a_single_value_is_a_binary_mask_everywhere_now.)"""
    assert np.array_equal(instance_labels(mask), old_targets_instance_labels(mask))
    for kind in ("boundary", "distance"):
        assert np.array_equal(make_target(mask, kind), make_target(old_targets_instance_labels(mask), kind))


@pytest.mark.parametrize("mask", binary_masks() + label_images(), ids=lambda m: f"{m.dtype}-{len(np.unique(m))}")
def test_weight_map_inputs_give_the_old_objects(mask):
    """border_weight_map gets 0/255 files (write_weight_map_png), 0/1 masks and labels: the same objects."""
    assert same_objects(instance_labels(mask), old_weightmap_instance_labels(mask))
    if mask.ndim == 2 and mask.shape[0] > 5:
        old_inst = old_weightmap_instance_labels(mask)
        assert np.array_equal(border_weight_map(mask, 10.0, 3.0), border_weight_map(old_inst, 10.0, 3.0))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # skimage's Rand error of an empty prediction
@pytest.mark.parametrize("mask", binary_masks() + label_images(), ids=lambda m: f"{m.dtype}-{len(np.unique(m))}")
def test_evaluation_inputs_give_the_old_objects_and_scores(mask):
    """evaluate gets raw predictions (0/255 masks, uint16 labels) and truths (0/1 or labels): same objects, and
    match_objects / adapted Rand error (which do not depend on ids) give the same numbers."""
    for connectivity in (1, 2):
        assert same_objects(instance_labels(mask, connectivity), old_as_instance_labels(mask, connectivity))
    truth = cells(5, mask.shape) if mask.shape[0] > 5 else np.eye(*mask.shape, dtype=np.int32)
    assert match_objects(instance_labels(mask), truth) == match_objects(old_as_instance_labels(mask), truth)
    if truth.any():
        assert adapted_rand_error(mask, truth) == pytest.approx(adapted_rand_error(
            old_as_instance_labels(mask), old_as_instance_labels(truth)), abs=1e-12)


def test_a_single_value_is_a_binary_mask_everywhere_now():
    """The old rules disagreed on {0, v} with v > 1: make_target kept it as one object, evaluation and the weight
    map took components. Now it is a binary mask everywhere, as {0, 1} already was for make_target. Objects
    that are one 4-connected piece (every cell) give the same targets; only an object in pieces differs."""
    one = np.zeros((12, 12), np.int32)
    one[2:9, 3:10] = 7  # a patch holding one object, id 7
    assert np.array_equal(instance_labels(one), (one > 0).astype(np.int32))
    for kind in ("boundary", "distance"):
        assert np.array_equal(make_target(one, kind), make_target(old_targets_instance_labels(one), kind))
    pieces = one.copy()
    pieces[5, 3:10] = 0  # object 7 cut in two pieces
    assert instance_labels(pieces).max() == 2 and old_targets_instance_labels(pieces).max() == 7
    # the boundary target never depends on it (pieces of one label never touch); the distance target now
    # normalises each piece by its own maximum, as it did for {0, 1}
    assert np.array_equal(make_target(pieces, "boundary"), make_target(old_targets_instance_labels(pieces),
                                                                       "boundary"))
    assert np.array_equal(make_target(pieces, "distance"), make_target((pieces > 0).astype(np.uint8), "distance"))


def test_two_values_without_background_are_labels_now():
    """The one input where the evaluation's old rule (at most two values -> components) differs: two
    objects covering the whole image are two objects now, not one."""
    two = np.array([[3, 3, 5], [3, 5, 5]])
    assert instance_labels(two).tolist() == two.tolist()
    assert old_as_instance_labels(two).max() == 1
    assert same_objects(instance_labels(two), old_weightmap_instance_labels(two))  # the weight map's rule


def test_connectivity_and_dtypes():
    diagonal = np.eye(4, dtype=np.uint8) * 255
    assert instance_labels(diagonal).max() == 4 and instance_labels(diagonal, connectivity=2).max() == 1
    assert instance_labels(diagonal).dtype == np.int32
    big = np.array([[0, 1], [2**40, 5]], dtype=np.int64)
    assert instance_labels(big).dtype == np.int64 and instance_labels(big).tolist() == big.tolist()
    assert instance_labels(np.array([[0, 3], [9, 9]], np.uint8)).dtype == np.int32


@pytest.mark.parametrize("raw", [
    np.array([[0, 255], [255, 0]], np.uint8), np.array([[0, 3], [7, 7]]), np.zeros((3, 3), np.uint8),
    np.full((3, 3), 255, np.uint8), (cells(4) > 0).astype(np.uint8) * 255, cells(4).astype(np.uint16),
])
def test_mask_to_labels_as_before(raw):
    assert np.array_equal(mask_to_labels(raw), old_mask_to_labels(raw))


def test_mask_to_labels_follows_the_one_rule_for_two_values_without_zero():
    raw = np.array([[1, 1], [1, 2]], np.uint8)  # used to become all foreground; now two labels
    assert mask_to_labels(raw).tolist() == [[1, 1], [1, 2]]


# --- library functions against the hand-written ones they replaced -----------------------------------------------


def varied_labels() -> list[np.ndarray]:
    lab = cells(6)
    touching = np.zeros((10, 12), np.int32)
    touching[2:8, 1:6], touching[2:8, 6:11] = 3, 8  # touching objects
    pixels = np.zeros((7, 7), np.int32)
    pixels[0, 0], pixels[3, 3], pixels[6, 6], pixels[3, 4] = 1, 2, 5, 9  # single pixels, corners, a pair
    border = np.zeros((6, 6), np.int32)
    border[:, :2], border[:3, 4:] = 4, 2  # objects on the image border
    return [lab, touching, pixels, border, np.zeros((5, 5), np.int32), np.full((4, 4), 3, np.int32),
            np.zeros((1, 6), np.int32) + np.arange(6), cells(7) * 100_000, np.zeros((0, 3), np.int32)]


@pytest.mark.parametrize("lab", varied_labels(), ids=lambda m: f"{m.shape}-{len(np.unique(m))}")
def test_find_boundaries_inner_is_the_old_object_boundaries(lab):
    if lab.size == 0:
        return
    assert np.array_equal(find_boundaries(lab, connectivity=1, mode="inner"), old_object_boundaries(lab))


@pytest.mark.parametrize("lab", varied_labels(), ids=lambda m: f"{m.shape}-{len(np.unique(m))}")
def test_skimage_relabel_sequential_is_the_old_one(lab):
    if lab.size == 0:
        return
    new = relabel_sequential(lab)[0]
    old, n = old_relabel_sequential(lab)
    assert np.array_equal(new, old) and int(new.max(initial=0)) == n


@pytest.mark.parametrize("lab", varied_labels(), ids=lambda m: f"{m.shape}-{len(np.unique(m))}")
@pytest.mark.parametrize("min_size", [0, 1, 2, 5, 20, 10_000])
def test_remove_small_objects_is_the_old_one(lab, min_size):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # skimage's "Only one label" warning is not let through
        new = remove_small_objects(lab, min_size)
    old = old_remove_small_objects(lab, min_size)
    assert new.dtype == np.int32 and np.array_equal(new, old)


def test_remove_small_objects_keeps_labels_as_given():
    lab = np.zeros((6, 6), np.int32)
    lab[0, 0] = lab[5, 5] = 4  # one object in two pieces of one pixel: 2 pixels, not two objects of 1
    assert remove_small_objects(lab, 2).tolist() == (lab > 0).astype(int).tolist()
    assert not remove_small_objects(lab, 3).any()
    assert remove_small_objects(lab > 0, 2).max() == 1  # a bool mask is one object, as label 1
