"""Where an instance model loses objects: the ceiling of its target and post-processing, and its misses and
false objects sorted by kind, size and brightness; prints tables and writes JSON to
benchmarks/results/bench_errors.json.

    python benchmarks/bench_errors.py nuclei --data ../shared/data/dsb2018_train/stage1_train --split val
    python benchmarks/bench_errors.py RUN_DIR --data DATA --split val [--scale 1.5]

Rows, on the images of one split of the run's ``split.json`` (``val`` to look for levers; ``test`` only to
report, never to choose):

- *ceiling*: the true labels turned into the run's target (foreground and normalised distance, flows, or the 3-class
  boundary map) and back through its post-processing: what a perfect network would score;
- *model*: the run's predictions with its tuned post-processing (``--scale`` predicts the images rescaled);
- misses (true objects without a prediction at IoU >= 0.5) as *merged* (the best-overlapping prediction is larger
  than 1.25x the object: it took in a neighbour), *split* (smaller than 0.8x: a fragment), *outline* (the right size,
  IoU 0.1-0.5) or *not found* (IoU < 0.1), and the miss rate by object area and by brightness relative to the
  image's median object.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
from skimage.segmentation import relabel_sequential

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from unetlab.data.io import read_image  # noqa: E402
from unetlab.data.targets import make_target  # noqa: E402
from unetlab.evaluation.metrics import match_objects, object_overlaps, pool_matches  # noqa: E402
from unetlab.inference.postprocess import probabilities_to_labels  # noqa: E402
from unetlab.inference.predictor import Predictor  # noqa: E402
from unetlab.inference.rescale import resize_image, resize_labels, scaled_shape  # noqa: E402
from unetlab.labels import instance_labels  # noqa: E402

log = logging.getLogger("bench_errors")
AREA_BINS = (0, 40, 80, 150, 300, 600, 1500, 10**9)
BRIGHTNESS_BINS = (-np.inf, 0.25, 0.5, 0.75, 1.0, 1.5, np.inf)


def ideal_probabilities(labels: np.ndarray, kind: str) -> np.ndarray:
    """The probabilities a perfect network would give for the target ``kind`` (distance, flow or boundary)."""
    target = make_target(labels, kind)
    if kind == "flow":
        return np.concatenate([target[:1], (target[1:] + 1) / 2]).astype(np.float32)
    if kind == "distance":
        return np.stack([(target > 0).astype(np.float32), target.astype(np.float32)])
    if kind == "boundary":
        return np.stack([(target == k).astype(np.float32) for k in range(3)])
    return (target > 0).astype(np.float32)[None]


def object_rows(pred: np.ndarray, truth: np.ndarray, raw: np.ndarray) -> list[dict]:
    """One row per true object: area, brightness relative to the median object, best IoU, best prediction's area."""
    n = int(truth.max())
    ov = object_overlaps(pred, truth)
    best_iou = np.zeros(n)
    best_area = np.zeros(n)
    order = np.argsort(ov["iou"])  # ascending: the best pair of each object is written last
    best_iou[ov["true_idx"][order]] = ov["iou"][order]
    best_area[ov["true_idx"][order]] = ov["pred_area"][ov["pred_idx"][order]]
    idx = truth.ravel()
    area = np.bincount(idx, minlength=n + 1)[1:]
    mean = np.bincount(idx, weights=raw.ravel(), minlength=n + 1)[1:] / np.maximum(area, 1)
    background = float(np.median(raw[truth == 0])) if (truth == 0).any() else 0.0
    median = float(np.median(mean)) if n else 1.0
    rel = (mean - background) / max(median - background, 1e-6)
    return [{"area": int(a), "brightness": float(r), "iou": float(i), "pred_area": float(p)}
            for a, r, i, p in zip(area, rel, best_iou, best_area)]


def miss_kind(row: dict) -> str | None:
    """None for a found object, else merged / split / outline / not found."""
    if row["iou"] >= 0.5:
        return None
    if row["iou"] < 0.1:
        return "not found"
    ratio = row["pred_area"] / max(row["area"], 1)
    return "merged" if ratio > 1.25 else "split" if ratio < 0.8 else "outline"


