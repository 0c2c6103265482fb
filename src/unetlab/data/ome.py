"""OME-TIFF and OME-Zarr / Zarr images: channels-first views by their axes, and their metadata.

:class:`AxesView` gives any array with named axes (``"CYX"``, ``"TCZYX"``, NGFF ``["c", "y", "x"]``) the
``(C, H, W)`` face the rest of unetlab uses; ``view[:, y0:y1, x0:x1]`` reads only those rows of a lazy array
(a zarr array, or tifffile's zarr view of a TIFF), so large images stream. T and Z must be 1: unetlab is 2-D.
:func:`read_metadata` gives axes, shape, channel names and the physical pixel size of OME-TIFF and OME-Zarr.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UnetlabError

log = logging.getLogger(__name__)

ZARR_SUFFIX = ".zarr"
_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup", ".zattrs")
_UNITS_UM = {"nm": 1e-3, "nanometer": 1e-3, "µm": 1.0, "um": 1.0, "micrometer": 1.0, "mm": 1e3,
             "millimeter": 1e3}


def is_zarr_path(path: str | Path) -> bool:
    """True for a ``NAME.zarr`` / ``NAME.ome.zarr`` directory holding a zarr array or group."""
    p = Path(path)
    return p.name.lower().endswith(ZARR_SUFFIX) and p.is_dir() and any((p / m).exists() for m in _ZARR_MARKERS)


def is_ome_tiff(path: str | Path) -> bool:
    """True for ``.ome.tif`` / ``.ome.tiff`` file names."""
    return Path(path).name.lower().endswith((".ome.tif", ".ome.tiff"))


class LazyImage:
    """The (C, H, W) array face of a lazily read image: ``shape``, ``ndim`` and ``[c, y0:y1, x0:x1]`` slicing.

    Subclasses set ``channels``, ``height`` and ``width`` and implement ``_window(ys, xs)``, which reads the
    (C, rows, columns) block of two slices; channels are then picked from it.
    """

    channels: int
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @property
    def ndim(self) -> int:
        return 3

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > 3 or not all(isinstance(k, slice) for k in key):
            raise IndexError(f"{type(self).__name__} takes [channels, rows, columns] slices")
        cs, ys, xs = key + (slice(None),) * (3 - len(key))
        return self._window(ys, xs)[cs]

    def _window(self, ys: slice, xs: slice) -> np.ndarray:
        raise NotImplementedError

    def read(self) -> np.ndarray:
        """The whole image, (C, H, W), in its own dtype."""
        return self[:, :, :]

    def close(self) -> None:
        """Release the file (nothing to release by default)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_planar(shape: tuple[int, ...], axes: str, path: str | Path) -> None:
    """One line when an image with named ``axes`` (OME, ImageJ) is a Z-stack or a time series: unetlab reads,
    trains on and predicts 2-D planes (with channels)."""
    axes = axes.upper()
    for ax in "TZ":
        if ax in axes and shape[axes.index(ax)] > 1:
            raise UnetlabError(f"{ax} axis of size {shape[axes.index(ax)]} (axes {axes}): unetlab predicts 2-D "
                               "images", path, hint="save one plane per file")


class AxesView(LazyImage):
    """A (C, H, W) view of an array with named axes; indexing ``[c, y0:y1, x0:x1]`` reads only those rows.

    Every axis other than Y and X is a channel axis (C, S for samples, Q for unknown), except T and Z, which
    must have size 1. Several channel axes are flattened into one, in their order.
    """

    def __init__(self, array: Any, axes: str, path: str | Path) -> None:
        axes = axes.upper()
        self.path = Path(path)
        if len(axes) != len(array.shape) or "Y" not in axes or "X" not in axes:
            raise UnetlabError(f"image axes {axes!r} do not fit its shape {tuple(array.shape)}", self.path)
        check_planar(tuple(array.shape), axes, self.path)
        self.array, self.axes = array, axes
        self._other = [i for i, a in enumerate(axes) if a not in "YXTZ"]
        self._yx = (axes.index("Y"), axes.index("X"))
        self.channels = int(np.prod([array.shape[i] for i in self._other])) if self._other else 1
        self.height, self.width = int(array.shape[self._yx[0]]), int(array.shape[self._yx[1]])
        self.dtype = np.dtype(array.dtype)

    def _window(self, ys: slice, xs: slice) -> np.ndarray:
        index: list[Any] = [0 if a in "TZ" else slice(None) for a in self.axes]
        index[self._yx[0]], index[self._yx[1]] = ys, xs
        block = np.asarray(self.array[tuple(index)])
        kept = [a for a in self.axes if a not in "TZ"]  # integer indices dropped T and Z
        order = [kept.index(a) for a in kept if a not in "YX"] + [kept.index("Y"), kept.index("X")]
        block = np.transpose(block, order)
        return block.reshape((self.channels, *block.shape[-2:]))


# --- OME-Zarr / Zarr --------------------------------------------------------------------------------------------


def _ngff_attrs(group: Any) -> dict:
    attrs = dict(group.attrs)
    return attrs.get("ome", attrs)  # NGFF 0.5 nests its metadata under "ome"


