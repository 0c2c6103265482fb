"""Reading and writing images: PNG, JPEG, TIFF (8/16-bit, multichannel) as float32 channels-first arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ErrorKind, UnetlabError
from ..files import write_atomic
from .ome import check_planar, is_ome_tiff, is_zarr_path, open_zarr_image, read_ome_tiff

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
_TIFF = (".tif", ".tiff")


def is_image_file(path: str | Path) -> bool:
    """True for files whose extension unetlab reads as an image, and for Zarr / OME-Zarr image directories
    (hidden ones excluded)."""
    p = Path(path)
    if p.name.startswith("."):
        return False
    return p.suffix.lower() in IMAGE_EXTENSIONS or is_zarr_path(p)


def image_stem(path: str | Path) -> str:
    """The image's name without its format: ``a.ome.tif``, ``a.ome.zarr``, ``a.zarr`` and ``a.tif`` give ``a``."""
    name = Path(path).name
    for ending in (".ome.tiff", ".ome.tif", ".ome.zarr", ".zarr"):
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return Path(name).stem


def list_images(folder: str | Path) -> list[Path]:
    """Sorted image files (and Zarr image directories) directly inside ``folder``."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if (p.is_file() and is_image_file(p)) or is_zarr_path(p))


def _read_raw(path: Path) -> np.ndarray:
    if not path.exists():
        raise UnetlabError("file not found", path, kind=ErrorKind.UNREADABLE)
    if is_zarr_path(path):
        return open_zarr_image(path).read()
    if path.stat().st_size == 0:
        raise UnetlabError("file is empty (0 bytes)", path, READ_HINT, ErrorKind.UNREADABLE)
    try:
        if is_ome_tiff(path):
            arr = read_ome_tiff(path)
        elif path.suffix.lower() in _TIFF:
            import tifffile

            with tifffile.TiffFile(path) as tif:  # ImageJ and tifffile stacks name their axes: no Z or T
                series = tif.series[0]
                arr = series.asarray()
                check_planar(tuple(arr.shape), series.axes, path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                if im.mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                elif im.mode == "I;16B":
                    im = im.convert("I;16")
                arr = np.asarray(im)
    except UnetlabError:
        raise
    except Exception as exc:  # corrupt, truncated or not an image at all
        raise UnetlabError(f"cannot read image ({describe_read_error(exc, path)})", path, READ_HINT,
                           ErrorKind.UNREADABLE) from exc
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.ndim not in (2, 3):
        arr = np.squeeze(arr)
        if arr.ndim not in (2, 3):
            raise UnetlabError(f"unsupported image shape {arr.shape}; expected 2-D or 2-D with channels", path,
                               kind=ErrorKind.UNREADABLE)
    return arr


READ_HINT = "re-export the file, or move it out of the folder"


def describe_read_error(exc: BaseException, path: str | Path) -> str:
    """A short, one-line reason for a failed image read: no repeated path, no multi-line library text."""
    text = str(exc).replace(f"'{path}'", "").replace(str(path), "").strip(" :")
    text = " ".join(text.split())
    if type(exc).__name__ == "UnidentifiedImageError" or "cannot identify image file" in text:
        return "not an image, or a damaged one"
    if "truncated" in text or "failed to read" in text or "unexpected end" in text.lower():
        detail = f": {text}" if "truncated" not in text else ""
        return f"the file is cut short{detail}; an interrupted copy?"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def to_channels_first(arr: np.ndarray) -> np.ndarray:
    """(H, W) -> (1, H, W); (H, W, C) with C <= 4 -> (C, H, W); (C, H, W) stays (TIFF stacks)."""
    if arr.ndim == 2:
        return arr[None]
    if arr.shape[-1] <= 4 and arr.shape[0] > 4:
        return np.moveaxis(arr, -1, 0)
    return arr


def read_image(path: str | Path, drop_alpha: bool = True) -> np.ndarray:
    """Read an image file as float32 (C, H, W), raw intensities (not normalised).

    Alpha channels of RGBA images are dropped unless ``drop_alpha`` is False.
    """
    path = Path(path)
    arr = to_channels_first(_read_raw(path))
    if drop_alpha and arr.shape[0] == 4 and path.suffix.lower() not in _TIFF and not is_zarr_path(path):
        arr = arr[:3]
    out = arr.astype(np.float32, copy=False)
    if not np.isfinite(out).all():
        raise UnetlabError("image contains NaN or Inf pixels", path, "clean or re-export the image")
    return out


def read_label(path: str | Path) -> np.ndarray:
    """Read a mask or label image as an integer array (H, W).

    RGB masks are reduced to their first channel when all channels agree, otherwise to any-nonzero.
    Binary 0/255 masks come back as 0/255: use :func:`unetlab.labels.mask_to_labels` to interpret values.
    """
    path = Path(path)
    arr = _read_raw(path)
    if arr.ndim == 3:
        arr = to_channels_first(arr)
        if arr.shape[0] == 4:  # RGBA: ignore alpha
            arr = arr[:3]
        if arr.shape[0] == 1 or all(np.array_equal(arr[0], c) for c in arr[1:]):
            arr = arr[0]
        else:
            arr = (arr != 0).any(axis=0).astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise UnetlabError("mask contains NaN or Inf values", path, kind=ErrorKind.MASK_VALUES)
        if np.any(arr != np.round(arr)):
            raise UnetlabError("mask has fractional values; expected integer labels", path,
                               kind=ErrorKind.MASK_VALUES)
        arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise UnetlabError("mask has negative values", path, kind=ErrorKind.MASK_VALUES)
    return arr.astype(np.int32) if arr.max() < 2**31 else arr.astype(np.int64)


def normalize_percentile(
    image: np.ndarray, low: float = 1.0, high: float = 99.8, per_channel: bool = True, eps: float = 1e-6
) -> np.ndarray:
    """Scale intensities so that the ``low``/``high`` percentiles map to 0/1 (values outside are kept)."""
    img = image.astype(np.float32, copy=False)
    axes = (1, 2) if per_channel else None
    sub = img[:, ::4, ::4] if img.shape[1] * img.shape[2] > 1_000_000 else img  # percentiles on a subsample
    lo = np.percentile(sub, low, axis=axes, keepdims=per_channel)
    hi = np.percentile(sub, high, axis=axes, keepdims=per_channel)
    return ((img - lo) / np.maximum(hi - lo, eps)).astype(np.float32)


def to_rgb8(image: np.ndarray, low: float = 1.0, high: float = 99.8, per_channel: bool = True) -> np.ndarray:
    """Display version of an image (H, W) or (C, H, W) for pictures: percentile-stretched RGB uint8 (H, W, 3).

    One channel is grey; two channels are red and green; three or more use the first three as RGB. The
    ``low``/``high`` percentiles map to 0/255, per channel, or over the three RGB planes together.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = img[None]
    if img.ndim != 3:
        raise UnetlabError(f"cannot display an image of shape {img.shape}")
    planes = img[: min(img.shape[0], 3)]
    if per_channel:
        planes = normalize_percentile(planes, low, high)
    if planes.shape[0] == 1:
        planes = np.repeat(planes, 3, axis=0)
    elif planes.shape[0] == 2:
        planes = np.concatenate([planes, np.zeros_like(planes[:1])], axis=0)
    if not per_channel:
        planes = normalize_percentile(planes, low, high, per_channel=False)
    return np.round(np.moveaxis(np.clip(planes, 0, 1), 0, -1) * 255).astype(np.uint8)


