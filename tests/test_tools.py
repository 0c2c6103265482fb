"""The training workbench: lr-find, the one-batch overfit check and compare (API and command line)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unetlab.cli import main
from unetlab.config import RunConfig, apply_overrides
from unetlab.errors import UnetlabError
from unetlab.training import train
from unetlab.training import trainer as trainer_module
from unetlab.training.tools import (
    compare,
    format_table,
    lr_find,
    overfit_check,
    plot_lr_find,
    smooth_losses,
    suggest_lr,
)

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
TINY = {"preset": "unet", "depth": 2, "base_width": 8, "patch_size": 64, "batch_size": 8, "samples_per_epoch": 32,
        "tensorboard": False, "seed": 0}
TINY_FLAGS = ["--depth", "2", "--base-width", "8", "--patch-size", "64", "--batch-size", "4"]


pytestmark = pytest.mark.usefixtures("one_thread")


def config(root: Path, **over) -> RunConfig:
    return apply_overrides(RunConfig(), {**TINY, "root": str(root), **over})


def png_ok(path: Path, max_bytes: int = 200_000) -> tuple[int, int]:
    assert path.exists() and 0 < path.stat().st_size < max_bytes
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


# --- lr-find -------------------------------------------------------------------------------------------------


def test_smoothing_is_bias_corrected_and_lags_a_step():
    assert smooth_losses([2.0] * 5, 0.9) == pytest.approx([2.0] * 5)  # no pull towards 0 at the start
    s = smooth_losses([1.0] * 10 + [0.0] * 10, 0.9)
    assert s[9] == pytest.approx(1.0) and 0 < s[10] < 1.0 and s[-1] < s[10]


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = np.logspace(-6, 0, 121)
    x = np.log10(lrs)
    # falls fastest at 1e-3, bottoms out near 1e-1, then blows up
    loss = 1 - np.tanh(1.5 * (x + 3)) + np.where(x > -1, 30 * (x + 1) ** 2, 0)
    suggestion, method, at_min = suggest_lr(lrs, loss)
    assert method == "steepest" and suggestion == pytest.approx(1e-3, rel=0.15)
    assert 0.05 < at_min < 0.2
    # a curve that only rises: nothing to descend, a tenth of the minimum instead
    suggestion, method, at_min = suggest_lr(lrs, np.linspace(1, 2, 121))
    assert method == "min/10" and at_min == lrs[0] and suggestion == pytest.approx(lrs[0] / 10)


def _lr_find_data(which: str, cells: Path) -> Path:
    if which == "synthetic":
        return cells
    path = SHARED_DATA / which
    if not path.exists():
        pytest.skip(f"real dataset ../shared/data/{which} is not available on this machine")
    return path


@pytest.mark.parametrize("which", ["synthetic", pytest.param("isbi2012", marks=[pytest.mark.realdata,
                                                                                 pytest.mark.slow])])
def test_lr_find_suggests_a_rate_that_trains_and_100x_does_not(which, cells, tmp_path):
    cfg = config(_lr_find_data(which, cells), epochs=3, schedule="constant", max_recoveries=0)
    result = lr_find(cfg, steps=60)
    n = len(result.lrs)
    assert 20 <= n <= 60 and len(result.losses) == len(result.smoothed) == n
    assert all(b > a for a, b in zip(result.lrs, result.lrs[1:]))  # an increasing sweep
    assert result.lrs[0] == pytest.approx(1e-6) and 1e-6 < result.suggestion < 1.0
    assert result.suggestion <= result.lr_at_min / 10 * 1.0001
    size = png_ok(plot_lr_find(result, tmp_path / "lr.png"))
    assert size[0] > 300

    def final_loss(lr: float) -> float:
        run = train(apply_overrides(cfg, {"lr": lr}), None, progress=False)
        return run.history[-1]["train_loss"] if run.history and not run.recoveries else math.inf

    start = result.losses[0]  # the same initial weights and first batch as the runs below
    at_suggestion = final_loss(result.suggestion)
    assert at_suggestion < 0.7 * start  # trains
    assert not final_loss(100 * result.suggestion) < 1.5 * at_suggestion  # a hundred times more trains worse


def test_lr_auto_runs_lr_find_and_leaves_the_initial_weights_alone(cells, tmp_path, monkeypatch):
    found = []

    def quick_lr_find(cfg):
        found.append(lr_find(cfg, steps=20))
        return found[-1]

    monkeypatch.setattr(trainer_module, "lr_find", quick_lr_find)  # where the trainer looks it up
    auto = train(config(cells, epochs=1, lr="auto"), tmp_path / "auto", progress=False)
    (result,) = found
    saved = RunConfig.load(tmp_path / "auto" / "config.yaml")
    assert saved.train.lr == pytest.approx(result.suggestion)
    fixed = train(config(cells, epochs=1, lr=result.suggestion), tmp_path / "fixed", progress=False)
    assert auto.history[0]["train_loss"] == fixed.history[0]["train_loss"]  # same seed, same start


def test_lr_find_rejects_a_bad_range(cells):
    with pytest.raises(UnetlabError, match="lr_min < lr_max"):
        lr_find(config(cells), steps=10, lr_min=1e-2, lr_max=1e-3)


# --- overfit -------------------------------------------------------------------------------------------------


def test_overfit_check_memorises_one_batch_at_a_sensible_rate(cells):
    rows = overfit_check(config(cells, batch_size=4), lrs=[1e-6, 3e-2], steps=80, tolerance=0.15)
    tiny, sensible = rows
    assert sensible["passed"] and 0 < sensible["steps_to_tolerance"] < 80
    assert sensible["final_loss"] <= 0.15 < sensible["start_loss"]
    assert not tiny["passed"] and tiny["steps_to_tolerance"] is None and tiny["best_loss"] > 0.5
    assert tiny["start_loss"] == sensible["start_loss"]  # the same batch and initial weights for every rate
    text = format_table(rows)
    assert "steps_to_tolerance" in text and len(text.splitlines()) == 3


def test_overfit_command_table_and_exit_codes(cells, capsys):
    rc = main(["overfit", "--data", str(cells), "--lrs", "3e-2", "--steps", "80", "--tolerance", "0.15",
               *TINY_FLAGS])
    out = capsys.readouterr().out
    assert rc == 0 and "memorised one batch" in out and "passed" in out
    rc = main(["overfit", "--data", str(cells), "--lrs", "1e-9", "--steps", "3", *TINY_FLAGS])
    assert rc == 1 and "no learning rate reached" in capsys.readouterr().out
    assert main(["overfit", "--data", str(cells), "--lrs", "fast", *TINY_FLAGS]) == 2


def test_lr_find_command_prints_the_suggestion_and_draws(cells, tmp_path, capsys):
    png = tmp_path / "lr.png"
    rc = main(["lr-find", "--data", str(cells), "--steps", "20", "--out", str(png), *TINY_FLAGS])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("suggested learning rate ")
    float(out.split()[3])
    png_ok(png)


# --- compare -------------------------------------------------------------------------------------------------


def test_compare_trains_on_one_split_and_writes_table_and_chart(cells, tmp_path, capsys, caplog):
    small, wide = tmp_path / "small.yaml", tmp_path / "wide.yaml"
    small.write_text("model: {depth: 2, base_width: 4}\ntrain: {epochs: 2, lr: 0.01, loss: bce}\n")
    wide.write_text("model: {depth: 2, base_width: 8}\ntrain: {epochs: 2, lr: 0.01, seed: 7}\n")
    out = tmp_path / "cmp"
    with caplog.at_level("WARNING"):
        rc = main(["compare", str(small), str(wide), "--data", str(cells), "--out", str(out), "--patch-size", "64",
                   "--samples-per-epoch", "32", "--tensorboard", "false", "--no-progress"])
    assert "wide sets seed 7; it trains with the first config's seed 0" in caplog.text
    printed = capsys.readouterr().out
    assert rc == 0 and "small" in printed and "wide" in printed
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["name"] for r in rows] == ["small", "wide"]
    for r in rows:
        run = out / r["name"]
        metrics = list(csv.DictReader((run / "metrics.csv").open()))
        assert float(r["val_dice"]) == pytest.approx(max(float(m["val_dice"]) for m in metrics))
        assert json.loads((run / "split.json").read_text())["val"] == json.loads(
            (out / "split.json").read_text())["val"]
        assert RunConfig.load(run / "config.yaml").train.seed == 0  # the first config's seed for all
    assert int(rows[1]["parameters"]) > int(rows[0]["parameters"])
    assert RunConfig.load(out / "small" / "config.yaml").train.loss == "bce"
    png_ok(out / "compare.png")
    # the folder is not silently reused
    with pytest.raises(UnetlabError, match="already exists"):
        compare([small], cells, out)
