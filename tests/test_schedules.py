"""Optimisers (param groups, choices) and LR schedules (curve shapes, resume, scale_lr)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from unetlab.config import TrainConfig
from unetlab.errors import UnetlabError
from unetlab.training.schedules import (
    PLATEAU_PATIENCE,
    SCHEDULES,
    build_optimizer,
    build_scheduler,
    scale_lr,
)

LR = 1e-2


def tiny_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 1, 1))


def make(schedule: str, steps_per_epoch: int = 10, epochs: int = 10, **kw):
    cfg = dataclasses.replace(TrainConfig(), schedule=schedule, **kw)
    opt = build_optimizer(tiny_model(), cfg, LR)
    return opt, build_scheduler(opt, cfg, steps_per_epoch, epochs)


def run(sched, n: int) -> list[float]:
    """Learning rates used by the next ``n`` optimiser steps."""
    lrs = []
    for _ in range(n):
        lrs.append(sched.optimizer.param_groups[0]["lr"])
        sched.step_batch()
    return lrs


def test_weight_decay_skips_norms_and_biases():
    model = tiny_model()
    opt = build_optimizer(model, TrainConfig(weight_decay=0.05), LR)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decay == {id(model[0].weight), id(model[2].weight)}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    named = build_optimizer(list(model.named_parameters()), TrainConfig(weight_decay=0.05), LR)
    assert [len(g["params"]) for g in named.param_groups] == [len(g["params"]) for g in opt.param_groups]


def test_optimizer_choices():
    model = tiny_model()
    assert isinstance(build_optimizer(model, TrainConfig(optimizer="adam"), LR), torch.optim.Adam)
    sgd = build_optimizer(model, TrainConfig(optimizer="sgd", momentum=0.8, nesterov=True), LR)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]
    assert sgd.param_groups[0]["momentum"] == 0.8
    with pytest.raises(UnetlabError, match="unknown optimizer"):
        build_optimizer(model, TrainConfig(optimizer="lion"), LR)
    with pytest.raises(UnetlabError, match="momentum"):
        build_optimizer(model, TrainConfig(optimizer="sgd", momentum=0.0, nesterov=True), LR)


def test_adamw8bit_needs_bitsandbytes():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(UnetlabError, match=r"needs the bitsandbytes package.*unetlab\[bnb\]"):
            build_optimizer(tiny_model(), TrainConfig(optimizer="adamw8bit"), LR)
    else:
        pytest.skip("bitsandbytes is installed")


def test_warmup_rises_then_cosine_ends_near_zero():
    _, sched = make("warmup_cosine", warmup_epochs=2.0)
    lrs = run(sched, 100)
    warm = lrs[:20]
    assert all(b > a for a, b in zip(warm, warm[1:])) and warm[0] < 0.1 * LR
    assert max(lrs) == pytest.approx(LR, rel=1e-6) and lrs.index(max(lrs)) == 20
    tail = lrs[20:]
    assert all(b <= a for a, b in zip(tail, tail[1:]))
    assert lrs[-1] < 0.002 * LR
    assert lrs[60] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * 40 / 80)), rel=1e-6)


def test_onecycle_rises_to_peak_then_anneals():
    _, sched = make("onecycle")
    lrs = run(sched, 100)
    peak = lrs.index(max(lrs))
    assert 20 <= peak <= 40 and max(lrs) == pytest.approx(LR)
    assert lrs[0] == pytest.approx(LR / 25) and lrs[-1] < LR / 1000


def test_step_drops_at_step_size():
    _, sched = make("step", step_size=3, step_gamma=0.1)
    lrs = run(sched, 70)
    assert lrs[0] == lrs[29] == pytest.approx(LR)
    assert lrs[30] == lrs[59] == pytest.approx(LR * 0.1)
    assert lrs[60] == pytest.approx(LR * 0.01)


def test_plateau_reduces_after_patience_and_constant_stays():
    _, sched = make("plateau")
    sched.step_epoch(0.5)
    for i in range(PLATEAU_PATIENCE - 1):
        sched.step_epoch(0.5 - 0.01 * i)
        assert sched.lr == pytest.approx(LR)
    sched.step_epoch(0.4)
    assert sched.lr < LR
    reduced = sched.lr
    sched.step_epoch(None)  # no metric: no change
    sched.step_epoch(0.9)  # improvement resets the count
    for _ in range(PLATEAU_PATIENCE - 1):
        sched.step_epoch(0.9)
    assert sched.lr == pytest.approx(reduced)
    _, const = make("constant")
    assert set(run(const, 30)) == {LR}


@pytest.mark.parametrize("kind", SCHEDULES)
def test_state_dict_round_trip_continues_the_same_sequence(kind):
    _, a = make(kind, step_size=2)
    run(a, 23)
    for m in (0.3, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1):
        a.step_epoch(m)
    state = a.state_dict()
    expected = run(a, 40)
    _, b = make(kind, step_size=2)
    b.load_state_dict(state)
    assert run(b, 40) == pytest.approx(expected, rel=1e-12)
    saved = torch.load(_roundtrip(state), weights_only=True)  # survives a checkpoint file
    _, c = make(kind, step_size=2)
    c.load_state_dict(saved)
    assert run(c, 40) == pytest.approx(expected, rel=1e-12)


def _roundtrip(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("kind", SCHEDULES)
def test_scale_lr_lowers_every_schedule_and_persists(kind):
    _, a = make(kind)
    _, b = make(kind)
    run(a, 15)
    run(b, 15)
    new = scale_lr(b, 0.1)
    assert new == pytest.approx(a.lr * 0.1)
    la, lb = run(a, 30), run(b, 30)
    assert lb == pytest.approx([x * 0.1 for x in la])
    _, c = make(kind)
    c.load_state_dict(b.state_dict())
    assert c.lr == pytest.approx(b.lr) and run(c, 5) == pytest.approx(run(b, 5))
    assert all(g["lr"] == pytest.approx(c.lr) for g in c.optimizer.param_groups)


def test_bad_schedule_is_a_user_error():
    with pytest.raises(UnetlabError, match="unknown schedule"):
        make("linear")
