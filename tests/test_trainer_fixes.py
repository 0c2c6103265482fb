"""Trainer settings that used to do the wrong thing, on tiny runs: the collapse guard with validation every few
epochs, gradient accumulation over short epochs and the monitor (checked, losses minimised); train.deterministic
is in tests/test_runtime.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unetlab import distributed as D
from unetlab.config import RunConfig, apply_overrides
from unetlab.errors import UnetlabError
from unetlab.runfolder import checkpoint_path, load_checkpoint
from unetlab.training import train
from unetlab.training import trainer as trainer_module

TINY = {"preset": "unet", "depth": 2, "base_width": 8, "patch_size": 64, "batch_size": 8, "samples_per_epoch": 32,
        "tensorboard": False, "lr": 1e-2, "val_fraction": 0.2, "seed": 0, "precision": "fp32",
        "tune_postprocess": False}

pytestmark = pytest.mark.usefixtures("one_thread")


def config(root: Path, **over) -> RunConfig:
    return apply_overrides(RunConfig(), {**TINY, "root": str(root), **over})


# --- 1. the collapse guard with --val-every 3 -----------------------------------------------------------------
VAL_EVERY = 3
COLLAPSE_FROM = 4  # the first epoch the network is collapsed: after the healthy validation at epoch 3


def force_collapse_from(mp: pytest.MonkeyPatch, first: int) -> None:
    """From epoch ``first`` until the guard's first recovery every Trainer's network outputs a constant far below
    zero (validation Dice exactly 0, the loss flat), as tests/test_trainer.py forces a collapse."""
    real_init = trainer_module.Trainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)

        def hook(module, inputs, output):
            if self.epoch + 1 >= first and not self.recoveries:
                return output * 0.0 - 20.0
            return output

        self.model.register_forward_hook(hook)

    mp.setattr(trainer_module.Trainer, "__init__", init)


def test_the_guard_rescues_a_forced_collapse_when_validating_every_third_epoch(cells, tmp_path, monkeypatch):
    force_collapse_from(monkeypatch, COLLAPSE_FROM)
    result = train(config(cells, epochs=12, val_every=VAL_EVERY, collapse_patience=2, max_recoveries=2),
                   tmp_path / "run", progress=False)
    (event,) = result.recoveries  # without the fix the unvalidated epochs between look healthy: never rescued
    assert event["reason"] == "validation Dice stuck at 0"
    assert event["epoch"] == 9  # the second validation at Dice 0 (epochs 6 and 9)
    assert event["restored"] == "last good state (epoch 3)"
    evaluated = [h for h in result.history if "val_dice" in h]
    assert [h["epoch"] for h in evaluated] == [3, 6, 9, 12]
    assert [h["val_dice"] for h in evaluated[1:3]] == [0.0, 0.0]
    assert evaluated[-1]["val_dice"] > evaluated[-1]["all_foreground_dice"] + 0.3  # learning again (seen: 0.94, 0.25)


# --- 2. gradient accumulation ---------------------------------------------------------------------------------
def fit_trainer(cfg: RunConfig, out: Path) -> tuple[trainer_module.Trainer, dict]:
    """A fitted Trainer and its parameters before training."""
    t = trainer_module.Trainer(cfg, out, progress=False)
    try:
        before = {k: v.detach().clone() for k, v in t.model.named_parameters()}
        t.fit()
    finally:
        D.cleanup(t.dist)
    return t, before


@pytest.mark.parametrize(("patches", "accum", "steps"), [(4, 4, 1), (6, 2, 2)])
def test_accumulation_steps_on_the_last_micro_batch_of_an_epoch(cells, tmp_path, patches, accum, steps):
    """Batch 2: 4 patches are 2 micro-batches (accumulation 4: one step per epoch, not none); 6 patches are 3
    (accumulation 2: two steps per epoch, the leftover micro-batch no longer dropped)."""
    cfg = config(cells, epochs=2, batch_size=2, samples_per_epoch=patches, grad_accumulation=accum, val_every=2)
    t, before = fit_trainer(cfg, tmp_path / "run")
    assert len(t.loader) == patches // 2
    assert t.steps_per_epoch == steps
    assert t.schedule.steps == t.schedule.total_steps == 2 * steps  # the schedule ran exactly its course
    changed = [k for k, v in t.model.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert len(changed) > len(before) // 2  # stepped (before the fix, 4 patches and accumulation 4 changed none)


# --- 3. the monitor -------------------------------------------------------------------------------------------
def test_a_monitor_typo_is_one_line_before_anything_is_written(cells, tmp_path, capsys):
    from unetlab.cli import main

    run = tmp_path / "run"
    with pytest.raises(UnetlabError, match=r"unknown --monitor 'val_dicee' \(choose train_loss, val_dice, val_iou"):
        train(config(cells, monitor="val_dicee"), run, progress=False)
    assert not run.exists()
    assert main(["-q", "train", "--data", str(cells), "--out", str(run), "--monitor", "val_dicee",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "val_dicee" in err[0] and "val_iou" in err[0]
    assert not run.exists()
    # a class name passes until the data is read: this binary data set has none, and no folder stays behind
    with pytest.raises(UnetlabError, match="unknown --monitor 'val_dice_cell'"):
        train(config(cells, monitor="val_dice_cell"), run, progress=False)
    assert not run.exists()


def test_a_loss_monitor_keeps_the_epoch_with_the_lowest_loss(cells, tmp_path):
    run = tmp_path / "run"
    result = train(config(cells, epochs=3, monitor="train_loss"), run, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]  # the loss falls, so the highest-loss epoch (what was kept before) differs
    assert result.best_metric == min(losses) and result.best_epoch == 1 + losses.index(min(losses))
    assert load_checkpoint(checkpoint_path(run, "best"))["epoch"] == result.best_epoch
    summary = json.loads((run / "summary.json").read_text())
    assert summary["monitor"] == "train_loss" and summary["best_metric"] == pytest.approx(min(losses))


def test_without_validation_images_the_lowest_training_loss_is_kept(cells, tmp_path):
    run = tmp_path / "run"
    result = train(config(cells, epochs=2, val_fraction=0.0), run, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert result.best_metric == min(losses) and result.best_epoch == 1 + losses.index(min(losses))
    assert result.monitor == json.loads((run / "summary.json").read_text())["monitor"] == "train_loss"


def test_resuming_a_run_saved_when_every_monitor_was_maximised_finds_its_lowest_loss(cells, tmp_path):
    """A checkpoint from before monitors had a direction (no "monitor"; without validation images the best was
    the highest negated loss) resumes with its best found again in its history, not stuck below every loss."""
    from unetlab.runfolder import save_checkpoint

    run = tmp_path / "run"
    first = train(config(cells, epochs=2, val_fraction=0.0), run, progress=False)
    last = load_checkpoint(checkpoint_path(run, "last"))
    del last["monitor"]
    last["best"] = -min(h["train_loss"] for h in first.history)  # what was kept before
    save_checkpoint(checkpoint_path(run, "last"), last)
    cfg = RunConfig.load(run / "config.yaml")
    cfg.train.epochs = 3
    cfg.save(run / "config.yaml")
    result = train(None, run, resume=True, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 3 and result.best_metric == min(losses)
    assert result.best_epoch == 1 + losses.index(min(losses))
