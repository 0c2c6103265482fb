"""Augmentations keep image and targets aligned, respect their probabilities and are reproducible."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from unetlab.config import AugmentConfig
from unetlab.data.augment import build_augment, elastic_displacement, preview_augmentations
from unetlab.data.io import normalize

OFF = {f.name: 0.0 for f in dataclasses.fields(AugmentConfig) if f.name in (
    "flip", "rotate90", "affine", "elastic", "brightness", "contrast", "gamma", "noise", "blur")}
ALL_ON = dataclasses.replace(AugmentConfig(), **{k: 1.0 for k in OFF})


def only(**probs) -> AugmentConfig:
    """An AugmentConfig with every probability 0 except ``probs``."""
    return dataclasses.replace(AugmentConfig(), **{**OFF, **probs})


def blobs(shape=(64, 64), channels: int = 1, seed: int = 0) -> np.ndarray:
    """Smoothed random blobs (C,H,W) float32 with values around 0..1."""
    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.standard_normal((channels, *shape)), sigma=(0, 4, 4))
    img = (img - img.min()) / (img.max() - img.min())
    return img.astype(np.float32)


def test_all_probabilities_zero_is_identity_and_inputs_are_untouched():
    img = blobs()
    mask = (img[0] > 0.5).astype(np.int32)
    img0, mask0 = img.copy(), mask.copy()
    out, (m,) = build_augment(only())(img, [mask], np.random.default_rng(0))
    assert np.array_equal(out, img0) and np.array_equal(m, mask0)
    cfg = ALL_ON
    build_augment(cfg)(img, [mask], np.random.default_rng(0))
    assert np.array_equal(img, img0) and np.array_equal(mask, mask0)


@pytest.mark.parametrize("probs", [{"flip": 1.0}, {"rotate90": 1.0}, {"flip": 1.0, "rotate90": 1.0}])
def test_flips_and_rotations_are_exact_and_aligned(probs):
    img = blobs()
    mask = (img[0] > 0.5).astype(np.uint8)
    augment = build_augment(only(**probs))
    rng = np.random.default_rng(1)
    changed = 0
    for _ in range(6):
        out, (m,) = augment(img, [mask], rng)
        assert out.flags["C_CONTIGUOUS"] and m.flags["C_CONTIGUOUS"] and m.dtype == np.uint8
        assert np.array_equal(m, (out[0] > 0.5).astype(np.uint8))
        assert sorted(out.ravel()) == sorted(img.ravel())  # a permutation of the pixels
        changed += not np.array_equal(out, img)
    assert changed >= 4


def test_non_square_rotation_is_180_degrees():
    img = blobs((32, 48))
    out, (m,) = build_augment(only(rotate90=1.0))(img, [img[0].copy()], np.random.default_rng(0))
    assert out.shape == img.shape and np.array_equal(out, img[:, ::-1, ::-1]) and np.array_equal(m, out[0])


WARPS = [{"affine": 1.0}, {"elastic": 1.0}, {"affine": 1.0, "elastic": 1.0, "flip": 1.0}]


@pytest.mark.parametrize("probs", WARPS, ids=["affine", "elastic", "combined"])
def test_warps_keep_masks_and_float_targets_aligned(probs):
    img = blobs((96, 96), seed=2)
    t = 0.5
    mask = (img[0] > t).astype(np.int32) * 7
    weight = img[0].copy()  # a float target follows the image with the same linear interpolation
    cfg = dataclasses.replace(only(**probs), affine_degrees=30, elastic_sigma=6)
    rng = np.random.default_rng(3)
    for _ in range(4):
        out, (m, wt) = build_augment(cfg)(img, [mask, weight], rng)
        assert m.dtype == np.int32 and set(np.unique(m)) <= {0, 7}
        assert wt.dtype == np.float32 and np.allclose(wt, out[0], atol=1e-5)
        inner = (slice(8, -8), slice(8, -8))
        clear = np.abs(out[0] - t)[inner] > 0.03  # away from the iso-line, within interpolation tolerance
        agree = (m[inner] > 0) == (out[0][inner] > t)
        assert agree[clear].mean() > 0.995
        assert not np.array_equal(out, img)


def test_float_target_ignore_region_stays_crisp():
    soft = np.full((48, 48), 0.6, dtype=np.float32)
    soft[:, :10] = -1.0
    _, (out,) = build_augment(only(affine=1.0))(blobs((48, 48)), [soft], np.random.default_rng(0))
    assert np.all((out == -1.0) | np.isclose(out, 0.6, atol=1e-6))
    assert (out < 0).any()


def test_elastic_field_interpolates_the_coarse_grid():
    dy, dx = elastic_displacement((65, 81), 3, 10.0, np.random.default_rng(7))
    coarse = np.random.default_rng(7).normal(0.0, 10.0, size=(2, 3, 3))
    ys, xs = [0, 32, 64], [0, 40, 80]
    assert np.allclose(dy[np.ix_(ys, xs)], coarse[0], atol=1e-4)
    assert np.allclose(dx[np.ix_(ys, xs)], coarse[1], atol=1e-4)
    assert np.abs(np.diff(dy, axis=0)).max() < 3.0  # smooth: no pixel-to-pixel jumps


def test_seeded_rng_is_reproducible():
    img = blobs(channels=2)
    mask = (img[0] > 0.5).astype(np.int32)
    cfg = AugmentConfig(flip=0.5, rotate90=0.5, affine=0.5, elastic=0.5, brightness=0.5, contrast=0.5,
                        gamma=0.5, noise=0.5, blur=0.5)
    aug = build_augment(cfg)
    a = [aug(img, [mask], np.random.default_rng(11)) for _ in range(2)]
    assert np.array_equal(a[0][0], a[1][0]) and np.array_equal(a[0][1][0], a[1][1][0])
    b = aug(img, [mask], np.random.default_rng(12))
    assert not np.array_equal(a[0][0], b[0])


def test_intensity_augmentations_touch_only_the_image():
    img = blobs(channels=3)
    mask = (img[0] > 0.5).astype(np.int32)
    weight = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    for name in ("brightness", "contrast", "gamma", "noise", "blur"):
        out, (m, w) = build_augment(only(**{name: 1.0}))(img, [mask, weight], np.random.default_rng(0))
        assert out.shape == img.shape and out.dtype == np.float32, name
        assert not np.allclose(out, img), name
        assert np.array_equal(m, mask) and np.array_equal(w, weight), name


def test_sixteen_bit_derived_and_multichannel_images():
    rng = np.random.default_rng(5)
    raw = (blobs(channels=3, seed=5) * 60000 + rng.integers(0, 500, (3, 64, 64))).astype(np.uint16)
    img = normalize(raw.astype(np.float32), "percentile")
    assert img.min() < 0 and img.max() > 1  # normalised 16-bit data spills outside [0, 1]
    cfg = ALL_ON
    for seed in range(3):
        out, (m,) = build_augment(cfg)(img, [np.zeros((64, 64), np.uint16)], np.random.default_rng(seed))
        assert out.shape == (3, 64, 64) and np.isfinite(out).all() and m.dtype == np.uint16
    # gamma on negative values is monotone per channel: it never reorders pixels
    g, _ = build_augment(only(gamma=1.0))(img, [], np.random.default_rng(0))
    assert np.isfinite(g).all()
    order = np.argsort(img[1].ravel(), kind="stable")
    assert np.all(np.diff(g[1].ravel()[order]) >= -1e-5)


def test_preview_grid_shows_the_original_then_the_draws():
    img = blobs((40, 40), channels=3)
    mask = ndimage.label(img[0] > 0.6)[0]
    grid = preview_augmentations(img, mask, AugmentConfig(flip=1.0), n=8, seed=0)
    assert grid.dtype == np.uint8 and grid.shape == (3 * 40 + 2 * 4, 3 * 40 + 2 * 4, 3)
    again = preview_augmentations(img, mask, AugmentConfig(flip=1.0), n=8, seed=0)
    assert np.array_equal(grid, again)
    outline = (grid[:40, :40] == [255, 217, 0]).all(-1)
    assert outline.any() and not outline.all()
