"""Bad input and faults: every command on every broken case of tests/corpus, --skip-bad, damaged checkpoints,
output protection, predict --resume, the out-of-memory fallback and the exit-code contract.

Commands run in-process through ``unetlab.cli.main``: a user mistake exits with 2 and prints exactly one stderr
line that names the file at fault (no traceback); an internal error exits with 1 (traceback only under
--debug). Input folders are never written to: every test compares their listing, sizes and mtimes before and
after.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from corpus.make_corpus import (
    CASES,
    COMMANDS,
    TINY_TRAIN_FLAGS,
    build_case,
    every_bad_file,
    foreign_checkpoint,
    good_dataset,
    malicious_checkpoint,
    other_architecture_checkpoint,
    snapshot,
    tiny_run,
    truncated_checkpoint,
    wrong_model_json,
)
from unetlab.cli import main
from unetlab.data.io import read_image, read_label
from unetlab.runfolder import checkpoint_path

PREDICT_FLAGS = ["--tile", "32", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny trained run (1-channel, binary), shared by the tests of this file; never written to."""
    return tiny_run(tmp_path_factory.mktemp("tiny"))


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run ``unetlab -q ARGV`` in-process; (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(err: str, command: str, names: str) -> None:
    """stderr is exactly one line: ``unetlab COMMAND: error: ...`` naming ``names``, without a traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith(f"unetlab {command}: error: "), lines[0]
    assert names in lines[0], f"{names!r} not named in: {lines[0]}"
    assert "Traceback" not in err


def assert_no_temporaries(folder: Path) -> None:
    """No half-written file under ``folder``: no temporary names, and every image decodes."""
    if not folder.exists():
        return
    hidden = [p for p in folder.rglob(".*")]
    assert hidden == [], f"temporary files left: {hidden}"
    for p in folder.rglob("*"):
        if p.suffix in (".png", ".tif"):
            read_label(p) if p.parent.name in ("masks", "labels") else read_image(p)


def command_argv(command: str, case, run: Path, outs: Path) -> list:
    """The command line that runs ``command`` on ``case`` (outputs under ``outs``)."""
    if command == "inspect":
        return ["inspect", case.data]
    if command == "train":
        return ["train", "--data", case.data, "--out", outs / "run", *TINY_TRAIN_FLAGS]
    if command == "predict":
        return ["predict", "--model", run, "--input", case.predict_input, "--out", outs / "predicted",
                *PREDICT_FLAGS]
    return ["evaluate", "--pred", case.pred, "--truth", case.data, "--out", outs / "eval.json"]


# --- the matrix: every command on every case -----------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_every_command_on_every_case(case_name, command, tmp_path, capsys, run_dir):
    case = build_case(case_name, tmp_path / "cases")
    outs = tmp_path / "outputs"
    outs.mkdir()
    watched = [case.data, case.pred, run_dir]
    before = [snapshot(p) for p in watched]
    rc, out, err = cli(capsys, *command_argv(command, case, run_dir, outs))
    expect = case.expect[command]
    assert rc == expect.code, f"exit {rc}, expected {expect.code}\nstdout: {out}\nstderr: {err}"
    if expect.code:
        assert_one_line_error(err, command, expect.names)
        assert not (outs / "run").exists(), "a failed train left a run folder behind"
        assert not (outs / "eval.json").exists() and not (outs / "eval.csv").exists()
        assert_no_temporaries(outs / "predicted")
    elif command == "train":
        assert (outs / "run" / "checkpoints" / "last.pt").stat().st_size > 0
    elif command == "predict":
        masks = sorted(p.stem for p in (outs / "predicted" / "masks").iterdir())
        images = sorted(p.stem for p in case.predict_input.glob("*.tif") if not p.name.startswith("."))
        assert masks == images, "stray files were not ignored"
    elif command == "evaluate":
        assert (outs / "eval.json").exists() and "Evaluated" in out
    elif command == "inspect":
        assert "problems     none" in out
    assert [snapshot(p) for p in watched] == before, "an input folder was written to"


def test_harmless_stray_files_are_ignored(tmp_path, capsys):
    case = build_case("stray_files", tmp_path)
    rc, out, _err = cli(capsys, "inspect", case.data, "--json")
    import json

    report = json.loads(out)
    assert rc == 0 and report["n_pairs"] == 4 and report["problems"] == []


def test_one_empty_mask_trains_with_a_warning(tmp_path, capsys, caplog):
    case = build_case("one_empty_mask", tmp_path)
    rc, out, err = cli(capsys, "train", "--data", case.data, "--out", tmp_path / "run", *TINY_TRAIN_FLAGS,
                       "--val", "cells_000")
    assert rc == 0, err
    warned = [r.getMessage() for r in caplog.records if "masks are empty" in r.getMessage()]
    assert len(warned) == 1 and "1 of 3" in warned[0] and "cells_001" in warned[0]


def test_failed_train_leaves_no_folder_so_the_same_command_runs_again(tmp_path, capsys):
    case = build_case("truncated_image", tmp_path)
    argv = ["train", "--data", case.data, "--out", tmp_path / "run", *TINY_TRAIN_FLAGS]
    rc, _out, err = cli(capsys, *argv)
    assert rc == 2 and "cells_001.tif" in err and not (tmp_path / "run").exists()
    shutil.copy(case.data / "images" / "cells_000.tif", case.data / "images" / "cells_001.tif")  # the fix
    rc, _out, err = cli(capsys, *argv)
    assert rc == 0, err


def test_failed_train_into_an_empty_existing_folder_keeps_the_folder_empty(tmp_path, capsys):
    case = build_case("nan_image", tmp_path)
    (tmp_path / "run").mkdir()
    rc, _out, err = cli(capsys, "train", "--data", case.data, "--out", tmp_path / "run", *TINY_TRAIN_FLAGS)
    assert rc == 2 and "cells_003.tif" in err
    assert (tmp_path / "run").is_dir() and list((tmp_path / "run").iterdir()) == []


# --- --skip-bad ----------------------------------------------------------------------------------------------


def test_train_skip_bad_leaves_out_every_kind_of_bad_file(tmp_path, capsys, caplog):
    data, bad = every_bad_file(tmp_path / "data")
    before = snapshot(data)
    rc, out, err = cli(capsys, "train", "--data", data, "--out", tmp_path / "run", *TINY_TRAIN_FLAGS,
                       "--skip-bad")
    assert rc == 0, err
    listing = out[out.index("bad file(s) left out"):]
    for name in bad:
        assert name in listing, f"{name} not listed as left out"
    assert f"{len(bad)} bad file(s) left out" in out
    import json

    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == [f"cells_{i:03d}" for i in range(4)]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["left_out"]) == len(bad)  # the run folder records what it was trained without
    assert any("--skip-bad" in r.getMessage() for r in caplog.records)
    assert snapshot(data) == before


def test_train_without_skip_bad_stops_at_the_first_bad_file(tmp_path, capsys):
    data, bad = every_bad_file(tmp_path / "data")
    rc, _out, err = cli(capsys, "train", "--data", data, "--out", tmp_path / "run", *TINY_TRAIN_FLAGS)
    assert rc == 2 and "--skip-bad" in err
    assert_one_line_error(err, "train", "lonely.tif")


def test_train_on_an_unreadable_image_says_how_to_list_and_skip_them_all(tmp_path, capsys):
    data = good_dataset(tmp_path / "data")
    for f in sorted((data / "images").iterdir())[:2]:
        f.write_bytes(b"not an image")
    rc, _out, err = cli(capsys, "train", "--data", data, "--out", tmp_path / "run", *TINY_TRAIN_FLAGS)
    assert rc == 2
    assert_one_line_error(err, "train", "cannot read image")
    assert "`unetlab inspect DATA` lists every bad file; --skip-bad leaves them out" in err
    assert not (tmp_path / "run").exists()


def test_predict_skip_bad_goes_on_and_lists_the_bad_images(tmp_path, capsys, run_dir):
    data, bad = every_bad_file(tmp_path / "data")
    before = snapshot(data)
    rc, out, err = cli(capsys, "predict", "--model", run_dir, "--input", data / "images", "--out",
                       tmp_path / "pred", *PREDICT_FLAGS, "--skip-bad")
    assert rc == 0, err
    bad_images = sorted(n for n, side in bad.items() if side == "image")
    assert f"{len(bad_images)} bad file(s) skipped" in out
    for name in bad_images:
        assert name in out[out.index("bad file(s) skipped"):]
    written = sorted(p.stem for p in (tmp_path / "pred" / "masks").iterdir())
    readable = sorted(p.stem for p in (data / "images").iterdir() if p.name not in bad_images
                      and p.suffix in (".tif", ".png"))
    mask_side = [n for n, side in bad.items() if side == "mask"]
    assert written == readable and len(written) == 4 + len(mask_side) + 1  # good, bad masks, lonely image
    assert_no_temporaries(tmp_path / "pred")
    assert snapshot(data) == before


def test_predict_stopped_by_a_bad_image_says_how_to_go_on_and_lists_only_what_it_wrote(tmp_path, capsys, run_dir):
    data = good_dataset(tmp_path / "data")
    folder = tmp_path / "in"
    shutil.copytree(data / "images", folder)
    (folder / "zz_bad.tif").write_bytes(b"not a tiff")  # sorted last: the good images come first
    out = tmp_path / "pred"
    rc, _out, err = cli(capsys, "predict", "--model", run_dir, "--input", folder, "--out", out, *PREDICT_FLAGS)
    assert rc == 2
    assert_one_line_error(err, "predict", "zz_bad.tif")
    assert "--resume --skip-bad goes on" in err
    rc, _out, err = cli(capsys, "predict", "--model", run_dir, "--input", folder, "--out", out, *PREDICT_FLAGS,
                        "--resume", "--skip-bad")
    assert rc == 0, err
    written = json.loads((out / "predictions.json").read_text())
    assert sorted(written["images"]) == sorted(p.stem for p in (data / "images").iterdir())
    assert len(written["left_out"]) == 1 and "zz_bad.tif" in written["left_out"][0]


def test_predict_skip_bad_with_only_bad_images_is_an_error_not_success(tmp_path, capsys, run_dir):
    folder = tmp_path / "all_bad"
    folder.mkdir()
    (folder / "a.tif").write_bytes(b"not a tiff")
    (folder / "b.png").write_bytes(b"")
    rc, _out, err = cli(capsys, "predict", "--model", run_dir, "--input", folder, "--out", tmp_path / "pred",
                        *PREDICT_FLAGS, "--skip-bad")
    assert rc == 2 and "none of the 2 input image(s) could be read" in err
    assert_one_line_error(err, "predict", "a.tif")


# --- checkpoints ---------------------------------------------------------------------------------------------


def test_predict_with_a_truncated_checkpoint(tmp_path, capsys, run_dir):
    bad_run = truncated_checkpoint(run_dir, tmp_path / "run")
    data = good_dataset(tmp_path / "data")
    rc, _out, err = cli(capsys, "predict", "--model", bad_run, "--input", data / "images", "--out",
                        tmp_path / "pred", *PREDICT_FLAGS)
    assert rc == 2
    assert_one_line_error(err, "predict", "best.pt")
    assert "damaged or incomplete" in err and not (tmp_path / "pred").exists()


def test_predict_with_a_checkpoint_of_another_format_names_its_version(tmp_path, capsys, run_dir):
    old = foreign_checkpoint(run_dir, tmp_path / "run", fmt=99, version="9.9.0")
    data = good_dataset(tmp_path / "data")
    rc, _out, err = cli(capsys, "predict", "--model", old, "--input", data / "images", "--out",
                        tmp_path / "pred", *PREDICT_FLAGS)
    assert rc == 2
    assert_one_line_error(err, "predict", "best.pt")
    assert "format 99" in err and "unetlab 9.9.0" in err


def test_train_resume_with_a_truncated_checkpoint_changes_nothing(tmp_path, capsys, run_dir):
    bad_run = truncated_checkpoint(run_dir, tmp_path / "run")
    before = snapshot(bad_run)
    rc, _out, err = cli(capsys, "train", "--resume", bad_run, "--no-progress")
    assert rc == 2
    assert_one_line_error(err, "train", "last.pt")
    assert snapshot(bad_run) == before


def test_a_malicious_pickle_in_a_run_folder_is_refused_and_never_runs(tmp_path, capsys, run_dir):
    marker = tmp_path / "pwned"
    hostile = malicious_checkpoint(run_dir, tmp_path / "run", marker)
    data = good_dataset(tmp_path / "data")
    rc, _out, err = cli(capsys, "predict", "--model", hostile, "--input", data / "images", "--out",
                        tmp_path / "pred", *PREDICT_FLAGS)
    assert rc == 2
    assert_one_line_error(err, "predict", "best.pt")
    assert "could run code" in err and "was not loaded" in err
    rc, _out, err = cli(capsys, "train", "--resume", hostile, "--no-progress")
    assert rc == 2
    assert_one_line_error(err, "train", "last.pt")
    rc, _out, err = cli(capsys, "train", "--data", data, "--out", tmp_path / "student", "--teacher", hostile,
                        *TINY_TRAIN_FLAGS)
    assert rc == 2
    assert_one_line_error(err, "train", "best.pt")
    assert not marker.exists(), "loading a run folder executed code from it"
    assert not (tmp_path / "pred").exists() and not (tmp_path / "student").exists()
    # the payload is live: an unsafe load does create the file, so the checks above mean something
    import torch

    torch.load(checkpoint_path(hostile, "best"), weights_only=False)
    assert marker.exists()


def test_a_checkpoint_of_another_architecture_is_one_line(tmp_path, capsys, run_dir):
    other = other_architecture_checkpoint(run_dir, tmp_path / "run")
    data = good_dataset(tmp_path / "data")
    rc, _out, err = cli(capsys, "predict", "--model", other, "--input", data / "images", "--out",
                        tmp_path / "pred", *PREDICT_FLAGS)
    assert rc == 2
    assert_one_line_error(err, "predict", "best.pt")
    assert "do not fit the model" in err
    before = snapshot(other)
    rc, _out, err = cli(capsys, "train", "--resume", other, "--no-progress")
    assert rc == 2
    assert_one_line_error(err, "train", "last.pt")
    assert "do not fit the model" in err and snapshot(other) == before


def test_a_run_folder_with_a_wrong_model_json_is_one_line(tmp_path, capsys, run_dir):
    broken = wrong_model_json(run_dir, tmp_path / "run")
    data = good_dataset(tmp_path / "data")
    rc, _out, err = cli(capsys, "predict", "--model", broken, "--input", data / "images", "--out",
                        tmp_path / "pred", *PREDICT_FLAGS)
    assert rc == 2
    assert_one_line_error(err, "predict", "model.json")
    assert "'in_channels' must be a positive integer" in err


def test_predict_with_a_missing_run_folder(tmp_path, capsys):
    data = good_dataset(tmp_path / "data")
    rc, _out, err = cli(capsys, "predict", "--model", tmp_path / "no_run", "--input", data / "images", "--out",
                        tmp_path / "pred", *PREDICT_FLAGS)
    assert rc == 2
    assert_one_line_error(err, "predict", "no_run")


def test_single_paths_that_are_missing_or_not_images(tmp_path, capsys, run_dir):
    data = good_dataset(tmp_path / "data", n=1)
    (tmp_path / "notes.txt").write_text("not an image")
    rc, _out, err = cli(capsys, "predict", "--model", run_dir, "--input", tmp_path / "notes.txt", "--out",
                        tmp_path / "pred", *PREDICT_FLAGS)
    assert rc == 2
    assert_one_line_error(err, "predict", "notes.txt")
    rc, _out, err = cli(capsys, "evaluate", "--pred", tmp_path / "no_preds", "--truth", data)
    assert rc == 2
    assert_one_line_error(err, "evaluate", "no_preds")
    rc, _out, err = cli(capsys, "train", "--resume", tmp_path / "no_run")
    assert rc == 2
    assert_one_line_error(err, "train", "no_run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "notes.txt"]  # nothing was created


def test_predict_rgb_image_with_a_grey_model(tmp_path, capsys, run_dir):
    from PIL import Image

    rgb = np.zeros((48, 48, 3), np.uint8)
    rgb[10:20, 10:20] = (200, 50, 30)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    rc, _out, err = cli(capsys, "predict", "--model", run_dir, "--input", tmp_path / "colour.png", "--out",
                        tmp_path / "pred", *PREDICT_FLAGS)
    assert rc == 2
    assert_one_line_error(err, "predict", "colour.png")
    assert "the model takes 1 input channel(s), but this image has 3" in err
    rc, _out, err = cli(capsys, "predict", "--model", run_dir, "--input", tmp_path / "colour.png", "--out",
                        tmp_path / "pred", *PREDICT_FLAGS, "--channels", "2,1")
    assert rc == 2
    assert "the model takes 1 input channel(s), but --channels 2,1 selects 2 of this image's 3" in err


# --- outputs are protected -----------------------------------------------------------------------------------


def test_predict_does_not_overwrite_without_overwrite(tmp_path, capsys, run_dir):
    data = good_dataset(tmp_path / "data")
    out = tmp_path / "pred"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(out)
    rc, _out, err = cli(capsys, "predict", "--model", run_dir, "--input", data / "images", "--out", out,
                        *PREDICT_FLAGS)
    assert rc == 2
    assert_one_line_error(err, "predict", "pred")
    assert "--overwrite" in err and snapshot(out) == before
    (out / "masks").mkdir()
    (out / "masks" / "from_another_model.png").write_bytes(b"stale")
    rc, _out, err = cli(capsys, "predict", "--model", run_dir, "--input", data / "images", "--out", out,
                        *PREDICT_FLAGS, "--overwrite")
    assert rc == 0 and len(list((out / "masks").iterdir())) == 4  # the earlier prediction's outputs are gone
    assert (out / "keep.txt").read_text() == "mine"  # what predict does not write is left alone


def test_predict_rle_csv_is_never_written_into_the_input_nor_over_a_file(tmp_path, capsys, run_dir):
    data = good_dataset(tmp_path / "data")
    (data / "labels.csv").write_text("ImageId,EncodedPixels\n")  # the dataset's own ground truth
    before = snapshot(data)
    rc, _out, err = cli(capsys, "predict", "--model", run_dir, "--input", data, "--out", tmp_path / "p",
                        "--rle", data / "labels.csv", *PREDICT_FLAGS)
    assert rc == 2
    assert_one_line_error(err, "predict", "--rle CSV is inside the input folder")
    assert snapshot(data) == before and not (tmp_path / "p").exists()
    mine = tmp_path / "earlier.csv"
    mine.write_text("mine")
    rc, _out, err = cli(capsys, "predict", "--model", run_dir, "--input", data / "images", "--out", tmp_path / "p",
                        "--rle", mine, *PREDICT_FLAGS)
    assert rc == 2
    assert_one_line_error(err, "predict", "--rle CSV exists")
    assert mine.read_text() == "mine"
    rc, _out, err = cli(capsys, "predict", "--model", run_dir, "--input", data / "images", "--out", tmp_path / "p",
                        "--rle", mine, *PREDICT_FLAGS, "--overwrite")
    assert rc == 0, err
    assert mine.read_text().startswith("ImageId,EncodedPixels")


def test_predict_never_writes_into_the_input_folder(tmp_path, capsys, run_dir):
    data = good_dataset(tmp_path / "data")
    before = snapshot(data)
    rc, _out, err = cli(capsys, "predict", "--model", run_dir, "--input", data, "--out", data / "images" / "out",
                        *PREDICT_FLAGS)
    assert rc == 2
    assert_one_line_error(err, "predict", "inside the input folder")
    assert snapshot(data) == before


def test_train_does_not_overwrite_a_run_without_overwrite(tmp_path, capsys, run_dir):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    data = good_dataset(tmp_path / "data")
    before = snapshot(run)
    rc, _out, err = cli(capsys, "train", "--data", data, "--out", run, *TINY_TRAIN_FLAGS)
    assert rc == 2
    assert_one_line_error(err, "train", "run folder already exists")
    assert snapshot(run) == before


def test_train_overwrite_replaces_the_whole_run_and_only_a_run(tmp_path, capsys, run_dir):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "size_model.json").write_text("{}")  # left by the earlier run: must not outlive --overwrite
    data = good_dataset(tmp_path / "data")
    rc, _out, err = cli(capsys, "train", "--data", data, "--out", run, *TINY_TRAIN_FLAGS, "--overwrite")
    assert rc == 0, err
    assert not (run / "size_model.json").exists() and (run / "checkpoints" / "last.pt").exists()
    mine = tmp_path / "my_notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    before = snapshot(mine)
    rc, _out, err = cli(capsys, "train", "--data", data, "--out", mine, *TINY_TRAIN_FLAGS, "--overwrite")
    assert rc == 2
    assert_one_line_error(err, "train", "this folder is not one")
    assert snapshot(mine) == before


def test_resume_refuses_flags_that_change_the_run_and_takes_more_epochs(tmp_path, capsys, run_dir):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = snapshot(run)
    rc, _out, err = cli(capsys, "train", "--resume", run, "--lr", "5e-3", "--batch-size", "2")
    assert rc == 2
    assert_one_line_error(err, "train", "--resume continues the run as it was set up; it cannot change")
    assert "--lr 0.005 (was" in err and "--batch-size 2 (was" in err and f"--init {run}" in err
    assert snapshot(run) == before  # nothing written, config.yaml included
    epochs = int(read_config_value(run, "epochs"))
    rc, _out, err = cli(capsys, "train", "--resume", run, "--epochs", epochs + 1, "--no-progress")
    assert rc == 0, err
    assert read_config_value(run, "epochs") == epochs + 1
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == epochs + 2  # header + one more epoch


def test_a_run_without_validation_reports_its_best_training_loss_as_such(tmp_path, capsys):
    data = good_dataset(tmp_path / "data")
    rc, out, err = cli(capsys, "train", "--data", data, "--out", tmp_path / "run", *TINY_TRAIN_FLAGS,
                       "--val-fraction", "0")
    assert rc == 0, err
    assert out.startswith("best train_loss ") and "val_dice" not in out


def test_a_run_started_with_relative_paths_resumes_from_another_folder(tmp_path, capsys, monkeypatch):
    good_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    names = sorted(p.stem for p in (tmp_path / "data" / "images").iterdir())
    (tmp_path / "some.txt").write_text("\n".join(names[:-1]))
    rc, _out, err = cli(capsys, "train", "--data", "data", "--out", "run", "--include", "some.txt", *TINY_TRAIN_FLAGS)
    assert rc == 0, err
    assert read_config_value(tmp_path / "run", "root") == str((tmp_path / "data").resolve())
    # the same relative flags again (a script that resumes with its recipe) are no change
    rc, _out, err = cli(capsys, "train", "--resume", "run", "--data", "data", "--include", "some.txt",
                        *TINY_TRAIN_FLAGS)
    assert rc == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    epochs = int(read_config_value(tmp_path / "run", "epochs"))
    rc, _out, err = cli(capsys, "train", "--resume", tmp_path / "run", "--epochs", epochs + 1)
    assert rc == 0, err


@pytest.mark.parametrize("flags, says", [
    (["--epochs", "0"], "--epochs must be at least 1, not 0"),
    (["--epochs", "-3"], "--epochs must be at least 1, not -3"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--val-fraction", "1"], "--val-fraction must be in [0, 1)"),
    (["--seed", "-1"], "--seed must be 0 or more, not -1"),
    (["--patch-size", "7"], "--patch-size must be at least 16 pixels, not 7"),
    (["--aug-elastic", "3"], "--aug-elastic is a probability, in [0, 1], not 3.0"),
])
def test_settings_no_run_can_have_are_one_line_and_leave_no_folder(tmp_path, capsys, flags, says):
    data = good_dataset(tmp_path / "data")
    rc, _out, err = cli(capsys, "train", "--data", data, "--out", tmp_path / "run", *TINY_TRAIN_FLAGS, *flags)
    assert rc == 2
    assert_one_line_error(err, "train", says)
    assert not (tmp_path / "run").exists()


def read_config_value(run: Path, key: str):
    from unetlab.config import RunConfig, leaf_keys

    section, name = leaf_keys()[key][:2]
    return getattr(getattr(RunConfig.load(run / "config.yaml"), section), name)


def test_evaluate_does_not_overwrite_a_report_without_overwrite(tmp_path, capsys):
    data = good_dataset(tmp_path / "data")
    (tmp_path / "eval.json").write_text("{}")
    before = snapshot(tmp_path)
    rc, _out, err = cli(capsys, "evaluate", "--pred", data / "masks", "--truth", data, "--out",
                        tmp_path / "eval.json")
    assert rc == 2
    assert_one_line_error(err, "evaluate", "eval.json")
    assert snapshot(tmp_path) == before


def test_a_full_disk_is_a_one_line_error_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch, run_dir):
    import errno

    from PIL import Image

    data = good_dataset(tmp_path / "data", n=2)
    original = Image.Image.save

    def save(self, fp, *args, **kwargs):
        if "masks" in str(fp):
            Path(fp).write_bytes(b"half a png")  # some bytes reached the disk, then it was full
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    rc, _out, err = cli(capsys, "predict", "--model", run_dir, "--input", data / "images", "--out",
                        tmp_path / "pred", *PREDICT_FLAGS)
    assert rc == 2
    assert_one_line_error(err, "predict", "cells_000.png")
    assert "No space left on device" in err and "free some disk space" in err
    assert list((tmp_path / "pred" / "masks").iterdir()) == []  # neither a partial mask nor a temporary


# --- predict --resume ----------------------------------------------------------------------------------------


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_predict_resume_skips_finished_images_and_completes_the_tables(tmp_path, capsys, run_dir):
    data = good_dataset(tmp_path / "data", n=4)
    argv = ["predict", "--model", run_dir, "--input", data / "images", *PREDICT_FLAGS, "--instances"]
    rc, _out, err = cli(capsys, *argv, "--out", tmp_path / "full")
    assert rc == 0, err
    full = _files(tmp_path / "full")
    assert "counts.csv" in full and "labels/cells_002.tif" in full
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    for sub in ("masks/cells_002.png", "labels/cells_002.tif", "overlays/cells_002.png", "counts.csv",
                "objects.csv"):
        (part / sub).unlink()
    (part / "overlays" / "cells_003.png").unlink()  # killed between two outputs of one image
    (part / "masks" / ".cells_002.abcd1234.tmp.png").write_bytes(b"half")  # a write cut by a kill
    rc, out, err = cli(capsys, *argv, "--out", part, "--resume")
    assert rc == 0, err
    assert "predicted 2 image(s)" in out and "(2 already done)" in out
    assert _files(part) == full  # identical, counts and objects tables included; the temporary is gone


# --- out of memory, internal errors, --debug -----------------------------------------------------------------


def _oom_predict_fn(monkeypatch, seen: list[int], message: str = "CUDA out of memory. Tried to allocate 2 GiB",
                    always: bool = False):
    import unetlab.inference.predictor as predictor

    original = predictor.make_predict_fn

    def make(*args, **kwargs):
        fn = original(*args, **kwargs)

        def predict(batch):
            seen.append(int(batch.shape[0]))
            if batch.shape[0] > 1 or always:
                raise RuntimeError(message)
            return fn(batch)

        return predict

    monkeypatch.setattr(predictor, "make_predict_fn", make)


def test_out_of_memory_falls_back_to_smaller_tile_batches(tmp_path, capsys, caplog, monkeypatch, run_dir):
    data = good_dataset(tmp_path / "data", n=2, size=64)
    common = ["predict", "--model", run_dir, "--input", data / "images", *PREDICT_FLAGS, "--probabilities"]
    rc, _out, err = cli(capsys, *common, "--out", tmp_path / "ref", "--batch-size", "1")
    assert rc == 0, err
    seen: list[int] = []
    _oom_predict_fn(monkeypatch, seen)
    rc, _out, err = cli(capsys, *common, "--out", tmp_path / "oom", "--batch-size", "4")
    assert rc == 0, err
    tries = seen[: seen.index(1)]  # the batches that ran out of memory before the first one that fitted
    assert tries and tries[0] > 1 and all(a > b for a, b in zip(tries, tries[1:]))
    assert set(seen[len(tries):]) == {1}, "the second image should start at the batch size that fitted"
    assert any("out of memory" in r.getMessage() for r in caplog.records)
    for name in ("cells_000", "cells_001"):
        ref = read_image(tmp_path / "ref" / "probabilities" / f"{name}.tif")
        got = read_image(tmp_path / "oom" / "probabilities" / f"{name}.tif")
        np.testing.assert_allclose(got, ref, atol=1e-5)
        assert (read_label(tmp_path / "oom" / "masks" / f"{name}.png")
                == read_label(tmp_path / "ref" / "masks" / f"{name}.png")).all()


def test_out_of_memory_falls_back_when_predicting_at_the_training_size(tmp_path, capsys, monkeypatch):
    """--diameter (auto here, the default for instance models) predicts rescaled images: the same fallback."""
    import tifffile

    from test_pretrained import nuclei_image

    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "n.tif", nuclei_image(seed=2, size=160, n=8)[0])
    common = ["predict", "--model", "nuclei", "--input", tmp_path / "in", "--instances", "--no-progress",
              "--tile", "64"]
    rc, _out, err = cli(capsys, *common, "--out", tmp_path / "ref", "--batch-size", "1")
    assert rc == 0, err
    seen: list[int] = []
    _oom_predict_fn(monkeypatch, seen)
    rc, _out, err = cli(capsys, *common, "--out", tmp_path / "oom", "--batch-size", "4")
    assert rc == 0, err
    assert seen[0] > 1 and 1 in seen
    ref = read_label(tmp_path / "ref" / "labels" / "n.tif")
    assert ref.max() >= 6
    np.testing.assert_array_equal(read_label(tmp_path / "oom" / "labels" / "n.tif"), ref)


def test_out_of_memory_with_single_tiles_is_a_user_error(tmp_path, capsys, monkeypatch, run_dir):
    data = good_dataset(tmp_path / "data", n=1)
    _oom_predict_fn(monkeypatch, [], always=True)
    rc, _out, err = cli(capsys, "predict", "--model", run_dir, "--input", data / "images", "--out",
                        tmp_path / "pred", *PREDICT_FLAGS, "--batch-size", "2")
    assert rc == 2
    assert_one_line_error(err, "predict", "cells_000.tif")
    assert "out of memory" in err and "--tile" in err


def test_internal_error_exits_1_with_one_line_and_a_traceback_only_under_debug(tmp_path, capsys, monkeypatch,
                                                                                run_dir):
    data = good_dataset(tmp_path / "data", n=1)
    _oom_predict_fn(monkeypatch, [], message="cuDNN error: CUDNN_STATUS_INTERNAL_ERROR\nmore detail")
    def argv(out):
        return ["predict", "--model", run_dir, "--input", data / "images", "--out", out, *PREDICT_FLAGS,
                "--batch-size", "4"]

    rc, _out, err = cli(capsys, *argv(tmp_path / "pred"))
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "internal error: RuntimeError: cuDNN error" in lines[0]
    assert "--debug" in lines[0] and "Traceback" not in err
    with pytest.raises(RuntimeError, match="CUDNN_STATUS_INTERNAL_ERROR"):
        main(["--debug", *map(str, argv(tmp_path / "pred2"))])


def test_user_error_under_debug_raises_the_unetlab_error(tmp_path):
    from unetlab.errors import UnetlabError

    with pytest.raises(UnetlabError, match="data folder not found"):
        main(["--debug", "inspect", str(tmp_path / "missing")])


def test_the_real_command_line_prints_one_stderr_line_per_failure(tmp_path, run_dir):
    """A fresh process with logging set up as the console script does: no log line precedes the error."""
    case = build_case("truncated_mask", tmp_path / "cases")
    image_case = build_case("truncated_image", tmp_path / "cases")
    calls = {
        "inspect": ["inspect", str(case.data)],
        "train": ["train", "--data", str(case.data), "--out", str(tmp_path / "run"), *TINY_TRAIN_FLAGS],
        "predict": ["predict", "--model", str(run_dir), "--input", str(image_case.predict_input), "--out",
                    str(tmp_path / "pred"), *PREDICT_FLAGS],
        "evaluate": ["-q", "evaluate", "--pred", str(case.pred), "--truth", str(case.data)],
    }
    driver = textwrap.dedent(f"""
        import logging, sys
        from unetlab.cli import main
        for name, argv in {calls!r}.items():
            for handler in logging.root.handlers[:]:  # each call configures logging as a fresh process would
                logging.root.removeHandler(handler)
            print("@@", name, file=sys.stderr, flush=True)
            code = main(argv)
            print("@@ exit", code, file=sys.stderr, flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=120)
    blocks = proc.stderr.split("@@ ")[1:]
    got = {}
    for head, tail in zip(blocks[::2], blocks[1::2]):
        got[head.splitlines()[0]] = (int(tail.split()[1]), [ln for ln in head.splitlines()[1:] if ln.strip()])
    names = {"inspect": "cells_002.png", "train": "cells_002.png", "predict": "cells_001.tif",
             "evaluate": "cells_002.png"}
    assert set(got) == set(calls), proc.stderr
    for command, (code, lines) in got.items():
        assert code == 2, (command, proc.stderr)
        assert len(lines) == 1, f"{command}: {lines}"
        assert lines[0].startswith(f"unetlab {command}: error:") and names[command] in lines[0]
    assert "Traceback" not in proc.stderr
