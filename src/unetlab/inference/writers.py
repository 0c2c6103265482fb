"""Writing predictions: label images, masks, probability maps, outline overlays, per-object measurements,
Kaggle run-length CSVs and ImageJ/Fiji ROI sets. Every writer is atomic (write, then rename) and refuses to
write onto one of the ``protect`` paths (the input images)."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..data.io import to_rgb8, write_image
from ..data.rle import RLE_STYLES, read_rle_table
from ..errors import UnetlabError
from ..files import atomic_directory, write_atomic, write_text

log = logging.getLogger(__name__)

def check_output(path: str | Path, protect: Iterable[str | Path] = ()) -> Path:
    """``path`` as a Path, after checking it is not one of the ``protect`` paths (inputs are never overwritten)."""
    path = Path(path)
    target = path.resolve()
    for p in protect:
        if Path(p).resolve() == target:
            raise UnetlabError("refusing to overwrite an input file", path, "choose another output folder")
    return path


# --- images ---------------------------------------------------------------------------------------------------


def write_labels(path: str | Path, labels: np.ndarray, protect: Iterable[str | Path] = (),
                 note: dict | None = None, pixel_size_um: tuple[float, float] | None = None) -> Path:
    """Write an instance label image as uint16 (TIFF or PNG); more than 65535 objects need a .tif (uint32).

    ``note`` (TIFF only) is kept in the file as JSON, e.g. the scale the image was predicted at
    (:func:`read_labels_note` reads it back); ``pixel_size_um`` (TIFF only), the input's pixel size."""
    path = check_output(path, protect)
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise UnetlabError(f"label image must be 2-D, got shape {lab.shape}", path)
    top = int(lab.max(initial=0))
    if top < 0 or lab.min(initial=0) < 0:
        raise UnetlabError("label image has negative values", path)
    if top <= 65535:
        out = lab.astype(np.uint16)
    elif path.suffix.lower() in (".tif", ".tiff"):
        out = lab.astype(np.uint32)
    else:
        raise UnetlabError(f"{top} labels do not fit a 16-bit PNG", path, "write labels as .tif")
    tiff = path.suffix.lower() in (".tif", ".tiff")
    return write_image(path, out, description=json.dumps({"unetlab": note}) if note and tiff else None,
                       pixel_size_um=pixel_size_um if tiff else None)


