"""Train and package unetlab's pretrained ``nuclei`` model (shipped in ``unetlab/pretrained/nuclei``).

Reproducible from the public DSB 2018 stage-1 training set (CC0): the fluorescence images only, a test split
held out by the seeded ``--test-fraction 0.2`` that never trains or tunes anything, the size- and
brightness-invariant recipe (each image drawn with its nuclei at the training median size, then zoom 0.5x-2x,
contrast/gamma/noise augmentation, per-image percentile normalisation), then the best weights stored as float16
with the tuned post-processing and the test scores.

    python scripts/train_nuclei_model.py --data ../shared/data/dsb2018_train --run runs/nuclei
    python scripts/train_nuclei_model.py --data ../shared/data/dsb2018_train --run runs/nuclei --package-only
    python scripts/train_nuclei_model.py --data ../shared/data/dsb2018_train --run - --size-model-only

Packaging also fits the size model of ``--diameter auto`` (``size_model.json``) on the packaged weights (about
3.5 min on 2 busy cores); ``--size-model-only`` fits it again for the model already in ``--dest``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("train_nuclei_model")

RECIPE = [
    "--channels", "0", "--target", "distance",
    "--preset", "unet", "--base-width", "16", "--depth", "4",
    "--patch-size", "256", "--batch-size", "8", "--samples-per-epoch", "384",
    "--epochs", "30", "--val-every", "10", "--lr", "2e-3", "--seed", "0",
    "--test-fraction", "0.2",
    "--aug-contrast", "0.3", "--aug-gamma", "0.3", "--aug-noise", "0.2",
    "--size-normalize", "true",
    "--tensorboard", "false", "--no-progress",
]


def fluorescence_ids(data: Path) -> list[str]:
    """Image ids the DSB metadata table marks as fluorescence."""
    with open(data / "image_metadata.csv", newline="") as f:
        return [row["ImageId"] for row in csv.DictReader(f) if row["modality_guess"] == "fluorescence"]


def train(data: Path, run: Path, extra: list[str]) -> None:
    """Run ``unetlab train`` with the recipe on the fluorescence images."""
    ids = fluorescence_ids(data)
    run.parent.mkdir(parents=True, exist_ok=True)
    include = run.parent / f"{run.name}_fluorescence.txt"
    include.write_text("\n".join(ids) + "\n")
    cmd = [sys.executable, "-m", "unetlab", "train", "--data", str(data / "stage1_train"),
           "--include", str(include), "--out", str(run), *RECIPE, *extra]
    log.info("training on %d fluorescence images: %s", len(ids), " ".join(cmd))
    subprocess.run(cmd, check=True)


DEST = Path(__file__).resolve().parents[1] / "src" / "unetlab" / "pretrained" / "nuclei"


def half_weights(weights: dict) -> dict:
    """The state dict with floating tensors stored as float16 (half the file; loaded back into float32)."""
    return {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}


def score_other(model_dir: Path, other: Path) -> dict:
    """AP@0.5 / DSB score of the packaged model on ``other`` (images/ + masks/), no fine-tuning."""
    from unetlab import evaluate, predict

    with tempfile.TemporaryDirectory(prefix="nuclei_other_") as tmp:
        predict(model_dir, other / "images", Path(tmp) / "pred", instances=True, progress=False)
        rep = evaluate(Path(tmp) / "pred" / "labels", other / "masks", instances=True)
    obj = rep["objects"]
    return {"data": other.name, "images": rep["n_images"], "objects": int(obj.get("n_true", 0)),
            "ap50": round(float(obj["ap"][0]), 4), "dsb_score": round(float(obj["dsb_score"]), 4)}


def fit_size_model(model_dir: Path, data: Path) -> None:
    """Fit the packaged weights' size model (``size_model.json``, issue 28) on its training images; the ridge
    penalty is chosen on its validation images; its test images are never read."""
    from unetlab.training.sizefit import fit_size_model_for_run

    fit_size_model_for_run(model_dir, data / "stage1_train", crops=1024, val_crops=256, seed=0)


def package(run: Path, dest: Path, others: list[Path], data: Path | None = None) -> Path:
    """Copy the run's best weights (float16), config, model.json and split into ``dest`` with a model card; with
    ``data`` (the DSB folder) fit the size model of the packaged weights too."""
    from unetlab.config import RunConfig
    from unetlab.models import count_parameters
    from unetlab.runfolder import load_checkpoint, load_run, read_json, save_checkpoint

    summary = read_json(run / "summary.json")
    split = read_json(run / "split.json")
    test = summary.get("test") or {}
    if "ap50" not in test:
        raise SystemExit(f"{run}: summary.json has no test scores; train with --test-fraction")
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    cfg = RunConfig.load(run / "config.yaml")
    cfg.data.root = "dsb2018_train/stage1_train"  # where it came from, not a path on this machine
    cfg.data.include = None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".staging_") as tmp:
        stage = Path(tmp) / dest.name
        (stage / "checkpoints").mkdir(parents=True)
        save_checkpoint(stage / "checkpoints" / "best.pt",
                        {"model": half_weights(best["model"]), "epoch": best.get("epoch", 0)})
        cfg.save(stage / "config.yaml")
        shutil.copy(run / "model.json", stage / "model.json")
        shutil.copy(run / "split.json", stage / "split.json")
        model = load_run(stage).model
        if data is not None:
            fit_size_model(stage, data)
        card = {
            "summary": "fluorescence nuclei, instance labels (distance target + watershed), 1 channel",
            "trained_on": "DSB 2018 stage-1 training set, fluorescence images (CC0; "
                          f"{len(split.get('train', []))} training, {len(split.get('val', []))} validation, "
                          f"{len(split.get('test', []))} test images)",
            "license": "weights MIT; training data CC0 (Broad Bioimage Benchmark Collection BBBC038)",
            "parameters": count_parameters(model),
            "diameter": read_json(run / "model.json").get("diameter"),
            "epochs": best.get("epoch"),
            "training_seconds": round(float(summary.get("seconds_this_session", 0))),
            "recipe": "python scripts/train_nuclei_model.py --data ../shared/data/dsb2018_train --run runs/nuclei",
            "recipe_flags": " ".join(RECIPE),
            "test": {"images": test.get("n_images"), "objects": test.get("n_objects"),
                     **{k: round(float(test[k]), 4) for k in ("ap50", "ap_mean", "dsb_score", "dice") if k in test}},
            "created": datetime.date.today().isoformat(),
        }
        card["other"] = [score_other(stage, o) for o in others]
        (stage / "card.json").write_text(json.dumps(card, indent=1) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        stage.rename(dest)
    log.info("packaged %s -> %s (%.1f MB)", run, dest,
             sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()) / 1e6)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="the DSB 2018 folder (stage1_train/, image_metadata.csv)")
    p.add_argument("--run", type=Path, required=True, help="run folder to train into")
    p.add_argument("--package-only", action="store_true", help="package an existing run, do not train")
    p.add_argument("--resume", action="store_true", help="resume a stopped training run")
    p.add_argument("--size-model-only", action="store_true",
                   help="only fit the size model (size_model.json) of the packaged model in --dest again")
    p.add_argument("--dest", type=Path, default=DEST, help=f"package folder (default {DEST})")
    p.add_argument("--other", type=Path, action="append", default=[],
                   help="images/ + masks/ from elsewhere to score the packaged model on (into its card)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.size_model_only:
        fit_size_model(args.dest, args.data)
        return 0
    if not args.package_only:
        train(args.data, args.run, ["--resume"] if args.resume else [])
    package(args.run, args.dest, args.other, args.data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
