"""Augmentations toward other labs' look: per-object brightness and an uneven background (off by default,
seeded, on normalised or raw 16-bit intensities, shown by augment-preview)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from unetlab.config import AugmentConfig
from unetlab.data.augment import apply_augment, preview_augmentations

OFF = dict(flip=0.0, rotate90=0.0, zoom=0.0)


def two_nuclei(value: float = 1.0, shape=(64, 64)) -> tuple[np.ndarray, np.ndarray]:
    """Two equally bright square objects on a zero background: image (1,H,W) float32, labels (H,W) uint16."""
    labels = np.zeros(shape, np.uint16)
    labels[6:22, 6:22] = 1
    labels[36:56, 36:56] = 2
    image = (labels > 0).astype(np.float32)[None] * np.float32(value)
    return image, labels


def cfg(**kw) -> AugmentConfig:
    return dataclasses.replace(AugmentConfig(), **{**OFF, **kw})


def test_new_augmentations_are_off_by_default():
    default = AugmentConfig()
    assert default.object_intensity == 0.0 and default.background == 0.0
    image, labels = two_nuclei()
    out, (lab,) = apply_augment(image, [labels], np.random.default_rng(0), cfg())
    np.testing.assert_array_equal(out, image)
    np.testing.assert_array_equal(lab, labels)


@pytest.mark.parametrize("value", [1.0, 60000.0])  # normalised, and raw 16-bit intensities
def test_object_intensity_gives_each_object_its_own_factor_within_range(value):
    image, labels = two_nuclei(value)
    c = cfg(object_intensity=1.0, object_intensity_range=(0.3, 1.5))
    ratios = []
    for seed in range(20):
        out, (lab,) = apply_augment(image, [labels], np.random.default_rng(seed), c)
        np.testing.assert_array_equal(lab, labels)  # labels never change
        assert out.dtype == np.float32 and np.isfinite(out).all()
        assert out[0, 30, 2] == 0.0  # background far from objects untouched
        inner = [out[0, 10:18, 10:18], out[0, 40:52, 40:52]]  # object interiors, away from the smoothed edge
        for a in inner:
            assert np.allclose(a, a.flat[0], rtol=1e-4)  # one factor per object
            assert 0.3 * value * 0.999 <= a.flat[0] <= 1.5 * value * 1.001
        ratios.append(inner[0].flat[0] / inner[1].flat[0])
    assert max(abs(np.log(r)) for r in ratios) > np.log(1.5)  # dim nuclei next to bright ones


def test_object_intensity_without_objects_is_a_no_op():
    image = np.full((1, 32, 32), 0.5, np.float32)
    out, _ = apply_augment(image, [np.zeros((32, 32), np.uint16)], np.random.default_rng(0),
                           cfg(object_intensity=1.0))
    np.testing.assert_array_equal(out, image)


def test_background_adds_a_smooth_uneven_offset_within_range():
    image = np.zeros((1, 128, 96), np.float32)
    labels = np.zeros((128, 96), np.uint16)
    spans = []
    for seed in range(10):
        out, _ = apply_augment(image, [labels], np.random.default_rng(seed), cfg(background=1.0,
                                                                                   background_range=0.4))
        off = out[0]
        assert off.shape == (128, 96) and off.min() >= 0.0 and off.max() <= 0.4 + 1e-6
        # smooth: neighbouring pixels differ by at most a grid cell's span over its width (0.4 / 24 px)
        assert np.abs(np.diff(off, axis=0)).max() <= 0.4 / 24 + 1e-5
        assert np.abs(np.diff(off, axis=1)).max() <= 0.4 / 24 + 1e-5
        spans.append(off.max() - off.min())
    assert min(spans) > 0.05  # uneven, not a constant shift


def test_lab_augmentations_are_seeded():
    image, labels = two_nuclei()
    c = cfg(object_intensity=1.0, background=1.0)
    a, _ = apply_augment(image, [labels], np.random.default_rng(3), c)
    b, _ = apply_augment(image, [labels], np.random.default_rng(3), c)
    other, _ = apply_augment(image, [labels], np.random.default_rng(4), c)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, other)


def test_inputs_are_not_modified_in_place():
    image, labels = two_nuclei()
    before = image.copy()
    apply_augment(image, [labels], np.random.default_rng(0), cfg(object_intensity=1.0, background=1.0))
    np.testing.assert_array_equal(image, before)


def test_augment_preview_shows_the_lab_augmentations():
    image, labels = two_nuclei(60000.0)
    plain = preview_augmentations(image, labels, cfg(), n=3, seed=0)
    lab = preview_augmentations(image, labels, cfg(object_intensity=1.0, background=1.0), n=3, seed=0)
    assert plain.shape == lab.shape and lab.dtype == np.uint8
    assert not np.array_equal(plain, lab)
