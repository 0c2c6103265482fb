"""Compare a folder of predicted masks or labels with ground truth: per-image and overall pixel and object metrics.

Predictions: a folder of mask / label images (names may carry ``_mask``, ``_labels``, ... suffixes; probability
maps and overlays are skipped), a folder with ``labels/`` or ``masks/`` inside, or a run-length CSV.
Ground truth: a flat folder of label/mask images, a run-length CSV file, or any dataset folder unetlab reads
(``images/`` + ``masks/``, Kaggle DSB folders, an RLE CSV folder, multiclass folders).
A dataset's samples are keyed by the names ``predict`` gives their outputs (``data.layouts.output_name``), and
both sides pair by the same name, else by :func:`pair_key` (no ``MASK_`` prefix, no mask suffix, any case).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.io import image_stem, list_images, read_label
from ..data.layouts.timelapse import frame_key
from ..data.ome import is_zarr_path
from ..data.sample import Sample
from ..errors import UnetlabError
from ..files import write_text
from ..labels import instance_labels, mask_to_labels
from .metrics import (
    DEFAULT_IOU_THRESHOLDS,
    adapted_rand_error,
    dice_per_class,
    match_objects,
    metrics_from_counts,
    pixel_counts,
    pool_matches,
)

log = logging.getLogger(__name__)

PRED_SUFFIXES = ("_labels", "_label", "_masks", "_mask", "_pred", "_prediction", "_seg", "_segmentation", "_gt")
SKIP_SUFFIXES = ("_prob", "_probs", "_probability", "_probabilities", "_overlay", "_outlines")
PIXEL_KEYS = ("dice", "iou", "precision", "recall", "accuracy")

Loader = Callable[[tuple[int, int] | None], np.ndarray]


@dataclass
class _Source:
    """What a prediction or truth location holds: name -> loader (taking a size hint), plus notes."""

    loaders: dict[str, Loader]
    files: dict[str, str]
    task: str = "binary"
    num_classes: int = 2
    ignored: list[str] | None = None
    problems: list[str] | None = None
    needs_shape: bool = False  # a run-length CSV without sizes: decode with the other side's size


def split_suffix(stem: str, suffixes: tuple[str, ...] = PRED_SUFFIXES) -> tuple[str, str]:
    """(key, suffix) of a file stem: ``img1_labels`` -> (``img1``, ``_labels``); no known suffix -> (stem, "")."""
    for suf in sorted(suffixes, key=len, reverse=True):
        if stem.lower().endswith(suf) and len(stem) > len(suf):
            return stem[: -len(suf)], suf
    return stem, ""


def _read_labels(path: Path, invert: bool = False) -> np.ndarray:
    labels = mask_to_labels(read_label(path), path)
    if invert:
        labels = (labels == 0).astype(np.int32)
    return labels


def _file_loader(path: Path, invert: bool = False) -> Loader:
    return lambda shape=None: _read_labels(path, invert)


def _csv_source(path: Path, invert: bool = False) -> _Source:
    from ..data.rle import read_rle_table

    table = read_rle_table(path)

    def make(key: str) -> Loader:
        def load(shape=None):
            lab = table.labels(key, shape)
            return (lab == 0).astype(np.int32) if invert else lab

        return load

    keys = table.rles
    needs = any(k not in table.sizes for k in keys)
    return _Source({k: make(k) for k in keys}, {k: f"{path.name}:{k}" for k in keys}, needs_shape=needs)


def _prediction_source(pred: Path, instances: bool) -> _Source:
    if pred.is_file() and pred.suffix.lower() == ".csv":
        return _csv_source(pred)
    if not pred.is_dir():
        raise UnetlabError("prediction folder not found", pred)
    files = list_images(pred)
    if not files:  # a predict output folder with labels/ and masks/ inside
        order = ("labels", "masks", "mask") if instances else ("masks", "mask", "labels")
        for sub in order:
            if (pred / sub).is_dir() and list_images(pred / sub):
                log.info("reading predictions from %s", pred / sub)
                return _prediction_source(pred / sub, instances)
        raise UnetlabError("no mask or label images in the prediction folder", pred)
    prefer = ("_labels", "_label", "", "_masks", "_mask") if instances else ("_masks", "_mask", "", "_labels", "_label")
    by_key: dict[str, dict[str, Path]] = {}
    ignored = []
    for f in sorted(files, key=is_zarr_path):  # labels written twice (TIFF and --ome-zarr): the TIFF is read
        if split_suffix(image_stem(f), SKIP_SUFFIXES)[1]:
            ignored.append(f.name)
            continue
        key, suf = split_suffix(image_stem(f))
        if by_key.setdefault(key, {}).setdefault(suf.lower(), f) is not f:
            ignored.append(f.name)
    loaders, names = {}, {}
    for key, options in by_key.items():
        ranked = sorted(options, key=lambda s: prefer.index(s) if s in prefer else len(prefer))
        chosen = options[ranked[0]]
        ignored.extend(options[s].name for s in ranked[1:])
        loaders[key] = (lambda shape=None, f=chosen: read_label(f))  # raw values: class indices stay
        names[key] = chosen.name
    return _Source(loaders, names, ignored=ignored)


def _is_flat_label_folder(folder: Path) -> bool:
    files = list_images(folder)
    if not files:
        return False
    stems = {f.stem for f in files}
    # an image beside its "_masks" file (Cellpose habit) is a dataset, not a folder of labels
    return not any(split_suffix(s)[1] and split_suffix(s)[0] in stems for s in stems)


def _mask_file(sample: Sample, root: Path) -> str:
    """How a dataset sample's truth is named in the report: its mask file under ``root``, else its name."""
    if len(sample.mask_paths) != 1:
        return sample.name
    path = sample.mask_paths[0]
    return str(path.relative_to(root)) if path.is_relative_to(root) else path.name