def normalize(image: np.ndarray, mode: str = "percentile", low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Normalise an image by ``mode``: 'percentile' (per channel), 'minmax', 'dtype' (divide by 255/65535), 'none'."""
    if mode == "percentile":
        return normalize_percentile(image, low, high)
    if mode == "minmax":
        return normalize_percentile(image, 0.0, 100.0)
    if mode == "dtype":
        return (image / (65535.0 if image.max() > 255 else 255.0)).astype(np.float32)
    if mode == "none":
        return image.astype(np.float32, copy=False)
    raise UnetlabError(f"unknown normalisation '{mode}' (choose percentile, minmax, dtype or none)")


def write_image(path: str | Path, array: np.ndarray, compress: bool = True, description: str | None = None,
                pixel_size_um: tuple[float, float] | None = None) -> Path:
    """Write a 2-D (H, W) or channels-first (C, H, W) array to PNG/TIFF/JPEG atomically.

    TIFF keeps the dtype (uint16 labels, float32 probabilities); PNG takes uint8 or uint16. ``description``
    (TIFF only) is stored as the ImageDescription tag, e.g. how a label image was made; ``pixel_size_um`` (y, x;
    TIFF only) as its resolution tags, as Fiji and Bio-Formats read them.
    """
    path = Path(path)
    arr = np.asarray(array)
    suffix = path.suffix.lower()
    if suffix not in (*_TIFF, ".png", ".jpg", ".jpeg"):
        raise UnetlabError(f"cannot write an image to a {suffix or 'name without an extension'}: use .png or .tif",
                           path)

    def _write(tmp: Path) -> None:
        if suffix in _TIFF:
            import tifffile

            extra = {} if description is None else {"description": description, "metadata": None}
            if pixel_size_um:  # pixels per centimetre, the TIFF unit every reader knows
                extra.update(resolution=(1e4 / pixel_size_um[1], 1e4 / pixel_size_um[0]),
                             resolutionunit="CENTIMETER")
            # channels (classes, probabilities) are not colours: one grey plane each, never RGB
            tifffile.imwrite(tmp, arr, photometric="minisblack", compression="zlib" if compress else None, **extra)
        else:
            from PIL import Image

            a = arr
            if a.ndim == 3:
                a = np.moveaxis(a, 0, -1) if a.shape[0] in (3, 4) else a[0]
            if a.dtype not in (np.uint8, np.uint16):
                raise UnetlabError(f"cannot write dtype {a.dtype} to {suffix}; use .tif", path)
            fmt = "PNG" if suffix == ".png" else ("JPEG" if suffix in (".jpg", ".jpeg") else None)
            Image.fromarray(a).save(tmp, format=fmt)

    return write_atomic(path, _write)
