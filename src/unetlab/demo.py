"""``unetlab demo``: synthetic fluorescence cells -> a trained small U-Net -> held-out masks, Dice and overlays."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .config import RunConfig, apply_overrides
from .errors import UnetlabError

log = logging.getLogger(__name__)

DEMO_OVERRIDES = {
    "preset": "unet", "depth": 3, "base_width": 16, "patch_size": 128, "batch_size": 8,
    "samples_per_epoch": 128, "lr": 3e-3, "val_fraction": 0.2, "aug_flip": 0.5, "aug_rotate90": 0.5,
    "aug_brightness": 0.3, "aug_contrast": 0.3, "tensorboard": False,
}


DEMO_ENTRIES = ("data", "run", "predictions", "evaluation.json", "evaluation.csv")  # all a demo writes into --out


def run_demo(out: str | Path = "unetlab_demo", minutes: float = 2.0, overwrite: bool = False, seed: int = 0,
             n_train: int = 20, n_test: int = 4) -> dict:
    """Generate data, train for at most ``minutes``, predict and evaluate; returns {'dice', 'n_test',
    'train_seconds', 'epochs_run', 'epochs', 'out'}."""
    from .data.synthetic import write_synthetic_dataset
    from .evaluation import evaluate
    from .inference.predict import predict
    from .training import train

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UnetlabError("--out is a file, not a folder", out, "choose a folder for the demo")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UnetlabError("demo folder already exists", out, "use --overwrite or another --out")
        if not set(DEMO_ENTRIES) >= {p.name for p in out.iterdir()}:
            raise UnetlabError("--overwrite replaces a demo folder, and this folder holds other files", out,
                               f"choose another --out (a demo folder holds only {', '.join(DEMO_ENTRIES)})")
        shutil.rmtree(out)
    log.info("writing %d synthetic training and %d test images (16-bit TIFF) to %s", n_train, n_test, out / "data")
    write_synthetic_dataset(out / "data" / "train", n_images=n_train, size=(256, 256), seed=seed)
    write_synthetic_dataset(out / "data" / "test", n_images=n_test, size=(384, 384), seed=seed + 1)
    # about 8 s per epoch on 2 idle CPU cores sizes the schedule; on a busier or slower machine the time budget
    # (max_minutes) ends training at the last epoch that fits
    epochs = max(2, int(round(minutes * 60 / 8)))
    cfg = apply_overrides(RunConfig(), {**DEMO_OVERRIDES, "root": str(out / "data" / "train"), "epochs": epochs,
                                        "seed": seed, "max_minutes": minutes})
    result = train(cfg, out / "run")
    predict(out / "run", out / "data" / "test" / "images", out / "predictions", instances=True, overlays=True)
    report = evaluate(out / "predictions" / "masks", out / "data" / "test" / "masks", out=out / "evaluation.json")
    dice = float(report["mean"]["dice"])
    return {"dice": dice, "n_test": n_test, "train_seconds": result.seconds, "epochs_run": result.epochs_run,
            "epochs": epochs, "out": str(out)}


def format_demo_result(result: dict) -> str:
    """The line ``unetlab demo`` prints for a :func:`run_demo` result."""
    return (f"demo: held-out Dice {result['dice']:.3f} on {result['n_test']} synthetic images "
            f"(training {result['train_seconds']:.0f} s, {result.get('epochs_run', '?')} epoch(s)); "
            f"outputs in {result['out']}")
