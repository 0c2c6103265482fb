"""Huge TIFF and Zarr images, tile by tile: read rows on demand, normalise from a subsample, write outputs band
by band.

:func:`open_tiff_rows` gives a lazy channels-first view of a TIFF or Zarr / OME-Zarr image whose
``[:, y0:y1, x0:x1]`` reads only those rows: uncompressed contiguous TIFF data by positioned reads (no memory
map, so pages read never count as the process's resident memory), compressed, striped or tiled TIFF pages
through tifffile's zarr interface (``series.aszarr``), which decodes only the strips/tiles the rows touch, and
Zarr arrays by their chunks.
:func:`band_normalizer` computes the normalisation from a strided subsample and applies it per band, and
:func:`stream_predict_file` writes the mask as a compressed tiled TIFF and the probabilities as a float32 TIFF
while the predictor yields finished bands, so memory stays bounded by one band of tiles whatever the image size.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..data.ome import AxesView, LazyImage, is_zarr_path, open_zarr
from ..errors import UnetlabError
from ..files import atomic_output

log = logging.getLogger(__name__)

STREAM_THRESHOLD = 64_000_000  # pixels: larger TIFF images are predicted tile by tile from disk
SUBSAMPLE_MAX = 32_000_000  # at most this many pixels (per channel) go into the normalisation percentiles
MASK_TILE = 256


class TiffRows(LazyImage):
    """A lazy (C, H, W) view of one TIFF series: ``view[:, y0:y1, x0:x1]`` reads only rows ``y0:y1``.

    Supports contiguous uncompressed data (positioned reads) and single-sample-per-page or multi-sample pages
    in strips or 2-D tiles, any compression tifffile decodes. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | Path) -> None:
        import tifffile

        self.path = Path(path)
        try:
            self._tif = tifffile.TiffFile(self.path)
        except Exception as exc:
            raise UnetlabError(f"cannot read TIFF ({type(exc).__name__}: {exc})", self.path) from exc
        try:
            self._setup()
        except Exception:
            self._tif.close()
            raise

    def _setup(self) -> None:
        series = self._tif.series[0]
        pages = list(series.pages)
        if any(p is None for p in pages):
            raise UnetlabError("TIFF layout cannot be streamed (virtual pages)", self.path)
        pages = [p.aspage() for p in pages]  # frames -> full pages (tags needed to decode)
        first = pages[0]
        if int(getattr(first, "tiledepth", 1) or 1) > 1:
            raise UnetlabError("TIFF layout cannot be streamed (volumetric tiles)", self.path)
        h, w = int(first.imagelength), int(first.imagewidth)
        spp = int(first.samplesperpixel)
        if len(pages) > 1 and (spp != 1 or any((p.imagelength, p.imagewidth, p.samplesperpixel) != (h, w, 1)
                                               for p in pages)):
            raise UnetlabError(f"TIFF series of shape {series.shape} cannot be streamed", self.path)
        self.height, self.width = h, w
        self.channels = len(pages) * spp
        self.dtype = np.dtype(self._tif.byteorder + series.dtype.char)
        self._offset = series.dataoffset  # contiguous uncompressed data: the file offset of pixel (0, 0)
        self._contig_samples = spp if first.planarconfig == 1 else 1  # samples interleaved per pixel
        self._store = None
        if self._offset is None:  # compressed or segmented: decoded by tifffile through its zarr store
            import zarr

            self._store = series.aszarr(level=0)
            self._zarr = AxesView(zarr.open(self._store, mode="r"), series.axes, self.path)

    # -- the array-like face used by tiling.read_window (LazyImage) -------------------------------------------
    def _window(self, ys: slice, xs: slice) -> np.ndarray:
        y0, y1, ystep = ys.indices(self.height)
        x0, x1, xstep = xs.indices(self.width)
        return self.rows(y0, max(y0, y1))[:, ::ystep, x0:x1:xstep]

    def rows(self, y0: int, y1: int) -> np.ndarray:
        """Rows ``y0:y1`` of every channel, (C, y1 - y0, W), in the file's dtype."""
        if self._offset is not None:
            return self._read_contiguous(y0, y1)
        return self._read_segments(y0, y1)

    def _read_contiguous(self, y0: int, y1: int) -> np.ndarray:
        n, w, item = y1 - y0, self.width, self.dtype.itemsize
        fh = self._tif.filehandle
        if self._contig_samples > 1 or self.channels == 1:  # one block: rows of interleaved samples
            s = self._contig_samples
            fh.seek(self._offset + y0 * w * s * item)
            buf = fh.read(n * w * s * item)
            arr = np.frombuffer(buf, self.dtype).reshape(n, w, s)
            return np.moveaxis(arr, -1, 0)
        out = np.empty((self.channels, n, w), self.dtype)
        plane = self.height * w * item
        for c in range(self.channels):
            fh.seek(self._offset + c * plane + y0 * w * item)
            out[c] = np.frombuffer(fh.read(n * w * item), self.dtype).reshape(n, w)
        return out

    def _read_segments(self, y0: int, y1: int) -> np.ndarray:
        """Compressed, striped or tiled data: through tifffile's zarr view, which decodes only the strips or
        tiles that rows ``y0:y1`` touch."""
        return self._zarr[:, y0:y1, :]

    def close(self) -> None:
        """Close the file."""
        if self._store is not None:
            self._store.close()
        self._tif.close()


