"""The size model of ``--diameter auto`` (issue 28): an object size from the network's pooled features, not from
the objects it finds, stored as plain numbers in the run folder; runs without it keep the measuring rule."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from unetlab.config import RunConfig, apply_overrides
from unetlab.data.io import normalize, write_image
from unetlab.data.sizes import median_diameter
from unetlab.data.synthetic import make_synthetic_cells
from unetlab.errors import UnetlabError
from unetlab.inference.rescale import resize_image, resize_labels
from unetlab.inference.sizemodel import SIZE_MODEL_FILE, SizeModel, image_style, load_size_model
from unetlab.models import build_model
from unetlab.runfolder import save_checkpoint, write_json
from unetlab.training.sizefit import fit_ridge

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN_DIAMETER = 14.2


def make_run(root: Path) -> Path:
    """A run folder of an untrained tiny distance U-Net (batch-norm statistics measured on one image) that knows
    its training objects' size: enough to follow ``--diameter auto`` through predict."""
    cfg = RunConfig()
    cfg.model.preset, cfg.model.depth, cfg.model.base_width = "unet", 2, 4
    cfg.data.target, cfg.model.in_channels, cfg.model.out_channels = "distance", 1, 2
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    x = normalize(make_synthetic_cells((96, 96), seed=10)[0][None].astype(np.float32), "percentile", 1.0, 99.8)
    with torch.no_grad():
        model(torch.from_numpy(x[None]))
    root.mkdir(parents=True)
    cfg.save(root / "config.yaml")
    write_json(root / "model.json", {"in_channels": 1, "out_channels": 2, "image_channels": 1, "task": "binary",
                                     "classes": [], "target": "distance", "layout": "paired",
                                     "diameter": TRAIN_DIAMETER})
    save_checkpoint(root / "checkpoints" / "best.pt", {"model": model.state_dict(), "epoch": 1})
    return root


def constant_size_model(diameter: float, n_features: int = 8) -> SizeModel:
    """A size model that says ``diameter`` for every image (zero weights)."""
    return SizeModel(weights=[0.0] * n_features, bias=math.log(diameter), mean=[0.0] * n_features,
                     std=[1.0] * n_features, train_diameter=TRAIN_DIAMETER)


def _counts(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "counts.csv").open()))


def test_size_model_round_trips_as_plain_json_and_a_bad_file_is_one_line(tmp_path):
    rng = np.random.default_rng(0)
    sm = SizeModel(weights=rng.normal(size=5).tolist(), bias=2.5, mean=rng.normal(size=5).tolist(),
                   std=(rng.random(5) + 0.5).tolist(), train_diameter=20.5, alpha=10.0, fit={"val": 0.1})
    path = sm.save(tmp_path)
    assert path.name == SIZE_MODEL_FILE and json.loads(path.read_text())["weights"] == sm.weights  # plain JSON
    back = load_size_model(tmp_path)
    assert back == sm
    styles = rng.normal(size=(3, 5))
    assert np.allclose(back.log_diameters(styles), sm.log_diameters(styles))
    assert load_size_model(tmp_path / "elsewhere") is None  # an older run: no size model
    obj = json.loads(path.read_text())
    assert obj["zoom"] == 1.0
    del obj["zoom"]  # a fit written before the style was read at half size
    path.write_text(json.dumps(obj))
    assert load_size_model(tmp_path).zoom == 1.0
    path.write_text(json.dumps({**obj, "zoom": 2.0}))
    with pytest.raises(UnetlabError, match="zoom"):
        load_size_model(tmp_path)
    path.write_text(json.dumps({"format": "unetlab-size-model/1", "weights": [1.0], "bias": 0.0}))
    with pytest.raises(UnetlabError, match=SIZE_MODEL_FILE):
        load_size_model(tmp_path)


