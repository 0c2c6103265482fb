"""A path that is not a run folder is one line that says so, and suggests the run that holds it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from corpus.make_corpus import tiny_run
from unetlab.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("runfolder"))


@pytest.fixture
def images(tmp_path) -> Path:
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", np.zeros((32, 32), np.uint16))
    return tmp_path / "in"


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "config file not found" not in lines[0] and "run folder not found" not in lines[0]
    return lines[0]


@pytest.mark.parametrize("inside", ["checkpoints/best.pt", "checkpoints", "metrics.csv", "checkpoints/bset.pt"])
def test_a_path_inside_a_run_suggests_the_run(run, images, tmp_path, capsys, inside):
    line = _error(capsys, ["predict", "--model", str(run / inside), "--input", str(images),
                           "--out", str(tmp_path / "o")])
    why = "is not a run folder (no config.yaml)" if (run / inside).exists() else "not found"
    assert f"{run / inside} {why}; did you mean {run}?" in line
    assert not (tmp_path / "o").exists()


def test_resume_from_a_checkpoint_suggests_its_run(run, capsys, monkeypatch):
    monkeypatch.chdir(run.parent)  # a relative path gets a relative suggestion
    line = _error(capsys, ["train", "--resume", "run/checkpoints/last.pt"])
    assert line.endswith("run/checkpoints/last.pt is not a run folder (no config.yaml); did you mean run?")


def test_a_folder_that_is_no_run_says_so(images, tmp_path, capsys):
    line = _error(capsys, ["export", str(images)])
    assert f"{images} is not a run folder (no config.yaml)" in line and "did you mean" not in line
