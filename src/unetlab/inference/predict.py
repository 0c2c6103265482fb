"""Predict a folder (or one file) of images with a trained run: masks, probabilities, labels, counts, RLE."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..config import PostprocessConfig
from ..data.io import IMAGE_EXTENSIONS, is_image_file, read_image, write_atomic, write_image
from ..errors import UnetlabError
from .predictor import Predictor, load_run

log = logging.getLogger(__name__)


def collect_inputs(path: str | Path) -> list[tuple[str, Path]]:
    """(output name, file) for an image file or every image under a folder (recursively, sorted)."""
    path = Path(path)
    if not path.exists():
        raise UnetlabError("input not found", path)
    if path.is_file():
        if not is_image_file(path):
            raise UnetlabError(f"not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})", path)
        return [(path.stem, path)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p)
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise UnetlabError("no images found in folder", path)
    out = []
    for f in files:
        rel = f.relative_to(path).with_suffix("")
        out.append(("__".join(rel.parts), f))
    return out


def output_paths(out: Path, name: str, multiclass: bool) -> dict[str, Path]:
    """Where each output of image ``name`` goes."""
    return {
        "mask": out / ("classes" if multiclass else "masks") / f"{name}.png",
        "prob": out / "probabilities" / f"{name}.tif",
        "labels": out / "labels" / f"{name}.tif",
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


def _foreground(prob: np.ndarray, run_info: dict, threshold: float) -> np.ndarray:
    if run_info.get("task") == "multiclass":
        return prob.argmax(0).astype(np.uint8)
    fg = prob[1:].sum(0) if run_info.get("target") == "boundary" else prob[0]
    return fg > threshold


def predict(
    model: str | Path,
    input: str | Path,
    out: str | Path,
    tile: int = 512,
    overlap: float = 0.25,
    batch_size: int = 4,
    device: str = "auto",
    precision: str = "auto",
    probabilities: bool = False,
    instances: bool = False,
    overlays: bool = False,
    tta: bool = False,
    rle: str | Path | None = None,
    rle_style: str = "dsb",
    rois: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    skip_bad: bool = False,
    backend: str = "torch",
    compile: bool = False,
    postprocess: PostprocessConfig | None = None,
    progress: bool | None = None,
) -> dict:
    """Predict every image of ``input`` with the run ``model`` into ``out``; returns a summary dict.

    Writes ``masks/`` (or ``classes/``), and on request ``probabilities/`` (float32 TIFF), ``labels/`` (uint16
    instance labels) with ``objects.csv`` and ``counts.csv``, ``overlays/``, a Kaggle RLE CSV and ImageJ ROIs.
    """
    from tqdm.auto import tqdm

    from ..training import distributed as D
    from . import writers

    out = Path(out)
    inputs = collect_inputs(input)
    _check_out(out, Path(input), overwrite, resume)
    run = load_run(model)
    dist = D.init_distributed("cpu" if device == "cpu" else ("cuda" if device.startswith("cuda") else "cpu"))
    predictor = Predictor.from_run(run, device=device, precision=precision, tile=tile, overlap=overlap,
                                   batch_size=batch_size, tta=tta, compile=compile, backend=backend)
    pp = postprocess or run.config.postprocess
    multiclass = run.info.get("task") == "multiclass"
    kind = run.info.get("target", "binary")
    if instances and multiclass:
        raise UnetlabError("--instances needs a binary, boundary or distance model; this one predicts classes")
    protect = [f for _n, f in inputs]
    mine = inputs[dist.rank :: dist.world_size]
    done, skipped, bad = [], [], []
    measurements: dict[str, list[dict]] = {}
    rle_items: list[tuple[str, np.ndarray]] = []
    want_labels = instances or bool(rle) or rois
    sizes = {}
    total_tiles = 0
    for _n, f in mine:
        try:
            import tifffile

            if f.suffix.lower() in (".tif", ".tiff"):
                with tifffile.TiffFile(f) as t:
                    shp = t.series[0].shape
                sizes[f] = tuple(shp[-2:]) if len(shp) == 2 or shp[-1] > 4 else tuple(shp[:2])
            else:
                from PIL import Image

                with Image.open(f) as im:
                    sizes[f] = (im.height, im.width)
            total_tiles += predictor.n_tiles(sizes[f])
        except Exception:
            total_tiles += 1
    disable = True if (progress is False or not dist.is_main) else (False if progress else None)
    bar = tqdm(total=total_tiles, desc="predict", unit="tile", disable=disable, dynamic_ncols=True)
    for name, f in mine:
        paths = output_paths(out, name, multiclass)
        needed = [paths["mask"]] + ([paths["prob"]] if probabilities else []) + (
            [paths["labels"]] if want_labels else [])
        if resume and all(p.exists() for p in needed) and not rle:
            skipped.append(name)
            bar.update(predictor.n_tiles(sizes[f]) if f in sizes else 1)
            continue
        try:
            raw = read_image(f)
            prob = _predict_with_fallback(predictor, raw, f, bar.update)
        except UnetlabError as exc:
            if not skip_bad:
                bar.close()
                raise
            bad.append(f"{exc}")
            log.warning("skipped: %s", exc)
            continue
        fg = _foreground(prob, run.info, pp.threshold)
        writers.write_mask(paths["mask"], fg, protect) if not multiclass else write_image(paths["mask"], fg)
        if probabilities:
            writers.write_probabilities(paths["prob"], prob, protect)
        if want_labels:
            from .postprocess import probabilities_to_labels

            labels = probabilities_to_labels(prob, kind if kind in ("binary", "boundary", "distance") else "binary",
                                             pp)
            writers.write_labels(paths["labels"], labels, protect)
            measurements[name] = writers.measure_objects(labels, raw)
            if rle:
                rle_items.append((name, labels))
            if rois:
                writers.write_imagej_rois(out / "rois" / f"{name}.zip", labels, protect)
            if overlays or instances:
                writers.write_overlay(paths["overlay"], raw, labels, protect)
        elif overlays:
            from scipy import ndimage as ndi

            writers.write_overlay(paths["overlay"], raw, ndi.label(fg > 0)[0], protect)
        done.append(name)
    bar.close()
    summary = {"images": len(inputs), "predicted": len(done), "skipped_done": len(skipped), "bad": bad,
               "out": str(out), "rank": dist.rank, "world_size": dist.world_size}
    if measurements:
        suffix = f".rank{dist.rank}" if dist.enabled else ""
        writers.write_objects_csv(out / f"objects{suffix}.csv", measurements, protect)
        writers.write_summary_csv(out / f"counts{suffix}.csv", measurements, protect)
        summary["objects"] = {k: len(v) for k, v in measurements.items()}
    if rle:
        writers.write_rle_csv(rle, rle_items, style=rle_style, protect=protect)
    if dist.enabled:
        D.barrier(dist)
        if dist.is_main and measurements is not None:
            _merge_rank_csvs(out, dist.world_size)
    if bad:
        log.warning("%d bad file(s) skipped:\n  %s", len(bad), "\n  ".join(bad))
    return summary


def _merge_rank_csvs(out: Path, world: int) -> None:
    """Concatenate per-rank objects/counts CSVs into one (rank 0, after a barrier)."""
    for stem in ("objects", "counts"):
        parts = [out / f"{stem}.rank{r}.csv" for r in range(world)]
        parts = [p for p in parts if p.exists()]
        if not parts:
            continue
        lines: list[str] = []
        for i, p in enumerate(parts):
            text = p.read_text().splitlines()
            lines += text if i == 0 else text[1:]
        body = "\n".join(lines) + "\n"
        write_atomic(out / f"{stem}.csv", lambda tmp, b=body: Path(tmp).write_text(b))
        for p in parts:
            os.remove(p)


def _predict_with_fallback(predictor: Predictor, raw: np.ndarray, source: Path, progress) -> np.ndarray:
    """Predict, halving the tile batch on out-of-memory errors instead of failing."""
    p = predictor
    while True:
        try:
            return p.predict_image(raw, source, progress)
        except (RuntimeError, MemoryError) as exc:
            oom = isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
            if not oom or p.batch_size <= 1:
                raise
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            p = replace(p, batch_size=max(1, p.batch_size // 2))
            log.warning("out of memory on %s: retrying with %d tiles per batch", source.name, p.batch_size)
