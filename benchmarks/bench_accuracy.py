"""Accuracy of an instance model on images that chose nothing: its held-out test split, the same images with
nuclei twice and half the size, and another collection; prints a table and writes JSON to
benchmarks/results/bench_accuracy.json.

    python benchmarks/bench_accuracy.py RUN_DIR --data ../shared/data/dsb2018_train/stage1_train \
        [--scale-images 20] [--other ../shared/data/stardist_nuclei]
    python benchmarks/bench_accuracy.py nuclei --other ../shared/data/stardist_nuclei   # the pretrained model

RUN_DIR must have been trained with a test split (``--test-fraction``, ``--test`` or ``--test-groups``): its
test images took no part in training, checkpoint choice or post-processing tuning. Rows:

- test split at the images' own size (``--diameter none``) and with ``--diameter auto``;
- the first ``--scale-images`` test images rescaled by 2 and by 0.5 (image bilinear, labels nearest), predicted
  with ``--diameter auto``, against the same images at native size;
- ``--other``: a folder of images + masks from elsewhere, with no fine-tuning.

``--sizes`` prints the Size estimate table of benchmarks/README.md instead (issue 28; per collection: the split of
``--data`` (its DSB images), ``--bitdepth``'s fixed list for the split (bitdepth_nucseg_split.json), ``--other``;
each at x1 and, for the first ``--scale-images``, x0.5 / x2 / x4): AP@0.5 and DSB score with ``--diameter auto``
(the run's size model) and at each image's true size, the size estimates' |log(estimated / true)|, seconds of
auto and none, and with ``--modes true,none,auto,measured`` the same run without its size model (``no_relook``:
its size model without the relook of large estimates).

``--split val`` scores the validation images instead, to choose between settings (of ``--diameter auto``, say)
without looking at the test images; report the test split.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from unetlab.data.io import image_stem, read_image, write_image  # noqa: E402
from unetlab.data.layouts import load_dataset  # noqa: E402
from unetlab.data.split import load_split  # noqa: E402
from unetlab.evaluation.evaluate import evaluate  # noqa: E402
from unetlab.inference.predict import predict  # noqa: E402
from unetlab.inference.rescale import resize_image, resize_labels  # noqa: E402
from unetlab.labels import instance_labels  # noqa: E402
from unetlab.runfolder import resolve_run_dir  # noqa: E402

log = logging.getLogger("bench_accuracy")


def write_rescaled(samples, factor: float, out: Path) -> Path:
    """The samples' first channel and labels rescaled by ``factor`` as ``out/images`` + ``out/masks`` TIFFs."""
    for s in samples:
        image = read_image(s.image)[:1]
        labels = instance_labels(s.load_mask())
        shape = (max(16, int(round(image.shape[1] * factor))), max(16, int(round(image.shape[2] * factor))))
        name = s.name.replace("/", "__")
        write_image(out / "images" / f"{name}.tif", np.clip(resize_image(image, shape)[0], 0, 65535).astype(np.uint16))
        write_image(out / "masks" / f"{name}.tif", resize_labels(labels, shape).astype(np.uint16))
    return out


def _split_samples(run: Path, data: Path, part: str) -> list:
    """The samples of ``data`` in the run's ``part`` split; its split.json names them as they are or, for a model
    trained on the two-collection view of scripts/train_nuclei_model.py, as "dsb_<id>"."""
    names = set(load_split(run / "split.json").get(part) or [])
    return [s for s in load_dataset(data).samples if s.name in names or f"dsb_{s.name}" in names]


def _linked_images(samples: list, out: Path) -> Path:
    """The samples' image files as they are (every channel, no conversion), linked into the flat folder ``out``
    under the output names ``predict`` gives a dataset's samples; returns ``out``."""
    out.mkdir(parents=True)
    for s in samples:
        suffix = s.image.name[len(image_stem(s.image)):]
        (out / f"{s.name.replace('/', '__')}{suffix}").symlink_to(Path(s.image).resolve())
    return out


def score(run: Path, images: Path, truth: Path, out: Path, diameter: str, precision: str = "auto") -> dict:
    """Predict ``images`` with ``run`` (instances) at ``precision`` and score the labels against ``truth``."""
    t0 = time.time()
    predict(run, images, out, instances=True, diameter=diameter, progress=False, overwrite=True,
            precision=precision)
    seconds = time.time() - t0
    rep = evaluate(out / "labels", truth, instances=True)
    obj = rep["objects"]
    return {"n_images": rep["n_images"], "n_objects": int(obj.get("n_true", 0)), "ap50": float(obj["ap"][0]),
            "dsb_score": float(obj.get("dsb_score", float("nan"))), "seconds": round(seconds, 1)}


