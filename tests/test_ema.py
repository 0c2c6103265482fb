"""--ema: the running average of the weights, what validation and the best checkpoint use, and its resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from unetlab.config import RunConfig, apply_overrides
from unetlab.errors import UnetlabError
from unetlab.runfolder import checkpoint_path, load_checkpoint
from unetlab.training import train
from unetlab.training.ema import weight_average

TINY = {"preset": "unet", "depth": 2, "base_width": 8, "patch_size": 64, "batch_size": 8, "samples_per_epoch": 32,
        "tensorboard": False, "lr": 1e-2, "val_fraction": 0.2, "seed": 0, "tune_postprocess": False}

pytestmark = pytest.mark.usefixtures("one_thread")


def config(root: Path, **over) -> RunConfig:
    return apply_overrides(RunConfig(), {**TINY, "root": str(root), **over})


def test_the_average_follows_the_weights_with_a_ramped_decay():
    torch.manual_seed(0)
    live = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    avg = weight_average(live, 0.5)
    w0 = live[0].weight.detach().clone()
    with torch.no_grad():
        live[0].weight.add_(1.0)
    live.train()(torch.randn(4, 3))  # BatchNorm statistics move, num_batches_tracked counts 1
    avg.update(live)  # first update: decay min(0.5, 1/10) = 0.1
    assert torch.allclose(avg.model[0].weight, 0.1 * w0 + 0.9 * (w0 + 1.0))
    assert int(avg.model[1].num_batches_tracked) == 1
    w1 = avg.model[0].weight.detach().clone()
    avg.update(live)  # second: min(0.5, 2/11)
    d = 2 / 11
    assert torch.allclose(avg.model[0].weight, d * w1 + (1 - d) * (w0 + 1.0))
    assert not any(p.requires_grad for p in avg.model.parameters()) and not avg.model.training
    avg.reset(live)
    assert avg.updates == 0 and torch.equal(avg.model[0].weight, live[0].weight)
    assert weight_average(live, 0.0) is None
    for bad in (1.0, -0.1):
        with pytest.raises(UnetlabError, match="--ema"):
            weight_average(live, bad)


def test_validation_and_the_best_checkpoint_use_the_average(cells, tmp_path):
    train(config(cells, epochs=1, ema=0.9), tmp_path / "run", progress=False)
    best = load_checkpoint(checkpoint_path(tmp_path / "run", "best"))
    last = load_checkpoint(checkpoint_path(tmp_path / "run", "last"))
    assert last["ema"]["updates"] == 4  # 32 patches in batches of 8: four optimiser steps
    for k, v in best["model"].items():
        assert torch.equal(v, last["ema"]["model"][k]), k
    moved = [k for k, v in last["model"].items() if v.is_floating_point() and not torch.equal(v, best["model"][k])]
    assert moved  # the trained weights are not what was kept


def test_a_stopped_run_resumes_its_average_exactly(cells, tmp_path):
    train(config(cells, epochs=2, ema=0.9), tmp_path / "a", progress=False)
    train(config(cells, epochs=2, ema=0.9, max_minutes=1e-6), tmp_path / "b", progress=False)  # stops after 1
    assert load_checkpoint(checkpoint_path(tmp_path / "b", "last"))["epoch"] == 1
    train(None, tmp_path / "b", resume=True, progress=False)
    a = load_checkpoint(checkpoint_path(tmp_path / "a", "last"))["ema"]
    b = load_checkpoint(checkpoint_path(tmp_path / "b", "last"))["ema"]
    assert a["updates"] == b["updates"] == 8
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_a_recovery_restarts_the_average_at_the_restored_weights(monkeypatch):
    """The collapse guard restores the last good weights; the average of the collapsed ones must not survive it."""
    from types import SimpleNamespace

    from unetlab.training import guard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    good = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    avg = weight_average(model, 0.9)
    with torch.no_grad():
        model[0].weight.fill_(-20.0)  # the collapse
    avg.update(model)
    avg.update(model)
    monkeypatch.setattr(guard, "scale_lr", lambda schedule, factor: 0.01)
    run = SimpleNamespace(cfg=RunConfig(), dist=SimpleNamespace(is_main=True), model=model, optimizer=opt,
                          schedule=None, train_cache_dataset=SimpleNamespace(seed=0), history=[], recoveries=[],
                          good_state={"model": good, "optimizer": opt.state_dict()}, good_epoch=1, ema=avg)
    assert guard.recover(run, "validation Dice stuck at 0", 3)
    assert avg.updates == 0 and torch.equal(avg.model[0].weight, good["0.weight"])
