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

``--split val`` scores the validation images instead, to choose between settings (of ``--diameter auto``, say)
without looking at the test images; report the test split.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from unetlab.data.io import read_image, write_image  # noqa: E402
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


def score(run: Path, images: Path, truth: Path, out: Path, diameter: str, split: str | None = None,
          precision: str = "auto") -> dict:
    """Predict ``images`` with ``run`` (instances) at ``precision`` and score the labels against ``truth``."""
    t0 = time.time()
    predict(run, images, out, instances=True, diameter=diameter, split=split, progress=False, overwrite=True,
            precision=precision)
    seconds = time.time() - t0
    rep = evaluate(out / "labels", truth, instances=True)
    obj = rep["objects"]
    return {"n_images": rep["n_images"], "n_objects": int(obj.get("n_true", 0)), "ap50": float(obj["ap"][0]),
            "dsb_score": float(obj.get("dsb_score", float("nan"))), "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run folder, or a pretrained model's name (nuclei)")
    p.add_argument("--data", type=Path, help="the dataset folder the run was trained on (for the test split rows)")
    p.add_argument("--scale-images", type=int, default=20, help="test images used for the 2x / 0.5x rows")
    p.add_argument("--other", type=Path, action="append", default=[], help="images + masks from elsewhere")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="the run's split to score: test (to report, default) or val (to choose settings)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="predict's --precision for every row (default auto)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_accuracy.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("unetlab").setLevel(logging.WARNING)

    args.run = resolve_run_dir(args.run)
    if args.data is None and not args.other:
        raise SystemExit("give --data (the test split's dataset) and/or --other")
    test_names = load_split(args.run / "split.json").get(args.split) if args.data is not None else []
    if args.data is not None and not test_names:
        raise SystemExit(f"{args.run}: no {args.split} split in split.json; train with --test-fraction (or --test)")
    rows: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="bench_accuracy_") as tmp:
        tmp = Path(tmp)
        for d in ("none", "auto") if test_names else ():
            rows.append((f"{args.split} split, --diameter {d}",
                         score(args.run, args.data, args.data, tmp / f"test_{d}", d, split=args.split,
                               precision=args.precision)))
        samples = [s for s in load_dataset(args.data).samples if s.name in set(test_names)][: args.scale_images] \
            if test_names else []
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


if __name__ == "__main__":
    raise SystemExit(main())