def prediction_classes(pred: Path, given: list[str] | None) -> list[str] | None:
    """The classes a multiclass prediction's indices 1, 2, ... stand for, from the predictions.json beside it
    (``given``, ``--classes``, when it has none); ``given`` in another order or with other names is an error:
    class indices would be scored against the wrong truth classes."""
    doc = next((d / "predictions.json" for d in (pred, pred.parent) if (d / "predictions.json").is_file()), None)
    try:
        named = json.loads(doc.read_text()).get("classes") if doc is not None else None
    except (OSError, ValueError):
        named = None
    if not named:
        return given
    theirs = [str(c) for c in named[1:]]  # index 0 is the background
    if given is not None and list(given) != theirs:
        raise UnetlabError(f"these predictions' classes 1..{len(theirs)} are {','.join(theirs)} ({doc}); --classes "
                           f"{','.join(given)} would score them against other truth classes", pred,
                           f"use --classes {','.join(theirs)}, or leave it out")
    if given is None:
        log.info("classes of the predictions (%s): %s", doc, ", ".join(theirs))
    return theirs


def _truth_source(truth: Path, invert: bool, classes: list[str] | None = None) -> _Source:
    if truth.is_file() and truth.suffix.lower() == ".csv":
        return _csv_source(truth, invert)
    if not truth.exists():
        raise UnetlabError("ground truth not found", truth)
    if not truth.is_dir():
        raise UnetlabError("ground truth must be a folder of masks, a dataset folder or a run-length CSV", truth)
    if _is_flat_label_folder(truth):
        loaders, names = {}, {}
        for f in list_images(truth):
            key = split_suffix(f.stem)[0]
            if key in loaders:
                continue
            loaders[key] = _file_loader(f, invert)
            names[key] = f.name
        return _Source(loaders, names)
    from ..data.layouts import load_dataset, output_name

    info = load_dataset(truth, invert_mask=invert, classes=classes)
    # keyed by the name predict gives a sample's outputs, e.g. expA__Pos001__img_0 for expA/Pos001/img_0
    loaders = {output_name(s.name): (lambda shape=None, s=s: s.load_mask()) for s in info.samples}
    names = {output_name(s.name): _mask_file(s, truth) for s in info.samples}
    log.debug("ground truth: %d samples in the %s layout", len(info.samples), info.layout)
    return _Source(loaders, names, task=info.task, num_classes=len(info.classes), problems=list(info.problems))


def pair_key(key: str) -> str:
    """What a prediction and its truth share: the name without a ``MASK_`` prefix or mask suffixes, any case
    (``MASK_img_0``, ``img_0_labels`` and ``IMG_0`` all pair as ``img_0``)."""
    return split_suffix(frame_key(key))[0].lower()