def test_the_style_is_read_from_the_image_at_the_size_models_zoom():
    """zoom 0.5 reads the style of the half-size image (a quarter of the pixels), and predict's estimator uses
    the zoom its size model was fitted with."""
    from unetlab.models import UNet

    torch.manual_seed(0)
    model = UNet(1, 1, (4, 8, 16)).eval()
    img = np.random.default_rng(3).random((1, 128, 96), np.float32)
    half = image_style(model, img, crop=64, zoom=0.5)
    assert np.allclose(half, image_style(model, resize_image(img, (64, 48)), crop=64))
    assert not np.allclose(half, image_style(model, img, crop=64))


def test_an_estimate_of_objects_far_over_the_training_size_is_made_again_on_the_shrunk_image():
    """A regression that saturates near 100 px (as a style crop cannot hold 180 px nuclei) is asked again on the
    image shrunk to show them near the training size; estimates under the relook limit cost one call."""
    from unetlab.inference.sizemodel import RELOOK, relook

    calls = []

    def saturating(objects: float):
        def diameter_of(image):
            calls.append(image.shape[-2:])
            return min(objects * image.shape[-2] / 1000, 100.0)
        return diameter_of

    image = np.zeros((1, 1000, 800), np.float32)
    assert relook(saturating(180.0), image, 20.0) == pytest.approx(180.0, rel=0.01)
    assert calls == [(1000, 800), (200, 160)]  # shrunk so the first estimate (100 px) maps to 20 px
    calls.clear()
    below = RELOOK * 20.0 - 1
    assert relook(saturating(below), image, 20.0) == pytest.approx(below) and len(calls) == 1


def test_ridge_recovers_a_linear_log_size_and_chooses_its_penalty_on_validation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 12)) * rng.uniform(0.1, 10, 12)
    true_w = rng.normal(size=12) / x.std(0)
    y = x @ true_w + 3.0 + rng.normal(0, 0.01, 400)
    w, b, mean, std, alpha, errors = fit_ridge((x[:300], y[:300]), (x[300:], y[300:]))
    pred = ((x[300:] - mean) / std) @ w + b
    assert np.median(np.abs(pred - y[300:])) < 0.05
    assert errors[f"{alpha:g}"] == min(errors.values()) and len(errors) > 1


def test_diameter_auto_predicts_at_the_size_models_estimate_and_without_it_still_predicts(tmp_path):
    """With size_model.json one pass at the estimated scale (the estimate in counts.csv); a run folder without it
    predicts with the measuring rule."""
    from unetlab.inference.predict import predict

    run = make_run(tmp_path / "run")
    img, _lab = make_synthetic_cells((96, 96), seed=4)
    write_image(tmp_path / "in" / "a.tif", img)
    predict(run, tmp_path / "in", tmp_path / "old", instances=True, diameter="auto", progress=False,
            precision="fp32")
    assert (tmp_path / "old" / "labels").is_dir() and _counts(tmp_path / "old")[0]["DiameterFrom"].startswith(
        "measured")
    n_features = 2 * sum(build_model(RunConfig.load(run / "config.yaml").model).widths)
    constant_size_model(2 * TRAIN_DIAMETER, n_features).save(run)
    from unetlab.inference import rescale

    before = rescale.REFINE
    try:
        rescale.REFINE = False  # the estimate alone (an untrained network's objects would refine it anywhere)
        predict(run, tmp_path / "in", tmp_path / "new", instances=True, diameter="auto", progress=False,
                precision="fp32")
    finally:
        rescale.REFINE = before
    row = _counts(tmp_path / "new")[0]
    assert row["DiameterFrom"] == "estimated" and float(row["Scale"]) == pytest.approx(0.5, abs=0.01)
    assert float(row["Diameter"]) == pytest.approx(2 * TRAIN_DIAMETER, rel=1e-3)


