"""The collapse guard: notice a run whose validation Dice is stuck (or whose loss is not finite) and recover it.

A recovery restores the last healthy state (or fresh weights when there is none), lowers the learning rate by
:data:`RECOVERY_LR_FACTOR` and reseeds the patch stream; ``train.max_recoveries`` bounds how often.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
from torch import nn

from .. import distributed as D
from ..config import RunConfig
from ..data.dataset import PatchDataset
from .ema import WeightAverage
from .schedules import Schedule, scale_lr

log = logging.getLogger(__name__)

RECOVERY_LR_FACTOR = 0.2


def collapsed(history: list[dict], patience: int) -> str | None:
    """Why the run looks collapsed (Dice stuck at 0 or at the all-foreground value while the loss is flat).

    Only evaluated rows (those with a ``val_dice``) count: ``patience`` is in evaluations, so a run validated
    every few epochs is judged on its last ``patience`` validations, never on the epochs in between."""
    if patience <= 0 or not history or "val_dice" not in history[-1]:
        return None
    history = [h for h in history if "val_dice" in h]
    if len(history) < patience:
        return None
    recent = history[-patience:]
    stuck_zero = all(h.get("val_dice", 1.0) < 1e-3 for h in recent)
    stuck_full = all(abs(h.get("val_dice", 0) - h.get("all_foreground_dice", -1)) < 1e-3 for h in recent)
    if not (stuck_zero or stuck_full):
        return None
    losses = [h["train_loss"] for h in recent]
    before = history[-patience - 1]["train_loss"] if len(history) > patience else losses[0] * 1.1 + 1e-9
    if min(losses) < 0.95 * before and losses[-1] < losses[0] * 0.95:
        return None  # still learning
    return "validation Dice stuck at 0" if stuck_zero else "validation Dice stuck at the all-foreground value"


def healthy(row: dict) -> bool:
    """Whether an evaluation row is a state worth returning to: Dice above 0 and not the all-foreground value."""
    dice = row.get("val_dice", 0.0)
    return dice > 1e-3 and abs(dice - row.get("all_foreground_dice", -1.0)) >= 1e-3


class Guarded(Protocol):
    """What a recovery reads and changes of a training run (the :class:`~unetlab.training.trainer.Trainer`)."""

    cfg: RunConfig
    dist: D.DistInfo
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    train_cache_dataset: PatchDataset
    history: list[dict]
    recoveries: list[dict]
    good_state: dict | None
    good_epoch: int
    ema: WeightAverage | None


def recover(run: Guarded, reason: str, epoch: int) -> bool:
    """Restore the last good state of ``run``, lower the learning rate, reseed; False when out of recoveries.

    ``epoch`` (1-based) is the epoch whose training or validation showed the collapse."""
    main = run.dist.is_main  # every rank recovers identically; rank 0 tells
    cfg = run.cfg
    if len(run.recoveries) >= cfg.train.max_recoveries:
        (log.error if main else log.debug)("collapse (%s) and no recoveries left (%d used)", reason,
                                           len(run.recoveries))
        return False
    n = len(run.recoveries) + 1
    if run.good_state is not None:
        run.model.load_state_dict(run.good_state["model"])
        run.optimizer.load_state_dict(run.good_state["optimizer"])
    else:  # nothing good yet: start the weights afresh with another seed
        torch.manual_seed(cfg.train.seed + 1000 * n)
        for m in run.model.modules():
            if hasattr(m, "reset_parameters") and m is not run.model:
                m.reset_parameters()
        run.optimizer.state.clear()
    if run.ema is not None:  # --ema: the average of the collapsed weights goes too
        run.ema.reset(run.model)
    new_lr = scale_lr(run.schedule, RECOVERY_LR_FACTOR)
    torch.manual_seed(cfg.train.seed + 1000 * n)
    run.train_cache_dataset.seed = cfg.train.seed + 1000 * n
    event = {"epoch": epoch, "reason": reason, "lr_now": new_lr, "recovery": n,
             "restored": f"last good state (epoch {run.good_epoch})" if run.good_state else "fresh weights",
             "history_len": len(run.history)}  # collapse checks look only at evaluations after this
    run.recoveries.append(event)
    (log.warning if main else log.debug)(
        "collapse guard: %s at epoch %d; restored %s, learning rate now %.2e (recovery %d of %d)",
        reason, epoch, event["restored"], new_lr, n, cfg.train.max_recoveries)
    return True


__all__ = ["RECOVERY_LR_FACTOR", "Guarded", "collapsed", "healthy", "recover"]
