"""Train and package unetlab's pretrained ``nuclei`` model (shipped in ``unetlab/pretrained/nuclei``).

Reproducible from the public DSB 2018 stage-1 training set (CC0): the fluorescence images only, a test split
held out by the seeded ``--test-fraction 0.2`` that never trains or tunes anything, the size- and
brightness-invariant recipe (each image drawn with its nuclei at the training median size, then zoom 0.5x-2x,
contrast/gamma/noise augmentation, per-image percentile normalisation), then the best weights stored as float16
with the tuned post-processing and the test scores.

    python scripts/train_nuclei_model.py --data ../shared/data/dsb2018_train --run runs/nuclei
    python scripts/train_nuclei_model.py --data ../shared/data/dsb2018_train --run runs/nuclei --package-only
    python scripts/train_nuclei_model.py --data ../shared/data/dsb2018_train --run runs/nuclei --size-model-only

Packaging also fits the size model of ``--diameter auto`` (``size_model.json``) on the packaged weights (about
3.5 min on 2 busy cores); ``--size-model-only`` fits it again for the model already in ``--dest``.

With ``--bitdepth ../shared/data/bitdepth_nucseg`` it trains on DSB + that tissue-section set (a combined view
beside the run folder, MULTILAB_RECIPE appended); flags it does not know go to ``unetlab train`` (they win).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import re
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


# DSB 2018 + bitdepth_nucseg (tissue sections of another lab), in two stages: the DSB-only recipe above (stage 1,
# into RUN_dsb; pass ``--init RUN`` to start from another run instead), then the same network fine-tuned on both
# collections for 40 epochs at half the learning rate, with augmentation toward other labs' look (dim nuclei next
# to bright ones, uneven bright backgrounds, defocus); appended to RECIPE (later flags win). The test split comes
# from the view's split.json (--split-file), not --test-fraction.
MULTILAB_RECIPE = [
    "--lr", "1e-3",
    "--epochs", "40", "--val-every", "4", "--max-minutes", "95",
    "--aug-object-intensity", "0.5", "--aug-object-intensity-range", "0.3,1.5",
    "--aug-background", "0.3", "--aug-background-range", "0.3",
    "--aug-blur", "0.2", "--aug-blur-sigma", "0.5,1.5",
]
# bitdepth_nucseg: whole images held out for testing and validation (every tissue, each magnification:
# benchmarks/bitdepth_nucseg_split.json, which the benchmark reads too); the other 30 train, each listed
# BITDEPTH_COPIES times so that its patches are not drowned by DSB's ~350 training images (patches are drawn from
# images uniformly)
BITDEPTH_SPLIT = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "bitdepth_nucseg_split.json")
                            .read_text())
BITDEPTH_TEST, BITDEPTH_VAL = BITDEPTH_SPLIT["test"], BITDEPTH_SPLIT["val"]
BITDEPTH_COPIES = 3


def recipe(two_lab: bool) -> list[str]:
    """The `unetlab train` flags of the DSB-only recipe, or of the two-lab fine-tune (its split from the view's
    split.json instead of --test-fraction)."""
    if not two_lab:
        return RECIPE
    k = RECIPE.index("--test-fraction")
    return RECIPE[:k] + RECIPE[k + 2:] + MULTILAB_RECIPE


def fluorescence_ids(data: Path) -> list[str]:
    """Image ids the DSB metadata table marks as fluorescence."""
    with open(data / "image_metadata.csv", newline="") as f:
        return [row["ImageId"] for row in csv.DictReader(f) if row["modality_guess"] == "fluorescence"]


def _link(src: Path, dst: Path) -> None:
    if not dst.is_symlink():
        dst.symlink_to(src.resolve())


def build_combined_view(data: Path, bitdepth: Path, view: Path, dsb_split: Path) -> Path:
    """A paired images/ + masks/ folder of DSB (``dsb_`` names: channel 0 of each image, per-nucleus PNGs merged into uint16 label TIFFs)
    and bitdepth_nucseg (``bd_`` names, symlinks), with its split.json: DSB train/val/test as in ``dsb_split``
    (the shipped model's), bitdepth test/val as BITDEPTH_TEST / BITDEPTH_VAL. Returns the split.json path."""
    from unetlab.data.io import read_image, write_image
    from unetlab.data.layouts import load_dataset
    from unetlab.data.split import load_split

    saved = load_split(dsb_split)
    (view / "images").mkdir(parents=True, exist_ok=True)
    (view / "masks").mkdir(parents=True, exist_ok=True)
    split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for part in split:  # DSB ids as they are (a DSB-only run's split) or as "dsb_<id>" (a two-lab model's)
        split[part] += [n if n.startswith("dsb_") else f"dsb_{n}" for n in saved.get(part, [])
                        if not re.match(r"bd\d*_", n)]
    wanted = set(split["train"] + split["val"] + split["test"])
    samples = [s for s in load_dataset(data / "stage1_train").samples if f"dsb_{s.name}" in wanted]
    if len(samples) != len(wanted):
        raise SystemExit(f"{data}: {len(wanted) - len(samples)} images of {dsb_split} are missing")
    for s in samples:
        name = f"dsb_{s.name}"
        image = view / "images" / f"{name}.tif"  # channel 0 only (what --channels 0 reads): one channel count
        if not image.exists():
            write_image(image, read_image(s.image)[0])
        mask = view / "masks" / f"{name}.tif"
        if not mask.exists():
            write_image(mask, s.load_mask().astype("uint16"))
    for img in sorted((bitdepth / "images").glob("*.tif")):
        stem = img.stem
        held = stem in BITDEPTH_TEST or stem in BITDEPTH_VAL
        names = [f"bd_{stem}"] + ([] if held else [f"bd{k}_{stem}" for k in range(2, BITDEPTH_COPIES + 1)])
        for name in names:
            _link(img, view / "images" / f"{name}.tif")
            _link(bitdepth / "masks" / img.name, view / "masks" / f"{name}.tif")
        split["test" if stem in BITDEPTH_TEST else "val" if stem in BITDEPTH_VAL else "train"] += names
    missing = sorted(set(BITDEPTH_TEST + BITDEPTH_VAL) - {p.stem for p in (bitdepth / "images").glob("*.tif")})
    if missing:
        raise SystemExit(f"{bitdepth}: images missing: {missing}")
    out = view / "split.json"
    out.write_text(json.dumps(split, indent=1) + "\n")
    log.info("combined view %s: %s", view, {k: len(v) for k, v in split.items()})
    return out


def training_source(data: Path, run: Path, bitdepth: Path | None) -> tuple[Path, list[str], list[str]]:
    """(dataset folder, its `unetlab train` source flags, recipe) of the DSB-only or the two-lab recipe; the
    two-lab view is built beside ``run`` (idempotent)."""
    run.parent.mkdir(parents=True, exist_ok=True)
    if bitdepth is not None:
        view = run.parent / f"{run.name}_data"
        split = build_combined_view(data, bitdepth, view, DEST / "split.json")
        return view, ["--data", str(view), "--split-file", str(split)], recipe(True)
    include = run.parent / f"{run.name}_fluorescence.txt"
    include.write_text("\n".join(fluorescence_ids(data)) + "\n")
    return data / "stage1_train", ["--data", str(data / "stage1_train"), "--include", str(include)], recipe(False)


def train(data: Path, bitdepth: Path | None, run: Path, extra: list[str], resume: bool = False) -> None:
    """Run ``unetlab train`` with the recipe into ``run`` (``resume``: continue it). The two-lab recipe starts
    from a DSB-only run (stage 1, trained first into ``RUN_dsb`` unless ``extra`` has ``--init``)."""
    _root, source, flags = training_source(data, run, bitdepth)
    if bitdepth is not None and "--init" not in extra:
        stage1 = run.parent / f"{run.name}_dsb"
        if not (stage1 / "summary.json").is_file():  # not finished: train (or go on with) the DSB-only stage
            train(data, None, stage1, [], resume=(stage1 / "checkpoints" / "last.pt").is_file())
        extra = ["--init", str(stage1), *extra]
    where = ["--resume", str(run)] if resume else ["--out", str(run)]
    cmd = [sys.executable, "-m", "unetlab", "train", *source, *where, *flags, *extra]
    log.info("training: %s", " ".join(cmd))
    subprocess.run(cmd, check=True)


DEST = Path(__file__).resolve().parents[1] / "src" / "unetlab" / "pretrained" / "nuclei"


def half_weights(weights: dict) -> dict:
    """The state dict with floating tensors stored as float16 (half the file; loaded back into float32)."""
    return {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}


def score_other(model_dir: Path, other: Path) -> dict:
    """AP@0.5 / DSB score of the packaged model on ``other`` (images/ + masks/), no fine-tuning, in fp32 (the same
    figure on every CPU)."""
    from unetlab import evaluate, predict

    with tempfile.TemporaryDirectory(prefix="nuclei_other_") as tmp:
        predict(model_dir, other / "images", Path(tmp) / "pred", instances=True, progress=False, precision="fp32")
        rep = evaluate(Path(tmp) / "pred" / "labels", other / "masks", instances=True)
    obj = rep["objects"]
    return {"data": other.name, "images": rep["n_images"], "objects": int(obj.get("n_true", 0)),
            "ap50": round(float(obj["ap"][0]), 4), "dsb_score": round(float(obj["dsb_score"]), 4)}


def fit_size_model(model_dir: Path, root: Path) -> None:
    """Fit the packaged weights' size model (``size_model.json``, issue 28) on its training images in ``root``
    (the folder its split.json names); the ridge penalty is chosen on its validation images; its test images are
    never read. The crops are shared equally by the collections (DSB 2018, bitdepth_nucseg: ``collection_of``)."""
    from unetlab.training.sizefit import fit_size_model_for_run

    fit_size_model_for_run(model_dir, root, crops=4096, val_crops=512, seed=0, collection=collection_of)


def collection_of(name: str) -> str:
    """The collection of a training-view image: its name's prefix ("dsb" or the bitdepth copies' "bd0".."bd2")."""
    return "dsb2018" if name.startswith("dsb_") else "bitdepth_nucseg"


def _trained_on(split: dict, two_lab: bool) -> str:
    """The card's line on the training images: collections and split sizes (two-lab: per collection)."""
    if not two_lab:
        return ("DSB 2018 stage-1 training set, fluorescence images (CC0; "
                f"{len(split.get('train', []))} training, {len(split.get('val', []))} validation, "
                f"{len(split.get('test', []))} test images)")

    def count(part: str, prefix: str) -> int:
        return len({n.split("_", 1)[1] for n in split.get(part, []) if n.split("_", 1)[0].startswith(prefix)})

    parts = ("train", "val", "test")
    dsb = ", ".join(f"{count(p, 'dsb')} {p}" for p in parts)
    bd = ", ".join(f"{count(p, 'bd')} {p}" for p in parts)
    return (f"DSB 2018 stage-1 training set, fluorescence images (CC0; {dsb}) and bitdepth_nucseg DAPI tissue "
            f"sections of another lab (20x, 40x air, 40x oil; whole images {bd})")


def package(run: Path, dest: Path, others: list[Path], root: Path | None = None, two_lab: bool = False) -> Path:
    """Copy the run's best weights (float16), config, model.json and split into ``dest`` with a model card; with
    ``root`` (the dataset folder the run's split names) fit the size model of the packaged weights too;
    ``two_lab``: it was trained by the DSB + bitdepth_nucseg recipe."""
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
    # where it came from, not a path on this machine
    cfg.data.root = "dsb2018_train/stage1_train + bitdepth_nucseg" if two_lab else "dsb2018_train/stage1_train"
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
        if root is not None:
            fit_size_model(stage, root)
        card = {
            "summary": "fluorescence nuclei, instance labels (distance target + watershed), 1 channel",
            "trained_on": _trained_on(split, two_lab),
            "license": "weights MIT; training data CC0 (Broad Bioimage Benchmark Collection BBBC038)"
                       + ("; bitdepth_nucseg as its SOURCE.md states" if two_lab else ""),
            "parameters": count_parameters(model),
            "diameter": read_json(run / "model.json").get("diameter"),
            "epochs": best.get("epoch"),
            "training_seconds": round(float(summary.get("seconds_this_session", 0))),
            "recipe": "python scripts/train_nuclei_model.py --data ../shared/data/dsb2018_train --run runs/nuclei"
                      + (" --bitdepth ../shared/data/bitdepth_nucseg" if two_lab else ""),
            "recipe_flags": " ".join(recipe(two_lab)),
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


def add_size_rows(dest: Path, bench_sizes: Path) -> None:
    """Put the Size estimate rows of ``bench_sizes`` (benchmarks/bench_accuracy.py --sizes on the packaged model,
    test splits) into ``dest/card.json``: ``unetlab models`` prints them."""
    from unetlab.files import write_text

    bench = json.loads(bench_sizes.read_text())
    card = json.loads((dest / "card.json").read_text())
    card["sizes"] = [{"images": r["collection"], "zoom": r["zoom"], "n": r["n_images"],
                      "ap50_auto": round(r["auto_ap50"], 3), "ap50_true": round(r["true_ap50"], 3),  # as printed
                      "within25": round(r["auto_within25"], 3), "err_p90": round(r["auto_err_p90"], 3)}
                     for r in bench["rows"] if "val" not in r["collection"]]
    card["sizes_from"] = bench.get("command", "")
    write_text(dest / "card.json", json.dumps(card, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="the DSB 2018 folder (stage1_train/, image_metadata.csv)")
    p.add_argument("--run", type=Path, required=True, help="run folder to train into")
    p.add_argument("--bitdepth", type=Path, default=None,
                   help="bitdepth_nucseg folder (images/ + masks/): train on DSB + it (a combined view beside --run)")
    p.add_argument("--no-package", action="store_true", help="train only, do not package")
    p.add_argument("--package-only", action="store_true", help="package an existing run, do not train")
    p.add_argument("--resume", action="store_true", help="resume a stopped training run")
    p.add_argument("--size-model-only", action="store_true",
                   help="only fit the size model (size_model.json) of the packaged model in --dest again")
    p.add_argument("--dest", type=Path, default=DEST, help=f"package folder (default {DEST})")
    p.add_argument("--other", type=Path, action="append", default=[],
                   help="images/ + masks/ from elsewhere to score the packaged model on (into its card)")
    p.add_argument("--card-sizes", type=Path, metavar="JSON",
                   help="only put the Size estimate rows of this bench_sizes.json into --dest's card.json")
    args, extra = p.parse_known_args(argv)  # unknown flags go to `unetlab train` (after the recipe: they win)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.card_sizes:
        add_size_rows(args.dest, args.card_sizes)
        return 0
    root = training_source(args.data, args.run, args.bitdepth)[0]
    if args.size_model_only:
        fit_size_model(args.dest, root)
        return 0
    if not args.package_only:
        train(args.data, args.bitdepth, args.run, extra, resume=args.resume)
    if args.no_package:
        return 0
    package(args.run, args.dest, args.other, root, two_lab=args.bitdepth is not None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