def read_labels_note(path: str | Path) -> dict:
    """The ``note`` that :func:`write_labels` stored in a label TIFF ({} when there is none)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as t:
            doc = json.loads(t.pages[0].description or "{}")
    except (OSError, ValueError, tifffile.TiffFileError):
        return {}
    note = doc.get("unetlab") if isinstance(doc, dict) else None
    return note if isinstance(note, dict) else {}


OME_ZARR_CHUNK = 1024


def write_labels_ome_zarr(path: str | Path, labels: np.ndarray, protect: Iterable[str | Path] = (),
                          pixel_size_um: tuple[float, float] | None = None, note: dict | None = None) -> Path:
    """Write an instance label image as an OME-Zarr (NGFF 0.4, Zarr v2) labels image: a nearest-neighbour
    pyramid down to 1024 px, the physical pixel size (y, x) in µm when known, and ``note`` in its attributes.

    Opens in napari (napari-ome-zarr), Fiji (MoBIE / n5-viewer) and any NGFF reader as a labels layer.
    """
    path = check_output(path, protect)
    if not path.name.lower().endswith(".zarr"):
        raise UnetlabError("OME-Zarr outputs are written to a NAME.ome.zarr directory", path)
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise UnetlabError(f"label image must be 2-D, got shape {lab.shape}", path)
    if lab.min(initial=0) < 0:
        raise UnetlabError("label image has negative values", path)
    lab = lab.astype(np.uint16 if lab.max(initial=0) <= 65535 else np.uint32)
    import warnings

    try:
        import zarr
        from ome_zarr.format import FormatV04

        with warnings.catch_warnings():  # ome-zarr >= 0.14 deprecates its Scaler class at import time
            warnings.simplefilter("ignore", DeprecationWarning)
            from ome_zarr.writer import write_multiscale
    except ImportError:
        raise UnetlabError("writing OME-Zarr needs the 'zarr' and 'ome-zarr' packages", path,
                           "pip install 'unetlab[zarr]'") from None
    pyramid = [lab]
    while min(pyramid[-1].shape) > OME_ZARR_CHUNK:
        pyramid.append(pyramid[-1][::2, ::2])  # nearest neighbour: labels stay labels
    sy, sx = pixel_size_um or (1.0, 1.0)
    unit = {"unit": "micrometer"} if pixel_size_um else {}
    axes = [{"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}]
    transforms = [[{"type": "scale", "scale": [sy * 2**i, sx * 2**i]}] for i in range(len(pyramid))]
    with atomic_directory(path) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        with warnings.catch_warnings():  # explicit transforms: levels are strided, so no half-pixel shift
            warnings.simplefilter("ignore", DeprecationWarning)
            write_multiscale(pyramid, group, fmt=FormatV04(), axes=axes, coordinate_transformations=transforms,
                             storage_options={"chunks": (OME_ZARR_CHUNK, OME_ZARR_CHUNK)}, name=path.name)
        group.attrs["image-label"] = {"version": "0.4"}
        if note:
            group.attrs["unetlab"] = note
    return path


def write_mask(path: str | Path, mask: np.ndarray, protect: Iterable[str | Path] = ()) -> Path:
    """Write a binary mask as uint8 0/255 (PNG or TIFF)."""
    path = check_output(path, protect)
    return write_image(path, (np.asarray(mask) > 0).astype(np.uint8) * 255)


def write_probabilities(path: str | Path, prob: np.ndarray, protect: Iterable[str | Path] = ()) -> Path:
    """Write a probability map (H, W) or (C, H, W) as float32 TIFF."""
    path = check_output(path, protect)
    if path.suffix.lower() not in (".tif", ".tiff"):
        raise UnetlabError("probability maps are written as float32 TIFF", path, "use a .tif name")
    return write_image(path, np.asarray(prob, dtype=np.float32))


def label_colors(n: int, seed: int = 0) -> np.ndarray:
    """(n + 1, 3) uint8 distinct bright colours for labels 0..n (golden-ratio hues; row 0 is black)."""
    import colorsys

    hues = (np.arange(n) * 0.618033988749895 + 0.1 * seed) % 1.0
    cols = [colorsys.hsv_to_rgb(h, 0.85, 1.0) for h in hues]
    out = np.zeros((n + 1, 3), np.uint8)
    if n:
        out[1:] = np.round(np.asarray(cols) * 255).astype(np.uint8)
    return out


def outline_overlay(image: np.ndarray, labels: np.ndarray, color: tuple[int, int, int] | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3) of the image with each object's outline drawn in its own colour (or ``color``).

    The outline is each object's pixels with a 4-neighbour of another label (skimage's ``find_boundaries``
    inner mode; image borders do not count). Colours come from :func:`label_colors`, not ``label2rgb``, whose
    default palette repeats every 10 labels: touching objects whose ids differ by 10 would share a colour.
    """
    from skimage.segmentation import find_boundaries, relabel_sequential

    rgb = to_rgb8(image)
    lab = np.asarray(labels)
    if lab.shape != rgb.shape[:2]:
        raise UnetlabError(f"labels {lab.shape} and image {rgb.shape[:2]} differ in size")
    if lab.dtype == bool:
        lab = lab.astype(np.uint8)
    edge = find_boundaries(lab, connectivity=1, mode="inner")
    if color is not None:
        rgb[edge] = np.asarray(color, np.uint8)
    elif edge.any():
        seq = relabel_sequential(lab)[0]
        rgb[edge] = label_colors(int(seq.max()))[seq[edge]]
    return rgb


def write_overlay(
    path: str | Path, image: np.ndarray, labels: np.ndarray, protect: Iterable[str | Path] = ()
) -> Path:
    """Write :func:`outline_overlay` as an RGB PNG."""
    path = check_output(path, protect)
    return write_image(path, np.moveaxis(outline_overlay(image, labels), -1, 0))


# --- measurements ---------------------------------------------------------------------------------------------

_SHAPE_COLUMNS = {
    "label": "ObjectNumber",
    "area": "AreaShape_Area",
    "centroid-1": "AreaShape_Center_X",
    "centroid-0": "AreaShape_Center_Y",
    "bbox-1": "AreaShape_BoundingBoxMinimum_X",
    "bbox-0": "AreaShape_BoundingBoxMinimum_Y",
    "bbox-3": "AreaShape_BoundingBoxMaximum_X",
    "bbox-2": "AreaShape_BoundingBoxMaximum_Y",
    "eccentricity": "AreaShape_Eccentricity",
    "solidity": "AreaShape_Solidity",
}


