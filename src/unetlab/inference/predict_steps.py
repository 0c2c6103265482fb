"""The steps of :func:`unetlab.inference.predict.predict` for one image: its size from the header, its
probabilities (at its own size, at the training object size, or streamed band by band; smaller batches on
out of memory), its foreground, and the joining of the ranks' run-length parts."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from ..data.ome import is_zarr_path
from ..data.targets import TARGET_KINDS
from ..errors import UnetlabError
from ..files import remove_entries, remove_stale_temporaries, write_text
from .predictor import Predictor

log = logging.getLogger(__name__)

def foreground(prob: np.ndarray, run_info: dict, threshold: float) -> np.ndarray:
    """The mask of probabilities ``prob``: the class map of a multi-class model, else the foreground rule of its
    target at ``threshold``."""
    if run_info.get("task") == "multiclass":
        return prob.argmax(0).astype(np.uint8)
    from .postprocess import foreground_mask

    return foreground_mask(prob, run_info.get("target", "binary"), threshold)


def header_size(f: Path) -> tuple[int, int]:
    """An image's (height, width) from its header, without reading its pixels."""
    if is_zarr_path(f):
        from ..data.ome import open_zarr_image

        view = open_zarr_image(f)
        return (view.height, view.width)
    if f.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(f) as t:
            shp = t.series[0].shape
        return tuple(shp[-2:]) if len(shp) == 2 or shp[-1] > 4 else tuple(shp[:2])
    from PIL import Image

    with Image.open(f) as im:
        return (im.height, im.width)


