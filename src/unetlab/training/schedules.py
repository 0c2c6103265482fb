"""Optimisers and learning-rate schedules.

A :class:`Schedule` sets the learning rate of every parameter group itself (no torch scheduler underneath),
from three numbers it keeps in its state: the optimiser steps taken, the plateau reductions so far and a user
scale (:func:`scale_lr`). That makes resuming exact and lets the collapse guard lower the rate for any
schedule type.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..config import TrainConfig
from ..errors import UnetlabError

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adam", "sgd", "adamw8bit")
SCHEDULES = ("warmup_cosine", "onecycle", "step", "plateau", "constant")

# plateau: ReduceLROnPlateau-like constants (TrainConfig has no keys for them)
PLATEAU_PATIENCE = 5  # evaluations without improvement before reducing
PLATEAU_FACTOR = 0.5
PLATEAU_THRESHOLD = 1e-4  # relative improvement that counts
PLATEAU_MIN_FACTOR = 1e-3  # never below lr * this
# onecycle: torch.optim.lr_scheduler.OneCycleLR defaults
ONECYCLE_PCT_START = 0.3
ONECYCLE_DIV = 25.0
ONECYCLE_FINAL_DIV = 1e4


# --- optimisers ---------------------------------------------------------------------------------------------


def parameter_groups(params: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Split parameters into decayed (conv/linear weights) and non-decayed (biases, norm weights: ndim <= 1).

    ``params`` may be a module, an iterable of parameters or of ``(name, parameter)`` pairs.
    """
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    items = list(params)
    if items and isinstance(items[0], dict):  # already parameter groups
        return items
    tensors = [p[1] if isinstance(p, tuple) else p for p in items]
    tensors = [p for p in tensors if p.requires_grad]
    decay = [p for p in tensors if p.ndim > 1]
    no_decay = [p for p in tensors if p.ndim <= 1]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise UnetlabError("the model has no trainable parameters")
    return groups


def build_optimizer(params: Any, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.optimizer`` (adamw | adam | sgd | adamw8bit); no decay on norms/biases."""
    name = cfg.optimizer.lower()
    if name not in OPTIMIZERS:
        raise UnetlabError(f"unknown optimizer '{cfg.optimizer}' (choose {', '.join(OPTIMIZERS)})")
    lr = float(lr)
    if not lr > 0:
        raise UnetlabError(f"learning rate must be positive, got {lr}")
    groups = parameter_groups(params, cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "sgd":
        if cfg.nesterov and cfg.momentum <= 0:
            raise UnetlabError("nesterov needs momentum > 0", hint="set --momentum 0.9 or drop --nesterov")
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise UnetlabError(f"optimizer adamw8bit needs the bitsandbytes package ({exc})",
                           hint='pip install torch==2.13.0 -e ".[bnb]" in a clone (or pip install "unetlab[bnb]"), '
                                'or choose --optimizer adamw') from None
    return bnb.optim.AdamW8bit(groups, lr=lr)


# --- schedules ----------------------------------------------------------------------------------------------


@dataclass
class Schedule:
    """Learning-rate schedule driving ``optimizer``: call ``step_batch()`` after every optimiser step and
    ``step_epoch(metric)`` after every validation."""

    optimizer: torch.optim.Optimizer
    kind: str
    base_lrs: list[float]
    total_steps: int
    steps_per_epoch: int
    warmup_steps: int = 0
    step_size: int = 30
    step_gamma: float = 0.1
    steps: int = 0  # optimiser steps taken
    epochs_seen: int = 0  # step_epoch calls
    scale: float = 1.0  # product of scale_lr factors
    plateau_factor: float = 1.0
    plateau_best: float | None = None
    plateau_bad: int = 0

    def factor(self, step: int | None = None) -> float:
        """Multiplier of the base learning rate at optimiser step ``step`` (the current one by default)."""
        s = self.steps if step is None else step
        return self.scale * self.plateau_factor * _curve(self, s)

    @property
    def lr(self) -> float:
        """Learning rate of the first parameter group right now."""
        return float(self.optimizer.param_groups[0]["lr"])

    def apply(self) -> None:
        """Write the current learning rate into the optimiser's parameter groups."""
        f = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def step_batch(self) -> None:
        """Advance by one optimiser step."""
        self.steps += 1
        self.apply()

    def step_epoch(self, metric: float | None = None, mode: str = "max") -> None:
        """After a validation: for ``plateau``, reduce the rate when ``metric`` stalls; ``mode`` says which way
        is better ('max', or 'min' for a loss: ``decisions.monitor_mode`` of the monitored name)."""
        self.epochs_seen += 1
        if self.kind != "plateau" or metric is None or not math.isfinite(metric):
            return
        best = self.plateau_best
        margin = abs(best) * PLATEAU_THRESHOLD if best is not None else 0.0
        if best is None or (metric > best + margin if mode == "max" else metric < best - margin):
            self.plateau_best = float(metric)
            self.plateau_bad = 0
            return
        self.plateau_bad += 1
        if self.plateau_bad > PLATEAU_PATIENCE - 1 and self.plateau_factor > PLATEAU_MIN_FACTOR:
            self.plateau_factor = max(self.plateau_factor * PLATEAU_FACTOR, PLATEAU_MIN_FACTOR)
            self.plateau_bad = 0
            log.info("no improvement for %d evaluations: learning rate lowered to %.3g", PLATEAU_PATIENCE,
                     self.base_lrs[0] * self.factor())
            self.apply()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the same learning-rate sequence."""
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "optimizer"}
        state["base_lrs"] = list(self.base_lrs)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` and set the optimiser's learning rate accordingly."""
        for k, v in state.items():
            if k == "optimizer" or not hasattr(self, k):
                continue
            setattr(self, k, list(v) if isinstance(v, (list, tuple)) else v)
        self.apply()


def _warmup_cosine(s: int, warmup: int, total: int) -> float:
    if warmup > 0 and s < warmup:
        return (s + 1) / (warmup + 1)
    span = max(total - warmup, 1)
    progress = min(max(s - warmup, 0) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _onecycle(s: int, total: int) -> float:
    up = max(int(ONECYCLE_PCT_START * total), 1)
    start, peak, end = 1.0 / ONECYCLE_DIV, 1.0, 1.0 / (ONECYCLE_DIV * ONECYCLE_FINAL_DIV)
    if s < up:
        a, b, t = start, peak, s / up
    else:
        a, b, t = peak, end, min((s - up) / max(total - up, 1), 1.0)
    return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * t))


