"""Predict a folder (or one file) of images with a trained run: masks, probabilities, labels, counts, RLE."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..config import PostprocessConfig, coerce
from ..data.io import IMAGE_EXTENSIONS, image_stem, is_image_file, read_image, write_image
from ..data.ome import is_zarr_path
from ..data.targets import TARGET_KINDS
from ..errors import UnetlabError
from ..files import write_text
from ..runfolder import Run, load_run, resolve_run_dir
from .options import PredictOptions, effective_postprocess, resolve_options
from .predict_steps import (
    PREDICTIONS_JSON,
    check_out,
    header_sizes,
    merge_rle_parts,
    on_oom_smaller_batches,
    pixel_size,
    predict_at_training_size,
    predict_streaming,
    predict_with_fallback,
    with_skip_bad_hint,
)
from .predict_steps import (
    foreground as _foreground,
)
from .predictor import Predictor, onnx_device
from .rescale import auto_rescales, parse_diameter
from .sizemodel import size_estimator
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
    from ..data.layouts import detect_layout, load_dataset, output_name

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
        return [(output_name(s.name), s.image) for s in samples]
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


def output_paths(out: Path, name: str, multiclass: bool) -> dict[str, Path]:
    """Where each output of image ``name`` goes."""
    return {
        "mask": out / ("classes" if multiclass else "masks") / f"{name}.png",
        "prob": out / "probabilities" / f"{name}.tif",
        "labels": out / "labels" / f"{name}.tif",
        "labels_zarr": out / "labels" / f"{name}.ome.zarr",
        "overlay": out / "overlays" / f"{name}.png",
    }


@dataclass
class _Job:
    """What one :func:`predict` call fixed before its first image: options, run, predictor, outputs wanted."""

    o: PredictOptions
    out: Path
    run: Run
    predictor: Predictor
    pp: PostprocessConfig
    diameter: float | str | None
    protect: list[Path]
    device: Any = None  # where the network runs (onnxruntime's provider device with --backend onnx)
    channels_said: bool = False  # the line on channels taken from a multichannel image: once per prediction
    stream_said: bool = False  # the line that streamed images are not rescaled: once per prediction
    estimate: Any = None  # --diameter auto: the run's size model (size_model.json), read once per prediction

    @property
    def multiclass(self) -> bool:
        return self.run.info.get("task") == "multiclass"

    @property
    def kind(self) -> str:
        return self.run.info.get("target", "binary")

    @property
    def want_labels(self) -> bool:
        return self.o.instances or bool(self.o.rle) or self.o.rois


@dataclass
class _Results:
    """What the images of one rank gave: names done, already done (resume), bad, and the tables' rows."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    measurements: dict[str, list[dict]] = field(default_factory=dict)
    scales: dict[str, dict] = field(default_factory=dict)
    rle_items: list[tuple[str, np.ndarray]] = field(default_factory=list)