# --- Size estimate (issue 28): --diameter auto (size model / measuring rule) against each image's true size ------

# bitdepth_nucseg's held-out whole images (every tissue and magnification): "test" never trains or tunes any model,
# "val" chooses; the one list, which scripts/train_nuclei_model.py reads too
BITDEPTH_SPLIT = json.loads((Path(__file__).parent / "bitdepth_nucseg_split.json").read_text())
SIZE_FACTORS = (1.0, 0.5, 2.0, 4.0)


def _truth_diameters(folder: Path) -> dict[str, float]:
    """Each image's true median object diameter (from its labels)."""
    from unetlab.data.sizes import median_diameter

    return {f.stem: median_diameter([read_image(folder / "masks" / f.name)[0].astype(np.int64)])
            for f in sorted((folder / "images").iterdir())}


def _true_size_score(run: Path, folder: Path, out: Path, precision: str, truth: dict[str, float]) -> dict:
    """Each image predicted at its own true median object diameter (from its labels): scores."""
    for f in sorted((folder / "images").iterdir()):
        d = truth[f.stem]
        predict(run, f, out / "one" / f.stem, instances=True, diameter=str(d) if d else "none", progress=False,
                overwrite=True, precision=precision)
        (out / "labels").mkdir(parents=True, exist_ok=True)
        for lab in (out / "one" / f.stem / "labels").iterdir():
            lab.rename(out / "labels" / lab.name)
    rep = evaluate(out / "labels", folder / "masks", instances=True)
    return {"ap50": float(rep["objects"]["ap"][0]), "dsb_score": float(rep["objects"]["dsb_score"])}


def _size_errors(pred: Path, truth: dict[str, float]) -> dict:
    """Median / 90th percentile of |log(estimated / true diameter)| and the share within 25%, from counts.csv."""
    import csv

    errs = [abs(float(np.log(float(r["Diameter"]) / truth[r["ImageName"]])))
            for r in csv.DictReader((pred / "counts.csv").open())
            if truth.get(r["ImageName"]) and r.get("Diameter") not in (None, "", "None")]
    if not errs:
        return {"err_median": float("nan"), "err_p90": float("nan"), "within25": float("nan")}
    e = np.array(errs)
    return {"err_median": float(np.median(e)), "err_p90": float(np.quantile(e, 0.9)),
            "within25": float((e < np.log(1.25)).mean())}


def size_rows(run: Path, collections: dict[str, list], tmp: Path, n_scaled: int, precision: str,
              refine_both: bool, modes: tuple[str, ...] = ("true", "none", "auto"),
              zooms: tuple[float, ...] = SIZE_FACTORS) -> list[dict]:
    """Per collection and zoom: AP@0.5 / DSB score with --diameter none, auto (size model; with ``refine_both``
    with and without the refinement pass), auto without the size model ("measured": the run without
    size_model.json) and each image's true size; the size estimates' errors; seconds of each."""
    import shutil

    from unetlab.inference import rescale

    measured_run = tmp / "run_without_size_model"
    if "measured" in modes:
        shutil.copytree(run, measured_run, ignore=shutil.ignore_patterns("size_model.json"))
    runs = {"none": (run, None), "auto": (run, rescale.REFINE), "measured": (measured_run, None),
            "no_relook": (run, rescale.REFINE)}
    if refine_both:
        runs["auto_1pass"] = (run, not rescale.REFINE)
    rows = []
    for cname, samples in collections.items():
        for factor in zooms:
            part = samples if factor == 1.0 else samples[:n_scaled]
            folder = write_rescaled(part, factor, tmp / f"{cname}_x{factor:g}")
            row: dict = {"collection": cname, "zoom": factor, "n_images": len(part)}
            truth = _truth_diameters(folder)
            if "true" in modes:
                true_scores = _true_size_score(run, folder, tmp / f"p_{cname}_{factor}_true", precision, truth)
                row.update({f"true_{k}": v for k, v in true_scores.items()})
            for mode, (r, refine) in runs.items():
                if mode in modes or (mode == "auto_1pass" and refine_both):
                    row.update(_mode_scores(r, folder, tmp / f"p_{cname}_{factor}_{mode}", mode, refine, truth,
                                            precision))
            rows.append(row)
            log.info("%s", row)
    return rows


