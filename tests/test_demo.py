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
    assert report["n_images"] == 4 and report["mean"]["dice"] > 0.6  # two short epochs already find the cells
    assert len(list((out / "predictions" / "overlays").glob("*.png"))) == 4
    assert (out / "run" / "curves.png").exists() and (out / "predictions" / "counts.csv").exists()
    assert main(["demo", "--out", str(out), "--minutes", "0.3"]) == 2  # existing folder needs --overwrite
