"""The demo command end to end (shortened): synthetic data, training, prediction, evaluation, overlays."""

from __future__ import annotations

import json

import pytest

from unetlab.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--minutes", "0.3"]) == 0
    printed = capsys.readouterr().out
    assert "held-out Dice" in printed
    report = json.loads((out / "evaluation.json").read_text())
    assert report["n_images"] == 4 and report["mean"]["dice"] > 0.6  # one or two short epochs find the cells
    assert len(list((out / "predictions" / "overlays").glob("*.png"))) == 4
    assert (out / "run" / "curves.png").exists() and (out / "predictions" / "counts.csv").exists()
    assert main(["demo", "--out", str(out), "--minutes", "0.3"]) == 2  # existing folder needs --overwrite


def test_demo_stops_at_its_time_budget(tmp_path):
    """--minutes is a budget: the demo stops at the last epoch that fits, however slow the machine."""
    from unetlab.demo import run_demo

    # 0.06 s of training, sized for 2 epochs: a first epoch longer than 0.03 s leaves no time for a second
    result = run_demo(tmp_path / "demo", minutes=0.001, n_train=5, n_test=1)
    assert result["epochs_run"] < result["epochs"]
    summary = json.loads((tmp_path / "demo" / "run" / "summary.json").read_text())
    assert summary["stop_reason"].startswith("time budget") and summary["epochs_run"] == result["epochs_run"]


def test_demo_overwrite_replaces_only_a_demo_folder(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "important.txt").write_text("keep")
    assert main(["demo", "--out", str(mine), "--overwrite"]) == 2
    assert "holds other files" in capsys.readouterr().err
    assert (mine / "important.txt").read_text() == "keep"
    assert main(["demo", "--out", str(mine / "important.txt")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