def binned(rows: list[dict], key: str, edges) -> list[dict]:
    """Miss rate of ``rows`` in the bins ``edges`` of ``key``."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = [r for r in rows if lo < r[key] <= hi]
        if sel:
            name = f"{'min' if lo == -np.inf else f'{lo:g}'}-{'max' if hi in (np.inf, 10**9) else f'{hi:g}'}"
            out.append({"bin": name, "objects": len(sel),
                        "missed": sum(miss_kind(r) is not None for r in sel),
                        "miss_rate": sum(miss_kind(r) is not None for r in sel) / len(sel)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=C.description(__doc__))
    C.split_arguments(p)
    p.add_argument("--scale", type=float, default=1.0, help="predict the images rescaled by this factor")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    run_dir, run, samples = C.split_run(args)
    kind, pp = run.info.get("target", "binary"), run.config.postprocess
    predictor = Predictor.from_run(run)
    ceiling, model, rows = [], [], []
    fp_kinds = {"false (no true object)": 0, "fragment or merge": 0}
    for s in samples:
        truth = instance_labels(s.load_mask())
        ceiling.append(match_objects(probabilities_to_labels(ideal_probabilities(truth, kind), kind, pp), truth))
        raw = read_image(s.image)
        x = predictor.prepare(raw, s.image)
        if args.scale != 1.0:
            x = resize_image(x, scaled_shape(truth.shape, args.scale))
        labels = probabilities_to_labels(predictor.predict_prepared(x), kind, pp)
        if args.scale != 1.0:
            labels = resize_labels(labels, truth.shape)
        model.append(match_objects(labels, truth))
        truth = relabel_sequential(truth)[0]
        rows += object_rows(labels, truth, raw[0].astype(np.float64))
        ov = object_overlaps(labels, truth)
        best = np.zeros(ov["n_pred"])
        np.maximum.at(best, ov["pred_idx"], ov["iou"])
        unmatched = best < 0.5
        fp_kinds["false (no true object)"] += int((unmatched & (best < 0.1)).sum())
        fp_kinds["fragment or merge"] += int((unmatched & (best >= 0.1)).sum())
    pc, pm = pool_matches(ceiling), pool_matches(model)
    scores = [{"rows": "ceiling (true labels through the post-processing)", "ap50": pc["ap"][0],
               "dsb": pc["dsb_score"]},
              {"rows": f"model, scale {args.scale:g}", "ap50": pm["ap"][0], "dsb": pm["dsb_score"],
               "tp": pm["tp"][0], "fp": pm["fp"][0], "fn": pm["fn"][0]}]
    print(f"{run_dir.name}: {len(samples)} {args.split} images, {len(rows)} true objects, post-processing "
          f"threshold {pp.threshold}, prominence {pp.prominence}, min size {pp.min_size}")
    C.print_table(scores, [("rows", "", ""), ("ap50", "AP@0.5", ".3f"), ("dsb", "DSB score", ".3f"),
                           ("tp", "TP", ""), ("fp", "FP", ""), ("fn", "FN", "")])
    kinds = {}
    for r in rows:
        k = miss_kind(r)
        if k:
            kinds[k] = kinds.get(k, 0) + 1
    print()
    C.print_table([{"kind": k, "n": v} for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])]
                  + [{"kind": f"FP: {k}", "n": v} for k, v in fp_kinds.items()],
                  [("kind", "misses by kind (FP: predictions without a match)", ""), ("n", "n", "")])
    by_area, by_brightness = binned(rows, "area", AREA_BINS), binned(rows, "brightness", BRIGHTNESS_BINS)
    for title, table in (("object area (px)", by_area), ("brightness / median object", by_brightness)):
        print()
        C.print_table(table, [("bin", title, ""), ("objects", "objects", ""), ("missed", "missed", ""),
                              ("miss_rate", "miss rate", ".3f")])
    seconds = time.perf_counter() - start
    print(f"\n{seconds:.0f} s")
    path = C.write_results("bench_errors", {
        "command": " ".join(sys.argv), "run": str(run_dir), "split": args.split, "scale": args.scale,
        "images": len(samples), "scores": scores, "misses": kinds, "false_objects": fp_kinds,
        "by_area": by_area, "by_brightness": by_brightness, "seconds": seconds}, args.json)
    log.info("results written to %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