@pytest.mark.parametrize("kind", ["unet-same", "unet-valid", "resnet"])
def test_every_network_gives_pooled_features(kind):
    """Every preset builds a UNet (same or valid padding) or a ResNetUNet: small ones of each kind here."""
    from unetlab.models import ResNetUNet, UNet

    if kind == "resnet":
        model = ResNetUNet(1, 1, blocks=(1, 1, 1, 1), encoder_widths=(4, 8, 8, 8), decoder_widths=(8, 8, 8, 8, 8))
    else:
        model = UNet(1, 1, (4, 8, 16), padding=kind.split("-")[1], upsample="transpose")
    model.eval()
    n = model.valid_input_size(64)  # the smallest image each network takes whole (one crop)
    style = image_style(model, np.random.default_rng(0).random((1, n, n), np.float32), crop=n)
    assert style.ndim == 1 and np.isfinite(style).all() and style.shape[0] >= 8


# --- end to end: a network that knows one size, and nuclei 4x and 0.25x that size ---------------------------------


RADIUS = (9.0, 16.0)  # nuclei ~25 px across: a quarter of that size (~6 px) is still measurable at IoU 0.5


def _write_fields(root: Path, factor: float, n: int, size: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        img, lab = make_synthetic_cells((size, size), radius=RADIUS, seed=rng)
        shape = (int(size * factor), int(size * factor))
        im = resize_image(img[None].astype(np.float32), shape)[0]
        write_image(root / "images" / f"c{i}.tif", np.clip(im, 0, 65535).astype(np.uint16))
        write_image(root / "masks" / f"c{i}.tif", resize_labels(lab, shape).astype(np.uint16))
    return root


@pytest.mark.slow
def test_nuclei_4x_and_quarter_the_training_size_get_their_size_and_native_accuracy(tmp_path):
    """Without zoom augmentation the network knows one size: at 4x the nuclei fragment as they are. The size model
    fitted at the end of training finds their size within 25% and the masks score within 0.05 of native."""
    from unetlab.data.io import read_image
    from unetlab.evaluation.evaluate import evaluate
    from unetlab.inference.predict import predict
    from unetlab.training import train

    _write_fields(tmp_path / "train", 1.0, 12, 192, 0)
    over = dict(preset="unet", depth=3, base_width=12, patch_size=96, batch_size=8, samples_per_epoch=128,
                epochs=8, lr=3e-3, target="distance", tensorboard=False, val_fraction=0.25, seed=0, aug_zoom=0.0,
                precision="fp32")
    run = tmp_path / "run"
    train(apply_overrides(RunConfig(), {**over, "root": str(tmp_path / "train")}), run, progress=False)
    assert (run / SIZE_MODEL_FILE).is_file()
    scores = {}
    for name, factor, size in (("native", 1.0, 192), ("x4", 4.0, 96), ("x0.25", 0.25, 384)):
        data = _write_fields(tmp_path / name, factor, 2, size, 21)
        out = tmp_path / f"pred_{name}"
        predict(run, data / "images", out, instances=True, diameter="auto", progress=False, precision="fp32")
        scores[name] = float(evaluate(out / "labels", data / "masks", instances=True)["objects"]["ap"][0])
        for row in _counts(out):
            truth = median_diameter([read_image(data / "masks" / f"{row['ImageName']}.tif")[0].astype(np.int32)])
            assert row["DiameterFrom"].startswith("estimated"), row
            assert abs(math.log(float(row["Diameter"]) / truth)) < math.log(1.25), (name, row, truth)
    assert scores["native"] > 0.85, scores
    for name in ("x4", "x0.25"):
        assert scores[name] >= scores["native"] - 0.05, scores


def test_an_existing_run_gets_a_size_model_from_its_split_and_never_reads_its_test_images(tmp_path, monkeypatch):
    from unetlab.data.synthetic import write_synthetic_dataset
    from unetlab.training import sizefit

    data = write_synthetic_dataset(tmp_path / "data", n_images=6, size=(96, 96), seed=2)
    run = make_run(tmp_path / "run")
    with pytest.raises(UnetlabError, match="split.json"):
        sizefit.fit_size_model_for_run(run, data)
    names = [f"cells_{i:03d}" for i in range(6)]
    write_json(run / "split.json", {"train": names[:3], "val": names[3:5], "test": names[5:]})
    read = []
    monkeypatch.setattr(sizefit, "read_image", lambda p: read.append(Path(p).stem) or sizefit_read(p))
    sm = sizefit.fit_size_model_for_run(run, data, crops=12, val_crops=4)
    assert load_size_model(run) == sm and sm.fit["train_crops"] == 12 and sm.train_diameter == TRAIN_DIAMETER
    assert set(read) == set(names[:5]), read  # training and validation images only


def test_crops_are_shared_equally_by_collections(tmp_path, monkeypatch):
    """A small collection gets as many size-model crops as a large one (then spread over its images)."""
    from unetlab.data.layouts import load_dataset
    from unetlab.data.synthetic import write_synthetic_dataset
    from unetlab.runfolder import load_run
    from unetlab.training import sizefit

    data = write_synthetic_dataset(tmp_path / "data", n_images=5, size=(64, 64), seed=6)
    run = load_run(make_run(tmp_path / "run"))
    samples = load_dataset(data).samples
    calls, crops_of = [], sizefit.size_crops

    def recording(run, part, crops, seed):
        rows = list(crops_of(run, part, crops, seed))
        calls.append((sorted(s.name for s in part), len(rows)))
        return rows

    monkeypatch.setattr(sizefit, "size_crops", recording)
    small = samples[0].name
    rows = list(sizefit.balanced_crops(run, samples, 8, 0, lambda n: "small" if n == small else "large"))
    assert len(rows) == 8
    assert sorted(calls) == sorted([([small], 4), (sorted(s.name for s in samples[1:]), 4)])
    calls.clear()
    assert len(list(sizefit.balanced_crops(run, samples, 10, 0))) == 10 and len(calls) == 1  # one collection


def sizefit_read(path):
    from unetlab.data.io import read_image

    return read_image(path)


def test_size_model_command_fits_an_existing_run_and_names_a_run_without_a_split(tmp_path, capsys):
    """`unetlab size-model RUN --data DIR` writes size_model.json; without split.json it is one line, exit 2."""
    from unetlab.cli import main
    from unetlab.data.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", n_images=5, size=(96, 96), seed=3)
    run = make_run(tmp_path / "run")
    assert main(["size-model", str(run), "--data", str(data), "--crops", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "split.json" in err and not (run / SIZE_MODEL_FILE).exists()
    names = [f"cells_{i:03d}" for i in range(5)]
    write_json(run / "split.json", {"train": names[:3], "val": names[3:], "test": []})
    assert main(["size-model", str(run), "--data", str(data), "--crops", "9"]) == 0
    assert load_size_model(run).fit["train_crops"] == 9 and "size_model.json" in capsys.readouterr().out


def test_native_crops_keep_the_images_own_pixels_and_size(tmp_path, monkeypatch):
    """A share of the size model's crops is taken as it is (no resampling, which would smooth a camera's noise):
    with every crop native, each target is the image's own median diameter and no crop is resized."""
    from unetlab.data.layouts import load_dataset
    from unetlab.data.synthetic import write_synthetic_dataset
    from unetlab.runfolder import load_run
    from unetlab.training import sizefit

    data = write_synthetic_dataset(tmp_path / "data", n_images=3, size=(96, 96), seed=5)
    run = load_run(make_run(tmp_path / "run"))
    samples = load_dataset(data).samples
    truth = {s.name: median_diameter([s.load_mask().astype(np.int64)]) for s in samples}
    resized = []
    monkeypatch.setattr(sizefit, "resize_image", lambda a, shape: resized.append(shape) or resize_image(a, shape))
    rows = list(sizefit.size_crops(run, samples, crops=6, seed=0, native=1.0))
    assert len(rows) == 6 and all(shape == (96, 96) for shape in resized)
    assert sorted(round(math.exp(y), 3) for _s, y in rows) == sorted(round(truth[s.name], 3) for s in samples
                                                                      for _ in range(2))
    resized.clear()
    rows = list(sizefit.size_crops(run, samples, crops=6, seed=0, native=0.0))
    assert any(shape != (96, 96) for shape in resized)