def _mode_scores(run: Path, folder: Path, out: Path, mode: str, refine: bool | None, truth: dict[str, float],
                 precision: str) -> dict:
    """One mode of a Size estimate row: seconds, AP@0.5, DSB score and (auto modes) the size errors."""
    from unetlab.inference import rescale, sizemodel

    before = rescale.REFINE, sizemodel.RELOOK
    rescale.REFINE = before[0] if refine is None else refine
    sizemodel.RELOOK = math.inf if mode == "no_relook" else before[1]
    try:
        t0 = time.time()
        predict(run, folder / "images", out, instances=True, diameter="none" if mode == "none" else "auto",
                progress=False, overwrite=True, precision=precision)
        row = {f"{mode}_seconds": round(time.time() - t0, 1)}
    finally:
        rescale.REFINE, sizemodel.RELOOK = before
    rep = evaluate(out / "labels", folder / "masks", instances=True)
    row[f"{mode}_ap50"] = float(rep["objects"]["ap"][0])
    row[f"{mode}_dsb_score"] = float(rep["objects"]["dsb_score"])
    if mode != "none":
        row.update({f"{mode}_{k}": v for k, v in _size_errors(out, truth).items()})
    return row


def size_table(rows: list[dict], modes: tuple[str, ...]) -> str:
    """The Size estimate table (markdown): auto against the true size, the size errors, seconds auto / none;
    with the "measured" (no size model) and "no_relook" (size model without its relook) modes, and with
    --refine-both "auto_1pass" (no refinement pass), their AP@0.5 and size errors too."""
    extra = [m for m in modes if m in ("measured", "no_relook")]
    extra += ["auto_1pass"] if rows and "auto_1pass_ap50" in rows[0] else []  # --refine-both
    head = ["images", "zoom", "n", "AP@0.5 auto", "AP@0.5 true size", "auto - true", "DSB auto / true",
            "size err med / p90 (within 25%)", "s none / auto"]
    for m in extra:
        head += [f"AP@0.5 {m}", f"{m} err med / p90 (within 25%)"]
    lines = ["| " + " | ".join(head) + " |", "| --- | " + " | ".join(["---:"] * (len(head) - 1)) + " |"]
    for r in rows:
        cells = [r["collection"], f"x{r['zoom']:g}", str(r["n_images"]), f"{r['auto_ap50']:.3f}",
                 f"{r['true_ap50']:.3f}", f"{r['auto_ap50'] - r['true_ap50']:+.3f}",
                 f"{r['auto_dsb_score']:.3f} / {r['true_dsb_score']:.3f}",
                 f"{r['auto_err_median']:.2f} / {r['auto_err_p90']:.2f} ({r['auto_within25']:.0%})",
                 f"{_seconds(r, 'none')} / {_seconds(r, 'auto')}"]
        for m in extra:
            cells += [f"{r[f'{m}_ap50']:.3f}", f"{r[f'{m}_err_median']:.2f} / {r[f'{m}_err_p90']:.2f} "
                      f"({r[f'{m}_within25']:.0%})"]
        lines.append("| " + " | ".join(cells) + " |")
    n = sum(r["n_images"] for r in rows)
    within = sum(r["auto_within25"] * r["n_images"] for r in rows) / max(n, 1)
    lines += ["", f"size estimate within 25% of the true median diameter on {within:.0%} of {n} images (all rows)"]
    if "none" in modes:
        none_s, auto_s = sum(r["none_seconds"] for r in rows), sum(r["auto_seconds"] for r in rows)
        lines[-1] += (f"; --diameter auto took {auto_s:.0f} s against {none_s:.0f} s for --diameter none "
                      f"({auto_s / max(none_s, 1e-9):.2f}x)")
    return "\n".join(lines)


