"""Sliding-window (overlap-tile) prediction of images of any size, band by band.

Tiles sit on a grid aligned to the network's pooling factor, so that a tile sees exactly what the whole image
would; each tile contributes its core (the output minus an optional context margin) with Gaussian blending
weights computed once. Rows of tiles are processed top to bottom and finished output rows are yielded as soon as
no later tile touches them, so huge images (memory maps) stream with memory bounded by one band.
For valid-padding networks the input is mirror-padded so every output pixel gets its full context (the
overlap-tile strategy of Ronneberger et al. 2015).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..models.geometry import model_geometry

PredictFn = Callable[[np.ndarray], torch.Tensor]  # (B, C, Ti, Ti) float32 -> (B, K, To, To) probabilities


@dataclass(frozen=True)
class AxisPlan:
    """Tile geometry along one axis: input tile, output tile, shrink per side, core, step and count."""

    tile_in: int
    tile_out: int
    shrink: int  # (tile_in - tile_out) // 2: lost to valid convolutions on each side
    margin: int  # output discarded on each side of a tile (context)
    step: int
    count: int

    @property
    def core(self) -> int:
        return self.tile_out - 2 * self.margin

    @property
    def padded_out(self) -> int:
        """Length of the output grid covered by the tiles (>= the image)."""
        return (self.count - 1) * self.step + self.core


def _round_up(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)


def plan_axis(
    n: int,
    tile: int,
    overlap: float,
    align: int,
    margin: int = 0,
    output_size: Callable[[int], int] = lambda s: s,
    valid_input_size: Callable[[int], int] = lambda s: s,
) -> AxisPlan:
    """Tile geometry for an axis of length ``n`` (smaller tiles for small images, steps multiple of ``align``)."""
    margin = _round_up(margin, align) if margin else 0

    def geometry(t: int) -> tuple[int, int]:
        ti = valid_input_size(_round_up(t, align))
        return ti, output_size(ti)

    ti, to = geometry(tile)
    if to - 2 * margin <= 0:
        raise ValueError(f"tile {tile} is too small for a context margin of {margin} px")
    while to - 2 * margin < align:  # a valid-padding tile whose output is narrower than one step would leave gaps
        tile += align
        ti, to = geometry(tile)
    if to - 2 * margin > n:  # a smaller tile covers the whole axis
        t = align
        while True:
            ti2, to2 = geometry(t)
            if to2 - 2 * margin >= n or ti2 >= ti:
                ti, to = ti2, to2
                break
            t += align
    core = to - 2 * margin
    step = max(align, int(core * (1.0 - overlap)) // align * align)
    step = min(step, max(align, core // align * align))  # <= core: consecutive tiles leave no gap
    count = 1 if core >= n else math.ceil((n - core) / step) + 1
    return AxisPlan(ti, to, (ti - to) // 2, margin, step, count)


def model_tiling(model: nn.Module, tile: int, overlap: float, margin: int = 0) -> dict:
    """Keyword arguments of :func:`iter_tile_rows`, :func:`tile_predict` and :func:`count_tiles` for ``model``:
    tiles aligned to its size multiple and sized by its own size rules (:func:`unetlab.models.model_geometry`)."""
    g = model_geometry(model)
    return dict(tile=tile, overlap=overlap, align=g.size_multiple, margin=margin, output_size=g.output_size,
                valid_input_size=g.valid_input_size)


def gaussian_weights(h: int, w: int, sigma_scale: float = 0.125, floor: float = 1e-3) -> torch.Tensor:
    """Separable Gaussian importance map (h, w) peaking at 1 in the centre (nnU-Net/MONAI style)."""

    def axis(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        s = max(n * sigma_scale, 1e-6)
        return torch.exp(-0.5 * (x / s) ** 2)

    g = axis(h)[:, None] * axis(w)[None, :]
    return (g / g.max()).clamp_min(floor).float()


def reflect_indices(start: int, length: int, n: int) -> np.ndarray:
    """Indices ``start .. start+length-1`` mirrored into ``[0, n)`` (numpy 'reflect' convention)."""
    idx = np.arange(start, start + length)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.abs(idx) % period
    return np.where(idx >= n, period - idx, idx)


def read_window(image, y0: int, h: int, x0: int, w: int) -> np.ndarray:
    """``image[:, y0:y0+h, x0:x0+w]`` with mirror reflection outside; reads only the rows it needs."""
    c, H, W = image.shape
    if y0 >= 0 and x0 >= 0 and y0 + h <= H and x0 + w <= W:
        return np.asarray(image[:, y0 : y0 + h, x0 : x0 + w])
    ys, xs = reflect_indices(y0, h, H), reflect_indices(x0, w, W)
    ylo, yhi = int(ys.min()), int(ys.max()) + 1
    xlo, xhi = int(xs.min()), int(xs.max()) + 1
    block = np.asarray(image[:, ylo:yhi, xlo:xhi])
    return block[:, ys - ylo][:, :, xs - xlo]


def iter_tile_rows(
    predict: PredictFn,
    image,
    out_channels: int,
    tile: int = 512,
    overlap: float = 0.25,
    align: int = 16,
    margin: int = 0,
    batch_size: int = 4,
    output_size: Callable[[int], int] = lambda s: s,
    valid_input_size: Callable[[int], int] = lambda s: s,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(y0, y1, probs)`` bands of the prediction of ``image`` (C, H, W array-like), top to bottom.

    ``transform`` (e.g. normalisation) is applied to each band of input as it is read; ``progress`` is called
    with the number of tiles done after each batch.
    """
    _c, H, W = image.shape
    py = plan_axis(H, tile, overlap, align, margin, output_size, valid_input_size)
    px = plan_axis(W, tile, overlap, align, margin, output_size, valid_input_size)
    weight = gaussian_weights(py.core, px.core).to(device)
    off_y, off_x = py.margin + py.shrink, px.margin + px.shrink  # input tile start = core start - offset
    width = px.padded_out
    acc = torch.zeros((out_channels, py.core, width), device=device)
    norm = torch.zeros((1, py.core, width), device=device)
    for ty in range(py.count):
        y_core = ty * py.step
        band = read_window(image, y_core - off_y, py.tile_in, -off_x, (px.count - 1) * px.step + px.tile_in)
        if transform is not None:
            band = transform(band)
        band = np.ascontiguousarray(band, dtype=np.float32)
        for b0 in range(0, px.count, batch_size):
            cols = range(b0, min(b0 + batch_size, px.count))
            batch = np.stack([band[:, :, tx * px.step : tx * px.step + px.tile_in] for tx in cols])
            probs = predict(batch)
            probs = probs[:, :, py.margin : py.margin + py.core, px.margin : px.margin + px.core]
            for j, tx in enumerate(cols):
                xs = slice(tx * px.step, tx * px.step + px.core)
                acc[:, :, xs].addcmul_(probs[j].to(acc.dtype), weight)
                norm[:, :, xs] += weight
            if progress is not None:
                progress(len(cols))
        last = ty == py.count - 1
        done = py.core if last else py.step
        y1 = min(y_core + done, H)
        if y1 > y_core:
            yield y_core, y1, (acc[:, : y1 - y_core, :W] / norm[:, : y1 - y_core, :W])
        if not last:  # shift the overlapping rows up for the next row of tiles
            acc = torch.cat([acc[:, py.step :], acc.new_zeros((out_channels, py.step, width))], 1)
            norm = torch.cat([norm[:, py.step :], norm.new_zeros((1, py.step, width))], 1)


def tile_predict(predict: PredictFn, image, out_channels: int, **kwargs) -> torch.Tensor:
    """Whole-image sliding-window prediction: probabilities (K, H, W) float32 on the predict device."""
    _c, H, W = image.shape
    bands = [b for _y0, _y1, b in iter_tile_rows(predict, image, out_channels, **kwargs)]
    out = torch.cat(bands, dim=1)
    assert out.shape[1:] == (H, W), (out.shape, H, W)
    return out


def count_tiles(shape: tuple[int, int], tile: int, overlap: float, align: int, margin: int = 0,
                output_size: Callable[[int], int] = lambda s: s,
                valid_input_size: Callable[[int], int] = lambda s: s) -> int:
    """Number of tiles :func:`iter_tile_rows` will run for an image of ``shape`` (H, W)."""
    py = plan_axis(shape[0], tile, overlap, align, margin, output_size, valid_input_size)
    px = plan_axis(shape[1], tile, overlap, align, margin, output_size, valid_input_size)
    return py.count * px.count
