"""Draw the README's pictures into docs/ (a few minutes on two CPU cores).

    python scripts/make_docs_pictures.py [--data DIR] [--out docs] [--work /tmp/unetlab_docs] [--epochs 12]

With ``--nuclei ../shared/data/stardist_nuclei [--only-nuclei]`` also docs/nuclei_pretrained.png (the shipped
model on an image it never saw). Writes docs/augment_preview.png, weightmap.png, curves.png and overlay.png from synthetic cells, and
docs/lr_find.png and compare.png from --data (default: the synthetic cells too; the committed pictures use
../shared/data/isbi2012). Each is a small PNG (< 200 KB). Everything is seeded, so a rerun draws the same
pictures up to timing numbers.
"""

from __future__ import annotations

import argparse
import io
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from unetlab.config import AugmentConfig, RunConfig, apply_overrides
from unetlab.data.augment import preview_augmentations
from unetlab.data.io import normalize, read_image, read_label, write_image
from unetlab.data.synthetic import make_synthetic_cells, write_synthetic_dataset
from unetlab.inference.predict import predict
from unetlab.inference.writers import outline_overlay
from unetlab.training import train
from unetlab.training.tools import compare, format_table, lr_find, plot_lr_find
from unetlab.training.weightmap import border_weight_map

log = logging.getLogger("make_docs_pictures")
MAX_BYTES = 200_000

BASE = {"preset": "unet", "patch_size": 96, "batch_size": 8, "samples_per_epoch": 64, "tensorboard": False,
        "val_fraction": 0.2, "seed": 0, "aug_flip": 0.5, "aug_rotate90": 0.5}
# the configurations compared; the first one also trains the demo run the curves and the overlay come from
COMPARED = {
    "unet-d2-w8": {"depth": 2, "base_width": 8, "lr": 1e-2},
    "unet-d3-w16": {"depth": 3, "base_width": 16, "lr": 1e-2},
    "unet-d3-w16-border": {"depth": 3, "base_width": 16, "lr": 1e-2, "border_weight": True},
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure as a compact PNG."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    path.write_bytes(buf.getvalue())
    return path


def save_rgb(rgb: np.ndarray, path: Path) -> Path:
    """Write an (H, W, 3) uint8 array as PNG."""
    write_image(path, np.moveaxis(rgb, -1, 0))
    return path


def draw_augment_preview(out: Path) -> Path:
    """The original cell field (top left) and eight random draws of a typical augmentation setting."""
    image, labels = make_synthetic_cells((128, 128), seed=5)
    cfg = AugmentConfig(flip=0.5, rotate90=0.5, affine=0.5, elastic=0.5, brightness=0.5, contrast=0.5,
                        gamma=0.3, noise=0.3, blur=0.2)
    grid = preview_augmentations(normalize(image[None], "percentile"), labels, cfg, n=8, seed=0)
    return save_rgb(grid, out / "augment_preview.png")


def draw_weightmap(out: Path) -> Path:
    """Image, instance labels and the U-Net border weight map (w0 10, sigma 5) of one field."""
    plt = _pyplot()
    image, labels = make_synthetic_cells((128, 128), seed=5)
    weights = border_weight_map(labels, w0=10.0, sigma=5.0)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    axes[0].imshow(normalize(image[None], "percentile")[0], cmap="gray")
    axes[0].set_title("image")
    shown = np.ma.masked_where(labels == 0, labels % 20)
    axes[1].imshow(shown, cmap="tab20", interpolation="nearest")
    axes[1].set_title(f"instances ({labels.max()} cells)")
    im = axes[2].imshow(weights, cmap="magma")
    axes[2].set_title("border weight map")
    fig.colorbar(im, ax=axes[2], fraction=0.046, pad=0.04)
    for a in axes:
        a.set_axis_off()
    fig.tight_layout()
    return save_figure(fig, out / "weightmap.png")


def draw_overlay(run: Path, test: Path, work: Path, out: Path) -> Path:
    """Image and predicted instance outlines of a held-out field, side by side."""
    pred = work / "predictions"
    predict(run, test / "images", pred, instances=True, overwrite=True, progress=False)
    name = sorted((test / "images").iterdir())[0].stem
    image = read_image(test / "images" / f"{name}.tif")
    labels = read_label(pred / "labels" / f"{name}.tif")
    truth = read_label(test / "masks" / f"{name}.tif")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.2))
    axes[0].imshow(normalize(image, "percentile")[0], cmap="gray")
    axes[0].set_title("held-out image")
    axes[1].imshow(outline_overlay(image, labels))
    axes[1].set_title(f"predicted: {labels.max()} cells (truth {len(np.unique(truth)) - 1})")
    for a in axes:
        a.set_axis_off()
    fig.tight_layout()
    return save_figure(fig, out / "overlay.png")


