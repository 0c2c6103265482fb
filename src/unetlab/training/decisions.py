"""The end-of-epoch decisions of a training run, as plain functions of its history: which metric is monitored
and which way is better, whether this epoch is the best so far, whether the run collapsed, whether to stop.

Nothing here trains or writes: :meth:`~unetlab.training.trainer.Trainer.fit` acts on a :class:`Decision`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UnetlabError
from .guard import collapsed, healthy

# What one epoch's row can be monitored by. Validation (training/validation.py ``validate``) gives these for
# every task, plus ``val_dice_<class>`` per class of a multiclass run; ``all_foreground_dice`` is a reference
# value (a network that says "object" everywhere), not a score of the network, so it is not a monitor.
TRAIN_MONITORS = ("train_loss",)
VALIDATION_MONITORS = ("val_dice", "val_iou")
CLASS_MONITOR_PREFIX = "val_dice_"
IMPROVEMENT = 1e-6  # a new best must beat the old one by more than this


def monitor_mode(name: str) -> str:
    """'min' for a loss (a name ending in ``loss``), else 'max': the one rule for which way a monitor is better."""
    return "min" if name.endswith("loss") else "max"


def monitor_names(task: str | None = None, classes: list[str] | None = None) -> list[str]:
    """The names ``train.monitor`` may take for a run of ``task`` (its ``classes`` for a multiclass one)."""
    names = [*TRAIN_MONITORS, *VALIDATION_MONITORS]
    if task == "multiclass":
        names += [f"{CLASS_MONITOR_PREFIX}{c}" for c in (classes or [])[1:]]  # background is not scored
    return names


def check_monitor(name: str, task: str | None = None, classes: list[str] | None = None) -> None:
    """Refuse a ``train.monitor`` that no epoch would report. Without ``task`` (before the data is read) a
    per-class name ``val_dice_<class>`` passes; it is checked again once the classes are known."""
    if name in monitor_names(task, classes):
        return
    if task is None and name.startswith(CLASS_MONITOR_PREFIX) and len(name) > len(CLASS_MONITOR_PREFIX):
        return
    valid = ", ".join(monitor_names(task, classes))
    if task is None:
        valid += f", or {CLASS_MONITOR_PREFIX}<class> for a multiclass run"
    raise UnetlabError(f"unknown --monitor '{name}'", hint=f"choose {valid}")


def monitored(monitor: str, has_val: bool) -> str:
    """The metric a run actually keeps its best by: ``monitor``, or ``train_loss`` when there is no validation."""
    return monitor if has_val or monitor in TRAIN_MONITORS else "train_loss"


def worst(mode: str) -> float:
    """The starting 'best' value for a monitor of ``mode``: every finite value beats it."""
    return -math.inf if mode == "max" else math.inf


def is_better(value: float, best: float, mode: str) -> bool:
    """Whether ``value`` improves on ``best`` by more than :data:`IMPROVEMENT` in the direction of ``mode``."""
    if not math.isfinite(value):
        return False
    return value > best + IMPROVEMENT if mode == "max" else value < best - IMPROVEMENT


def best_in_history(history: list[dict], name: str, has_val: bool) -> tuple[float, int]:
    """The best value of the monitor ``name`` over the counted rows of ``history`` and its epoch (-1: none)."""
    mode = monitor_mode(name)
    best, epoch = worst(mode), -1
    for row in history:
        counted = "val_dice" in row or not has_val
        if counted and name in row and is_better(float(row[name]), best, mode):
            best, epoch = float(row[name]), int(row["epoch"])
    return best, epoch


@dataclass(frozen=True)
class Decision:
    """What to do at the end of one epoch (``counted``: whether it was an evaluation that decisions count)."""

    counted: bool = False
    metric: float | None = None  # the monitored value this epoch (None: not evaluated)
    improved: bool = False  # a new best: write best.pt
    collapse: str | None = None  # why the run looks collapsed: recover it
    restore_point: bool = False  # a healthy evaluation: the collapse guard's new restore point
    bad_evals: int = 0  # evaluations without improvement, this one included
    stop: str | None = None  # why to stop early (None: go on)


def decide(row: dict, history: list[dict], *, evaluated: bool, has_val: bool, monitor: str, best: float,
           bad_evals: int, collapse_patience: int, early_stopping: int | None) -> Decision:
    """The end-of-epoch decision for ``row``; ``history`` holds the rows since the last recovery (``row`` last).

    An epoch counts when it was validated, or every epoch when the run has no validation images (its monitor
    is then the training loss). Only validated rows are seen by the collapse guard.
    """
    if not (evaluated or not has_val):
        return Decision(bad_evals=bad_evals)
    name = monitored(monitor, has_val)
    metric = row.get(name)
    why = collapsed(history, collapse_patience) if evaluated else None
    improved = metric is not None and is_better(float(metric), best, monitor_mode(name))
    bad = 0 if improved else bad_evals + 1
    stop = None
    if early_stopping and bad >= early_stopping and not why:
        stop = f"early stopping after {bad} evaluations without improvement"
    return Decision(counted=True, metric=None if metric is None else float(metric), improved=improved,
                    collapse=why, restore_point=evaluated and healthy(row) and not why, bad_evals=bad, stop=stop)


def micro_batch_plan(batches: int, accum: int) -> list[tuple[int, bool]]:
    """For each of an epoch's ``batches`` micro-batches, (the size of its accumulation group, whether the
    optimiser steps after it): groups of ``accum``, the last one shorter when ``accum`` does not divide."""
    accum = max(int(accum), 1)
    plan = []
    for i in range(batches):
        start = i // accum * accum
        plan.append((min(accum, batches - start), i + 1 == min(start + accum, batches)))
    return plan


def optimizer_steps(batches: int, accum: int) -> int:
    """Optimiser steps in an epoch of ``batches`` micro-batches accumulated by ``accum`` (at least one)."""
    return max(1, math.ceil(batches / max(int(accum), 1)))


__all__ = ["CLASS_MONITOR_PREFIX", "Decision", "TRAIN_MONITORS", "VALIDATION_MONITORS", "best_in_history",
           "check_monitor", "decide", "is_better", "micro_batch_plan", "monitor_mode", "monitor_names", "monitored",
           "optimizer_steps", "worst"]