def _axis_names(axes: list) -> str:
    return "".join((a["name"] if isinstance(a, dict) else str(a))[0].upper() for a in axes)


def _guess_axes(shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        return "CYX" if shape[0] <= shape[-1] else "YXC"
    return "TCZYX"[-len(shape):] if len(shape) <= 5 else "Q" * (len(shape) - 2) + "YX"


def open_zarr(path: str | Path) -> tuple[Any, str, dict]:
    """The full-resolution array of a Zarr array or NGFF image at ``path``, its axes and its NGFF metadata."""
    import zarr

    path = Path(path)
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise UnetlabError(f"cannot open Zarr ({type(exc).__name__}: {exc})", path) from exc
    if hasattr(node, "shape") and hasattr(node, "dtype"):  # a plain array
        return node, _guess_axes(tuple(node.shape)), {}
    meta = _ngff_attrs(node)
    multiscales = meta.get("multiscales")
    if not multiscales:
        arrays = [k for k, v in node.arrays()] if hasattr(node, "arrays") else []
        raise UnetlabError("Zarr group is not an OME-Zarr image (no 'multiscales' metadata)", path,
                           hint=f"open one of its arrays instead: {', '.join(arrays)}" if arrays else None)
    ms = multiscales[0]
    level0 = ms["datasets"][0]["path"]
    array = node[level0]
    axes = _axis_names(ms["axes"]) if ms.get("axes") else _guess_axes(tuple(array.shape))
    return array, axes, meta


def open_zarr_image(path: str | Path) -> AxesView:
    """A lazy (C, H, W) view of the Zarr / OME-Zarr image at ``path``."""
    array, axes, _meta = open_zarr(path)
    return AxesView(array, axes, path)


# --- metadata ------------------------------------------------------------------------------------------------


@dataclass
class ImageMeta:
    """What the file says about an image: axes, shape, dtype, channel names, pixel size in µm (y, x)."""

    axes: str
    shape: tuple[int, ...]
    dtype: str
    channel_names: list[str] = field(default_factory=list)
    pixel_size_um: tuple[float, float] | None = None


def _one(value: Any) -> dict:
    """The first element of an OME-XML node that may be repeated (a list in xml2dict's dict), or {}."""
    if isinstance(value, list):
        value = value[0] if value else {}
    return value if isinstance(value, dict) else {}


def _ome_xml_pixels(xml: str) -> tuple[tuple[float, float] | None, list[str]]:
    """Pixel size in µm (y, x) and channel names of the first image of an OME-XML document."""
    import tifffile

    pixels = _one(_one(_one(tifffile.xml2dict(xml, sep="").get("OME")).get("Image")).get("Pixels"))
    size = None
    sx, sy = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeY")
    if sx is not None and sy is not None:
        unit_x, unit_y = pixels.get("PhysicalSizeXUnit", "µm"), pixels.get("PhysicalSizeYUnit", "µm")
        size = (float(sy) * _UNITS_UM.get(unit_y, 1.0), float(sx) * _UNITS_UM.get(unit_x, 1.0))
    channels = pixels.get("Channel") or []
    channels = channels if isinstance(channels, list) else [channels]
    names = [str(c["Name"]) for c in channels if isinstance(c, dict) and "Name" in c]
    return size, names


def read_metadata(path: str | Path) -> ImageMeta:
    """Axes, shape, dtype, channel names and pixel size of an OME-TIFF, TIFF or (OME-)Zarr image."""
    path = Path(path)
    if is_zarr_path(path):
        array, axes, meta = open_zarr(path)
        size = None
        ms = (meta.get("multiscales") or [{}])[0]
        for t in (ms.get("datasets") or [{}])[0].get("coordinateTransformations", []):
            if t.get("type") == "scale":
                scale = dict(zip(axes, t["scale"]))
                units = {(a["name"][0].upper() if isinstance(a, dict) else ""): a.get("unit", "micrometer")
                         for a in ms.get("axes", []) if isinstance(a, dict)}
                size = (float(scale["Y"]) * _UNITS_UM.get(units.get("Y", "micrometer"), 1.0),
                        float(scale["X"]) * _UNITS_UM.get(units.get("X", "micrometer"), 1.0))
        names = [c.get("label", "") for c in meta.get("omero", {}).get("channels", [])]
        return ImageMeta(axes, tuple(array.shape), str(array.dtype), names, size)
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            size, names = _ome_xml_pixels(tif.ome_metadata) if tif.is_ome and tif.ome_metadata else (None, [])
            return ImageMeta(series.axes, tuple(series.shape), str(series.dtype), names, size)
    except Exception as exc:
        raise UnetlabError(f"cannot read TIFF metadata ({type(exc).__name__}: {exc})", path) from exc


def read_ome_tiff(path: str | Path) -> np.ndarray:
    """An OME-TIFF's first series as (C, H, W), by its OME axes (T and Z of size 1)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        return AxesView(series.asarray(), series.axes, path).read()


__all__ = ["AxesView", "ImageMeta", "LazyImage", "is_ome_tiff", "is_zarr_path", "open_zarr", "open_zarr_image",
           "read_metadata", "read_ome_tiff"]