def _pair(pred: _Source, truth: _Source) -> tuple[list[tuple[str, str, str]], list[str], list[str]]:
    """[(name, pred key, truth key)], unpaired predictions, unpaired truths: same names first, then same
    :func:`pair_key`."""
    by_key: dict[str, str] = {}
    for k in sorted(truth.loaders):
        by_key.setdefault(pair_key(k), k)
    match: dict[str, str] = {k: k for k in pred.loaders if k in truth.loaders}
    used = set(match.values())
    for key in sorted(k for k in pred.loaders if k not in match):
        t = by_key.get(pair_key(key))
        if t is not None and t not in used:
            match[key] = t
            used.add(t)
    pairs = [(match[k], k, match[k]) for k in sorted(match)]
    unpaired_pred = sorted(pred.files[k] for k in pred.loaders if k not in match)
    unpaired_truth = sorted(truth.files[k] for k in truth.loaders if k not in used)
    return pairs, unpaired_pred, unpaired_truth


def _no_pairs_hint(pred: _Source, truth: _Source) -> str:
    """The hint of the no-pairs error: an example of each side, and where predictions of a dataset pair up."""
    ex_p = next(iter(pred.files.values()), "none")
    ex_t = next(iter(truth.files.values()), "none")
    hint = f"e.g. prediction {ex_p!r}, truth {ex_t!r}"
    nested = next((k for k in sorted(pred.loaders) if "__" in k), None)
    if nested and not any("__" in k for k in truth.loaders):
        hint += (f"; {nested!r} is how predict names a dataset sample's outputs: pass that dataset folder (not "
                 "a subfolder) as the truth")
    return hint


def _nan_to_none(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, np.generic):
        return _nan_to_none(x.item())
    return x


def _threshold_index(thresholds: list[float], value: float) -> int | None:
    for i, t in enumerate(thresholds):
        if abs(t - value) < 1e-9:
            return i
    return None


def _evaluate_pair(p: np.ndarray, t: np.ndarray, instances: bool, thresholds, task: str, k: int) -> dict:
    row: dict = {}
    if task == "multiclass":
        dices = dice_per_class(p, t, k)
        row["dice_per_class"] = dices
        row.update({f"dice_class{c}": d for c, d in enumerate(dices)})
        row["dice"] = float(np.mean(dices[1:])) if k > 1 else dices[0]
        row["accuracy"] = float(np.mean(p == t))
        return row
    counts = pixel_counts(p > 0, t > 0)
    row.update(metrics_from_counts(**counts))
    row.update(counts)
    row["adapted_rand_error"] = adapted_rand_error(p, t)
    if instances:
        m = match_objects(instance_labels(p), instance_labels(t), thresholds)
        row["objects"] = m
        row["n_true"], row["n_pred"], row["count_error"] = m["n_true"], m["n_pred"], m["count_error"]
        row["ap_mean"] = m["ap_mean"]
        for name, value in (("50", 0.5), ("75", 0.75)):
            i = _threshold_index(m["thresholds"], value)
            if i is None:
                continue
            for key in ("ap", "f1", "precision", "recall", "pq", "tp", "fp", "fn"):
                row[f"{key}_{name}"] = m[key][i]
    return row


