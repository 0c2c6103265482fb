"""Predict a folder (or one file) of images with a trained run: masks, probabilities, labels, counts, RLE."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..data.io import IMAGE_EXTENSIONS, image_stem, is_image_file, read_image, write_image
from ..data.ome import is_zarr_path
from ..data.targets import INSTANCE_KINDS, TARGET_KINDS
from ..errors import UnetlabError
from ..files import remove_stale_temporaries, write_text
from ..runfolder import load_run, resolve_run_dir
from .options import PredictOptions, effective_postprocess, resolve_options
from .predictor import Predictor
from .rescale import parse_diameter
from .streaming import should_stream

log = logging.getLogger(__name__)


def collect_inputs(path: str | Path, split_file: str | Path | None = None, split: str = "val"
                   ) -> list[tuple[str, Path]]:
    """(output name, file) for an image file, the images of a dataset folder (any layout; with ``split_file``
    only the ``split`` side of a run's split.json), or every image under a plain folder (recursively, sorted)."""
    path = Path(path)
    if not path.exists():
        raise UnetlabError("input not found", path)
    if path.is_file() or is_zarr_path(path):
        if not is_image_file(path):
            raise UnetlabError(f"not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)}, or a "
                               "Zarr / OME-Zarr directory)", path)
        return [(image_stem(path), path)]
    if path.name.lower().endswith(".zarr"):
        raise UnetlabError("not a Zarr image: no zarr.json, .zarray or .zattrs in the directory", path)
    from ..data.layouts import detect_layout, load_dataset

    try:
        layout = detect_layout(path)
    except UnetlabError:
        layout = None
        if split_file:
            raise
    if layout is not None:  # a dataset folder: its images, not its masks
        samples = load_dataset(path, layout).samples
        if split_file:
            from ..data.split import load_split

            saved = load_split(split_file)
            if split not in saved:
                raise UnetlabError(f"the run's split has no '{split}' samples", split_file,
                                   "train with --test, --test-groups or --test-fraction to hold out a test split"
                                   if split == "test" else None)
            wanted = set(saved[split])
            samples = [s for s in samples if s.name in wanted]
            if not samples:
                raise UnetlabError(f"none of the '{split}' samples of {split_file} are in this dataset", path)
        return [(s.name.replace("/", "__"), s.image) for s in samples]
    files = sorted(p for p in path.rglob("*") if ((p.is_file() and is_image_file(p)) or is_zarr_path(p))
                   and not any(part.startswith(".") or part.lower().endswith(".zarr")
                               for part in p.relative_to(path).parts[:-1]))  # nothing inside a Zarr image
    if not files:
        raise UnetlabError("no images found in folder", path)
    out: list[tuple[str, Path]] = []
    seen: dict[str, Path] = {}
    for f in files:
        rel = f.relative_to(path)
        name = "__".join((*rel.parent.parts, image_stem(f)))
        if name in seen:  # a.tif beside a.png or a.ome.zarr: their outputs would overwrite each other
            raise UnetlabError(f"two images give the output name '{name}': {seen[name].name} and {f.name}", f,
                               "rename one, or predict them into different folders")
        seen[name] = f
        out.append((name, f))
    return out


PREDICTIONS_JSON = "predictions.json"


def output_paths(out: Path, name: str, multiclass: bool) -> dict[str, Path]:
    """Where each output of image ``name`` goes."""
    return {
        "mask": out / ("classes" if multiclass else "masks") / f"{name}.png",
        "prob": out / "probabilities" / f"{name}.tif",
        "labels": out / "labels" / f"{name}.tif",
        "labels_zarr": out / "labels" / f"{name}.ome.zarr",
        "overlay": out / "overlays" / f"{name}.png",
    }


def _check_out(out: Path, input: Path, overwrite: bool, resume: bool) -> None:
    o, i = out.resolve(), input.resolve()
    if input.is_dir() and (o == i or i in o.parents):
        raise UnetlabError("output folder is inside the input folder (inputs are never written to)", out,
                           "choose an --out outside the input folder")
    if out.exists() and not out.is_dir():
        raise UnetlabError("output exists and is not a folder", out)
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise UnetlabError("output folder is not empty", out, "use --overwrite to replace or --resume to finish it")
    if out.is_dir():  # temporaries of a run killed mid-write: never a finished output, so never kept
        for tmp in remove_stale_temporaries(out):
            log.info("removed %s, left by an interrupted run", tmp)


def _foreground(prob: np.ndarray, run_info: dict, threshold: float) -> np.ndarray:
    if run_info.get("task") == "multiclass":
        return prob.argmax(0).astype(np.uint8)
    from .postprocess import foreground_mask

    return foreground_mask(prob, run_info.get("target", "binary"), threshold)


def predict(model: str | Path, input: str | Path, out: str | Path, *, options: PredictOptions | None = None,
            **overrides: Any) -> dict:
    """Predict every image of ``input`` with the run ``model`` into ``out``; returns a summary dict.

    Writes ``masks/`` (or ``classes/``), and on request ``probabilities/`` (float32 TIFF), ``labels/`` (uint16
    instance labels) with ``objects.csv`` and ``counts.csv``, ``overlays/``, a Kaggle RLE CSV and ImageJ ROIs.
    TIFF images of more than ``stream_threshold`` pixels (None: never) are read, predicted and written band by
    band with bounded memory; their mask is then a tiled TIFF (``masks/<name>.tif``) and they support masks
    and probabilities only. Settings: ``options`` (a :class:`PredictOptions`, default all defaults) with any
    keyword arguments on top, e.g. ``predict(run, images, out, instances=True, tile=256)``; an unknown keyword
    is a TypeError naming it.
    """
    from tqdm.auto import tqdm

    from .. import distributed as D
    from .._runtime import resolve_device
    from . import writers

    o = resolve_options(options, overrides)
    out = Path(out)
    run_dir = resolve_run_dir(model)  # a run folder, or a pretrained model's name
    inputs = collect_inputs(input, run_dir / "split.json" if o.split else None, o.split or "val")
    # under torchrun: Gloo carries only the coordination (objects, barriers), whatever device predicts
    dist = D.init_distributed("cpu", backend="gloo")
    D.run_on_main(partial(_check_out, out, Path(input), o.overwrite, o.resume), dist)  # before any rank writes
    run = load_run(run_dir)
    dev = D.rank_device(resolve_device(str(o.device)), dist)  # cuda:LOCAL_RANK under torchrun
    predictor = Predictor.from_run(run, device=dev, precision=o.precision, tile=o.tile, overlap=o.overlap,
                                   batch_size=o.batch_size, tta=o.tta, compile=o.compile, backend=o.backend)
    pp = effective_postprocess(o, run.config.postprocess)
    if pp != run.config.postprocess:
        log.info("post-processing: threshold %s, min size %s, prominence %s (the run's: %s, %s, %s)", pp.threshold,
                 pp.min_size, pp.prominence, run.config.postprocess.threshold, run.config.postprocess.min_size,
                 run.config.postprocess.prominence)
    multiclass = run.info.get("task") == "multiclass"
    kind = run.info.get("target", "binary")
    if o.instances and multiclass:
        raise UnetlabError("--instances needs a binary, boundary, distance or flow model; this one predicts classes")
    protect = [f for _n, f in inputs]
    mine = inputs[dist.rank :: dist.world_size]
    done, skipped, bad = [], [], []
    measurements: dict[str, list[dict]] = {}
    rle_items: list[tuple[str, np.ndarray]] = []
    want_labels = o.instances or bool(o.rle) or o.rois
    if o.ome_zarr and not want_labels:
        raise UnetlabError("--ome-zarr writes the instance labels as OME-Zarr: add --instances")
    train_diameter = run.info.get("diameter")
    diameter = parse_diameter(o.diameter)
    rescales = want_labels or run.config.data.size_normalize  # a size-normalised model's masks need it too
    if diameter == "auto" and not (rescales and train_diameter and kind in INSTANCE_KINDS):
        diameter = None  # auto: instance models (boundary, distance, flow targets) that know their objects' size
    elif diameter is not None and not train_diameter:
        raise UnetlabError("--diameter needs a model that knows its training objects' size (model.json "
                           "'diameter', written by unetlab >= 0.1 at training)", run_dir / "model.json",
                           "train again, or predict with --diameter none")
    if diameter is None and run.config.data.size_normalize:
        log.warning("this model was trained size-normalised (objects of %s px): images are predicted at their own "
                    "size, which suits it only if their objects have that size; --diameter auto (the default) or "
                    "--diameter PX rescales them", train_diameter)
    scales: dict[str, dict] = {}
    sizes = {}
    total_tiles = 0
    for _n, f in mine:
        try:
            import tifffile

            if is_zarr_path(f):
                from ..data.ome import open_zarr_image

                view = open_zarr_image(f)
                sizes[f] = (view.height, view.width)
            elif f.suffix.lower() in (".tif", ".tiff"):
                with tifffile.TiffFile(f) as t:
                    shp = t.series[0].shape
                sizes[f] = tuple(shp[-2:]) if len(shp) == 2 or shp[-1] > 4 else tuple(shp[:2])
            else:
                from PIL import Image

                with Image.open(f) as im:
                    sizes[f] = (im.height, im.width)
            total_tiles += predictor.n_tiles(sizes[f])
        except Exception as exc:  # the image itself is read (and its problem reported) when its turn comes
            log.warning("%s: size not readable from the header (%s: %s); the progress bar counts it as one tile",
                        f, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            total_tiles += 1
    disable = True if (o.progress is False or not dist.is_main) else (False if o.progress else None)
    bar = tqdm(total=total_tiles, desc="predict", unit="tile", disable=disable, dynamic_ncols=True)
    for name, f in mine:
        paths = output_paths(out, name, multiclass)
        stream = should_stream(f, o.stream_threshold)
        if stream:  # PNG cannot be written band by band
            paths["mask"] = paths["mask"].with_suffix(".tif")
        needed = [paths["mask"]] + ([paths["prob"]] if o.probabilities else []) + (
            [paths["labels"]] if want_labels else []) + ([paths["labels_zarr"]] if want_labels and o.ome_zarr else []) + ([paths["overlay"]] if o.overlays or o.instances else []) + (
            [out / "rois" / f"{name}.zip"] if o.rois else [])
        if o.resume and all(p.exists() for p in needed) and _resume_done(name, f, paths, want_labels, bool(o.rle),
                                                                         measurements, rle_items, scales):
            skipped.append(name)
            bar.update(predictor.n_tiles(sizes[f]) if f in sizes else 1)
            continue
        try:
            if stream:
                _predict_streaming(predictor, f, paths, o.probabilities, want_labels or o.overlays, protect,
                                   lambda p: _foreground(p, run.info, pp.threshold), bar.update, o.stream_threshold)
                done.append(name)
                continue
            raw = read_image(f)
            labels = None
            if diameter is None:
                prob = _predict_with_fallback(predictor, raw, f, bar.update)
            else:
                prob, labels, choice = _on_oom_smaller_batches(predictor, f, partial(
                    _predict_at_training_size, raw=raw, source=f, train_diameter=train_diameter,
                    diameter=diameter, kind=kind, pp=pp, info=run.info))
                bar.update(predictor.n_tiles(prob.shape[-2:]))
                scales[name] = {"Scale": round(choice.scale, 4), "Diameter": choice.diameter,
                                "DiameterFrom": choice.how}
                log.info("%s: predicted at scale %.3f (object diameter %s px, %s)", name, choice.scale,
                         f"{choice.diameter:.1f}" if choice.diameter else "?", choice.how)
        except UnetlabError as exc:
            if not o.skip_bad:
                bar.close()
                raise
            bad.append(f"{exc}")
            log.warning("skipped: %s", exc)
            continue
        fg = _foreground(prob, run.info, pp.threshold)
        writers.write_mask(paths["mask"], fg, protect) if not multiclass else write_image(paths["mask"], fg)
        if o.probabilities:
            writers.write_probabilities(paths["prob"], prob, protect)
        if want_labels:
            from .postprocess import probabilities_to_labels

            if labels is None:
                labels = probabilities_to_labels(prob, kind if kind in TARGET_KINDS else "binary", pp)
            writers.write_labels(paths["labels"], labels, protect, note=scales.get(name))
            if o.ome_zarr:
                writers.write_labels_ome_zarr(paths["labels_zarr"], labels, protect, _pixel_size(f),
                                              note=scales.get(name))
            measurements[name] = writers.measure_objects(labels, raw)
            if o.rle:
                rle_items.append((name, labels))
            if o.rois:
                writers.write_imagej_rois(out / "rois" / f"{name}.zip", labels, protect)
            if o.overlays or o.instances:
                writers.write_overlay(paths["overlay"], raw, labels, protect)
        elif o.overlays:
            from scipy import ndimage as ndi

            writers.write_overlay(paths["overlay"], raw, ndi.label(fg > 0)[0], protect)
        done.append(name)
    bar.close()
    if o.rle:  # several ranks: one part each, joined by rank 0 below
        part = Path(f"{o.rle}.rank{dist.rank}.part") if dist.enabled else Path(o.rle)
        writers.write_rle_csv(part, rle_items, style=o.rle_style, protect=protect)
    if dist.enabled:  # every rank's lists, in input order, as a single process would have them
        parts = D.gather_objects({"done": done, "skipped": skipped, "bad": bad, "measurements": measurements,
                                  "scales": scales}, dist)
        order = {name: i for i, (name, _f) in enumerate(inputs)}
        done = sorted((n for p in parts for n in p["done"]), key=order.__getitem__)
        skipped = sorted((n for p in parts for n in p["skipped"]), key=order.__getitem__)
        bad = [b for p in parts for b in p["bad"]]
        merged = {n: m for p in parts for n, m in p["measurements"].items()}
        measurements = {n: merged[n] for n in sorted(merged, key=order.__getitem__)}
        scales = {n: s for p in parts for n, s in p["scales"].items()}
        if o.rle and dist.is_main:
            _merge_rle_parts(Path(o.rle), [Path(f"{o.rle}.rank{r}.part") for r in range(dist.world_size)], order)
    if dist.is_main:  # which image each output came from, for viewers (the napari reader) and for provenance
        write_text(out / PREDICTIONS_JSON, json.dumps(
            {"model": str(model), "run": str(run_dir), "images": {n: str(Path(f).resolve()) for n, f in inputs},
             "labels": want_labels, "multiclass": multiclass, "postprocess": asdict(pp)}, indent=1) + "\n")
    summary = {"images": len(inputs), "predicted": len(done), "skipped_done": len(skipped), "bad": bad,
               "out": str(out), "rank": dist.rank, "world_size": dist.world_size}
    if measurements:
        if dist.is_main:  # one objects.csv and counts.csv, whatever the number of ranks
            writers.write_objects_csv(out / "objects.csv", measurements, protect)
            writers.write_summary_csv(out / "counts.csv", measurements, protect, per_image=scales)
        summary["objects"] = {k: len(v) for k, v in measurements.items()}
    D.barrier(dist)  # every output exists when predict() returns on any rank
    D.cleanup(dist)
    if bad and not done and not skipped:
        raise UnetlabError(f"none of the {len(inputs)} input image(s) could be read; the first: {bad[0]}")
    if bad and dist.is_main:
        log.warning("%d bad file(s) skipped:\n  %s", len(bad), "\n  ".join(bad))
    return summary


def format_predict_summary(summary: dict) -> str:
    """The lines ``unetlab predict`` prints for a :func:`predict` summary: counts, then any bad files."""
    msg = f"predicted {summary['predicted']} image(s) into {summary['out']}"
    if summary["skipped_done"]:
        msg += f" ({summary['skipped_done']} already done)"
    if summary.get("objects"):
        msg += f"; {sum(summary['objects'].values())} objects"
    lines = [msg]
    if summary["bad"]:
        lines.append(f"{len(summary['bad'])} bad file(s) skipped:")
        lines.extend(f"  {b}" for b in summary["bad"])
    return "\n".join(lines)


def _merge_rle_parts(rle: Path, parts: list[Path], order: dict[str, int]) -> None:
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


def _resume_done(name: str, image: Path, paths: dict[str, Path], want_labels: bool, rle: bool,
                 measurements: dict[str, list[dict]], rle_items: list, scales: dict[str, dict]) -> bool:
    """For ``--resume``: collect what the tables need from an image's finished outputs (its labels and the scale
    noted in them); False when they cannot be read, and the image is predicted again."""
    if not want_labels:
        return True
    from ..data.io import read_label
    from . import writers

    try:
        labels = read_label(paths["labels"])
        measurements[name] = writers.measure_objects(labels, read_image(image))
    except UnetlabError:
        return False
    note = writers.read_labels_note(paths["labels"])
    if note:
        scales[name] = note
    if rle:
        rle_items.append((name, labels))
    return True


def _pixel_size(image: Path) -> tuple[float, float] | None:
    """The physical pixel size (y, x) in µm that an OME-TIFF or OME-Zarr input declares (None otherwise)."""
    from ..data.ome import is_ome_tiff, read_metadata

    if not (is_ome_tiff(image) or is_zarr_path(image)):
        return None
    try:
        return read_metadata(image).pixel_size_um
    except UnetlabError as exc:
        log.warning("%s", exc)
        return None


def _predict_streaming(predictor: Predictor, f: Path, paths: dict[str, Path], probabilities: bool,
                       whole_image_outputs: bool, protect: list[Path], foreground, progress, threshold: int) -> None:
    """Predict a huge TIFF band by band into its mask (and probabilities) TIFF."""
    from . import writers
    from .streaming import stream_predict_file

    if whole_image_outputs:
        raise UnetlabError(
            f"image is over {threshold / 1e6:g} Mpx and is predicted tile by tile with bounded memory: instance "
            "labels, overlays, RLE and ROIs need the whole image in memory", f,
            "predict masks (and probabilities) only, or split the image into smaller ones")
    mask = writers.check_output(paths["mask"], protect)
    prob = writers.check_output(paths["prob"], protect) if probabilities else None
    stream_predict_file(predictor, f, mask, prob, foreground, progress)


def _predict_at_training_size(predictor: Predictor, raw: np.ndarray, source: Path, train_diameter: float,
                              diameter: float | str, kind: str, pp, info: dict):
    """Probabilities and labels of one image predicted with its objects rescaled to the training size
    (:func:`~unetlab.inference.rescale.predict_rescaled`), and the scale chosen."""
    from .postprocess import probabilities_to_labels
    from .rescale import predict_rescaled
    from .sizemodel import size_estimator

    prepared = predictor.prepare(raw, source)
    target = kind if kind in TARGET_KINDS else "binary"
    estimate = size_estimator(predictor.run) if diameter == "auto" else None  # size_model.json
    return predict_rescaled(predictor.predict_prepared, prepared, float(train_diameter), diameter,
                            to_labels=lambda p: probabilities_to_labels(p, target, pp),
                            foreground=lambda p: _foreground(p, info, pp.threshold), estimate=estimate)


def _predict_with_fallback(predictor: Predictor, raw: np.ndarray, source: Path, progress) -> np.ndarray:
    """Predict one image at its own size, with :func:`_on_oom_smaller_batches`."""
    return _on_oom_smaller_batches(predictor, source, lambda p: p.predict_image(raw, source, progress))


def _on_oom_smaller_batches(predictor: Predictor, source: Path, work):
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