def predict(model: str | Path, input: str | Path, out: str | Path, *, options: PredictOptions | None = None,
            **overrides: Any) -> dict:
    """Predict every image of ``input`` with the run ``model`` into ``out``; returns a summary dict.

    Writes ``masks/`` (or ``classes/``), and on request ``probabilities/`` (float32 TIFF), ``labels/`` (uint16
    instance labels) with ``objects.csv`` and ``counts.csv``, ``overlays/``, a Kaggle RLE CSV and ImageJ ROIs.
    TIFF images of more than ``stream_threshold`` pixels (None: never) are read, predicted and written band by
    band with bounded memory; their mask is then a tiled TIFF (``masks/<name>.tif``) and they support masks
    and probabilities only. Settings: ``options`` (a :class:`PredictOptions`, default all defaults) with any
    keyword arguments on top, e.g. ``predict(run, images, out, instances=True, tile=256)``; an unknown keyword
    is a TypeError naming it. Unreadable images skipped with ``skip_bad`` are listed in the summary's ``bad``.
    """
    from tqdm.auto import tqdm

    from .. import distributed as D

    o = resolve_options(options, overrides)
    out = Path(out)
    run_dir = resolve_run_dir(model)  # a run folder, or a pretrained model's name
    inputs = collect_inputs(input, run_dir / "split.json" if o.split else None, o.split or "val")
    # under torchrun: Gloo carries only the coordination (objects, barriers), whatever device predicts
    dist = D.init_distributed("cpu", backend="gloo")
    D.run_on_main(partial(check_out, out, Path(input), o.overwrite, o.resume, o.rle), dist)  # before any rank writes
    job = _plan(o, out, run_dir, [f for _n, f in inputs], dist)
    mine = inputs[dist.rank :: dist.world_size]
    sizes, total_tiles = header_sizes([f for _n, f in mine], job.predictor)
    disable = True if (o.progress is False or not dist.is_main) else (False if o.progress else None)
    res = _Results()
    with tqdm(total=total_tiles, desc="predict", unit="tile", disable=disable, dynamic_ncols=True) as bar:
        for name, f in mine:
            _predict_one(job, name, f, res, bar.update, sizes.get(f))
    res = _merge_ranks(job, res, inputs, dist)
    if dist.is_main:  # at the end: a command that fails prints its one error line only
        _write_tables(job, res, model, run_dir, inputs)
        _log_scales(res.scales, bool(res.measurements))
        log.info("predict: device %s, precision %s (--precision %s), %d thread(s), backend %s", job.device,
                 job.predictor.precision, o.precision, _torch_threads(), o.backend)
    summary = {"images": len(inputs), "predicted": len(res.done), "skipped_done": len(res.skipped),
               "bad": res.bad, "out": str(out), "rank": dist.rank, "world_size": dist.world_size,
               "precision": job.predictor.precision}
    if res.measurements:
        summary["objects"] = {k: len(v) for k, v in res.measurements.items()}
    D.barrier(dist)  # every output exists when predict() returns on any rank
    D.cleanup(dist)
    if res.bad and not res.done and not res.skipped:
        raise UnetlabError(f"none of the {len(inputs)} input image(s) could be read; the first: {res.bad[0]}")
    if res.bad and dist.is_main:  # the files themselves: once, in the summary (printed by `unetlab predict`)
        log.warning("%d image(s) skipped (--skip-bad: unreadable, or unfit for the model); the summary lists them",
                    len(res.bad))
    return summary


def _plan(o: PredictOptions, out: Path, run_dir: Path, protect: list[Path], dist) -> _Job:
    """Load the run, build the predictor and check that the options fit the model, before any image."""
    from .. import distributed as D
    from .._runtime import resolve_device

    run = load_run(run_dir)
    if o.channels is not None:  # the model's own channel selection, replaced
        chosen = coerce(o.channels, list[int], "channels")
        if run.config.data.channel_code:
            log.warning("--channels %s replaces the channel code the model was trained with (%s)",
                        ",".join(map(str, chosen)), run.config.data.channel_code)
        run.config.data = replace(run.config.data, channels=chosen, channel_code=None)
    if o.backend == "onnx" and str(o.device) == "auto":
        dev: Any = "auto"  # onnxruntime's providers decide (CUDA only where it has it)
    else:
        dev = D.rank_device(resolve_device(str(o.device)), dist)  # cuda:LOCAL_RANK under torchrun
    predictor = Predictor.from_run(run, device=dev, precision=o.precision, tile=o.tile, overlap=o.overlap,
                                   batch_size=o.batch_size, tta=o.tta, compile=o.compile, backend=o.backend,
                                   onnx_path=o.onnx)
    pp = effective_postprocess(o, run.config.postprocess)
    if pp != run.config.postprocess:
        log.info("post-processing: threshold %s, min size %s, prominence %s (the run's: %s, %s, %s)", pp.threshold,
                 pp.min_size, pp.prominence, run.config.postprocess.threshold, run.config.postprocess.min_size,
                 run.config.postprocess.prominence)
    job = _Job(o, out, run, predictor, pp, None, protect, onnx_device(dev) if o.backend == "onnx" else predictor.device)
    if o.instances and job.multiclass:
        raise UnetlabError("--instances needs a binary, boundary, distance or flow model; this one predicts classes")
    if o.ome_zarr and not job.want_labels:
        raise UnetlabError("--ome-zarr writes the instance labels as OME-Zarr: add --instances")
    job.diameter = _resolve_diameter(o.diameter, run, job.want_labels, run_dir)
    if job.diameter == "auto":
        job.estimate = size_estimator(run.model, run.path)
        if job.estimate is None:
            log.info("--diameter auto: %s has no size model, so the objects found at the image's own size are measured "
                     "(objects far larger than trained may fragment); `unetlab size-model RUN` fits one", run.path)
    return job


