"""Evaluating prediction folders against ground truth in several layouts, the report files and the CLI."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from unetlab.cli import main
from unetlab.data.io import read_label, write_image
from unetlab.errors import UnetlabError
from unetlab.evaluation.evaluate import evaluate, format_summary, split_suffix
from unetlab.inference.writers import write_rle_csv

sys.path.insert(0, str(Path(__file__).parent))
from test_metrics import perturb_stardist  # noqa: E402

STARDIST = Path(__file__).resolve().parents[1] / "../shared/data/stardist_nuclei"


def make_truth(seed: int) -> np.ndarray:
    """Three squares at seed-dependent places."""
    lab = np.zeros((32, 32), np.int32)
    off = seed % 3
    lab[2 + off : 10 + off, 2:10] = 1
    lab[14:22, 14 + off : 22 + off] = 2
    lab[24:30, 2:8] = 3
    return lab


@pytest.fixture
def folders(tmp_path):
    """truth/ (flat label images), pred/ with suffixed masks, one extra prediction and one missing."""
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    truth.mkdir()
    pred.mkdir()
    for i in range(3):
        lab = make_truth(i)
        write_image(truth / f"img{i}.tif", lab.astype(np.uint16))
        p = lab.copy()
        if i == 1:
            p[p == 3] = 0  # one object missed: 4 fewer foreground pixels... (36 px)
        write_image(pred / f"img{i}_mask.png", ((p > 0) * 255).astype(np.uint8))
        write_image(pred / f"img{i}_prob.tif", (p > 0).astype(np.float32))  # ignored
    write_image(truth / "img9.tif", make_truth(0).astype(np.uint16))  # no prediction
    write_image(pred / "stray_mask.png", np.zeros((32, 32), np.uint8))  # no truth
    return pred, truth


def test_split_suffix():
    assert split_suffix("a_labels") == ("a", "_labels")
    assert split_suffix("a_mask") == ("a", "_mask")
    assert split_suffix("plain") == ("plain", "")
    assert split_suffix("_mask") == ("_mask", "")


def test_evaluate_pixels_and_objects(folders, tmp_path):
    pred, truth = folders
    out = tmp_path / "rep" / "eval.json"
    rep = evaluate(pred, truth, instances=True, out=out)
    assert rep["n_images"] == 3
    assert rep["unpaired_pred"] == ["stray_mask.png"] and rep["unpaired_truth"] == ["img9.tif"]
    assert sorted(rep["ignored_pred_files"]) == ["img0_prob.tif", "img1_prob.tif", "img2_prob.tif"]
    rows = {r["image"]: r for r in rep["images"]}
    assert rows["img0"]["dice"] == 1.0 and rows["img0"]["ap_mean"] == 1.0
    fg = np.count_nonzero(make_truth(1))
    assert rows["img1"]["recall"] == pytest.approx((fg - 36) / fg)
    assert rows["img1"]["dice"] == pytest.approx(2 * (fg - 36) / (2 * fg - 36))
    assert (rows["img1"]["tp_50"], rows["img1"]["fn_50"], rows["img1"]["fp_50"]) == (2, 1, 0)
    assert rows["img1"]["count_error"] == -1
    obj = rep["objects"]
    assert obj["tp"][0] == 8 and obj["fn"][0] == 1 and obj["n_true"] == 9
    assert obj["dsb_score"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert rep["pooled"]["fn"] == 36 and rep["mean"]["dice"] == pytest.approx(np.mean([r["dice"] for r in rows.values()]))
    # the files: JSON with the same numbers, CSV with one row per image
    saved = json.loads(out.read_text())
    assert saved["objects"]["dsb_score"] == pytest.approx(obj["dsb_score"])
    table = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [r["image"] for r in table] == ["img0", "img1", "img2"] and float(table[1]["ap_50"]) == pytest.approx(2 / 3)
    with pytest.raises(UnetlabError, match="overwrite"):
        evaluate(pred, truth, out=out)
    evaluate(pred, truth, out=out, overwrite=True)
    text = format_summary(rep)
    assert "DSB score" in text and "stray_mask.png" in text and "img9.tif" in text


def test_invert_mask_and_rand_error(tmp_path):
    truth, pred = tmp_path / "t", tmp_path / "p"
    lab = make_truth(0)
    write_image(truth / "a.png", ((lab == 0) * 255).astype(np.uint8))  # truth marks the background
    write_image(pred / "a.png", ((lab > 0) * 255).astype(np.uint8))
    assert evaluate(pred, truth)["images"][0]["dice"] == 0.0
    rep = evaluate(pred, truth, invert_mask=True)
    assert rep["images"][0]["dice"] == 1.0 and rep["images"][0]["adapted_rand_error"] == 0.0


def test_truth_as_rle_csv_and_pred_as_csv(tmp_path):
    pred = tmp_path / "pred"
    items = [(f"img{i}", make_truth(i)) for i in range(2)]
    for name, lab in items:
        write_image(pred / f"{name}_labels.tif", lab.astype(np.uint16))
    truth_csv = write_rle_csv(tmp_path / "truth.csv", items, style="dsb")
    rep = evaluate(pred, truth_csv, instances=True)
    assert rep["n_images"] == 2 and rep["objects"]["dsb_score"] == 1.0
    # a submission CSV as prediction, against label images
    truth = tmp_path / "truth"
    for name, lab in items:
        write_image(truth / f"{name}.png", lab.astype(np.uint16))
    shifted = [(n, np.roll(lab, 2, axis=1)) for n, lab in items]
    sub = write_rle_csv(tmp_path / "sub.csv", shifted, style="sartorius")
    rep = evaluate(sub, truth, instances=True, iou_thresholds=[0.5, 0.9])
    assert rep["objects"]["tp"] == [6, 0]


def test_truth_as_dataset_folders(tmp_path):
    from unetlab.data.layouts import LAYOUTS

    pred = tmp_path / "pred"
    lab = make_truth(0)
    write_image(pred / "s1_labels.tif", lab.astype(np.uint16))
    # images/ + masks/
    paired = tmp_path / "paired"
    write_image(paired / "images" / "s1.png", np.zeros((32, 32), np.uint8))
    write_image(paired / "masks" / "s1_mask.tif", lab.astype(np.uint16))
    assert evaluate(pred, paired, instances=True)["objects"]["ap"][0] == 1.0
    if "kaggle_dsb" not in LAYOUTS:
        pytest.skip("kaggle_dsb layout not available")
    kag = tmp_path / "kaggle"
    write_image(kag / "s1" / "images" / "s1.png", np.zeros((32, 32, 3), np.uint8))
    for v in (1, 2, 3):
        write_image(kag / "s1" / "masks" / f"m{v}.png", ((lab == v) * 255).astype(np.uint8))
    rep = evaluate(pred, kag, instances=True)
    assert rep["objects"]["n_true"] == 3 and rep["objects"]["ap"][0] == 1.0


def test_errors(tmp_path, folders):
    pred, truth = folders
    with pytest.raises(UnetlabError, match="not found"):
        evaluate(pred, tmp_path / "missing")
    other = tmp_path / "other"
    write_image(other / "zzz.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(UnetlabError, match="pairs up"):
        evaluate(pred, other)
    with pytest.raises(UnetlabError, match="JSON"):
        evaluate(pred, truth, out=tmp_path / "x.csv")


def test_cli(folders, tmp_path, capsys):
    pred, truth = folders
    out = tmp_path / "e.json"
    rc = main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--instances", "--out", str(out)])
    assert rc == 0 and out.exists() and out.with_suffix(".csv").exists()
    assert "DSB score" in capsys.readouterr().out
    rc = main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--out", str(out)])
    assert rc == 2 and "overwrite" in capsys.readouterr().err
    rc = main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--instances", "--iou-thresholds", "0.5,0.75"])
    assert rc == 0 and "0.75" in capsys.readouterr().out


@pytest.mark.realdata
@pytest.mark.skipif(not STARDIST.is_dir(), reason="../shared/data/stardist_nuclei not available")
def test_stardist_evaluate_self_and_perturbed(tmp_path):
    truth = read_label(STARDIST / "masks" / "img2d.tif")
    same, pert = tmp_path / "same", tmp_path / "pert"
    write_image(same / "img2d_labels.tif", truth.astype(np.uint16))
    rep = evaluate(same, STARDIST, instances=True)
    assert rep["objects"]["ap"] == [1.0] * 10 and rep["objects"]["dsb_score"] == 1.0
    pred, expected_tp, n_pred = perturb_stardist(truth)
    write_image(pert / "img2d_labels.tif", pred.astype(np.uint16))
    rep = evaluate(pert, STARDIST / "masks", instances=True)
    exp = [expected_tp(t) for t in rep["objects"]["thresholds"]]
    assert rep["objects"]["tp"] == exp
    assert rep["objects"]["dsb_score"] == pytest.approx(np.mean([e / (n_pred + 125 - e) for e in exp]))


def test_multiclass_truth(tmp_path):
    root, pred = tmp_path / "em", tmp_path / "pred"
    write_image(root / "images" / "a.png", np.zeros((10, 10), np.uint8))
    membrane = np.zeros((10, 10), np.uint8)
    membrane[:, :3] = 255
    mito = np.zeros((10, 10), np.uint8)
    mito[5:9, 5:9] = 255
    write_image(root / "masks_membrane" / "a.png", membrane)
    write_image(root / "masks_mito" / "a.png", mito)
    classes = np.zeros((10, 10), np.uint8)
    classes[:, :2] = 1  # 20 of the 30 membrane pixels
    classes[5:9, 5:9] = 2  # mitochondrion exact
    write_image(pred / "a_mask.png", classes)
    rep = evaluate(pred, root)
    d = rep["mean"]["dice_per_class"]
    assert len(d) == 3 and d[1] == pytest.approx(2 * 20 / 50) and d[2] == 1.0
    assert rep["images"][0]["dice"] == pytest.approx((d[1] + d[2]) / 2)
    assert "class" in format_summary(rep)
    with pytest.raises(UnetlabError, match="multiclass"):
        evaluate(pred, root, instances=True)
    # predictions of a model whose class 1 is the mitochondrion (its predictions.json says so) are scored
    # against the right truth classes without --classes, and a --classes in another order is refused
    swapped = tmp_path / "swapped"
    write_image(swapped / "masks" / "a.png", np.where(classes == 1, 2, np.where(classes == 2, 1, 0)).astype(np.uint8))
    (swapped / "predictions.json").write_text(json.dumps({"classes": ["background", "mito", "membrane"]}))
    rep = evaluate(swapped / "masks", root)
    d = rep["mean"]["dice_per_class"]
    assert d[1] == 1.0 and d[2] == pytest.approx(2 * 20 / 50)
    assert rep["classes"] == ["background", "mito", "membrane"] and "1 mito" in format_summary(rep)
    with pytest.raises(UnetlabError, match="would score them against other truth classes"):
        evaluate(swapped / "masks", root, classes=["membrane", "mito"])


def test_labels_written_twice_as_tiff_and_ome_zarr_are_one_prediction(tmp_path, caplog):
    pytest.importorskip("zarr")
    from unetlab.inference.writers import write_labels, write_labels_ome_zarr

    truth = make_truth(1)
    write_image(tmp_path / "truth" / "a.tif", truth.astype(np.uint16))
    write_labels(tmp_path / "pred" / "a.tif", truth)
    write_labels_ome_zarr(tmp_path / "pred" / "a.ome.zarr", truth)
    with caplog.at_level("WARNING"):
        rep = evaluate(tmp_path / "pred", tmp_path / "truth", instances=True)
    assert rep["n_images"] == 1 and rep["objects"]["ap"][0] == 1.0
    assert "no ground truth" not in caplog.text and rep["ignored_pred_files"] == ["a.ome.zarr"]


def test_iou_thresholds_outside_zero_one_are_one_line(tmp_path):
    truth = make_truth(1)
    write_image(tmp_path / "truth" / "a.tif", truth.astype(np.uint16))
    write_image(tmp_path / "pred" / "a.tif", truth.astype(np.uint16))
    with pytest.raises(UnetlabError, match=r"IoU thresholds must lie in \(0, 1\], not 0.5,1.5"):
        evaluate(tmp_path / "pred", tmp_path / "truth", instances=True, iou_thresholds=(0.5, 1.5))


def test_classes_given_for_binary_truth_are_refused_not_ignored(tmp_path):
    truth = make_truth(1)
    write_image(tmp_path / "truth" / "a.tif", truth.astype(np.uint16))
    write_image(tmp_path / "pred" / "a.tif", truth.astype(np.uint16))
    with pytest.raises(UnetlabError, match="--classes foo is for multiclass ground truth"):
        evaluate(tmp_path / "pred", tmp_path / "truth", classes=["foo"])
