"""QA fixes: evaluate pairs by predict's output names in every layout, --include names that match nothing,
run-length CSV folders (two CSVs, messages naming the CSV line) and a forced paired layout on an RLE folder."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from unetlab.data.inspect import format_report, inspect_dataset
from unetlab.data.io import write_image
from unetlab.data.layouts import filter_samples, load_dataset
from unetlab.data.rle import rle_encode
from unetlab.errors import UnetlabError
from unetlab.evaluation.evaluate import evaluate

H, W = 12, 16
FRAMES = ("img_000000000", "img_000000001")


def _label(seed: int) -> np.ndarray:
    lab = np.zeros((H, W), np.uint16)
    lab[1 + seed % 3 : 5 + seed % 3, 1:5], lab[6:10, 8:14] = 1, 2
    return lab


def _timelapse(root: Path) -> dict[str, np.ndarray]:
    """expA with two positions, two annotated frames each; returns sample name -> label image."""
    truth = {}
    for p, pos in enumerate(("Pos001", "Pos002")):
        for f, frame in enumerate(FRAMES):
            lab = _label(2 * p + f)
            write_image(root / "expA_raw_data" / pos / f"{frame}.tif", np.zeros((H, W), np.uint8))
            write_image(root / "expA_masks" / pos / f"MASK_{frame}.tif", lab)
            truth[f"expA/{pos}/{frame}"] = lab
    return truth


def test_evaluate_pairs_timelapse_predictions_by_predicts_output_names(tmp_path):
    from unetlab.inference.predict import collect_inputs

    root, pred = tmp_path / "tl", tmp_path / "pred" / "masks"
    truth = _timelapse(root)
    names = [name for name, _ in collect_inputs(root)]  # the names predict gives its outputs
    by_output = {name.replace("/", "__"): lab for name, lab in truth.items()}
    assert sorted(names) == sorted(by_output)
    for name in names:
        write_image(pred / f"{name}.png", ((by_output[name] > 0) * 255).astype(np.uint8))
    rep = evaluate(pred, root)
    assert rep["n_images"] == 4 and rep["mean"]["dice"] == 1.0 and not rep["unpaired_pred"]
    assert {r["image"] for r in rep["images"]} == set(names)
    assert rep["images"][0]["truth_file"] == str(Path("expA_masks/Pos001/MASK_img_000000000.tif"))


def test_evaluate_strips_the_mask_prefix_of_a_position_folder(tmp_path):
    root, pred = tmp_path / "tl", tmp_path / "pred"
    truth = _timelapse(root)
    for frame in FRAMES:  # predicted from tl/expA_raw_data/Pos001: named by the frame
        write_image(pred / f"{frame}.png", truth[f"expA/Pos001/{frame}"].astype(np.uint16))
    rep = evaluate(pred, root / "expA_masks" / "Pos001", instances=True)
    assert rep["n_images"] == 2 and rep["objects"]["dsb_score"] == 1.0 and not rep["unpaired_truth"]
    # the whole dataset's predictions against one position: the error says which folder to pass
    other = tmp_path / "pred_all"
    write_image(other / "expA__Pos001__img_000000000.png", truth["expA/Pos001/img_000000000"].astype(np.uint16))
    with pytest.raises(UnetlabError, match="pass that dataset folder"):
        evaluate(other, root / "expA_masks" / "Pos002")


def test_include_names_that_match_nothing_are_named_in_one_warning(tmp_path, caplog):
    root = tmp_path / "tl"
    _timelapse(root)
    samples = load_dataset(root).samples
    listing = tmp_path / "list.txt"
    listing.write_text("expA/Pos001/img_000000000\nexpA/Pos002\nexpA/Pos01/typo\nnope\n")
    with caplog.at_level(logging.WARNING):
        kept = filter_samples(samples, str(listing))
    assert len(kept) == 3
    warned = [r.getMessage() for r in caplog.records if "--include" in r.getMessage()]
    assert len(warned) == 1 and "2 of its 4 names match no sample" in warned[0]
    assert "expA/Pos01/typo" in warned[0] and "nope" in warned[0]
    listing.write_text("nope\n")
    with pytest.raises(UnetlabError, match="keeps none.*sample names look like 'expA/Pos001/img_000000000'"):
        filter_samples(samples, str(listing))


def _rle_folder(root: Path, rows: list[str], images: tuple[str, ...] = ("a", "b")) -> Path:
    for key in images:
        write_image(root / "images" / f"{key}.png", np.zeros((H, W), np.uint8))
    (root / "labels.csv").write_text("\n".join(["ImageId,EncodedPixels,Height,Width", *rows]) + "\n")
    return root


def _rows(key: str, seed: int) -> list[str]:
    lab = _label(seed)
    return [f"{key},{rle_encode(lab == v)},{H},{W}" for v in (1, 2)]


def test_two_run_length_csvs_are_one_error_naming_both(tmp_path):
    root = _rle_folder(tmp_path / "r", _rows("a", 0) + _rows("b", 1))
    (root / "00_submission.csv").write_text("ImageId,EncodedPixels\na,1 3\n")
    with pytest.raises(UnetlabError, match=r"00_submission\.csv and labels\.csv.*move the other"):
        load_dataset(root)
    assert len(load_dataset(root, csv_file="labels.csv").samples) == 2  # the loader's choice still works


def test_rle_problems_name_the_csv_line_and_give_csv_advice(tmp_path):
    odd = _rle_folder(tmp_path / "odd", _rows("a", 0) + ["b,5 2 9,12,16"])
    with pytest.raises(UnetlabError, match=r"labels\.csv: line 4: bad run-length mask for image id b: .*odd"):
        load_dataset(odd).samples[1].load_mask()
    report = inspect_dataset(odd, progress=False)
    assert "fix or remove the CSV rows" in report["fix"] and "not an image" not in report["fix"]
    missing = _rle_folder(tmp_path / "missing", _rows("a", 0) + _rows("ghost", 1), images=("a",))
    info = load_dataset(missing)
    assert len(info.problems) == 1 and "line 4: image id ghost" in info.problems[0]
    assert str(missing / "images") in info.problems[0]
    fix = inspect_dataset(missing, progress=False)["fix"]
    assert "image id of the CSV" in fix and "_mask" not in fix


def test_forced_paired_layout_on_an_rle_folder_says_where_the_masks_are(tmp_path):
    root = _rle_folder(tmp_path / "r", _rows("a", 0))
    with pytest.raises(UnetlabError) as err:
        inspect_dataset(root, "paired", progress=False)
    text = str(err.value)
    assert "None" not in text and "no mask folder" in text and "--layout rle_csv" in text
    assert "labels.csv" in text
    assert "layout       rle_csv" in format_report(inspect_dataset(root, progress=False))
