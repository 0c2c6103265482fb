"""Joint image/target augmentations for training patches.

An augmentation function takes an image (C,H,W) float32 (normalised, any channel count), a list of 2-D targets
(H,W) and a numpy Generator, and returns new arrays of the same shapes. Geometric transforms move the image
and every target together: integer targets (labels, masks) with nearest-neighbour, float targets (weight maps,
soft targets) with linear interpolation; pixels that come from outside the patch are filled by reflection.
Intensity transforms touch only the image. Inputs are never modified in place (they may live in a cache).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache, partial

import numpy as np
from scipy import ndimage

from ..config import AugmentConfig
from ..labels import resize_nearest

log = logging.getLogger(__name__)

AugmentFn = Callable[[np.ndarray, list[np.ndarray], np.random.Generator], tuple[np.ndarray, list[np.ndarray]]]


# --- geometry -----------------------------------------------------------------------------------------------


@lru_cache(maxsize=32)
def _cubic_weights(n: int, grid: int) -> np.ndarray:
    """(n, grid) cubic-spline interpolation weights from ``grid`` points spanning pixels 0..n-1."""
    pos = np.linspace(0.0, grid - 1.0, n)
    w = np.empty((n, grid), dtype=np.float64)
    for j in range(grid):
        e = np.zeros(grid)
        e[j] = 1.0
        w[:, j] = ndimage.map_coordinates(e, pos[None], order=3, mode="mirror")
    w.setflags(write=False)
    return w


def elastic_displacement(
    shape: tuple[int, int], grid: int, sigma: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Dense (dy, dx) displacement fields: N(0, sigma) vectors on a grid x grid lattice, bicubic-upsampled."""
    h, w = shape
    grid = max(2, int(grid))
    coarse = rng.normal(0.0, sigma, size=(2, grid, grid))
    wy, wx = _cubic_weights(h, grid), _cubic_weights(w, grid)
    dy = (wy @ coarse[0] @ wx.T).astype(np.float32)
    dx = (wy @ coarse[1] @ wx.T).astype(np.float32)
    return dy, dx


def affine_matrix(degrees: float, scale: float) -> np.ndarray:
    """2x2 matrix mapping output offsets to source offsets (rotation by ``degrees``, zoom by ``scale``)."""
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s], [s, c]]) / scale


def _sample_coordinates(
    shape: tuple[int, int], cfg: AugmentConfig, rng: np.random.Generator, do_affine: bool, do_elastic: bool
) -> np.ndarray:
    """Source coordinates (2,H,W) for every output pixel of the combined affine + elastic warp."""
    h, w = shape
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    oy, ox = yy - cy, xx - cx
    if do_affine:
        deg = rng.uniform(-cfg.affine_degrees, cfg.affine_degrees)
        lo, hi = sorted(cfg.affine_scale)
        scale = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if lo > 0 else 1.0
        ty, tx = rng.uniform(-cfg.affine_shift, cfg.affine_shift, size=2) * np.array([h, w])
        m = affine_matrix(deg, scale).astype(np.float32)
        sy = m[0, 0] * oy + m[0, 1] * ox + (cy + ty)
        sx = m[1, 0] * oy + m[1, 1] * ox + (cx + tx)
    else:
        sy, sx = yy, xx
    if do_elastic:
        dy, dx = elastic_displacement(shape, cfg.elastic_grid, cfg.elastic_sigma, rng)
        sy = sy + dy
        sx = sx + dx
    return np.stack([sy, sx])


