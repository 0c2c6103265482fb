"""How an instance model's marker prominence trades merges for fragments: pooled AP@0.5 and DSB score of one split
predicted once, each image at its true object size, then post-processed with each prominence; prints a table and
writes JSON to benchmarks/results/bench_prominence.json.

    python benchmarks/bench_prominence.py RUN_DIR --data DATA --split val [--prominences 0.1,0.15,0.2] [--by-prefix]
    python benchmarks/bench_prominence.py RUN_DIR --data DATA --split train --limit 150 --by-prefix

``--split val`` or ``train`` to choose (a second opinion from images the network trained on); ``test`` only to
report. Images are predicted with their median true object at the run's training diameter (size-normalised runs;
other runs at their own size) and scored at that scale; copies of one image in the split (the same file behind
two names) count once. ``--by-prefix`` adds a row per name prefix without its digits (``dsb_``, ``bd_`` / ``bd2_``: the
collections of the nuclei recipe's training view).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from unetlab.data.io import read_image  # noqa: E402
from unetlab.data.sizes import median_diameter  # noqa: E402
from unetlab.evaluation.metrics import match_objects, pool_matches  # noqa: E402
from unetlab.inference.postprocess import probabilities_to_labels  # noqa: E402
from unetlab.inference.predictor import Predictor  # noqa: E402
from unetlab.inference.rescale import resize_image, resize_labels, scale_for, scaled_shape  # noqa: E402
from unetlab.labels import instance_labels  # noqa: E402

log = logging.getLogger("bench_prominence")


def predicted(run, predictor: Predictor, sample) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of one sample predicted with its objects at the training size, and its labels at that scale."""
    truth = instance_labels(sample.load_mask())
    x = predictor.prepare(read_image(sample.image), sample.image)
    train_d, true_d = run.info.get("diameter"), median_diameter([truth])
    if not run.config.data.size_normalize or not train_d or not true_d:
        return predictor.predict_prepared(x), truth
    shape = scaled_shape(tuple(x.shape[-2:]), scale_for(float(train_d), float(true_d)))
    return predictor.predict_prepared(resize_image(x, shape)), resize_labels(truth, shape)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=C.description(__doc__))
    C.split_arguments(p)
    p.add_argument("--prominences", default="0.05,0.1,0.13,0.15,0.175,0.2,0.25", help="comma list")
    p.add_argument("--by-prefix", action="store_true",
                   help="a row per image-name prefix (before the first '_', digits dropped)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    run_dir, run, samples = C.split_run(args)
    kind, pp = run.info.get("target", "binary"), run.config.postprocess
    predictor = Predictor.from_run(run, precision="fp32")
    preds = [predicted(run, predictor, s) for s in samples]
    groups = {"all": list(range(len(samples)))}
    if args.by_prefix:
        for i, s in enumerate(samples):
            groups.setdefault(re.sub(r"\d+$", "", s.name.split("_")[0]), []).append(i)
    rows = []
    for prom in (float(v) for v in args.prominences.split(",")):
        cfg = replace(pp, prominence=prom)
        matches = [match_objects(probabilities_to_labels(prob, kind, cfg), truth) for prob, truth in preds]
        for g, idx in groups.items():
            pooled = pool_matches([matches[i] for i in idx])
            rows.append({"prominence": prom, "images": f"{g} ({len(idx)})", "ap50": pooled["ap"][0],
                         "dsb": pooled["dsb_score"], "fp": pooled["fp"][0], "fn": pooled["fn"][0]})
    print(f"{run_dir.name}: {len(samples)} {args.split} images at their true size; threshold {pp.threshold}, "
          f"min size {pp.min_size}, run's prominence {pp.prominence}")
    C.print_table(rows, [("prominence", "prominence", "g"), ("images", "images", ""), ("ap50", "AP@0.5", ".3f"),
                         ("dsb", "DSB score", ".3f"), ("fp", "FP", ""), ("fn", "FN", "")])
    seconds = time.perf_counter() - start
    print(f"\n{seconds:.0f} s")
    path = C.write_results("bench_prominence", {"command": " ".join(sys.argv), "run": str(run_dir),
                                                "split": args.split, "rows": rows, "seconds": seconds}, args.json)
    log.info("results written to %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