def _torch_threads() -> int:
    """The number of threads PyTorch computes with on the CPU."""
    import torch

    return torch.get_num_threads()


def _resolve_diameter(value: Any, run: Run, want_labels: bool, run_dir: Path) -> float | str | None:
    """The ``--diameter`` a prediction uses: 'auto' only for instance models that know their objects' size
    (with labels, or size-normalised), a number only for models that know it; None: the images' own size."""
    train_diameter = run.info.get("diameter")
    diameter = parse_diameter(value)
    if diameter == "auto" and not auto_rescales(run.info, run.config.data.size_normalize, want_labels):
        diameter = None
    elif diameter is not None and not train_diameter:
        raise UnetlabError("--diameter needs a model that knows its training objects' size (model.json "
                           "'diameter', written by unetlab >= 0.1 at training)", run_dir / "model.json",
                           "train again, or predict with --diameter none")
    if diameter is None and run.config.data.size_normalize:
        log.warning("this model was trained size-normalised (objects of %s px): images are predicted at their own "
                    "size, which suits it only if their objects have that size; --diameter auto (the default) or "
                    "--diameter PX rescales them", train_diameter)
    return diameter


def _plan_outputs(job: _Job, name: str, f: Path) -> tuple[dict[str, Path], bool, list[Path]]:
    """Where image ``name``'s outputs go, whether it is streamed, and the files that must exist for it to be done."""
    o, paths = job.o, output_paths(job.out, name, job.multiclass)
    stream = should_stream(f, o.stream_threshold)
    if stream:  # PNG cannot be written band by band
        paths["mask"] = paths["mask"].with_suffix(".tif")
    paths["rois"] = job.out / "rois" / f"{name}.zip"
    wanted = {"mask": True, "prob": o.probabilities, "labels": job.want_labels,
              "labels_zarr": job.want_labels and o.ome_zarr, "overlay": o.overlays or o.instances, "rois": o.rois}
    return paths, stream, [paths[k] for k, w in wanted.items() if w]


def _predict_one(job: _Job, name: str, f: Path, res: _Results, progress: Callable[[int], Any],
                 size: tuple[int, int] | None) -> None:
    """Predict image ``name`` and write its outputs, or collect them when ``--resume`` finds them done; a bad
    image is an error naming ``--skip-bad``, or with it a line in ``res.bad``."""
    o, predictor = job.o, job.predictor
    paths, stream, needed = _plan_outputs(job, name, f)
    if o.resume and all(p.exists() for p in needed) and _resume_done(name, f, paths, job.want_labels, bool(o.rle),
                                                                          res):
        res.skipped.append(name)
        progress(predictor.n_tiles(size) if size else 1)
        return
    try:
        if stream:
            _note_streamed_size(job, f)
            predict_streaming(predictor, f, paths, o.probabilities, job.want_labels or o.overlays, job.protect,
                               lambda p: _foreground(p, job.run.info, job.pp.threshold), progress,
                               o.stream_threshold)
            res.done.append(name)
            return
        raw = read_image(f)
        _note_channels(job, raw, f)
        prob, labels = _predict_probabilities(job, name, raw, f, res, progress)
    except UnetlabError as exc:
        if not o.skip_bad:
            hinted = with_skip_bad_hint(exc, f, done=len(res.done))
            if hinted is exc:
                raise
            raise hinted from exc
        res.bad.append(f"{exc}")
        log.debug("skipped: %s", exc)
        return
    _write_one(job, name, f, raw, prob, labels, paths, res)
    res.done.append(name)