def measure_objects(labels: np.ndarray, image: np.ndarray | None = None) -> list[dict]:
    """One dict per object with CellProfiler-style names: ObjectNumber (the label), AreaShape_Area, _Center_X/Y,
    _BoundingBoxMinimum/Maximum_X/Y (maximum exclusive), _Eccentricity, _Solidity and, given an image (C, H, W)
    or (H, W), Intensity_MeanIntensity_ch<c> and Intensity_MaxIntensity_ch<c> per channel."""
    from skimage.measure import regionprops_table

    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise UnetlabError(f"label image must be 2-D, got shape {lab.shape}")
    lab = lab.astype(np.int32, copy=False)
    if not lab.any():
        return []
    props = ["label", "area", "centroid", "bbox", "eccentricity", "solidity"]
    intensity = None
    n_ch = 0
    if image is not None:
        img = np.asarray(image, dtype=np.float32)
        img = img[None] if img.ndim == 2 else img
        if img.shape[1:] != lab.shape:
            raise UnetlabError(f"image {img.shape[1:]} and labels {lab.shape} differ in size")
        n_ch = img.shape[0]
        intensity = np.moveaxis(img, 0, -1)
        props += ["intensity_mean", "intensity_max"]
    table = regionprops_table(lab, intensity_image=intensity, properties=props)
    columns: dict[str, np.ndarray] = {new: table[old] for old, new in _SHAPE_COLUMNS.items()}
    for c in range(n_ch):
        columns[f"Intensity_MeanIntensity_ch{c}"] = table[f"intensity_mean-{c}"]
        columns[f"Intensity_MaxIntensity_ch{c}"] = table[f"intensity_max-{c}"]
    n = len(columns["ObjectNumber"])
    rows = []
    for i in range(n):
        row = {}
        for k, v in columns.items():
            x = v[i]
            row[k] = int(x) if k == "ObjectNumber" or k.startswith(("AreaShape_Area", "AreaShape_Bounding")) else float(x)
        rows.append(row)
    return rows


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence], protect: Iterable[str | Path]) -> Path:
    path = check_output(path, protect)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(r)
    text = buf.getvalue()
    return write_text(path, text)


def _fmt(x) -> str:
    if isinstance(x, float):
        return "" if np.isnan(x) else f"{x:.6g}"
    return str(x)


def write_objects_csv(
    path: str | Path, measurements: dict[str, list[dict]], protect: Iterable[str | Path] = ()
) -> Path:
    """One CSV row per object of every image: ``ImageName`` then the :func:`measure_objects` columns."""
    cols: list[str] = []
    for rows in measurements.values():
        for r in rows:
            for k in r:
                if k not in cols:
                    cols.append(k)
    out_rows = ([name, *(_fmt(r.get(k, "")) for k in cols)] for name, rows in measurements.items() for r in rows)
    return _write_csv(Path(path), ["ImageName", *cols], out_rows, protect)


def summarize_objects(measurements: dict[str, list[dict]]) -> list[dict]:
    """Per image: object count and the mean, median and total object area, and mean intensities per channel."""
    out = []
    for name, rows in measurements.items():
        areas = np.asarray([r["AreaShape_Area"] for r in rows], dtype=np.float64)
        s: dict = {"ImageName": name, "Count": len(rows)}
        s["AreaShape_Area_Mean"] = float(areas.mean()) if len(areas) else float("nan")
        s["AreaShape_Area_Median"] = float(np.median(areas)) if len(areas) else float("nan")
        s["AreaShape_Area_Total"] = int(areas.sum())
        for k in rows[0] if rows else []:
            if k.startswith("Intensity_MeanIntensity_"):
                s[f"{k}_Mean"] = float(np.mean([r[k] for r in rows]))
        out.append(s)
    return out


def write_summary_csv(
    path: str | Path, measurements: dict[str, list[dict]], protect: Iterable[str | Path] = (),
    per_image: dict[str, dict] | None = None,
) -> Path:
    """One CSV row per image with the object count and area statistics (see :func:`summarize_objects`), plus
    ``per_image`` columns (e.g. the scale each image was predicted at)."""
    summary = summarize_objects(measurements)
    for s in summary:
        s.update((per_image or {}).get(s["ImageName"], {}))
    cols: list[str] = []
    for s in summary:
        for k in s:
            if k not in cols:
                cols.append(k)
    rows = ([_fmt(s.get(k, "")) for k in cols] for s in summary)
    return _write_csv(Path(path), cols or ["ImageName", "Count"], rows, protect)