def open_tiff_rows(path: str | Path) -> TiffRows | AxesView:
    """A lazy channels-first view of the TIFF (see :class:`TiffRows`) or Zarr / OME-Zarr image at ``path``."""
    if is_zarr_path(path):
        array, axes, _meta = open_zarr(path)
        return AxesView(array, axes, path)
    return TiffRows(path)


def tiff_pixels(path: str | Path) -> int | None:
    """Height x width of a TIFF's first series or a Zarr image, read from its header (None if unreadable)."""
    try:
        if is_zarr_path(path):
            view = open_tiff_rows(path)
            return view.height * view.width
        import tifffile

        with tifffile.TiffFile(path) as t:
            page = t.series[0].pages[0]
            return int(page.imagelength) * int(page.imagewidth)
    except Exception as exc:  # the image is read (and its problem reported) by the normal reader instead
        log.debug("%s: header not readable (%s: %s); not streaming it", path, type(exc).__name__, exc)
        return None


def should_stream(path: str | Path, threshold: int | None = STREAM_THRESHOLD) -> bool:
    """True for TIFF files and Zarr images with more than ``threshold`` pixels (None: never stream)."""
    if threshold is None or (Path(path).suffix.lower() not in (".tif", ".tiff") and not is_zarr_path(path)):
        return False
    n = tiff_pixels(path)
    return n is not None and n > threshold


def subsample_stride(height: int, width: int, limit: int = SUBSAMPLE_MAX) -> int:
    """Row/column stride of the normalisation subsample: 4 (as in-memory normalisation does for images over
    1 Mpx) unless more than ``limit`` pixels would remain."""
    if height * width <= 1_000_000:
        return 1
    return max(4, math.ceil(math.sqrt(height * width / limit)))