def _note_streamed_size(job: _Job, f: Path) -> None:
    """Say once per prediction that a streamed image is predicted at its own size, whatever --diameter says."""
    if job.diameter is None or job.stream_said:
        return
    job.stream_said = True
    log.warning("%s is streamed band by band at its own size: --diameter %s is not applied (its objects should "
                "have the model's training size, %s px); raise --stream-threshold to predict it rescaled", f,
                job.o.diameter, job.run.info.get("diameter"))


def _note_channels(job: _Job, raw: np.ndarray, f: Path) -> None:
    """Say once per prediction when the model takes some channels of a multichannel image (e.g. channel 0 of
    RGB), as its training did or as ``--channels`` asked."""
    chosen = job.run.config.data.channels
    if job.channels_said or not chosen or raw.shape[0] <= len(chosen) or job.run.config.data.channel_code:
        return
    job.channels_said = True
    want = int(job.run.info.get("in_channels", len(chosen)))
    kind = "RGB" if raw.shape[0] == 3 else f"{raw.shape[0]}-channel"
    source = "as --channels asked" if job.o.channels is not None else "as in its training"
    log.info("model expects %d channel(s); using channel(s) %s of %s image %s (and of any like it, %s); choose "
             "with --channels", want, ",".join(map(str, chosen)), kind, f.name, source)


