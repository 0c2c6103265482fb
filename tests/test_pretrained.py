"""The pretrained ``nuclei`` model shipped in the package: found by name, loads safely, segments nuclei."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import shared_data
from unetlab.cli import main
from unetlab.runfolder import (
    PRETRAINED_DIR,
    is_pretrained,
    load_run,
    pretrained_models,
    pretrained_names,
    resolve_run_dir,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def nuclei_image(seed: int = 0, size: int = 192, n: int = 14, radius: float = 9.0) -> tuple[np.ndarray, np.ndarray]:
    """A 16-bit fluorescence-like image of ``n`` separate round nuclei (uneven brightness, noise) and its labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = np.full((size, size), 200.0)
    labels = np.zeros((size, size), np.uint16)
    centres: list[tuple[float, float]] = []
    while len(centres) < n:
        c = rng.uniform(radius + 4, size - radius - 4, 2)
        if all(np.hypot(*(c - np.array(o))) > 2.6 * radius for o in centres):
            centres.append((float(c[0]), float(c[1])))
    for i, (cy, cx) in enumerate(centres, 1):
        r = radius * rng.uniform(0.8, 1.2)
        d = np.hypot(yy - cy, xx - cx)
        image += rng.uniform(800, 3000) / (1 + np.exp((d - r) / 1.0))
        labels[d <= r] = i
    image += rng.normal(0, 40, image.shape)
    return np.clip(image, 0, 65535).astype(np.uint16), labels


def test_nuclei_model_is_shipped_small_and_described():
    assert "nuclei" in pretrained_names()
    (card,) = [c for c in pretrained_models() if c["name"] == "nuclei"]
    assert "DSB 2018" in card["trained_on"] and "fluorescence" in card["trained_on"]
    assert card["test"]["images"] >= 50 and 0.5 < card["test"]["ap50"] <= 1.0
    folder = PRETRAINED_DIR / "nuclei"
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 6_000_000, f"the shipped model is {size / 1e6:.1f} MB"
    run = load_run("nuclei")  # weights_only loading, float16 weights into float32 parameters
    assert sum(p.numel() for p in run.model.parameters()) == card["parameters"]
    assert all(p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in run.model.parameters())
    assert run.info["target"] == "distance" and run.info["in_channels"] == 1
    cfg = run.config
    assert not Path(cfg.data.root).is_absolute(), "the shipped config must not carry a path of the build machine"


