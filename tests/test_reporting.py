"""What a run tells its user: val Dice beside the Dice of a model that learnt nothing (console, curves.png) and a
warning when it is not beaten, the time estimate after the first epoch, epoch lines from the Python API and with
output redirected, object scores only for instance targets, the precision in summary.json, whole-epoch ticks and
the demo's time budget. Tiny models on tiny synthetic cells."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import unetlab
from unetlab.inference.predictor import precision_name
from unetlab.training.reporting import (
    BASELINE_EVALUATIONS,
    baseline_warning,
    curves_figure,
    epoch_line,
    time_budget_reached,
    time_estimate,
)
from unetlab.training.validation import constant_prediction_dice

pytestmark = pytest.mark.usefixtures("one_thread")

# a network of 7.6k parameters on 32 px patches: an epoch takes a fraction of a second
TINY_FLAGS = ["--preset", "unet", "--depth", "2", "--base-width", "4", "--patch-size", "32", "--batch-size", "4",
              "--samples-per-epoch", "8", "--tensorboard", "false", "--precision", "fp32", "--val-fraction", "0.4",
              "--seed", "0"]
TINY = {"preset": "unet", "depth": 2, "base_width": 4, "patch_size": 32, "batch_size": 4, "samples_per_epoch": 8,
        "tensorboard": False, "precision": "fp32", "val_fraction": 0.4, "seed": 0}


@pytest.fixture(scope="module")
def tiny_cells(tmp_path_factory) -> Path:
    """Five synthetic 64x64 cell images with instance masks."""
    from unetlab.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("tiny"), n_images=5, size=(64, 64), seed=0)


def _env() -> dict:
    """The environment of a subprocess that imports this very unetlab, on one thread."""
    src = str(Path(unetlab.__file__).resolve().parents[1])
    return dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
                UNETLAB_THREADS="1")


def _row(epoch: int, dice: float | None = None, base: float = 0.8692, seconds: float = 2.0) -> dict:
    row = {"epoch": epoch, "train_loss": 0.3, "lr": 1e-3, "seconds": seconds}
    if dice is not None:
        row.update(val_dice=dice, val_iou=dice / 2, all_foreground_dice=base, baseline_dice=base)
    return row


# --- the pieces -----------------------------------------------------------------------------------------------


def test_epoch_line_shows_the_baseline_beside_val_dice():
    line = epoch_line(_row(3, 0.8693), 40)
    assert "val Dice 0.8693 (all-foreground 0.8692)" in line and line.startswith("epoch 3/40")
    assert "val Dice" not in epoch_line(_row(2), 40)  # an epoch without validation has no Dice and no baseline


def test_constant_prediction_dice_is_the_stronger_of_all_foreground_and_all_background():
    assert constant_prediction_dice([30.0], 100.0) == pytest.approx(60 / 130)  # all foreground
    assert constant_prediction_dice([0.0], 100.0) == 1.0  # no object anywhere: all background is perfect
    # two classes of 30 and 10 pixels in 100: every pixel class 1 gives (60/130 + 0) / 2
    assert constant_prediction_dice([30.0, 10.0], 100.0) == pytest.approx(60 / 130 / 2)


def test_warning_when_the_model_has_not_beaten_the_baseline_after_three_evaluations():
    stuck = [_row(e, 0.8693) for e in range(1, BASELINE_EVALUATIONS + 1)]
    warning = baseline_warning(stuck)
    assert warning and "has not beaten 0.8692" in warning and "--lr" in warning and "foreground" in warning
    assert baseline_warning(stuck[:2]) is None  # too early to tell
    assert baseline_warning([*stuck, _row(4, 0.8693)]) is None  # said once
    assert baseline_warning([*stuck[:2], _row(3, 0.95)]) is None  # it learnt
    assert baseline_warning([*stuck, _row(4)]) is None  # an epoch without validation says nothing


def test_time_estimate_after_the_first_epoch():
    line = time_estimate(_row(1, 0.5, seconds=114.0), 40)
    assert line == "epoch 1 took 114 s; about 76 min for 40 epochs (validation included)"
    assert "validation not included" in time_estimate(_row(1, seconds=10.0), 5)
    assert "stops it sooner" in time_estimate(_row(1, 0.5, seconds=30.0), 10, max_minutes=2)
    assert time_budget_reached(100.0, 30.0, 2.0) and not time_budget_reached(60.0, 30.0, 2.0)
    assert not time_budget_reached(1e9, 30.0, None)


def test_curves_tick_whole_epochs_and_draw_the_baseline():
    history = [_row(1, 0.5), _row(2, 0.7)]  # two epochs: matplotlib alone would tick 1.0, 1.2, ... 2.0
    fig = curves_figure(history)
    try:
        fig.canvas.draw()
        for ax in fig.axes:
            ticks = list(ax.get_xticks())
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
        labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
        assert any("all-foreground" in t for t in labels)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_precision_names():
    import torch

    assert [precision_name(d) for d in (None, torch.bfloat16, torch.float16)] == ["fp32", "bf16", "fp16"]


# --- runs -----------------------------------------------------------------------------------------------------


def test_semantic_run_with_output_redirected(tiny_cells, tmp_path):
    """A binary (semantic) run that learns nothing (a learning rate of 1e-12), stderr to a file: an epoch line
    with the baseline every epoch, the time estimate, the warning, no progress bar, no object scores, and the
    precision in summary.json."""
    run, err = tmp_path / "run", tmp_path / "stderr.txt"
    with err.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "unetlab", "--threads", "1", "train", "--data", str(tiny_cells),
                               "--out", str(run), "--epochs", "3", "--lr", "1e-12", "--schedule", "constant",
                               "--collapse-patience", "0", *TINY_FLAGS], env=_env(), stdout=subprocess.PIPE,
                              stderr=f, text=True, timeout=300)
    text = err.read_text()
    assert proc.returncode == 0, text
    for e in (1, 2, 3):
        (line,) = [ln for ln in text.splitlines() if ln.startswith(f"epoch {e}/3 ")]
        assert "(all-foreground " in line
    assert "epoch 1 took " in text and "for 3 epochs (validation included)" in text
    assert text.count("has not beaten") == 1
    assert "AP@0.5" not in text and "DSB" not in text and "tuned" not in text
    assert "\r" not in text and "batch/s" not in text  # no progress bar without a terminal
    summary = json.loads((run / "summary.json").read_text())
    assert summary["precision"] == "fp32" and summary["postprocess"] is None
    # asked for, `unetlab tune` still tunes a binary run's post-processing for predict --instances
    from unetlab.cli import main
    from unetlab.config import RunConfig

    threshold = RunConfig.load(run / "config.yaml").postprocess.threshold
    assert main(["tune", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["postprocess"]["validation_objects"]
    assert RunConfig.load(run / "config.yaml").postprocess.threshold == threshold  # its masks' threshold stays


def test_instance_run_prints_object_scores_and_the_tuned_settings_once(tiny_cells, tmp_path, caplog, capsys):
    from unetlab.cli import main
    from unetlab.training import train

    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="unetlab"):
        train(unetlab.config_with(root=str(tiny_cells), epochs=1, target="distance", **TINY), run, progress=False)
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "AP@0.5" in m]) == 1
    assert len([m for m in messages if "threshold" in m]) == 1  # the tuned post-processing, once
    assert json.loads((run / "summary.json").read_text())["postprocess"]["validation_objects"]
    # `unetlab tune` prints its result line and does not log the same settings again
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="unetlab"):
        assert main(["tune", str(run)]) == 0
    printed = capsys.readouterr().out + "".join(r.getMessage() for r in caplog.records)
    assert printed.count("threshold") == 1 and "validation AP@0.5" in printed


def test_python_api_logs_epoch_lines_without_logging_configured_and_once_with(tiny_cells, tmp_path):
    script = textwrap.dedent("""
        import logging, sys
        import torch
        import unetlab

        torch.set_num_threads(1)
        keys = dict(root=sys.argv[1], epochs=2, **{TINY!r})
        unetlab.train(unetlab.config_with(**keys), sys.argv[2] + "/a")
        print("--- configured", file=sys.stderr, flush=True)
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        unetlab.train(unetlab.config_with(**keys), sys.argv[2] + "/b")
    """).replace("{TINY!r}", repr(TINY))
    proc = subprocess.run([sys.executable, "-c", script, str(tiny_cells), str(tmp_path)], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    bare, configured = proc.stderr.split("--- configured")
    for part in (bare, configured):
        assert part.count("epoch 1/2 ") == 1 and part.count("epoch 2/2 ") == 1, part
        assert "epoch 1 took " in part