def header_sizes(files: list[Path], predictor: Predictor) -> tuple[dict[Path, tuple[int, int]], int]:
    """Each readable image's size and the number of tiles of them all, for the progress bar."""
    sizes, total = {}, 0
    for f in files:
        try:
            sizes[f] = header_size(f)
            total += predictor.n_tiles(sizes[f])
        except Exception as exc:  # the image itself is read, and its problem reported, when its turn comes
            log.debug("%s: size not readable from the header (%s: %s); the progress bar counts it as one tile",
                        f, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            total += 1
    return sizes, total


PREDICTIONS_JSON = "predictions.json"
# every entry predict writes into --out (what --overwrite removes first; anything else there is left alone)
PREDICT_OUTPUTS = ("masks", "classes", "probabilities", "labels", "overlays", "rois", "counts.csv", "objects.csv",
                   PREDICTIONS_JSON)


def check_out(out: Path, input: Path, overwrite: bool, resume: bool, rle: str | Path | None = None) -> None:
    """Refuse outputs that would write into the input folder or replace an earlier output without --overwrite
    (``--out`` and the ``--rle`` CSV); with --overwrite, remove the earlier prediction's outputs."""
    o, i = out.resolve(), input.resolve()
    if input.is_dir() and (o == i or i in o.parents):
        raise UnetlabError("output folder is inside the input folder (inputs are never written to)", out,
                           "choose an --out outside the input folder")
    if rle is not None:
        r = Path(rle)
        if input.is_dir() and i in r.resolve().parents or r.resolve() == i:
            raise UnetlabError("--rle CSV is inside the input folder (inputs are never written to)", r,
                               "write it elsewhere, e.g. into --out")
        if r.exists() and not (overwrite or resume):
            raise UnetlabError("--rle CSV exists", r, "use --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UnetlabError("output exists and is not a folder", out)
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise UnetlabError("output folder is not empty", out, "use --overwrite to replace or --resume to finish it")
    if out.is_dir() and overwrite and not resume:  # an earlier prediction's outputs do not outlive --overwrite
        for p in remove_entries(out, PREDICT_OUTPUTS):
            log.info("--overwrite: removed %s", p)
    if out.is_dir():  # temporaries of a run killed mid-write: never a finished output, so never kept
        for tmp in remove_stale_temporaries(out):
            log.info("removed %s, left by an interrupted run", tmp)


def with_skip_bad_hint(exc: UnetlabError, image: Path, done: int = 0) -> UnetlabError:
    """``exc``, when it is about ``image`` itself (unreadable, wrong channels), with a hint that ``--skip-bad``
    goes on past it (and, when ``done`` images before it were written, that ``--resume`` keeps them): the same
    kind of error, one line. Other errors (a full disk, say) stay as they are."""
    if exc.path is None or Path(exc.path) != Path(image) or "--skip-bad" in str(exc):
        return exc
    skip = "--skip-bad skips such images and lists them"
    if done:
        skip = (f"--skip-bad skips such images; the {done} image(s) before it are written, and --resume --skip-bad "
                "goes on from there")
    return exc.with_hint(f"or {skip}" if exc.hint else skip)


def merge_rle_parts(rle: Path, parts: list[Path], order: dict[str, int]) -> None:
    """Join the ranks' run-length CSV parts into ``rle``: the rows of each image together, in input order."""
    import csv

    header: list[str] | None = None
    groups: dict[str, list[list[str]]] = {}
    for part in parts:
        with part.open(newline="") as f:
            rows = list(csv.reader(f))
        header = header or rows[0]
        for row in rows[1:]:
            groups.setdefault(row[0], []).append(row)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header or [])
    for name in sorted(groups, key=lambda n: order.get(n, len(order))):
        w.writerows(groups[name])
    text = buf.getvalue()
    write_text(rle, text)
    for part in parts:
        part.unlink(missing_ok=True)


def pixel_size(image: Path) -> tuple[float, float] | None:
    """The physical pixel size (y, x) in µm that an OME-TIFF or OME-Zarr input declares (None otherwise)."""
    from ..data.ome import is_ome_tiff, read_metadata

    if not (is_ome_tiff(image) or is_zarr_path(image)):
        return None
    try:
        return read_metadata(image).pixel_size_um
    except UnetlabError as exc:
        log.warning("%s", exc)
        return None


def predict_streaming(predictor: Predictor, f: Path, paths: dict[str, Path], probabilities: bool,
                       whole_image_outputs: bool, protect: list[Path], foreground, progress, threshold: int) -> None:
    """Predict a huge TIFF band by band into its mask (and probabilities) TIFF."""
    from . import writers
    from .streaming import stream_predict_file

    if whole_image_outputs:
        raise UnetlabError(
            f"image is over {threshold / 1e6:g} Mpx and is predicted tile by tile with bounded memory: instance "
            "labels, overlays, RLE and ROIs need the whole image in memory", f,
            "predict masks (and probabilities) only, raise --stream-threshold (MPX; 0 never streams) if the "
            "image fits in memory, or split it into smaller ones")
    mask = writers.check_output(paths["mask"], protect)
    prob = writers.check_output(paths["prob"], protect) if probabilities else None
    stream_predict_file(predictor, f, mask, prob, foreground, progress)


def predict_at_training_size(predictor: Predictor, raw: np.ndarray, source: Path, train_diameter: float,
                              diameter: float | str, kind: str, pp, info: dict, estimate=None):
    """Probabilities and labels of one image predicted with its objects rescaled to the training size
    (:func:`~unetlab.inference.rescale.predict_rescaled`; ``estimate``: the run's size model for
    ``--diameter auto``), and the scale chosen."""
    from .postprocess import probabilities_to_labels
    from .rescale import predict_rescaled

    prepared = predictor.prepare(raw, source)
    target = kind if kind in TARGET_KINDS else "binary"
    return predict_rescaled(predictor.predict_prepared, prepared, float(train_diameter), diameter,
                            to_labels=lambda p: probabilities_to_labels(p, target, pp),
                            foreground=lambda p: foreground(p, info, pp.threshold), estimate=estimate)


def predict_with_fallback(predictor: Predictor, raw: np.ndarray, source: Path, progress) -> np.ndarray:
    """Predict one image at its own size, with :func:`on_oom_smaller_batches`."""
    return on_oom_smaller_batches(predictor, source, lambda p: p.predict_image(raw, source, progress))


def on_oom_smaller_batches(predictor: Predictor, source: Path, work):
    """``work(predictor)``, halving the tile batch on out-of-memory errors instead of failing; the smaller batch
    is kept for the images that follow. Out of memory with single tiles is a one-line error saying what to
    change."""
    p = predictor
    while True:
        try:
            return work(p)
        except (RuntimeError, MemoryError) as exc:
            oom = isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
            if not oom:
                raise
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if p.batch_size <= 1:
                raise UnetlabError(f"out of memory even with one {p.tile}-pixel tile per batch", source,
                                   "use a smaller --tile, or --device cpu") from exc
            p.batch_size = max(1, p.batch_size // 2)  # kept: the next images start at the size that fits
            log.warning("out of memory on %s: retrying with %d tiles per batch", source.name, p.batch_size)