def _warp_target(target: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Resample one 2-D target at ``coords``: nearest for integer/bool, linear for float (ignore < 0 kept)."""
    if target.dtype == bool:
        return _warp_target(target.astype(np.uint8), coords).astype(bool)
    if not np.issubdtype(target.dtype, np.floating):
        return ndimage.map_coordinates(target, coords, order=0, mode="reflect", output=target.dtype)
    t = target.astype(np.float32, copy=False)
    ignored = t < 0
    if ignored.any():  # interpolate among valid neighbours only, keep the ignore region crisp
        valid = (~ignored).astype(np.float32)
        num = ndimage.map_coordinates(t * valid, coords, order=1, mode="reflect", prefilter=False)
        den = ndimage.map_coordinates(valid, coords, order=1, mode="reflect", prefilter=False)
        out = num / np.maximum(den, 1e-6)
        ign = ndimage.map_coordinates(ignored.view(np.uint8), coords, order=0, mode="reflect") > 0
        out[ign | (den <= 1e-6)] = float(t[ignored].min())
        return out.astype(target.dtype, copy=False)
    out = ndimage.map_coordinates(t, coords, order=1, mode="reflect", prefilter=False)
    return out.astype(target.dtype, copy=False)


def _warp_image(image: np.ndarray, coords: np.ndarray) -> np.ndarray:
    out = np.empty((image.shape[0],) + coords.shape[1:], dtype=np.float32)
    for c in range(image.shape[0]):
        ndimage.map_coordinates(image[c], coords, output=out[c], order=1, mode="reflect", prefilter=False)
    return out


# --- intensity ----------------------------------------------------------------------------------------------


def _adjust_gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    """Gamma on each channel's own [min, max] range, so negative normalised values are safe."""
    lo = image.min(axis=(1, 2), keepdims=True)
    hi = image.max(axis=(1, 2), keepdims=True)
    span = np.maximum(hi - lo, 1e-6)
    return (lo + span * np.power((image - lo) / span, gamma)).astype(np.float32)


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    lo, hi = sorted(float(b) for b in bounds)
    if lo <= 0:
        return float(rng.uniform(lo, hi))
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _scale_objects(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                   bounds: tuple[float, float]) -> np.ndarray:
    """Each object of ``labels`` brightened/dimmed by its own log-uniform factor above the image's minimum; the
    factor map is smoothed by a pixel so object edges do not become steps."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if not len(ids):
        return image
    factors = np.ones(int(ids.max()) + 1, dtype=np.float32)
    factors[ids] = [_log_uniform(rng, bounds) for _ in ids]
    fmap = ndimage.gaussian_filter(factors[labels.astype(np.intp)], sigma=1.0, mode="nearest")
    lo = image.min(axis=(1, 2), keepdims=True)
    return (lo + (image - lo) * fmap[None]).astype(np.float32)


def _smooth_background(shape: tuple[int, int], rng: np.random.Generator, largest: float) -> np.ndarray:
    """A random smooth offset field (h, w) in [0, ``largest``]: a bilinear 4x4 grid of uniform levels."""
    h, w = shape
    grid = rng.uniform(0.0, largest, size=(4, 4)).astype(np.float32)
    return ndimage.zoom(grid, (h / 4, w / 4), order=1, mode="nearest", grid_mode=True)[:h, :w]


# --- the pipeline -------------------------------------------------------------------------------------------


def apply_augment(
    image: np.ndarray, targets: list[np.ndarray], rng: np.random.Generator, cfg: AugmentConfig
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Apply the augmentations of ``cfg`` (each with its own probability) to an image and its targets."""
    if image.ndim != 3:
        raise ValueError(f"augment expects an image (C,H,W), got shape {image.shape}")
    h, w = image.shape[1:]
    for t in targets:
        if t.shape != (h, w):
            raise ValueError(f"augment: target shape {t.shape} does not match image {image.shape}")
    img = image
    tgts = list(targets)

    # flips and 90-degree rotations: exact, as views
    if cfg.flip > 0:
        if rng.random() < cfg.flip:
            img, tgts = img[:, :, ::-1], [t[:, ::-1] for t in tgts]
        if rng.random() < cfg.flip:
            img, tgts = img[:, ::-1, :], [t[::-1, :] for t in tgts]
    if cfg.rotate90 > 0 and rng.random() < cfg.rotate90:
        k = int(rng.integers(1, 4)) if h == w else 2
        img = np.rot90(img, k, axes=(1, 2))
        tgts = [np.rot90(t, k) for t in tgts]

    # affine and elastic: one resampling for both
    do_affine = cfg.affine > 0 and rng.random() < cfg.affine
    do_elastic = cfg.elastic > 0 and rng.random() < cfg.elastic
    if do_affine or do_elastic:
        coords = _sample_coordinates((h, w), cfg, rng, do_affine, do_elastic)
        img = _warp_image(np.ascontiguousarray(img, dtype=np.float32), coords)
        tgts = [_warp_target(np.ascontiguousarray(t), coords) for t in tgts]

    # intensity: image only, on a private copy
    owned = do_affine or do_elastic

    def own(a: np.ndarray) -> np.ndarray:
        nonlocal owned
        if not owned:
            owned = True
            return np.array(a, dtype=np.float32, copy=True)
        return a

    if cfg.object_intensity > 0 and tgts and rng.random() < cfg.object_intensity:  # targets[0]: the labels
        img = _scale_objects(np.asarray(img, np.float32), np.asarray(tgts[0]), rng, cfg.object_intensity_range)
        owned = True
    if cfg.background > 0 and rng.random() < cfg.background:
        img = own(img)
        img += _smooth_background((h, w), rng, cfg.background_range)[None]
    if cfg.brightness > 0 and rng.random() < cfg.brightness:
        img = own(img)
        img += np.float32(rng.uniform(-cfg.brightness_range, cfg.brightness_range))
    if cfg.contrast > 0 and rng.random() < cfg.contrast:
        img = own(img)
        factor = np.float32(_log_uniform(rng, cfg.contrast_range))
        mean = img.mean(axis=(1, 2), keepdims=True)
        img -= mean
        img *= factor
        img += mean
    if cfg.gamma > 0 and rng.random() < cfg.gamma:
        img = _adjust_gamma(own(img), _log_uniform(rng, cfg.gamma_range))
    if cfg.blur > 0 and rng.random() < cfg.blur:
        lo, hi = sorted(cfg.blur_sigma)
        sigma = float(rng.uniform(lo, hi))
        img = np.asarray(img, np.float32)
        img = ndimage.gaussian_filter(img, sigma=(0, sigma, sigma), mode="reflect", truncate=3.0)
        owned = True
    if cfg.noise > 0 and rng.random() < cfg.noise:
        img = own(img)
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(cfg.noise_std)

    img = np.ascontiguousarray(img, dtype=np.float32)
    tgts = [np.ascontiguousarray(t) for t in tgts]
    return img, tgts


# --- zoom (scale augmentation) ------------------------------------------------------------------------------


INSTANCE_TARGETS = ("boundary", "distance", "flow")


def zoom_probability(cfg: AugmentConfig, target: str = "binary") -> float:
    """The zoom probability in effect: ``cfg.zoom``, or when None 0.5 for instance targets and 0 otherwise."""
    if cfg.zoom is not None:
        return float(cfg.zoom)
    return 0.5 if target in INSTANCE_TARGETS else 0.0


def draw_zoom(cfg: AugmentConfig, rng: np.random.Generator, probability: float) -> float:
    """A zoom factor for one patch: log-uniform in ``cfg.zoom_range`` with ``probability``, else 1.

    Draws nothing from ``rng`` when ``probability`` is 0, so runs without zoom keep their random stream."""
    if probability <= 0:
        return 1.0
    if rng.random() >= probability:
        return 1.0
    return _log_uniform(rng, cfg.zoom_range)


def zoom_window(size: int, zoom: float) -> int:
    """Side of the source window that a ``size`` patch shows at ``zoom`` (2: half the window, objects 2x)."""
    return max(2, int(round(size / zoom)))


def resize_patch(array: np.ndarray, size: int, labels: bool) -> np.ndarray:
    """Resize a (..., h, w) window to (..., size, size): nearest neighbour for labels, bilinear otherwise.

    16-bit safe: values are interpolated in float and labels keep their dtype and values."""
    h, w = array.shape[-2:]
    if (h, w) == (size, size):
        return array
    if labels:
        return resize_nearest(array, (size, size))
    factors = (1.0,) * (array.ndim - 2) + (size / h, size / w)
    out = ndimage.zoom(np.asarray(array, dtype=np.float32), factors, order=1, mode="reflect", grid_mode=True)
    return out[..., :size, :size].astype(np.float32, copy=False)


def zoom_whole(image: np.ndarray, mask: np.ndarray, zoom: float) -> tuple[np.ndarray, np.ndarray]:
    """The centre window of ``image``/``mask`` seen at ``zoom``, at the input size (for previews)."""
    h, w = image.shape[-2:]
    side = zoom_window(min(h, w), zoom)
    y, x = (h - side) // 2, (w - side) // 2
    pad = max(0, -y, -x)
    if pad:
        image = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
        mask = np.pad(mask, pad, mode="reflect")
        y, x = y + pad, x + pad
    img = resize_patch(image[:, y : y + side, x : x + side], min(h, w), labels=False)
    m = resize_patch(mask[y : y + side, x : x + side], min(h, w), labels=True)
    return img, m


def build_augment(cfg: AugmentConfig) -> AugmentFn:
    """A picklable ``augment(image, targets, rng) -> (image, targets)`` applying ``cfg``'s augmentations."""
    return partial(_call_augment, cfg=replace(cfg))


def _call_augment(
    image: np.ndarray, targets: list[np.ndarray], rng: np.random.Generator, cfg: AugmentConfig
) -> tuple[np.ndarray, list[np.ndarray]]:
    return apply_augment(image, targets, rng, cfg)


# --- preview ------------------------------------------------------------------------------------------------


def _display_rgb(image: np.ndarray) -> np.ndarray:
    """(C,H,W) normalised -> (H,W,3) float in [0,1] for display: the shared renderer (:func:`~.io.to_rgb8`) with
    joint 0.5/99.5 percentiles (gray, two-channel R/G or the first three)."""
    from .io import to_rgb8

    return to_rgb8(image, 0.5, 99.5, per_channel=False).astype(np.float32) / 255.0


def _overlay_outline(rgb: np.ndarray, labels: np.ndarray, colour=(1.0, 0.85, 0.0)) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    out = rgb.copy()
    edges = find_boundaries(labels, mode="inner") & (labels > 0)
    out[edges] = colour
    return out


def preview_augmentations(
    image: np.ndarray, mask: np.ndarray, cfg: AugmentConfig, n: int = 8, seed: int = 0, target: str = "binary"
) -> np.ndarray:
    """An RGB uint8 grid (H', W', 3): the original (top-left) then ``n`` augmented draws, mask outlined.

    Zoom draws (``cfg.zoom``; None: the default for ``target``) show the image's centre at the drawn zoom."""
    rng = np.random.default_rng(seed)
    augment = build_augment(cfg)
    zoom_p = zoom_probability(cfg, target)
    if zoom_p > 0:  # zoomed draws are square: show every tile at the same square size
        side = min(image.shape[1:])
        image, mask = image[:, :side, :side], mask[:side, :side]
    tiles = [_overlay_outline(_display_rgb(image), mask)]
    for _ in range(n):
        zoom = draw_zoom(cfg, rng, zoom_p)
        img, m = zoom_whole(image, mask, zoom) if zoom != 1.0 else (image, mask)
        img, (m,) = augment(img, [m], rng)
        tiles.append(_overlay_outline(_display_rgb(img), m))
    h, w = image.shape[1:]
    cols = int(np.ceil(np.sqrt(len(tiles))))
    rows = int(np.ceil(len(tiles) / cols))
    gap = 4
    grid = np.ones((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), dtype=np.float32)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tile
    return (grid * 255 + 0.5).astype(np.uint8)


def preview_dataset_augmentations(
    data: str,
    cfg: AugmentConfig,
    out: str,
    n: int = 8,
    seed: int = 0,
    index: int = 0,
    normalization: str = "percentile",
) -> str:
    """Write a preview grid PNG of sample ``index`` of the dataset at ``data`` under ``n`` augmentations."""
    from ..errors import UnetlabError
    from .io import normalize, read_image, write_image
    from .layouts import load_dataset

    info = load_dataset(data)
    samples = [s for s in info.samples if s.mask_loader is not None]
    if not samples:
        raise UnetlabError("no images with masks found", data)
    if not 0 <= index < len(samples):
        raise UnetlabError(f"sample index {index} out of range (0..{len(samples) - 1})", data)
    sample = samples[index]
    image = normalize(read_image(sample.image), normalization)
    mask = sample.load_mask()
    if mask.shape != image.shape[1:]:
        raise UnetlabError(f"mask shape {mask.shape} does not match image {image.shape[1:]}", sample.image)
    grid = preview_augmentations(image, mask, cfg, n=n, seed=seed)
    write_image(out, np.moveaxis(grid, -1, 0))
    log.info("augmentation preview of %s (%d draws) written to %s", sample.name, n, out)
    return str(out)