def evaluate(
    pred: str | Path,
    truth: str | Path,
    invert_mask: bool = False,
    instances: bool = False,
    out: str | Path | None = None,
    iou_thresholds=DEFAULT_IOU_THRESHOLDS,
    overwrite: bool = False,
    classes: list[str] | None = None,
) -> dict:
    """Compare predicted masks/labels in ``pred`` with the ground truth ``truth`` (paired by name).

    Returns a report: per-image rows (Dice, IoU, precision, recall, accuracy, adapted Rand error and, with
    ``instances``, object matching at each IoU threshold), their means, pixel metrics pooled over all images,
    pooled object scores with the DSB 2018 score, and the unpaired files. ``invert_mask`` inverts the truth
    masks (for datasets that mark the background). With ``out`` (a .json), writes the report there and a
    per-image CSV beside it, refusing to overwrite existing files unless ``overwrite``.
    """
    pred, truth = Path(pred), Path(truth)
    json_path = csv_path = None
    if out is not None:
        json_path = Path(out)
        if json_path.suffix.lower() != ".json":
            raise UnetlabError("the evaluation report is written as JSON", json_path, "name it e.g. eval.json")
        csv_path = json_path.with_suffix(".csv")
        for p in (json_path, csv_path):
            if p.exists() and not overwrite:
                raise UnetlabError("output exists", p, "pass --overwrite to replace it")
    thresholds = [float(x) for x in np.atleast_1d(np.asarray(iou_thresholds, dtype=np.float64)).round(6)]
    if instances and not thresholds:
        raise UnetlabError("no IoU thresholds given")
    if instances and not all(0 < t <= 1 for t in thresholds):
        raise UnetlabError(f"IoU thresholds must lie in (0, 1], not {','.join(f'{t:g}' for t in thresholds)}")
    classes = prediction_classes(pred, classes)
    truth_src = _truth_source(truth, invert_mask, classes)
    if classes and truth_src.task != "multiclass":
        raise UnetlabError(f"--classes {','.join(classes)} is for multiclass ground truth; this truth is "
                           f"{truth_src.task or 'binary or instance'} masks", truth, "leave --classes out")
    pred_src = _prediction_source(pred, instances)
    pairs, unpaired_pred, unpaired_truth = _pair(pred_src, truth_src)
    if unpaired_pred:
        log.warning("%d predictions have no ground truth (e.g. %s)", len(unpaired_pred), unpaired_pred[0])
    if unpaired_truth:
        log.warning("%d ground-truth images have no prediction (e.g. %s)", len(unpaired_truth), unpaired_truth[0])
    if not pairs:
        raise UnetlabError("no prediction pairs up with a ground-truth image by name", pred,
                           _no_pairs_hint(pred_src, truth_src))
    multiclass = truth_src.task == "multiclass"
    if multiclass and instances:
        raise UnetlabError("object metrics need binary or instance ground truth, not multiclass", truth)
    rows, problems = [], list(truth_src.problems or [])
    for name, pk, tk in pairs:
        if pred_src.needs_shape:
            t = truth_src.loaders[tk](None)
            p = pred_src.loaders[pk](t.shape)
        else:
            p = pred_src.loaders[pk](None)
            t = truth_src.loaders[tk](p.shape)
        if p.shape != t.shape:
            problems.append(f"{pred_src.files[pk]}: size {p.shape} differs from the truth's {t.shape}; skipped")
            continue
        row = {"image": name, "pred_file": pred_src.files[pk], "truth_file": truth_src.files[tk]}
        row.update(_evaluate_pair(p, t, instances, thresholds, truth_src.task, truth_src.num_classes))
        rows.append(row)
    if not rows:
        raise UnetlabError("no prediction could be compared with its ground truth", pred, problems[0] if problems else None)
    for problem in problems[len(truth_src.problems or []):]:  # after the check above: a failure stays one line
        log.warning(problem)
    report = _summarize(rows, instances, multiclass, thresholds)
    report.update({
        "pred": str(pred), "truth": str(truth), "invert_mask": invert_mask, "instances": instances,
        "iou_thresholds": thresholds if instances else None,
        "unpaired_pred": unpaired_pred, "unpaired_truth": unpaired_truth,
        "ignored_pred_files": pred_src.ignored or [], "problems": problems, "images": rows,
        "classes": ["background", *classes] if multiclass and classes else None,
    })
    if json_path is not None:
        write_report(report, json_path, csv_path)
    return report


def _summarize(rows: list[dict], instances: bool, multiclass: bool, thresholds: list[float]) -> dict:
    scalar_keys = []
    for r in rows:
        for k, v in r.items():
            if k not in scalar_keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                scalar_keys.append(k)
    skip = {"tp", "fp", "fn", "tn"}
    mean = {}
    for k in scalar_keys:
        if k in skip:
            continue
        vals = np.asarray([r.get(k, np.nan) for r in rows], dtype=np.float64)
        mean[k] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    report: dict = {"n_images": len(rows), "mean": mean}
    if multiclass:
        per = np.asarray([r["dice_per_class"] for r in rows], dtype=np.float64)
        report["mean"]["dice_per_class"] = per.mean(axis=0).tolist()
        return report
    total = {k: int(sum(r[k] for r in rows)) for k in ("tp", "fp", "fn", "tn")}
    report["pooled"] = {**metrics_from_counts(**total), **total}
    if instances:
        report["objects"] = pool_matches([r["objects"] for r in rows])
    return report


