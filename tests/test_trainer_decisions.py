"""The trainer's end-of-epoch decisions without training: the monitor and which way it is better, the best epoch,
the collapse guard on evaluated rows only, early stopping, the accumulation plan and the plateau schedule."""

from __future__ import annotations

import math

import pytest
import torch

from unetlab.config import TrainConfig
from unetlab.errors import UnetlabError
from unetlab.training.decisions import (
    best_in_history,
    check_monitor,
    decide,
    micro_batch_plan,
    monitor_mode,
    monitor_names,
    optimizer_steps,
    worst,
)
from unetlab.training.guard import collapsed
from unetlab.training.schedules import build_optimizer, build_scheduler


def test_losses_are_minimised_and_scores_maximised():
    assert monitor_mode("train_loss") == monitor_mode("val_loss") == "min"
    assert monitor_mode("val_dice") == monitor_mode("val_iou") == monitor_mode("val_dice_nucleus") == "max"
    assert worst("min") == math.inf and worst("max") == -math.inf


def test_a_wrong_monitor_name_is_one_line_listing_the_valid_ones():
    with pytest.raises(UnetlabError) as err:
        check_monitor("val_dicee")
    text = str(err.value)
    assert "\n" not in text and "val_dicee" in text
    assert all(name in text for name in ("train_loss", "val_dice", "val_iou", "val_dice_<class>"))
    check_monitor("val_dice_nucleus")  # the classes are not known yet: checked again once they are
    check_monitor("val_dice_nucleus", "multiclass", ["background", "nucleus"])
    assert monitor_names("multiclass", ["background", "nucleus"])[-1] == "val_dice_nucleus"
    with pytest.raises(UnetlabError, match=r"\(choose train_loss, val_dice, val_iou\)$"):
        check_monitor("val_dice_nucleus", "binary", [])
    with pytest.raises(UnetlabError, match="val_dice_background"):
        check_monitor("val_dice_background", "multiclass", ["background", "nucleus"])  # background is not scored
    with pytest.raises(UnetlabError):
        check_monitor("all_foreground_dice", "binary", [])  # a reference value, not a score of the network


def rows(dice: list[float | None], losses: list[float], fg: float = 0.25) -> list[dict]:
    """Epoch rows; a None Dice is an epoch without validation."""
    out = []
    for i, (d, loss) in enumerate(zip(dice, losses)):
        row = {"epoch": i + 1, "train_loss": loss}
        if d is not None:
            row.update(val_dice=d, all_foreground_dice=fg)
        out.append(row)
    return out


def test_the_guard_counts_only_evaluated_rows():
    """--val-every 3: two validations at Dice 0, with unvalidated epochs between them, are a collapse."""
    history = rows([None, None, 0.0, None, None, 0.0], [1.0] * 6)
    assert collapsed(history, 2) == "validation Dice stuck at 0"
    assert collapsed(history[:5], 2) is None  # the last row is not an evaluation: nothing to judge
    assert collapsed(rows([None, None, 0.6, None, None, 0.0], [1.0] * 6), 2) is None  # one bad evaluation only


def decide_kw(**over) -> dict:
    kw = {"evaluated": True, "has_val": True, "monitor": "val_dice", "best": -math.inf, "bad_evals": 0,
          "collapse_patience": 2, "early_stopping": None}
    return {**kw, **over}


def test_decide_keeps_the_best_counts_bad_evaluations_and_stops_early():
    row = {"epoch": 3, "train_loss": 0.5, "val_dice": 0.7, "all_foreground_dice": 0.25}
    d = decide(row, [row], **decide_kw(best=0.6, bad_evals=1))
    assert d.counted and d.improved and d.metric == 0.7 and d.bad_evals == 0 and d.restore_point and not d.stop
    d = decide(row, [row], **decide_kw(best=0.7, bad_evals=1, early_stopping=2))  # no better than before
    assert not d.improved and d.bad_evals == 2 and d.stop.startswith("early stopping after 2 evaluations")
    unvalidated = {"epoch": 4, "train_loss": 0.4}
    d = decide(unvalidated, [row, unvalidated], **decide_kw(evaluated=False, bad_evals=1, early_stopping=2))
    assert not d.counted and not d.improved and d.bad_evals == 1 and d.stop is None


def test_decide_minimises_a_loss_monitor_and_falls_back_to_it_without_validation():
    a, b = {"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.6}
    d = decide(a, [a], **decide_kw(monitor="train_loss", best=math.inf))
    assert d.improved and d.metric == 0.5
    assert not decide(b, [a, b], **decide_kw(monitor="train_loss", best=0.5)).improved  # a higher loss is worse
    # no validation images: the run keeps its best by the training loss, every epoch
    d = decide(b, [a, b], **decide_kw(evaluated=False, has_val=False, best=0.7))
    assert d.counted and d.improved and d.metric == 0.6 and not d.restore_point


def test_the_best_is_found_again_in_a_history():
    history = rows([None, 0.5, None, 0.7], [1.0, 0.8, 0.6, 0.7])
    assert best_in_history(history, "val_dice", has_val=True) == (0.7, 4)
    assert best_in_history(history, "train_loss", has_val=True) == (0.7, 4)  # only validated epochs count
    assert best_in_history(history, "train_loss", has_val=False) == (0.6, 3)
    assert best_in_history([], "train_loss", has_val=False) == (math.inf, -1)


def test_decide_reports_a_collapse_and_neither_a_restore_point_nor_early_stopping_then():
    history = rows([0.6, 0.0, 0.0], [1.0, 1.0, 1.0])
    d = decide(history[-1], history, **decide_kw(best=0.6, bad_evals=5, early_stopping=2))
    assert d.collapse == "validation Dice stuck at 0" and not d.restore_point and d.stop is None


@pytest.mark.parametrize(("batches", "accum", "plan"), [
    (2, 4, [(2, False), (2, True)]),  # fewer batches than the accumulation: one step, on the last
    (3, 2, [(2, False), (2, True), (1, True)]),  # the leftover micro-batch is a group of its own
    (4, 2, [(2, False), (2, True), (2, False), (2, True)]),
    (3, 1, [(1, True)] * 3),
])
def test_every_micro_batch_belongs_to_a_group_that_steps(batches, accum, plan):
    assert micro_batch_plan(batches, accum) == plan
    assert optimizer_steps(batches, accum) == sum(stepping for _, stepping in plan)


def plateau(mode_values: list[float], mode: str) -> float:
    """The learning-rate factor after a plateau schedule saw ``mode_values`` with ``mode``."""
    model = torch.nn.Linear(2, 1)
    cfg = TrainConfig(schedule="plateau")
    sched = build_scheduler(build_optimizer(model, cfg, 1e-2), cfg, 1, 20)
    for v in mode_values:
        sched.step_epoch(v, mode)
    return sched.plateau_factor


def test_the_plateau_schedule_follows_the_monitor_direction():
    falling = [1.0 - 0.05 * i for i in range(10)]
    assert plateau(falling, "min") == 1.0  # a falling loss keeps improving: no reduction
    assert plateau(falling, "max") < 1.0  # a falling score stalls: reduced
    assert plateau([-v for v in falling], "max") == 1.0
