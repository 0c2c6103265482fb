"""Fit (again) the size model of ``--diameter auto`` (``size_model.json``) for a finished run folder: its training
images (from ``split.json``) train it, its validation images choose the ridge penalty, its test images are not read.

    python scripts/fit_size_model.py runs/my_run [--data the/dataset/folder] [--crops 1024 --val-crops 256]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from unetlab.errors import UnetlabError
    from unetlab.training.sizefit import fit_size_model_for_run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="the run folder (config.yaml, model.json, split.json, checkpoints/)")
    p.add_argument("--data", type=Path, help="the dataset folder it was trained on (default: its config's)")
    p.add_argument("--crops", type=int, default=1024, help="rescaled crops of the training images, in all")
    p.add_argument("--val-crops", type=int, default=256, help="rescaled crops of the validation images, in all")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        fit_size_model_for_run(args.run, args.data, args.crops, args.val_crops, args.seed)
    except UnetlabError as exc:
        logging.getLogger("fit_size_model").error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