def write_report(report: dict, json_path: str | Path, csv_path: str | Path | None = None) -> None:
    """Write the report as JSON (NaN as null) and, optionally, its per-image rows as CSV; both atomically."""
    text = json.dumps(_nan_to_none(report), indent=2)
    write_text(json_path, text)
    if csv_path is None:
        return
    cols: list[str] = []
    for r in report["images"]:
        for k, v in r.items():
            if k not in cols and not isinstance(v, (dict, list)):
                cols.append(k)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in report["images"]:
        w.writerow(["" if (isinstance(r.get(k), float) and math.isnan(r[k])) else
                    (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in cols])
    csv_text = buf.getvalue()
    write_text(csv_path, csv_text)
    log.info("wrote %s and %s", json_path, csv_path)


def parse_iou_thresholds(text: str | None) -> list[float] | tuple[float, ...]:
    """IoU thresholds from a comma-separated ``--iou-thresholds`` value; empty or None: the defaults."""
    if not text:
        return DEFAULT_IOU_THRESHOLDS
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UnetlabError(f"bad --iou-thresholds {text!r} (expected e.g. 0.5,0.75)") from None


def _f(x, width: int = 8) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-".rjust(width)
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x)).rjust(width)
    return f"{x:.4f}".rjust(width)


def format_summary(report: dict) -> str:
    """A plain-text table of an :func:`evaluate` report: pixel metrics (mean over images and pooled), object
    scores per IoU threshold with the DSB score, and the files that did not pair up."""
    lines = [f"Evaluated {report['n_images']} images: {report.get('pred', '')} vs {report.get('truth', '')}"]
    mean, pooled = report["mean"], report.get("pooled")
    if "dice_per_class" in mean:
        names = report.get("classes") or []
        lines.append(f"{'class':<20}{'Dice':>8}")
        for k, d in enumerate(mean["dice_per_class"]):
            lines.append(f"{(f'{k} {names[k]}' if k < len(names) else str(k)):<20}{_f(d)}")
        lines.append(f"{'mean Dice (foreground classes)':<32}{_f(mean.get('dice'))}")
        lines.append(f"{'pixel accuracy':<32}{_f(mean.get('accuracy'))}")
    else:
        lines.append(f"{'metric':<20}{'mean':>8}{'pooled':>8}")
        for k in PIXEL_KEYS:
            lines.append(f"{k:<20}{_f(mean.get(k))}{_f(pooled.get(k) if pooled else None)}")
        if "adapted_rand_error" in mean:
            lines.append(f"{'adapted Rand error':<20}{_f(mean['adapted_rand_error'])}")
    obj = report.get("objects")
    if obj:
        lines.append("")
        lines.append(f"objects: {obj['n_true']} true, {obj['n_pred']} predicted "
                     f"(mean |count error| per image {obj['mean_abs_count_error']:.2f}); counts and scores per IoU "
                     "pooled over all images")
        head = ["IoU", "TP", "FP", "FN", "precision", "recall", "F1", "AP", "PQ"]
        lines.append("".join(h.rjust(10) if i else h.ljust(6) for i, h in enumerate(head)))
        for i, thr in enumerate(obj["thresholds"]):
            vals = [obj[k][i] for k in ("tp", "fp", "fn", "precision", "recall", "f1", "ap", "pq")]
            lines.append(f"{thr:<6.2f}" + "".join(_f(v, 10) for v in vals))
        lines.append(f"DSB score (mean over images of AP at IoU {obj['thresholds'][0]:.2f}.."
                     f"{obj['thresholds'][-1]:.2f}): {obj['dsb_score']:.4f}")
    worst = sorted((r for r in report.get("images", []) if "dice" in r), key=lambda r: r["dice"])[:3]
    if len(report.get("images", [])) > 3 and worst and worst[0]["dice"] < 1.0:
        lines.append("lowest Dice: " + ", ".join(f"{r['image']} ({r['dice']:.3f})" for r in worst))
    for key, what in (("unpaired_pred", "predictions without ground truth"),
                      ("unpaired_truth", "ground truths without prediction")):
        items = report.get(key) or []
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            lines.append(f"{len(items)} {what}: {', '.join(items[:5])}{more}")
    for p in (report.get("problems") or [])[:5]:
        lines.append(f"problem: {p}")
    return "\n".join(lines)
