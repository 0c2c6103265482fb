"""The learning-rate finder: an exponential sweep of the rate over training batches, and a suggested rate.

``unetlab lr-find`` runs it, and so does ``--lr auto`` before training (:class:`~unetlab.training.trainer.Trainer`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .._runtime import seed_everything
from ..config import RunConfig
from ..data.dataset import resolve_num_workers
from ..errors import UnetlabError
from ..files import write_bytes
from .bench import batch_loss, make_bench, png_bytes, pyplot, train_step
from .schedules import build_optimizer

log = logging.getLogger(__name__)

DIVERGENCE_FACTOR = 4.0  # lr_find stops when the smoothed loss exceeds this multiple of its best


@dataclass
class LRFindResult:
    """The sweep: learning rates tried, raw and smoothed losses, and the suggested rate."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    method: str = "steepest"  # how the suggestion was chosen: steepest | min/10
    lr_at_min: float = math.nan  # rate at the smoothed minimum
    diverged: bool = False  # the sweep stopped early because the loss blew up


def smooth_losses(losses: Sequence[float], beta: float) -> list[float]:
    """Exponential moving average of ``losses`` with bias correction (so early values are not pulled to 0)."""
    avg, out = 0.0, []
    for i, v in enumerate(losses):
        avg = beta * avg + (1 - beta) * float(v)
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def suggest_lr(lrs: Sequence[float], smoothed: Sequence[float]) -> tuple[float, str, float]:
    """(suggestion, method, lr at the minimum): the steepest descent of the smoothed loss before its minimum
    (in log learning rate), or a tenth of the rate at the minimum when that is lower (the steepest point then
    lies within a decade of where the loss turns) or the descending stretch is too short."""
    lrs_a, sm = np.asarray(lrs, float), np.asarray(smoothed, float)
    i_min = int(np.nanargmin(sm))
    lr_at_min = float(lrs_a[i_min])
    start = max(1, len(sm) // 10)  # the first points mostly show the smoothing settling
    if i_min - start >= 3:
        slope = np.gradient(sm[: i_min + 1], np.log10(lrs_a[: i_min + 1]))
        i = start + int(np.argmin(slope[start:i_min]))
        if slope[i] < 0 and lrs_a[i] <= lr_at_min / 10:
            return float(lrs_a[i]), "steepest", lr_at_min
    return lr_at_min / 10, "min/10", lr_at_min


def lr_find(cfg: RunConfig, steps: int = 100, lr_min: float = 1e-6, lr_max: float = 1.0,
            beta: float = 0.9) -> LRFindResult:
    """Exponential learning-rate sweep over ``steps`` training batches; suggests the steepest-descent rate.

    Leaves the caller's random state untouched, so ``--lr auto`` starts from the same weights as a fixed rate.
    """
    if steps < 5:
        raise UnetlabError(f"lr-find needs at least 5 steps, got {steps}")
    if not 0 < lr_min < lr_max:
        raise UnetlabError(f"lr-find needs 0 < lr_min < lr_max, got {lr_min} and {lr_max}")
    bs = cfg.train.batch_size
    with torch.random.fork_rng(devices=[]):
        np_state = np.random.get_state()
        try:
            seed_everything(cfg.train.seed)
            b = make_bench(cfg, steps * bs)
            lrs_all = lr_min * (lr_max / lr_min) ** (np.arange(steps) / (steps - 1))
            optimizer = build_optimizer(b.model, cfg.train, lr_min)
            workers = resolve_num_workers(cfg.data.num_workers, b.device.type)
            loader = DataLoader(b.dataset, batch_size=bs, shuffle=False, num_workers=workers, drop_last=True)
            b.model.train()
            lrs: list[float] = []
            losses: list[float] = []
            best, diverged = math.inf, False
            for lr, batch in zip(lrs_all, loader):
                for g in optimizer.param_groups:
                    g["lr"] = float(lr)
                loss = batch_loss(b, batch)
                value = float(loss.detach())
                if not math.isfinite(value):
                    diverged = True
                    break
                lrs.append(float(lr))
                losses.append(value)
                smoothed_now = smooth_losses(losses, beta)[-1]
                best = min(best, smoothed_now)
                if len(losses) > 5 and smoothed_now > DIVERGENCE_FACTOR * best:
                    diverged = True
                    break
                train_step(b, optimizer, loss, cfg.train.grad_clip)
        finally:
            np.random.set_state(np_state)
    if len(losses) < 5:
        raise UnetlabError(f"lr-find: the loss diverged after {len(losses)} steps from {lr_min:g}",
                           hint="lower --lr-min")
    smoothed = smooth_losses(losses, beta)
    suggestion, method, at_min = suggest_lr(lrs, smoothed)
    if not diverged and at_min >= lrs[-1]:
        log.warning("lr-find: the loss was still falling at the last rate %.1e; a larger --lr-max shows where "
                    "it turns", lrs[-1])
    log.info("lr-find: %d steps from %.1e to %.1e%s; suggestion %.2e (%s), minimum of the loss at %.2e",
             len(losses), lrs[0], lrs[-1], " (stopped: diverging)" if diverged else "", suggestion, method, at_min)
    return LRFindResult(lrs, losses, smoothed, suggestion, method, at_min, diverged)


def plot_lr_find(result: LRFindResult, png: str | Path) -> Path:
    """Draw loss against learning rate (raw and smoothed) with the suggestion marked, as a PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(result.lrs, result.losses, color="0.75", lw=1, label="loss per batch")
    ax.plot(result.lrs, result.smoothed, color="C0", lw=2, label="smoothed")
    ax.axvline(result.suggestion, color="C3", ls="--", lw=1.2,
               label=f"suggestion {result.suggestion:.1e} ({result.method})")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    low = min(min(result.losses), min(result.smoothed))
    ax.set_ylim(low * 0.9 if low > 0 else None, max(result.smoothed) * 1.15)
    ax.set_title("lr-find")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    data = png_bytes(fig)
    return write_bytes(Path(png), data)


__all__ = ["DIVERGENCE_FACTOR", "LRFindResult", "lr_find", "plot_lr_find", "smooth_losses", "suggest_lr"]