def draw_pretrained(data: Path, work: Path, out: Path) -> Path:
    """The shipped ``nuclei`` model on an image it never saw (no training): image and outlines, side by side."""
    pred = work / "pretrained"
    predict("nuclei", data / "images", pred, instances=True, overwrite=True, progress=False, precision="fp32")
    name = sorted((data / "images").iterdir())[0].stem
    image = read_image(sorted((data / "images").iterdir())[0])
    labels = read_label(pred / "labels" / f"{name}.tif")
    truth = read_label(sorted((data / "masks").iterdir())[0]) if (data / "masks").is_dir() else None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(7.6, 4.0))
    axes[0].imshow(normalize(image, "percentile")[0], cmap="gray")
    axes[0].set_title(f"{data.name}/{name}")
    axes[1].imshow(outline_overlay(image, labels))
    known = f" (truth {len(np.unique(truth)) - 1})" if truth is not None else ""
    axes[1].set_title(f"--model nuclei: {labels.max()} nuclei{known}")
    for a in axes:
        a.set_axis_off()
    fig.tight_layout()
    return save_figure(fig, out / "nuclei_pretrained.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs"), help="picture folder")
    p.add_argument("--work", default="/tmp/unetlab_docs", help="scratch folder (data and runs; replaced)")
    p.add_argument("--epochs", type=int, default=12, help="epochs per compared configuration")
    p.add_argument("--data", default=None, help="dataset for lr_find.png and compare.png (default: synthetic)")
    p.add_argument("--nuclei", default=None,
                   help="images/ (+ masks/) for nuclei_pretrained.png, e.g. ../shared/data/stardist_nuclei")
    p.add_argument("--only-nuclei", action="store_true", help="draw nuclei_pretrained.png only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    if work.exists():
        shutil.rmtree(work)
    t0 = time.time()
    if args.nuclei:
        picture = draw_pretrained(Path(args.nuclei), work, out)
        print(f"{picture}  {picture.stat().st_size / 1000:.0f} KB")
        if args.only_nuclei:
            return 0 if picture.stat().st_size <= MAX_BYTES else 1
    data = write_synthetic_dataset(work / "train", n_images=12, size=(160, 160), seed=0)
    test = write_synthetic_dataset(work / "test", n_images=2, size=(256, 256), seed=1)
    written = [draw_augment_preview(out), draw_weightmap(out)]

    first = next(iter(COMPARED.values()))
    demo = train(apply_overrides(RunConfig(), {**BASE, **first, "epochs": args.epochs, "root": str(data)}),
                 work / "demo_run", progress=False)
    shutil.copyfile(demo.run_dir / "curves.png", out / "curves.png")
    written += [out / "curves.png", draw_overlay(demo.run_dir, test, work, out)]

    bench = Path(args.data) if args.data else data
    base = apply_overrides(RunConfig(), {**BASE, **first, "root": str(bench)})
    result = lr_find(base, steps=100, lr_max=10.0)  # up to where the loss blows up
    written.append(plot_lr_find(result, out / "lr_find.png"))

    configs = []
    for name, over in COMPARED.items():  # as a user would: one YAML per configuration
        path = work / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        apply_overrides(RunConfig(), {**BASE, **over, "epochs": args.epochs}).save(path)
        configs.append(path)
    rows = compare(configs, bench, work / "compare", overwrite=True)
    shutil.copyfile(work / "compare" / "compare.png", out / "compare.png")
    written.append(out / "compare.png")
    print(format_table(rows, ["name", "val_dice", "val_iou", "epochs", "train_seconds", "parameters"]))

    too_big = [f"{p} ({p.stat().st_size} bytes)" for p in written if p.stat().st_size > MAX_BYTES]
    for p_ in written:
        print(f"{p_}  {p_.stat().st_size / 1000:.0f} KB")
    print(f"lr-find suggestion {result.suggestion:.2e}; done in {time.time() - t0:.0f} s")
    if too_big:
        print("pictures over 200 KB: " + ", ".join(too_big), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