# --- Kaggle run-length CSV ------------------------------------------------------------------------------------


def write_rle_csv(
    path: str | Path,
    items: Sequence[tuple[str, np.ndarray]],
    style: str = "dsb",
    protect: Iterable[str | Path] = (),
) -> Path:
    """Write a Kaggle submission: one row per object (labels in increasing order, objects never overlap since
    they come from label images); an image without objects gets one row with an empty mask.

    ``style`` "dsb": header ``ImageId,EncodedPixels``, column-major runs; "sartorius": ``id,predicted``, row-major
    (the styles of :data:`unetlab.data.rle.RLE_STYLES`).
    """
    from ..data.rle import labels_to_rles

    if style not in RLE_STYLES:
        raise UnetlabError(f"unknown RLE style '{style}' (choose {', '.join(RLE_STYLES)})")
    id_col, rle_col, order = RLE_STYLES[style]
    rows = []
    for image_id, labels in items:
        lab = np.asarray(labels)
        if lab.ndim != 2:
            raise UnetlabError(f"labels of {image_id} must be 2-D, got shape {lab.shape}")
        rles = [r for r in labels_to_rles(lab, order=order) if r]
        rows.extend([image_id, r] for r in rles) if rles else rows.append([image_id, ""])
    return _write_csv(Path(path), [id_col, rle_col], rows, protect)


def read_rle_csv(path: str | Path) -> dict[str, list[str]]:
    """Image id -> list of run-length strings from a DSB or Sartorius CSV (empty list for an image without objects)."""
    return read_rle_table(path).rles


def rle_csv_labels(path: str | Path, shapes: dict[str, tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
    """Decode a run-length CSV into label images (objects numbered in row order); sizes come from the CSV's
    Height/Width columns or from ``shapes``."""
    table = read_rle_table(path)
    return {key: table.labels(key, (shapes or {}).get(key)) for key in table.rles}


# --- ImageJ ROIs ----------------------------------------------------------------------------------------------


def label_outlines(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(label, polygon (N, 2) as x, y in ImageJ pixel coordinates) of each object's outer outline."""
    from scipy import ndimage as ndi
    from skimage.measure import find_contours

    lab = np.asarray(labels)
    out = []
    for i, sl in enumerate(ndi.find_objects(lab.astype(np.int64)), start=1):
        if sl is None:
            continue
        crop = np.pad((lab[sl] == i).astype(np.float32), 1)
        contours = find_contours(crop, 0.5)
        if not contours:
            continue
        c = max(contours, key=len)
        # crop coordinates -> image coordinates; ImageJ puts pixel (x, y) on [x, x + 1), its centre at x + 0.5
        y = c[:, 0] - 1 + sl[0].start + 0.5
        x = c[:, 1] - 1 + sl[1].start + 0.5
        out.append((i, np.stack([x, y], axis=1)))
    return out


def write_imagej_rois(path: str | Path, labels: np.ndarray, protect: Iterable[str | Path] = ()) -> Path:
    """Write each object's outline as a polygon ROI into an ImageJ/Fiji ROI zip (needs the ``roifile`` package)."""
    path = check_output(path, protect)
    try:
        import roifile
    except ImportError:
        raise UnetlabError(
            "writing ImageJ ROIs needs the 'roifile' package", path, "pip install roifile (or unetlab[roi])"
        ) from None
    if path.suffix.lower() != ".zip":
        raise UnetlabError("ImageJ ROI sets are written as .zip", path)
    rois = []
    for label, poly in label_outlines(labels):
        roi = roifile.ImagejRoi.frompoints(poly.astype(np.float32), name=f"{label:05d}")
        rois.append(roi)
    if not rois:
        log.warning("%s: no objects, writing an empty ROI set", path)

    def _write(tmp: Path) -> None:
        import zipfile

        if rois:
            roifile.roiwrite(tmp, rois, mode="w")
        else:
            with zipfile.ZipFile(tmp, "w"):
                pass

    return write_atomic(path, _write)