def _predict_probabilities(job: _Job, name: str, raw: np.ndarray, f: Path, res: _Results,
                           progress: Callable[[int], Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """One image's probabilities (and labels, when it was rescaled to the training size; its scale goes to
    ``res.scales``)."""
    if job.diameter is None:  # at its own size: counts.csv keeps its columns (Scale 1, no diameter)
        res.scales[name] = {"Scale": 1.0, "Diameter": "", "DiameterFrom": "none"}
        return predict_with_fallback(job.predictor, raw, f, progress), None
    prob, labels, choice = on_oom_smaller_batches(job.predictor, f, partial(
        predict_at_training_size, raw=raw, source=f, train_diameter=job.run.info.get("diameter"),
        diameter=job.diameter, kind=job.kind, pp=job.pp, info=job.run.info, estimate=job.estimate))
    progress(job.predictor.n_tiles(prob.shape[-2:]))
    res.scales[name] = {"Scale": round(choice.scale, 4), "Diameter": choice.diameter, "DiameterFrom": choice.how}
    log.debug("%s: predicted at scale %.3f (object diameter %s px, %s)", name, choice.scale,
              f"{choice.diameter:.1f}" if choice.diameter else "?", choice.how)
    return prob, labels


def _write_one(job: _Job, name: str, f: Path, raw: np.ndarray, prob: np.ndarray, labels: np.ndarray | None,
               paths: dict[str, Path], res: _Results) -> None:
    """Write one image's outputs: mask, probabilities, labels (TIFF, OME-Zarr), ROIs, overlay; keep its
    measurements and run-length rows for the tables."""
    from . import writers

    o, protect, note = job.o, job.protect, res.scales.get(name)
    fg = _foreground(prob, job.run.info, job.pp.threshold)
    writers.write_mask(paths["mask"], fg, protect) if not job.multiclass else write_image(paths["mask"], fg)
    if o.probabilities:
        writers.write_probabilities(paths["prob"], prob, protect)
    if job.want_labels:
        from .postprocess import probabilities_to_labels

        if labels is None:
            labels = probabilities_to_labels(prob, job.kind if job.kind in TARGET_KINDS else "binary", job.pp)
        um = pixel_size(f)
        writers.write_labels(paths["labels"], labels, protect, note=note, pixel_size_um=um)
        if o.ome_zarr:
            writers.write_labels_ome_zarr(paths["labels_zarr"], labels, protect, um, note=note)
        res.measurements[name] = writers.measure_objects(labels, raw)
        if o.rle:
            res.rle_items.append((name, labels))
        if o.rois:
            writers.write_imagej_rois(paths["rois"], labels, protect)
        if o.overlays or o.instances:
            writers.write_overlay(paths["overlay"], raw, labels, protect)
    elif o.overlays:
        from scipy import ndimage as ndi

        writers.write_overlay(paths["overlay"], raw, ndi.label(fg > 0)[0], protect)


def _merge_ranks(job: _Job, res: _Results, inputs: list[tuple[str, Path]], dist) -> _Results:
    """Write the run-length CSV (one part per rank, joined by rank 0) and return every rank's results, in
    input order, as a single process would have them."""
    from .. import distributed as D
    from .writers import write_rle_csv

    rle = Path(job.o.rle) if job.o.rle else None
    if rle is not None:
        part = Path(f"{rle}.rank{dist.rank}.part") if dist.enabled else rle
        write_rle_csv(part, res.rle_items, style=job.o.rle_style, protect=job.protect)
    if not dist.enabled:
        return res
    parts = D.gather_objects({"done": res.done, "skipped": res.skipped, "bad": res.bad,
                              "measurements": res.measurements, "scales": res.scales}, dist)
    order = {name: i for i, (name, _f) in enumerate(inputs)}
    merged = {n: m for p in parts for n, m in p["measurements"].items()}
    out = _Results(
        done=sorted((n for p in parts for n in p["done"]), key=order.__getitem__),
        skipped=sorted((n for p in parts for n in p["skipped"]), key=order.__getitem__),
        bad=[b for p in parts for b in p["bad"]],
        measurements={n: merged[n] for n in sorted(merged, key=order.__getitem__)},
        scales={n: s for p in parts for n, s in p["scales"].items()})
    if rle is not None and dist.is_main:
        merge_rle_parts(rle, [Path(f"{rle}.rank{r}.part") for r in range(dist.world_size)], order)
    return out


def _write_tables(job: _Job, res: _Results, model: str | Path, run_dir: Path, inputs: list[tuple[str, Path]]
                  ) -> None:
    """predictions.json (which image each output came from, the settings used), objects.csv and counts.csv."""
    from . import writers

    written = set(res.done) | set(res.skipped)  # not the images --skip-bad left out
    write_text(job.out / PREDICTIONS_JSON, json.dumps(
        {"model": str(model), "run": str(run_dir), "images": {n: str(Path(f).resolve()) for n, f in inputs
                                                              if n in written}, "left_out": res.bad,
         "labels": job.want_labels, "multiclass": job.multiclass, "postprocess": asdict(job.pp),
         "classes": list(job.run.info.get("classes") or []) if job.multiclass else None,
         "precision": job.predictor.precision, "backend": job.o.backend}, indent=1) + "\n")
    if res.measurements:  # one objects.csv and counts.csv, whatever the number of ranks
        writers.write_objects_csv(job.out / "objects.csv", res.measurements, job.protect)
        writers.write_summary_csv(job.out / "counts.csv", res.measurements, job.protect, per_image=res.scales)


def _log_scales(scales: dict[str, dict], in_counts: bool) -> None:
    """One line for the scales images were predicted at (each image's is in counts.csv when written, and in
    a --debug line)."""
    if not scales or all(s.get("DiameterFrom") == "none" for s in scales.values()):
        return
    values = sorted(s["Scale"] for s in scales.values())
    rescaled = sum(1 for v in values if v != 1.0)
    log.info("predicted %d image(s) at the training object size: %d rescaled, scale min %.3f, median %.3f, "
             "max %.3f (per image: %s)", len(values), rescaled, values[0], float(np.median(values)), values[-1],
             "counts.csv" if in_counts else "--debug")


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


def _resume_done(name: str, image: Path, paths: dict[str, Path], want_labels: bool, rle: bool, res: _Results
                 ) -> bool:
    """For ``--resume``: collect what the tables need from an image's finished outputs (its labels and the scale
    noted in them); False when they cannot be read, and the image is predicted again."""
    if not want_labels:
        return True
    from ..data.io import read_label
    from . import writers

    try:
        labels = read_label(paths["labels"])
        measurements = writers.measure_objects(labels, read_image(image))
    except UnetlabError:
        return False
    res.measurements[name] = measurements
    note = writers.read_labels_note(paths["labels"])
    if note:
        res.scales[name] = note
    if rle:
        res.rle_items.append((name, labels))
    return True