def _seconds(row: dict, mode: str) -> str:
    """A Size estimate row's seconds of ``mode``, '-' when the mode was not run (``--modes``)."""
    return f"{row[f'{mode}_seconds']:.0f}" if f"{mode}_seconds" in row else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=C.description(__doc__))
    p.add_argument("run", help="run folder, or a pretrained model's name (nuclei)")
    p.add_argument("--data", type=Path, help="the dataset folder the run was trained on (for the test split rows)")
    p.add_argument("--scale-images", type=int, default=20, help="test images used for the 2x / 0.5x rows")
    p.add_argument("--other", type=Path, action="append", default=[], help="images + masks from elsewhere")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="the run's split to score: test (to report, default) or val (to choose settings)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="fp32",
                   help="predict's --precision for every row (default fp32: the same figures on every CPU; auto "
                        "is bf16 where the CPU has native bf16)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_accuracy.json")
    p.add_argument("--sizes", action="store_true",
                   help="the Size estimate table only: the split of --data, --bitdepth's list and --other, each "
                        "at x1 / x0.5 / x2 / x4, with --diameter auto, none and the true size (see --modes)")
    p.add_argument("--bitdepth", type=Path,
                   help="the bitdepth_nucseg folder (its fixed list for --split, bitdepth_nucseg_split.json, is scored)")
    p.add_argument("--size-precision", default="fp32", help="--precision of the Size estimate rows")
    p.add_argument("--refine-both", action="store_true", help="Size estimate: also auto without/with refinement")
    p.add_argument("--modes", default="true,none,auto",
                   help="Size estimate: the modes to run (comma list of true, none, auto, measured: the run "
                        "without its size model, no_relook: the size model without its relook)")
    p.add_argument("--zooms", default="1,0.5,2,4", help="Size estimate: the zooms of the copies (comma list)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.sizes:
        return sizes_main(args)
    logging.getLogger("unetlab").setLevel(logging.WARNING)

    args.run = resolve_run_dir(args.run)
    if args.data is None and not args.other:
        raise SystemExit("give --data (the test split's dataset) and/or --other")
    split_samples = _split_samples(args.run, args.data, args.split) if args.data is not None else []
    if args.data is not None and not split_samples:
        raise SystemExit(f"{args.run}: no {args.split} images of {args.data} in split.json; train with "
                         "--test-fraction (or --test)")
    rows: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="bench_accuracy_") as tmp:
        tmp = Path(tmp)
        whole = _linked_images(split_samples, tmp / "split") if split_samples else None
        for d in ("none", "auto") if whole else ():
            rows.append((f"{args.split} split, --diameter {d}",
                         score(args.run, whole, args.data, tmp / f"test_{d}", d, precision=args.precision)))
        samples = split_samples[: args.scale_images]
        for factor in (1.0, 2.0, 0.5) if samples else ():
            folder = write_rescaled(samples, factor, tmp / f"x{factor}")
            rows.append((f"{len(samples)} {args.split} images x{factor:g}, --diameter auto",
                         score(args.run, folder / "images", folder / "masks", tmp / f"pred_x{factor}", "auto",
                               precision=args.precision)))
        for other in args.other:
            for d in ("none", "auto"):
                rows.append((f"{other.name}, --diameter {d}",
                             score(args.run, other / "images", other / "masks", tmp / f"o_{other.name}_{d}", d,
                               precision=args.precision)))
    info = json.loads((args.run / "model.json").read_text())
    header = f"run {args.run} (training object diameter {info.get('diameter')} px), --precision {args.precision}"
    lines = [header, "", "| images | n | objects | AP@0.5 | DSB score | s |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {name} | {r['n_images']} | {r['n_objects']} | {r['ap50']:.3f} | {r['dsb_score']:.3f} | "
              f"{r['seconds']:.0f} |" for name, r in rows]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "precision": args.precision,
                                    "machine": C.machine_info(__import__("torch").device("cpu")),
                                    "rows": [{"name": n, **r} for n, r in rows]}, indent=1))
    log.info("wrote %s", args.out)
    return 0



def sizes_main(args) -> int:
    """``--sizes``: the Size estimate table of benchmarks/README.md."""
    logging.getLogger("unetlab").setLevel(logging.WARNING)
    run = resolve_run_dir(args.run)
    collections: dict[str, list] = {}
    if args.data is not None:
        collections[f"DSB {args.split} split"] = _split_samples(run, args.data, args.split)
    if args.bitdepth is not None:
        collections[f"bitdepth_nucseg {args.split} list"] = [s for s in load_dataset(args.bitdepth).samples
                                                             if s.name in BITDEPTH_SPLIT[args.split]]
    for other in args.other:
        collections[other.name] = load_dataset(other).samples
    modes = tuple(args.modes.split(","))
    with tempfile.TemporaryDirectory(prefix="bench_sizes_") as tmp:
        rows = size_rows(run, collections, Path(tmp), args.scale_images, args.size_precision, args.refine_both,
                         modes, tuple(float(z) for z in args.zooms.split(",")))
    if {"true", "auto"} <= set(modes):
        print(size_table(rows, modes))
    out = args.out.with_name("bench_sizes.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "precision": args.size_precision,
                               "machine": C.machine_info(torch.device("cpu")), "rows": rows}, indent=1))
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
