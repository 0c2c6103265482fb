"""Synthetic fluorescence images of cells with instance labels, for the demo and for tests.

Cells are elliptical blobs of varied size, brightness and texture that touch and overlap, blurred by a PSF,
under uneven illumination with shot and read noise, stored as 16-bit images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi


def make_synthetic_cells(
    size: tuple[int, int] = (256, 256),
    n_cells: int | None = None,
    radius: tuple[float, float] = (6.0, 14.0),
    seed: int | np.random.Generator = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (image uint16 (H, W), instance labels int32 (H, W)) of one synthetic fluorescence field."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    h, w = size
    if n_cells is None:
        n_cells = int(rng.integers(28, 45) * (h * w) / (256 * 256))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    labels = np.zeros((h, w), np.int32)
    signal = np.zeros((h, w), np.float32)
    centres: list[tuple[float, float, float]] = []
    for i in range(1, n_cells + 1):
        r = rng.uniform(*radius)
        for _ in range(20):  # allow touching/overlap of up to ~30% of the radius
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            if all(np.hypot(cy - y, cx - x) > 0.6 * (r + rr) for y, x, rr in centres):
                break
        centres.append((cy, cx, r))
        a, b = r * rng.uniform(0.8, 1.25), r * rng.uniform(0.7, 1.0)
        t = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(t) + dy * np.sin(t)) / a
        v = (-dx * np.sin(t) + dy * np.cos(t)) / b
        inside = u * u + v * v <= 1.0
        labels[inside & (labels == 0)] = i  # earlier cells stay on top where they overlap
        brightness = rng.uniform(0.35, 1.0)
        profile = np.clip(1.0 - 0.35 * (u * u + v * v), 0, None)
        signal += inside * brightness * profile
    texture = ndi.gaussian_filter(rng.normal(0, 1, (h, w)).astype(np.float32), 1.5)
    signal *= 1.0 + 0.15 * texture
    signal = ndi.gaussian_filter(signal, 1.2)  # PSF
    gy, gx = rng.uniform(-1, 1, 2)
    illumination = 0.75 + 0.25 * (gy * (yy / h - 0.5) + gx * (xx / w - 0.5)) * 2
    background = 0.06 + 0.03 * ndi.gaussian_filter(rng.normal(0, 1, (h, w)).astype(np.float32), 20) * 10
    photons = (signal * illumination + background) * 900.0
    noisy = rng.poisson(np.clip(photons, 0, None)).astype(np.float32) + rng.normal(100.0, 8.0, (h, w))
    image = np.clip(noisy * 12.0, 0, 65535).astype(np.uint16)
    return image, labels


def write_synthetic_dataset(
    out: str | Path, n_images: int = 12, size: tuple[int, int] = (256, 256), seed: int = 0
) -> Path:
    """Write ``n_images`` synthetic fields as ``out/images/cells_NNN.tif`` + ``out/masks/cells_NNN.tif``."""
    from .io import write_image

    out = Path(out)
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        image, labels = make_synthetic_cells(size, seed=rng)
        write_image(out / "images" / f"cells_{i:03d}.tif", image)
        write_image(out / "masks" / f"cells_{i:03d}.tif", labels.astype(np.uint16))
    return out