def test_predict_with_model_nuclei_needs_no_training(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    truths = {}
    for i in range(2):
        image, labels = nuclei_image(seed=i)
        tifffile.imwrite(images / f"n{i}.tif", image)
        truths[f"n{i}"] = labels
    rc, out, err = cli(capsys, "predict", "--model", "nuclei", "--input", images, "--out", tmp_path / "pred",
                       "--instances", "--no-progress")
    assert rc == 0, err
    with open(tmp_path / "pred" / "counts.csv", newline="") as f:
        counts = {row["ImageName"]: int(row["Count"]) for row in csv.DictReader(f)}
    from unetlab.evaluation.metrics import match_objects

    for name, truth in truths.items():
        assert abs(counts[name] - truth.max()) <= 2, (name, counts[name], truth.max())
        pred = tifffile.imread(tmp_path / "pred" / "labels" / f"{name}.tif")
        assert match_objects(pred, truth)["ap"][0] > 0.8



def test_predict_flags_override_the_runs_post_processing_for_this_prediction_only(tmp_path, capsys):
    """--threshold / --min-size / --prominence replace the run's tuned settings in this prediction (recorded in
    predictions.json), leave the model's config.yaml as it was, and out-of-range values are one line, no output."""
    images = tmp_path / "images"
    images.mkdir()
    image, labels = nuclei_image(seed=3)
    tifffile.imwrite(images / "n.tif", image)
    config = (PRETRAINED_DIR / "nuclei" / "config.yaml").read_bytes()

    def run(name: str, *flags) -> tuple[int, float, dict]:
        rc, _out, err = cli(capsys, "predict", "--model", "nuclei", "--input", images, "--out", tmp_path / name,
                            "--instances", "--diameter", "none", "--no-progress", *flags)
        assert rc == 0, err
        with open(tmp_path / name / "counts.csv", newline="") as f:
            count = int(next(csv.DictReader(f))["Count"])
        from PIL import Image

        fg = float((np.asarray(Image.open(tmp_path / name / "masks" / "n.png")) > 0).mean())
        used = json.loads((tmp_path / name / "predictions.json").read_text())["postprocess"]
        return count, fg, used

    n0, fg0, used0 = run("default")
    assert abs(n0 - labels.max()) <= 2 and used0["min_size"] == load_run(resolve_run_dir("nuclei")).config.postprocess.min_size
    n1, _fg, used1 = run("big", "--min-size", "5000")
    assert n1 == 0 and used1["min_size"] == 5000  # every nucleus is smaller than 5000 px
    _n, fg_low, _u = run("low", "--threshold", "0.05")
    _n, fg_high, used_high = run("high", "--threshold", "0.95", "--prominence", "0.3")
    assert fg_low > fg0 > fg_high > 0, (fg_low, fg0, fg_high)
    assert used_high["threshold"] == 0.95 and used_high["prominence"] == 0.3
    assert (PRETRAINED_DIR / "nuclei" / "config.yaml").read_bytes() == config

    for flag, value in (("--threshold", "1.5"), ("--min-size", "-1"), ("--prominence", "0")):
        rc, _out, err = cli(capsys, "predict", "--model", "nuclei", "--input", images, "--out", tmp_path / "bad",
                            "--instances", flag, value)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and flag in lines[0], err
        assert not (tmp_path / "bad").exists()


def test_unknown_model_name_is_one_line_naming_the_pretrained(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", np.zeros((32, 32), np.uint16))
    rc, out, err = cli(capsys, "predict", "--model", "nucleii", "--input", tmp_path / "in", "--out", tmp_path / "o")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "nucleii" in lines[0] and "nuclei" in lines[0].split("nucleii")[-1], err
    assert not (tmp_path / "o").exists()


def test_an_existing_run_folder_wins_over_a_pretrained_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_pretrained("nuclei") and resolve_run_dir("nuclei") == PRETRAINED_DIR / "nuclei"
    (tmp_path / "nuclei").mkdir()  # a data folder of that name does not hide the model
    assert is_pretrained("nuclei") and resolve_run_dir("nuclei") == PRETRAINED_DIR / "nuclei"
    (tmp_path / "nuclei" / "config.yaml").write_text("{}\n")  # a run folder does
    assert not is_pretrained("nuclei") and resolve_run_dir("nuclei") == Path("nuclei")


def test_models_command_lists_pretrained_with_test_scores(capsys):
    rc, out, _ = cli(capsys, "models")
    assert rc == 0
    head, presets = out.split("Presets")
    card = pretrained_models()[0]
    # each check on its own: the name, the test split with the card's scores, and the other data set's AP@0.5
    assert card["name"] == "nuclei" and "nuclei" in head
    assert "test split" in head
    assert f"ap50 {card['test']['ap50']:.3f}" in head
    assert f"AP@0.5 {card['other'][0]['ap50']:.3f}" in head
    assert "unet-slim" in presets
    rc, out, _ = cli(capsys, "models", "--json")
    data = json.loads(out)
    assert [c["name"] for c in data["pretrained"]] == pretrained_names()
    assert {"unet", "unet-slim"} <= {r["name"] for r in data["presets"]}


@pytest.mark.slow
def test_packaging_a_run_keeps_its_predictions(tmp_path):
    """scripts/train_nuclei_model.package: float16 weights, card from summary.json; same masks as the run."""
    import train_nuclei_model as T

    from corpus.make_corpus import TINY_TRAIN_FLAGS, good_dataset

    data = good_dataset(tmp_path / "data", n=10)
    run = tmp_path / "run"
    flags = [f for f in TINY_TRAIN_FLAGS]
    rc = main(["-q", "train", "--data", str(data), "--out", str(run), *flags, "--epochs", "3",
               "--target", "distance", "--test-fraction", "0.3", "--aug-zoom", "0"])
    assert rc == 0
    dest = tmp_path / "pkg" / "nuclei"
    dest.parent.mkdir()
    T.package(run, dest, [])
    card = json.loads((dest / "card.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert card["test"]["ap50"] == pytest.approx(summary["test"]["ap50"], abs=1e-4)
    assert card["test"]["images"] == summary["test"]["n_images"] == len(json.loads((run / "split.json").read_text())["test"])
    assert os.path.getsize(dest / "checkpoints" / "best.pt") < 0.7 * os.path.getsize(run / "checkpoints" / "best.pt")
    import torch

    a, b = load_run(run).model, load_run(dest).model
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert torch.allclose(ya, yb, atol=5e-2 * float(ya.abs().max()) + 1e-3)
    assert not torch.equal(ya, yb), "float16 storage should round the weights"


def test_nuclei_model_on_stardist_image_without_fine_tuning(tmp_path):
    """The shipped model on the one StarDist nuclei image (not in its training split): AP@0.5 well above chance."""
    data = shared_data("stardist_nuclei")
    from unetlab import evaluate, predict

    predict("nuclei", data / "images", tmp_path / "pred", instances=True, progress=False)
    rep = evaluate(tmp_path / "pred" / "labels", data / "masks", instances=True)
    assert rep["objects"]["ap"][0] > 0.7


def test_init_fine_tunes_from_another_run(tmp_path):
    """--init RUN starts from RUN's network and weights; a run of another target is refused in one line."""
    import torch

    from corpus.make_corpus import TINY_TRAIN_FLAGS, good_dataset
    from unetlab.config import RunConfig
    from unetlab.errors import UnetlabError
    from unetlab.training.setup import initial_weights

    data = good_dataset(tmp_path / "data", n=6)
    first = tmp_path / "first"
    assert main(["-q", "train", "--data", str(data), "--out", str(first), *TINY_TRAIN_FLAGS]) == 0
    cfg = RunConfig()
    cfg.model.base_width = 32  # overridden by the starting run's network
    cfg.train.init = str(first)
    info = {"in_channels": 1, "out_channels": 1, "target": "binary"}
    weights = initial_weights(cfg, info)
    start = load_run(first)
    assert cfg.model == start.config.model and cfg.model.base_width == 8
    assert all(torch.equal(weights[k], v) for k, v in start.model.state_dict().items())
    with pytest.raises(UnetlabError, match="target"):
        initial_weights(cfg, {**info, "target": "distance"})
    second = tmp_path / "second"
    assert main(["-q", "train", "--data", str(data), "--out", str(second), *TINY_TRAIN_FLAGS,
                 "--init", str(first), "--base-width", "16"]) == 0
    assert RunConfig.load(second / "config.yaml").model.base_width == 8


def test_package_data_globs_ship_every_pretrained_file():
    """pyproject's package-data patterns cover every file of unetlab/pretrained (else a wheel lacks weights)."""
    import tomllib

    pkg = ROOT / "src" / "unetlab"
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["unetlab"]
    shipped = {p for pattern in patterns for p in pkg.glob(pattern)}
    files = {p for p in (pkg / "pretrained").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert files and files <= shipped, sorted(str(f.relative_to(pkg)) for f in files - shipped)


def test_exporting_a_pretrained_model_writes_to_the_working_folder_not_the_package(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx", reason="ONNX export needs the export extra")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in (PRETRAINED_DIR / "nuclei").rglob("*"))
    rc, out, err = cli(capsys, "export", "nuclei", "--format", "torchscript")
    assert rc == 0, err
    assert (tmp_path / "nuclei.pt").is_file()
    assert sorted(p.name for p in (PRETRAINED_DIR / "nuclei").rglob("*")) == before


def test_models_card_prints_size_estimate_rows_per_collection():
    """A card's `sizes` rows (bench_accuracy --sizes on the test splits) come out one line per collection, with
    auto / true-size AP@0.5 and the share of size estimates within 25% for every zoom."""
    from unetlab.runfolder import format_pretrained_table

    card = {"name": "nuclei", "parameters": 10, "summary": "s", "trained_on": "t",
            "sizes": [{"images": "DSB test split", "zoom": 1.0, "ap50_auto": 0.8, "ap50_true": 0.81, "within25": 0.9},
                      {"images": "DSB test split", "zoom": 4.0, "ap50_auto": 0.7, "ap50_true": 0.75, "within25": 0.5},
                      {"images": "stardist_nuclei", "zoom": 1.0, "ap50_auto": 0.83, "ap50_true": 0.82,
                       "within25": 1.0}]}
    lines = format_pretrained_table([card]).splitlines()
    dsb = [ln for ln in lines if "DSB test split" in ln]
    assert len(dsb) == 1 and "x1 0.800 / 0.810 (90%)" in dsb[0] and "x4 0.700 / 0.750 (50%)" in dsb[0]
    assert any("stardist_nuclei: x1 0.830 / 0.820 (100%)" in ln for ln in lines)
    assert "AP@0.5" not in format_pretrained_table([{**card, "sizes": []}])


@pytest.mark.parametrize("argv", [["tune", "nuclei"], ["size-model", "nuclei"], ["tune", str(PRETRAINED_DIR / "nuclei")]])
def test_the_pretrained_package_is_never_tuned_in_place_and_says_to_copy_it(argv, capsys):
    before = sorted((p.name, p.stat().st_mtime) for p in (PRETRAINED_DIR / "nuclei").iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "nuclei is a pretrained model, and its package folder is not written to" in err
    assert f"cp -r {PRETRAINED_DIR / 'nuclei'} my_nuclei" in err
    assert sorted((p.name, p.stat().st_mtime) for p in (PRETRAINED_DIR / "nuclei").iterdir()) == before


def test_bad_load_run_arguments_are_one_line(tmp_path, capsys):
    from unetlab.errors import UnetlabError
    from unetlab.runfolder import load_run

    with pytest.raises(UnetlabError, match="unknown checkpoint 'worst'"):
        load_run("nuclei", checkpoint="worst")
    with pytest.raises(UnetlabError, match="unknown device 'gpu'"):
        load_run("nuclei", device="gpu")
    copy = tmp_path / "copy"
    shutil.copytree(PRETRAINED_DIR / "nuclei", copy)
    assert main(["size-model", str(copy), "--crops", "0"]) == 2
    assert "--crops and --val-crops must be at least 1, not 0" in capsys.readouterr().err