def _curve(sched: Schedule, s: int) -> float:
    kind = sched.kind
    if kind == "warmup_cosine":
        return _warmup_cosine(s, sched.warmup_steps, sched.total_steps)
    if kind == "onecycle":
        return _onecycle(s, sched.total_steps)
    if kind == "step":
        epoch = s // max(sched.steps_per_epoch, 1)
        return sched.step_gamma ** (epoch // max(sched.step_size, 1))
    return 1.0  # plateau (its reductions live in plateau_factor) and constant


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int, epochs: int
) -> Schedule:
    """The schedule named by ``cfg.schedule`` over ``epochs`` epochs of ``steps_per_epoch`` optimiser steps.

    It sets the optimiser's learning rate for the first step right away (warmup starts low).
    """
    kind = cfg.schedule.lower()
    if kind not in SCHEDULES:
        raise UnetlabError(f"unknown schedule '{cfg.schedule}' (choose {', '.join(SCHEDULES)})")
    if kind == "step" and cfg.step_size < 1:
        raise UnetlabError(f"step_size must be at least 1 epoch, got {cfg.step_size}")
    steps_per_epoch = max(int(steps_per_epoch), 1)
    total = max(steps_per_epoch * int(epochs), 1)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch)) if kind == "warmup_cosine" else 0
    sched = Schedule(
        optimizer=optimizer,
        kind=kind,
        base_lrs=[float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups],
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
        warmup_steps=min(max(warmup, 0), total - 1),
        step_size=int(cfg.step_size),
        step_gamma=float(cfg.step_gamma),
    )
    for g, base in zip(optimizer.param_groups, sched.base_lrs):
        g["initial_lr"] = base
    sched.apply()
    return sched


def scale_lr(schedule: Schedule, factor: float) -> float:
    """Multiply the learning rate by ``factor`` from now on (kept in the state); returns the new rate."""
    if not factor > 0:
        raise ValueError(f"scale factor must be positive, got {factor}")
    schedule.scale *= float(factor)
    schedule.apply()
    return schedule.lr
