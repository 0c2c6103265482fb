"""The trainer itself: it learns, it is reproducible, it resumes exactly, the collapse guard recovers,
early stopping stops and a student learns from a teacher run. Tiny models on synthetic cells."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from unetlab.config import RunConfig, apply_overrides
from unetlab.errors import UnetlabError
from unetlab.runfolder import checkpoint_path, load_checkpoint
from unetlab.training import train
from unetlab.training import trainer as trainer_module
from unetlab.training.guard import collapsed, healthy

TINY = {"preset": "unet", "depth": 2, "base_width": 8, "patch_size": 64, "batch_size": 8, "samples_per_epoch": 32,
        "tensorboard": False, "lr": 1e-2, "val_fraction": 0.2, "seed": 0}
TINY_FLAGS = ["--preset", "unet", "--depth", "2", "--base-width", "8", "--patch-size", "64", "--batch-size", "8",
              "--samples-per-epoch", "32", "--tensorboard", "false", "--lr", "1e-2", "--val-fraction", "0.2",
              "--seed", "0", "--no-progress"]
EPOCHS = 5
# The collapse is forced (see ``forced_collapse``), not hoped for from a diverging learning rate
COLLAPSE = {"epochs": 8, "collapse_patience": 2, "max_recoveries": 4}
COLLAPSE_FROM = 3  # the first epoch whose training and validation see the collapsed network


pytestmark = pytest.mark.usefixtures("one_thread")


def config(root: Path, **over) -> RunConfig:
    return apply_overrides(RunConfig(), {**TINY, "root": str(root), **over})


def metrics(run: Path) -> list[dict]:
    return list(csv.DictReader((run / "metrics.csv").open()))


def assert_same_metrics(a: list[dict], b: list[dict], tol: float = 1e-6) -> None:
    assert len(a) == len(b)
    assert a and set(a[0]) == set(b[0])
    for ra, rb in zip(a, b):
        for k in ra:
            if k == "seconds":
                continue
            assert float(ra[k]) == pytest.approx(float(rb[k]), abs=tol, rel=0), (ra["epoch"], k)


@pytest.fixture(scope="module")
def baseline(cells, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("baseline") / "run"
    train(config(cells, epochs=EPOCHS), run, progress=False)
    return run


def test_training_lowers_the_loss_and_beats_the_trivial_baseline(baseline):
    rows = metrics(baseline)
    assert len(rows) == EPOCHS
    losses = [float(r["train_loss"]) for r in rows]
    dice, trivial = float(rows[-1]["val_dice"]), float(rows[-1]["all_foreground_dice"])
    assert losses[-1] < 0.8 * losses[0]  # seen here: 1.15 -> 0.68
    assert dice > 0.8 and dice > trivial + 0.3  # seen here: 0.95 against 0.25 for "everything is a cell"
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < 0.7 * losses[0]
    dice = [float(r["val_dice"]) for r in rows]
    all_foreground = float(rows[0]["all_foreground_dice"])  # predicting "cell" everywhere
    assert max(dice) > 0.75 and max(dice) > all_foreground + 0.3
    summary = json.loads((baseline / "summary.json").read_text())
    assert summary["best_metric"] == pytest.approx(max(dice))
    assert summary["stop_reason"] == "finished" and summary["recoveries"] == []
    best = load_checkpoint(checkpoint_path(baseline, "best"))
    assert best["epoch"] == summary["best_epoch"] == 1 + dice.index(max(dice))


def test_seeded_runs_give_the_same_metrics_and_another_seed_does_not(cells, tmp_path):
    a = train(config(cells, epochs=2), tmp_path / "a", progress=False)
    b = train(config(cells, epochs=2), tmp_path / "b", progress=False)
    c = train(config(cells, epochs=2, seed=1), tmp_path / "c", progress=False)
    assert_same_metrics(metrics(tmp_path / "a"), metrics(tmp_path / "b"), tol=0)
    assert a.history[-1]["train_loss"] == b.history[-1]["train_loss"]
    assert c.history[-1]["train_loss"] != a.history[-1]["train_loss"]


def _epochs_written(run: Path) -> int:
    try:
        return len(metrics(run))
    except (FileNotFoundError, OSError):
        return 0


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(cells, baseline, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "unetlab", "-q", "train", "--data", str(cells), "--out", str(run), "--epochs",
           str(EPOCHS), *TINY_FLAGS]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while not (checkpoint_path(run, "last").exists() and _epochs_written(run) >= 1):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no checkpoint within 2 minutes"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done = _epochs_written(run)
    assert 1 <= done < EPOCHS and not (run / "summary.json").exists(), "the run was not interrupted"
    resumed = subprocess.run([sys.executable, "-m", "unetlab", "-q", "train", "--resume", str(run),
                              "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_metrics(metrics(run), metrics(baseline))
    assert json.loads((run / "summary.json").read_text())["epochs_run"] == EPOCHS


def test_collapsed_spots_stuck_dice_only_while_the_loss_is_flat():
    def rows(dice, losses, fg=0.25):
        return [{"epoch": i + 1, "train_loss": loss, "val_dice": d, "all_foreground_dice": fg}
                for i, (d, loss) in enumerate(zip(dice, losses))]

    assert collapsed(rows([0, 0, 0], [1.0, 1.0, 1.0]), 3) == "validation Dice stuck at 0"
    assert "all-foreground" in collapsed(rows([0.25, 0.25, 0.25], [2.0, 2.1, 2.0]), 3)
    assert collapsed(rows([0, 0, 0], [1.2, 0.97, 0.84]), 3) is None  # Dice 0 but still learning
    assert collapsed(rows([0, 0.3, 0], [1.0, 1.0, 1.0]), 3) is None  # not stuck
    assert collapsed(rows([0, 0], [1.0, 1.0]), 3) is None  # too few evaluations
    assert collapsed(rows([0, 0, 0], [1.0, 1.0, 1.0]), 0) is None  # guard off
    assert collapsed(rows([0.9, 0, 0], [1.0, 1.0, 1.0]), 2) == "validation Dice stuck at 0"
    assert healthy({"val_dice": 0.6, "all_foreground_dice": 0.25})
    assert not healthy({"val_dice": 0.25, "all_foreground_dice": 0.25})
    assert not healthy({"val_dice": 0.0, "all_foreground_dice": 0.25})


def collapse_network_until_a_recovery(trainer) -> None:
    """From epoch COLLAPSE_FROM until the guard's first recovery, the network outputs a constant far below
    zero whatever its input or weights: validation Dice is exactly 0 and the loss is flat, on any CPU.

    The hook is on the trained module, so the copies validation predicts with (BatchNorm folded) carry it.
    Without a working guard nothing ever lifts the collapse, and the run ends with Dice 0."""

    def hook(module, inputs, output):
        if trainer.epoch + 1 >= COLLAPSE_FROM and not trainer.recoveries:  # epoch k: trainer.epoch is k - 1
            return output * 0.0 - 20.0  # keeps the autograd graph; every gradient is zero
        return output

    trainer.model.register_forward_hook(hook)


def force_collapse(mp: pytest.MonkeyPatch) -> None:
    """Every Trainer created while ``mp`` is active gets the collapsing hook."""
    real_init = trainer_module.Trainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        collapse_network_until_a_recovery(self)

    mp.setattr(trainer_module.Trainer, "__init__", init)


@pytest.fixture
def forced_collapse(monkeypatch):
    force_collapse(monkeypatch)


@pytest.fixture(scope="module")
def collapse_run(cells, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("collapse") / "run"
    with pytest.MonkeyPatch.context() as mp:
        force_collapse(mp)
        train(config(cells, **COLLAPSE), run, progress=False)
    return run


def test_collapse_guard_recovers_a_forced_collapse(collapse_run):
    summary = json.loads((collapse_run / "summary.json").read_text())
    rows = metrics(collapse_run)
    (event,) = summary["recoveries"]  # one recovery lifts the forced collapse
    last_collapsed = COLLAPSE_FROM + COLLAPSE["collapse_patience"] - 1
    assert event["epoch"] == last_collapsed and event["reason"] == "validation Dice stuck at 0"
    assert event["restored"] == f"last good state (epoch {COLLAPSE_FROM - 1})"
    assert event["lr_now"] < float(rows[COLLAPSE_FROM - 2]["lr"])  # a lower rate than the healthy epoch had
    assert [float(r["val_dice"]) for r in rows[COLLAPSE_FROM - 1:last_collapsed]] == [0.0] * 2
    assert summary["stop_reason"] == "finished" and len(rows) == COLLAPSE["epochs"]
    assert float(rows[-1]["val_dice"]) > 0.6 and summary["best_metric"] > 0.6  # clearly learned after all


def test_without_the_guard_a_forced_collapse_stays_collapsed(cells, tmp_path, forced_collapse):
    """The same run with the guard off (patience 0) ends at Dice 0: the forced collapse is real."""
    result = train(config(cells, **{**COLLAPSE, "epochs": 5, "collapse_patience": 0}), tmp_path / "run",
                   progress=False)
    assert not result.recoveries
    assert result.history[COLLAPSE_FROM - 2]["val_dice"] > 0.3  # healthy before the collapse
    assert all(h["val_dice"] == 0.0 for h in result.history[COLLAPSE_FROM - 1:])


def test_a_collapse_seen_at_the_last_epoch_is_not_recovered(cells, tmp_path, forced_collapse):
    """Nothing is left to train after the last epoch: the guard does not restore and lower the rate there
    (best.pt already holds the best weights), so the run finishes as it is."""
    last = COLLAPSE_FROM + COLLAPSE["collapse_patience"] - 1  # the epoch the guard sees the collapse
    result = train(config(cells, **{**COLLAPSE, "epochs": last}), tmp_path / "run", progress=False)
    assert not result.recoveries and result.epochs_run == last
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "finished" and summary["best_metric"] > 0.3


def test_resume_after_a_recovery_matches_the_uninterrupted_run(cells, collapse_run, tmp_path, monkeypatch,
                                                                forced_collapse):
    events = json.loads((collapse_run / "summary.json").read_text())["recoveries"]
    stop_after = events[0]["epoch"] + 2  # interrupt after the first recovery
    real_save = trainer_module.save_checkpoint

    def save_then_stop(path, state):
        out = real_save(path, state)
        if Path(path).name == "last.pt" and state["epoch"] == stop_after:
            raise KeyboardInterrupt  # as if killed right after this checkpoint
        return out

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_stop)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(config(cells, **COLLAPSE), run, progress=False)
    monkeypatch.setattr(trainer_module, "save_checkpoint", real_save)
    assert load_checkpoint(checkpoint_path(run, "last"))["recoveries"]
    train(None, run, resume=True, progress=False)
    assert_same_metrics(metrics(run), metrics(collapse_run))
    resumed = json.loads((run / "summary.json").read_text())["recoveries"]
    assert [e["epoch"] for e in resumed] == [e["epoch"] for e in events]


def test_non_finite_loss_restarts_from_fresh_weights_at_a_lower_rate(cells, tmp_path, monkeypatch):
    real = trainer_module.make_loss_fn
    calls = {"n": 0}

    def poisoned(cfg, info):
        loss_fn = real(cfg, info)

        def fn(logits, target, weight=None):
            calls["n"] += 1
            loss = loss_fn(logits, target, weight)
            return loss * math.nan if calls["n"] == 2 else loss  # one bad batch in the first epoch

        return fn

    monkeypatch.setattr(trainer_module, "make_loss_fn", poisoned)
    result = train(config(cells, epochs=3, lr=1e-2), tmp_path / "run", progress=False)
    (event,) = result.recoveries
    assert event["reason"].startswith("non-finite loss") and event["epoch"] == 1
    assert event["restored"] == "fresh weights" and event["lr_now"] < 1e-2
    assert result.epochs_run == 3 and all(math.isfinite(h["train_loss"]) for h in result.history)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["recoveries"][0]["reason"] == event["reason"]


def test_early_stopping_stops_after_patience_evaluations_without_improvement(cells, tmp_path):
    # a rate too small to change anything: the score never improves on the first evaluation
    result = train(config(cells, epochs=10, lr=1e-9, schedule="constant", early_stopping=2, collapse_patience=0),
                   tmp_path / "run", progress=False)
    assert result.epochs_run == 3 and result.best_epoch == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"].startswith("early stopping")
    assert len(metrics(tmp_path / "run")) == 3
    assert load_checkpoint(checkpoint_path(tmp_path / "run", "last"))["epoch"] == 3


def test_student_learns_from_a_teacher_run(cells, baseline, tmp_path, caplog):
    student = config(cells, epochs=4, base_width=4, lr=1e-2, teacher=str(baseline), distill_weight=0.7)
    with caplog.at_level("WARNING"):
        result = train(student, tmp_path / "student", progress=False)
    assert "trained on" not in caplog.text  # the same seed and data: the teacher's split, no leak
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.85 * losses[0]  # seen here: 0.52 -> 0.37; the margin leaves room for other CPUs
    assert result.best_metric > 0.6
    saved = RunConfig.load(tmp_path / "student" / "config.yaml")
    assert saved.train.teacher == str(baseline) and saved.model.base_width == 4
    # a teacher with another output (two-class boundary target) is refused with a clear message
    with pytest.raises(UnetlabError, match="teacher predicts"):
        train(config(cells, epochs=1, target="boundary", teacher=str(baseline)), tmp_path / "bad", progress=False)
    # a student whose validation images trained the teacher is warned (another seed draws another split)
    caplog.clear()
    with caplog.at_level("WARNING"):
        train(config(cells, epochs=1, seed=5, teacher=str(baseline)), tmp_path / "leaky", progress=False)
    assert "trained on 1 of this run's 1 validation/test images" in caplog.text
    # and so is one that takes another number of input channels (not a shape error in the first batch)
    with pytest.raises(UnetlabError, match="teacher takes 1 input channel"):
        train(config(cells, epochs=1, channels="0,0", teacher=str(baseline)), tmp_path / "bad2", progress=False)


def test_a_test_split_is_held_out_and_scored_once_at_the_end(cells, tmp_path, capsys):
    """Test images never reach training or validation; summary.json scores them; predict --split test finds them."""
    from unetlab.cli import main

    run = tmp_path / "run"
    train(config(cells, epochs=2, target="distance", test_fraction=0.2), run, progress=False)
    split = json.loads((run / "split.json").read_text())
    test = set(split["test"])
    assert len(test) == 1 and not (test & set(split["train"])) and not (test & set(split["val"]))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["n_images"] == 1 and 0.0 <= summary["test"]["dice"] <= 1.0
    assert set(summary["test"]) >= {"ap50", "ap_mean", "dsb_score", "n_objects"}
    info = json.loads((run / "model.json").read_text())
    assert 8 < info["diameter"] < 40  # the synthetic cells' median equivalent diameter
    assert main(["-q", "predict", "--model", str(run), "--input", str(cells), "--split", "test", "--out",
                 str(tmp_path / "pred"), "--no-progress", "--instances"]) == 0
    assert {p.stem for p in (tmp_path / "pred" / "masks").iterdir()} == test
    # the end-of-training score is what predict's defaults + evaluate give (the same --diameter rule)
    assert summary["test"]["diameter"] == "auto"
    assert main(["-q", "evaluate", "--pred", str(tmp_path / "pred" / "labels"), "--truth", str(cells),
                 "--instances", "--out", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["objects"]["ap"][0] == pytest.approx(summary["test"]["ap50"], abs=1e-9)
    assert report["objects"]["dsb_score"] == pytest.approx(summary["test"]["dsb_score"], abs=1e-9)
    # `unetlab tune` tunes a finished run again on its validation images and rescores the test split
    cfg = RunConfig.load(run / "config.yaml")
    cfg.postprocess.threshold, cfg.postprocess.min_size = 0.95, 1000  # settings that find nothing
    cfg.data.root = str(tmp_path / "moved")
    cfg.save(run / "config.yaml")
    assert main(["-q", "tune", str(run)]) == 2
    assert "dataset folder" in capsys.readouterr().err
    assert main(["tune", str(run), "--data", str(cells)]) == 0
    assert "validation AP@0.5" in capsys.readouterr().out
    tuned = RunConfig.load(run / "config.yaml")
    assert tuned.postprocess.threshold <= 0.7 and tuned.postprocess.min_size <= 50
    assert tuned.data.root == str(tmp_path / "moved")  # the run's own dataset folder is kept
    summary = json.loads((run / "summary.json").read_text())
    assert summary["postprocess"]["threshold"] == tuned.postprocess.threshold
    assert summary["test"]["n_images"] == 1 and {"ap50", "dsb_score"} <= set(summary["test"])
    assert main(["-q", "tune", str(tmp_path / "pred")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    # a run without a test split says so in one line
    plain = tmp_path / "plain"
    train(config(cells, epochs=1), plain, progress=False)
    assert json.loads((plain / "summary.json").read_text())["test"] is None
    assert main(["-q", "predict", "--model", str(plain), "--input", str(cells), "--split", "test", "--out",
                 str(tmp_path / "p2"), "--no-progress"]) == 2
    assert "no 'test' samples" in capsys.readouterr().err


@pytest.mark.parametrize("target, size_normalize, rescaled", [
    ("distance", False, True), ("distance", True, True), ("binary", False, False)])
def test_the_test_split_is_predicted_with_predicts_diameter_rule(monkeypatch, target, size_normalize, rescaled):
    """The end-of-training test score goes through --diameter auto exactly where `predict --instances` does (an
    instance model that knows its objects' size), so `predict --split test` + `evaluate` give its figures."""
    import numpy as np

    from unetlab.training import tuning

    calls = []

    def fake_rescaled(predict, x, train_diameter, diameter, **kw):
        calls.append((train_diameter, diameter))
        return np.zeros((2, 8, 8), np.float32), np.zeros((8, 8), np.int32), None

    monkeypatch.setattr(tuning, "predict_rescaled", fake_rescaled)
    monkeypatch.setattr(tuning, "predict_val_image", lambda *a, **k: torch.zeros(1 if target == "binary" else 2, 8, 8))
    cfg = apply_overrides(RunConfig(), {"target": target, "size_normalize": size_normalize})
    info = {"diameter": 20.0, "target": target, "task": "binary"}
    tuning._test_prediction(None, np.zeros((1, 8, 8), np.float32), cfg, info, "cpu", None)
    assert calls == ([(20.0, "auto")] if rescaled else [])


def test_contact_weights_train_the_distance_target(cells, tmp_path):
    """--contact-weight: the weighted distance loss falls and the network finds the cells."""
    run = tmp_path / "run"
    result = train(config(cells, epochs=EPOCHS, target="distance", contact_weight=10.0, sigma=2.0), run,
                   progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.8 * losses[0]
    rows = metrics(run)
    assert float(rows[-1]["val_dice"]) > float(rows[-1]["all_foreground_dice"]) + 0.3
    saved = RunConfig.load(run / "config.yaml")
    assert saved.train.contact_weight == 10.0 and saved.train.sigma == 2.0


def test_score_test_false_leaves_the_test_split_unseen(cells, tmp_path, caplog):
    """--score-test false: the test images are still held out of training and validation, but neither training
    nor `unetlab tune` scores them, so runs can be compared on validation without a look at the test split."""
    from unetlab.cli import main

    run = tmp_path / "run"
    with caplog.at_level("INFO"):
        train(config(cells, epochs=1, target="distance", test_fraction=0.2, score_test=False), run, progress=False)
    assert len(json.loads((run / "split.json").read_text())["test"]) == 1
    assert json.loads((run / "summary.json").read_text())["test"] is None
    assert "held out, not scored (--score-test false)" in caplog.text
    assert main(["-q", "tune", str(run), "--data", str(cells)]) == 0
    assert json.loads((run / "summary.json").read_text())["test"] is None


def test_samples_per_epoch_below_a_batch_says_what_an_epoch_holds(cells, tmp_path, caplog):
    with caplog.at_level("INFO"):
        train(config(cells, epochs=1, samples_per_epoch=4, tune_postprocess=False), tmp_path / "run", progress=False)
    assert "--samples-per-epoch 4: 8 patches per epoch, a whole number of batches (8 per batch)" in caplog.text
