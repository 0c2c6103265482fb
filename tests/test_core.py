"""End to end through the command line: train on synthetic cells, predict a folder, evaluate the masks."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile

from unetlab.cli import main
from unetlab.config import RunConfig, apply_overrides
from unetlab.data.io import read_label

TINY = ["--preset", "unet", "--depth", "2", "--base-width", "8", "--patch-size", "64", "--batch-size", "8",
        "--samples-per-epoch", "64", "--tensorboard", "false", "--no-progress"]


@pytest.fixture(scope="module")
def trained_run(synthetic_cells, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "r"
    rc = main(["train", "--data", str(synthetic_cells), "--out", str(run), "--epochs", "6", "--lr", "5e-3",
               "--val-fraction", "0.2", "--seed", "1", *TINY])
    assert rc == 0
    return run


def test_training_learns_and_writes_a_complete_run_folder(trained_run):
    for name in ("config.yaml", "split.json", "model.json", "metrics.csv", "curves.png", "summary.json",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (trained_run / name).exists(), name
    rows = list(csv.DictReader((trained_run / "metrics.csv").open()))
    assert len(rows) == 6
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < 0.7 * losses[0]  # the loss falls
    best = max(float(r["val_dice"]) for r in rows)
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["best_metric"] == pytest.approx(best)
    # a real signal: far better than predicting all foreground
    assert best > 0.75 and best > float(rows[0]["all_foreground_dice"]) + 0.3
    split = json.loads((trained_run / "split.json").read_text())
    assert split["val"] and not set(split["train"]) & set(split["val"])


def test_predict_folder_of_any_size_then_evaluate(trained_run, synthetic_cells, tmp_path):
    from unetlab.data.synthetic import make_synthetic_cells

    imgs, truth = tmp_path / "new", tmp_path / "truth"
    imgs.mkdir()
    truth.mkdir()
    for i, shape in enumerate([(150, 203), (97, 64)]):  # not multiples of anything, one smaller than a tile
        im, lab = make_synthetic_cells(shape, seed=100 + i)
        tifffile.imwrite(imgs / f"n{i}.tif", im)
        tifffile.imwrite(truth / f"n{i}.tif", lab.astype(np.uint16))
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(trained_run), "--input", str(imgs), "--out", str(out), "--tile", "64",
                 "--probabilities", "--no-progress"]) == 0
    m = read_label(out / "masks" / "n0.png")
    assert m.shape == (150, 203) and set(np.unique(m)) <= {0, 255}
    prob = tifffile.imread(out / "probabilities" / "n0.tif")
    assert prob.shape == (1, 150, 203) and prob.dtype == np.float32 and 0 <= prob.min() and prob.max() <= 1
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--pred", str(out / "masks"), "--truth", str(truth), "--out", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["n_images"] == 2 and r["mean"]["dice"] > 0.7
    # an existing output is not overwritten without --overwrite
    assert main(["predict", "--model", str(trained_run), "--input", str(imgs), "--out", str(out)]) == 2


def test_seeded_training_is_reproducible(synthetic_cells, tmp_path):
    from unetlab.training import train

    cfg = apply_overrides(RunConfig(), {"root": str(synthetic_cells), "preset": "unet", "depth": 2, "base_width": 4,
                                        "patch_size": 48, "batch_size": 4, "samples_per_epoch": 16, "epochs": 2,
                                        "tensorboard": False, "seed": 7})
    a = train(cfg, tmp_path / "a", progress=False)
    b = train(cfg, tmp_path / "b", progress=False)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert a.history[-1]["val_dice"] == b.history[-1]["val_dice"]


def test_multichannel_16bit_training_and_channel_selection(tmp_path):
    from unetlab.data.synthetic import make_synthetic_cells
    from unetlab.runfolder import load_run
    from unetlab.training import train

    rng = np.random.default_rng(0)
    for i in range(4):
        im, lab = make_synthetic_cells((96, 96), seed=rng)
        stack = np.stack([im, rng.integers(0, 4000, im.shape).astype(np.uint16), im // 2])  # (3, H, W) 16-bit
        (tmp_path / "d" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / "masks").mkdir(exist_ok=True)
        tifffile.imwrite(tmp_path / "d" / "images" / f"s{i}.tif", stack, photometric="minisblack")  # 3 channels
        tifffile.imwrite(tmp_path / "d" / "masks" / f"s{i}.tif", lab.astype(np.uint16))
    cfg = apply_overrides(RunConfig(), {"root": str(tmp_path / "d"), "preset": "unet", "depth": 2, "base_width": 4,
                                        "patch_size": 48, "batch_size": 4, "samples_per_epoch": 8, "epochs": 1,
                                        "channels": "0,2", "tensorboard": False})
    train(cfg, tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    assert run.info["in_channels"] == 2 and run.info["image_channels"] == 3
    assert run.model.in_channels == 2


def test_bad_flag_value_is_one_line_exit_2(synthetic_cells, tmp_path, capsys):
    rc = main(["train", "--data", str(synthetic_cells), "--out", str(tmp_path / "x"), "--epochs", "many"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "epochs" in err


@pytest.mark.slow
def test_epfl_multiclass_subset_trains_predicts_and_evaluates(tmp_path):
    from conftest import shared_data
    from unetlab.data.io import read_label

    root = shared_data("epfl_em")
    run, pred = tmp_path / "run", tmp_path / "pred"
    assert main(["train", "--data", str(root / "train"), "--classes", "membranes,mitochondrion", "--out", str(run),
                 "--epochs", "1", "--patch-size", "96", "--batch-size", "4", "--samples-per-epoch", "8",
                 "--depth", "2", "--base-width", "4", "--tensorboard", "false", "--no-progress"]) == 0
    info = json.loads((run / "model.json").read_text())
    assert info["task"] == "multiclass" and info["classes"] == ["background", "membranes", "mitochondrion"]
    assert main(["-q", "train", "--data", str(root / "train"), "--classes", "membranes,membranes", "--out",
                 str(tmp_path / "twice"), "--epochs", "1"]) == 2  # a class named twice is one line, no run
    assert not (tmp_path / "twice").exists()
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert {"val_dice_membranes", "val_dice_mitochondrion"} <= set(rows[0])
    one = sorted((root / "test" / "images").iterdir())[0]
    assert main(["predict", "--model", str(run), "--input", str(one), "--out", str(pred), "--no-progress"]) == 0
    classes = read_label(pred / "classes" / f"{one.stem}.png")
    assert classes.shape == (768, 1024) and classes.max() <= 2
    report = tmp_path / "e.json"
    assert main(["evaluate", "--pred", str(pred / "classes"), "--truth", str(root / "test"), "--classes",
                 "membranes,mitochondrion", "--out", str(report)]) == 0
    assert len(json.loads(report.read_text())["mean"]["dice_per_class"]) == 3
    # without --classes the predictions' own classes (predictions.json) pair with the truth's, not indices 1, 2
    report2 = tmp_path / "e2.json"
    assert main(["evaluate", "--pred", str(pred / "classes"), "--truth", str(root / "test"), "--out", str(report2)]) == 0
    assert json.loads(report2.read_text())["mean"] == json.loads(report.read_text())["mean"]


def test_valid_padding_model_trains_and_predicts_full_size(synthetic_cells, tmp_path):
    from unetlab.data.synthetic import make_synthetic_cells

    run = tmp_path / "run"
    assert main(["train", "--data", str(synthetic_cells), "--out", str(run), "--epochs", "1", "--padding", "valid",
                 "--depth", "2", "--base-width", "4", "--patch-size", "64", "--batch-size", "4",
                 "--samples-per-epoch", "8", "--tensorboard", "false", "--no-progress"]) == 0
    im, _ = make_synthetic_cells((111, 140), seed=5)
    tifffile.imwrite(tmp_path / "x.tif", im)
    assert main(["predict", "--model", str(run), "--input", str(tmp_path / "x.tif"), "--out", str(tmp_path / "p"),
                 "--tile", "64", "--no-progress"]) == 0
    assert read_label(tmp_path / "p" / "masks" / "x.png").shape == (111, 140)