def strided_subsample(image, stride: int, block_rows: int = 1024) -> np.ndarray:
    """``image[:, ::stride, ::stride]`` as float32, read ``block_rows`` rows at a time."""
    c, h, _w = image.shape
    parts = []
    for y0 in range(0, h, block_rows):
        y1 = min(h, y0 + block_rows)
        first = -(-y0 // stride) * stride  # first row of the stride grid in this block
        if first >= y1:
            continue
        parts.append(np.asarray(image[:, first:y1:stride, ::stride], dtype=np.float32))
    return np.concatenate(parts, axis=1)


def band_normalizer(image, mode: str = "percentile", low: float = 1.0, high: float = 99.8
                    ) -> Callable[[np.ndarray], np.ndarray]:
    """A per-band version of :func:`unetlab.data.io.normalize` for an image too big to hold: the statistics
    come from a strided subsample (the same one the in-memory path uses up to ~500 Mpx), the scaling per band."""
    c, h, w = image.shape
    if mode == "none":
        return lambda band: np.asarray(band, dtype=np.float32)
    if mode == "dtype":
        big = any(float(np.asarray(image[:, y0 : y0 + 1024]).max()) > 255 for y0 in range(0, h, 1024))
        scale = np.float32(65535.0 if big else 255.0)
        return lambda band: (np.asarray(band, dtype=np.float32) / scale).astype(np.float32)
    if mode not in ("percentile", "minmax"):
        raise UnetlabError(f"unknown normalisation '{mode}' (choose percentile, minmax, dtype or none)")
    if mode == "minmax":  # as in memory: the extremes of the subsample
        low, high = 0.0, 100.0
    sub = strided_subsample(image, subsample_stride(h, w))
    lo = np.percentile(sub, low, axis=(1, 2), keepdims=True)
    hi = np.percentile(sub, high, axis=(1, 2), keepdims=True)
    del sub
    scale = np.maximum(hi - lo, 1e-6)

    def normalize_band(band: np.ndarray) -> np.ndarray:
        return ((np.asarray(band, dtype=np.float32) - lo) / scale).astype(np.float32)

    return normalize_band


class BandTiffWriter:
    """An uncompressed TIFF of ``shape`` ((H, W) or (K, H, W)) at ``path``, filled band by band with positioned
    writes. The file is laid out by ``tifffile.memmap`` (sparse until written); data goes through the file,
    never through a memory map, so it costs no resident memory. ``path`` is a temporary from
    :func:`unetlab.files.atomic_output`, which moves it into place."""

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype) -> None:
        import tifffile

        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        mm = tifffile.memmap(self.path, shape=self.shape, dtype=self.dtype, photometric="minisblack")
        self.offset = int(mm.offset)
        del mm
        self._fh = open(self.path, "r+b")  # noqa: SIM115 - closed in close()

    def write_rows(self, y0: int, rows: np.ndarray) -> None:
        """Write ``rows`` ((n, W) or (K, n, W)) at row ``y0``."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        h, w = self.shape[-2:]
        item = self.dtype.itemsize
        planes = rows.reshape((-1,) + rows.shape[-2:])
        for k, plane in enumerate(planes):
            self._fh.seek(self.offset + (k * h * w + y0 * w) * item)
            self._fh.write(plane.tobytes())

    def close(self) -> None:
        """Flush and close the file."""
        self._fh.close()


def _mask_tiles(rows_iter: Iterator[tuple[int, np.ndarray]], height: int, width: int,
                tile: int = MASK_TILE) -> Iterator[np.ndarray]:
    """Re-cut (y0, rows) bands into the row-major (tile, tile) tiles tifffile writes."""
    pending: list[np.ndarray] = []
    have = 0
    done = 0
    for _y0, rows in rows_iter:
        pending.append(rows)
        have += rows.shape[0]
        while have >= tile or (done + have == height and have > 0):
            block = np.concatenate(pending, 0)
            n = min(tile, block.shape[0])
            for x in range(0, width, tile):
                yield block[:n, x : x + tile]
            rest = block[n:]
            pending = [rest] if rest.shape[0] else []
            have -= n
            done += n


def stream_predict_file(
    predictor,
    path: Path,
    mask_path: Path,
    prob_path: Path | None,
    foreground: Callable[[np.ndarray], np.ndarray],
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Predict the huge TIFF ``path`` band by band; write the mask (uint8, 0/255 or class ids) as a compressed
    tiled TIFF at ``mask_path`` and, when ``prob_path``, the float32 probabilities. Returns shape and counts."""
    import tifffile

    with open_tiff_rows(path) as image, contextlib.ExitStack() as outputs:
        _c, h, w = image.shape
        k = int(predictor.run.out_channels)
        prob_writer = None
        if prob_path is not None:
            prob_writer = BandTiffWriter(outputs.enter_context(atomic_output(prob_path)), (k, h, w), np.float32)
            outputs.callback(prob_writer.close)  # closed before its rename (callbacks run last-in first-out)
        tmp = outputs.enter_context(atomic_output(mask_path))
        foreground_pixels = 0

        def mask_rows() -> Iterator[tuple[int, np.ndarray]]:
            nonlocal foreground_pixels
            for y0, _y1, prob in predictor.predict_stream(image, source=path, progress=progress):
                if prob_writer is not None:
                    prob_writer.write_rows(y0, prob)
                fg = foreground(prob)
                if fg.dtype == bool:
                    foreground_pixels += int(fg.sum())
                    fg = fg.astype(np.uint8) * 255
                yield y0, fg.astype(np.uint8, copy=False)

        tifffile.imwrite(tmp, _mask_tiles(mask_rows(), h, w), shape=(h, w), dtype=np.uint8,
                         tile=(MASK_TILE, MASK_TILE), compression="zlib", photometric="minisblack")
    log.info("streamed %s (%dx%d) tile by tile into %s", path.name, h, w, mask_path)
    return {"shape": (h, w), "foreground_pixels": foreground_pixels}
