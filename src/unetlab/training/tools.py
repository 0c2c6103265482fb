"""The training workbench: learning-rate finder, one-batch overfit check and side-by-side comparison of configs.

* :func:`lr_find` sweeps the learning rate exponentially over training batches and suggests one
  (``unetlab lr-find``; also what ``--lr auto`` runs);
* :func:`overfit_check` trains on one fixed batch for each rate of a grid: a pipeline that cannot memorise one
  batch has a bug (``unetlab overfit``);
* :func:`compare` trains several configurations on the same split and seed and tabulates them
  (``unetlab compare``).

All three build the data, model and loss exactly as the trainer does (:func:`trainer.build_setup`).
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import distributed as D
from .._runtime import resolve_device, seed_everything, use_channels_last
from ..config import RunConfig, apply_overrides
from ..data.dataset import PatchDataset, resolve_num_workers
from ..errors import UnetlabError
from ..files import write_bytes, write_text
from ..inference.predictor import resolve_precision
from .schedules import build_optimizer
from .trainer import Setup, build_setup, center_crop, make_loss_fn

log = logging.getLogger(__name__)

DIVERGENCE_FACTOR = 4.0  # lr_find stops when the smoothed loss exceeds this multiple of its best
DEFAULT_OVERFIT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


# --- shared pieces -------------------------------------------------------------------------------------------


@dataclass
class _Bench:
    """Model, loss and patch dataset built as the trainer builds them, in one process."""

    setup: Setup
    model: nn.Module
    loss_fn: Any
    dataset: PatchDataset
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool  # the model's memory format, which each batch then takes too


def _bench(cfg: RunConfig, length: int, augment: bool = True) -> _Bench:
    device = resolve_device(cfg.train.device)
    setup = build_setup(cfg, None, False, D.DistInfo())
    model = setup.model.to(device)
    channels_last = use_channels_last(cfg.train.channels_last, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    weight_fn = None
    if cfg.train.border_weight:
        from .weightmap import border_weight_map

        weight_fn = partial(border_weight_map, w0=cfg.train.w0, sigma=cfg.train.sigma)
    data_cfg = cfg.data
    if not augment:
        from ..config import AugmentConfig

        off = {k: 0.0 for k in ("flip", "rotate90", "affine", "elastic", "brightness", "contrast", "gamma",
                                "noise", "blur")}
        data_cfg = replace(cfg.data, augment=replace(AugmentConfig(), **off))
    dataset = PatchDataset(setup.train_samples, data_cfg, setup.patch_in, length,
                           multiclass=setup.info["task"] == "multiclass", weight_fn=weight_fn, seed=cfg.train.seed)
    return _Bench(setup, model, make_loss_fn(cfg, setup.info), dataset, device,
                  resolve_precision(cfg.train.precision, device), channels_last)


def _batch_loss(b: _Bench, batch: dict) -> torch.Tensor:
    """The training loss of one batch, computed exactly as the trainer does."""
    x = batch["image"].to(b.device)
    if b.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(b.device.type, dtype=b.amp_dtype or torch.float32, enabled=b.amp_dtype is not None):
        logits = b.model(x)
    h, w = logits.shape[-2:]
    target = center_crop(batch["target"].to(b.device), h, w)
    weight = batch.get("weight")
    if weight is not None:
        weight = center_crop(weight.to(b.device), h, w)
    return b.loss_fn(logits, target, weight)


def _step(b: _Bench, optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float | None) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(b.model.parameters(), grad_clip)
    optimizer.step()


def _png_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def format_table(rows: list[dict], columns: Sequence[str] | None = None) -> str:
    """A plain fixed-width text table of ``rows`` (floats to 4 significant digits) for the command line."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


# --- learning-rate finder ------------------------------------------------------------------------------------


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
            b = _bench(cfg, steps * bs)
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
                loss = _batch_loss(b, batch)
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
                _step(b, optimizer, loss, cfg.train.grad_clip)
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
    plt = _pyplot()
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
    data = _png_bytes(fig)
    return write_bytes(Path(png), data)


# --- overfit check -------------------------------------------------------------------------------------------


def overfit_check(cfg: RunConfig, lrs: Sequence[float] = DEFAULT_OVERFIT_LRS, steps: int = 200,
                  tolerance: float = 0.1) -> list[dict]:
    """Train a fresh model on one fixed batch for up to ``steps`` steps per learning rate; one row per rate.

    Row keys: lr, start_loss, best_loss, final_loss, steps_to_tolerance (None if never), passed, diverged,
    seconds. A healthy pipeline passes at some rate; none passing points to a bug in data, targets or loss.
    """
    if not lrs:
        raise UnetlabError("overfit check needs at least one learning rate")
    if steps < 1:
        raise UnetlabError(f"steps must be at least 1, got {steps}")
    rows = []
    with torch.random.fork_rng(devices=[]):
        seed_everything(cfg.train.seed)
        b = _bench(cfg, cfg.train.batch_size, augment=False)
        batch = next(iter(DataLoader(b.dataset, batch_size=cfg.train.batch_size, shuffle=False)))
        initial = copy.deepcopy(b.model.state_dict())
        for lr in lrs:
            b.model.load_state_dict(initial)
            b.model.train()
            optimizer = build_optimizer(b.model, cfg.train, float(lr))
            t0 = time.time()
            start = best = final = math.nan
            reached, diverged = None, False
            for step in range(1, steps + 1):
                loss = _batch_loss(b, batch)
                value = float(loss.detach())
                if not math.isfinite(value):
                    diverged = True
                    break
                if step == 1:
                    start, best = value, value
                best, final = min(best, value), value
                if value <= tolerance:
                    reached = step - 1  # optimiser steps taken before this loss
                    break
                _step(b, optimizer, loss, cfg.train.grad_clip)
            rows.append({"lr": float(lr), "start_loss": start, "best_loss": best, "final_loss": final,
                         "steps_to_tolerance": reached, "passed": reached is not None, "diverged": diverged,
                         "seconds": time.time() - t0})
            log.info("overfit lr %.1e: %s", lr, f"loss <= {tolerance} after {reached} steps" if reached is not None
                     else f"best loss {best:.4f} in {steps} steps" + (" (diverged)" if diverged else ""))
    return rows


# --- compare -------------------------------------------------------------------------------------------------


COMPARE_COLUMNS = ("name", "val_dice", "val_iou", "best_epoch", "epochs", "final_train_loss", "train_seconds",
                   "seconds_per_epoch", "parameters", "recoveries")


@dataclass
class _Entry:
    name: str
    cfg: RunConfig
    source: str = ""
    extra: dict = field(default_factory=dict)


def _entries(configs: Sequence[str | Path | RunConfig], overrides: dict[str, Any]) -> list[_Entry]:
    entries: list[_Entry] = []
    seen: dict[str, int] = {}
    for i, c in enumerate(configs):
        if isinstance(c, RunConfig):
            name, cfg, source = f"config{i + 1}", c, "(object)"
        else:
            path = Path(c)
            name, cfg, source = path.stem, RunConfig.load(path), str(path)
        cfg = apply_overrides(cfg, overrides)
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        else:
            seen[name] = 1
        entries.append(_Entry(name, cfg, source))
    return entries


def compare(configs: Sequence[str | Path | RunConfig], data: str | Path | None, out: str | Path,
            overrides: dict[str, Any] | None = None, overwrite: bool = False,
            progress: bool | None = False) -> list[dict]:
    """Train each configuration on the same data split and seed into ``out/<name>``; write ``compare.csv``
    and the bar chart ``compare.png`` of validation Dice/IoU and training time. Returns the table rows."""
    from ..data.layouts import load_from_config
    from ..data.split import save_split, split_samples
    from ..runfolder import read_json
    from .trainer import train

    if len(configs) < 1:
        raise UnetlabError("compare needs at least one config")
    overrides = dict(overrides or {})
    if data is not None:
        overrides["root"] = str(data)
    entries = _entries(configs, overrides)
    roots = {e.cfg.data.root for e in entries}
    if len(roots) != 1 or not next(iter(roots)):
        raise UnetlabError("the configs must train on one dataset", hint="give it with --data DIR")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UnetlabError("compare folder already exists", out, "use --overwrite or another --out")
    out.mkdir(parents=True, exist_ok=True)
    first = entries[0].cfg
    seed = first.train.seed
    info = load_from_config(first.data)
    if info.problems:
        raise UnetlabError(f"{info.problems[0]} (run `unetlab inspect`)")
    train_s, val_s = split_samples(info, first.data, seed=seed)
    split_file = save_split(out / "split.json", train_s, val_s)
    rows = []
    for e in entries:
        cfg = apply_overrides(e.cfg, {"split_file": str(split_file), "seed": seed})
        log.info("compare: training %s (%s)", e.name, e.source)
        result = train(cfg, out / e.name, overwrite=overwrite, progress=progress)
        evals = [h for h in result.history if "val_dice" in h]
        at_best = next((h for h in evals if h["epoch"] == result.best_epoch), evals[-1] if evals else {})
        model_info = read_json(out / e.name / "model.json")
        rows.append({
            "name": e.name,
            "val_dice": at_best.get("val_dice"),
            "val_iou": at_best.get("val_iou"),
            "best_epoch": result.best_epoch,
            "epochs": result.epochs_run,
            "final_train_loss": result.history[-1]["train_loss"] if result.history else None,
            "train_seconds": result.seconds,
            "seconds_per_epoch": sum(h["seconds"] for h in result.history) / max(len(result.history), 1),
            "parameters": _count_parameters(cfg, model_info),
            "recoveries": len(result.recoveries),
        })
    _write_compare_csv(out / "compare.csv", rows)
    plot_compare(rows, out / "compare.png")
    return rows


def _count_parameters(cfg: RunConfig, model_info: dict) -> int:
    from ..models import build_model

    model = build_model(replace(cfg.model, in_channels=model_info["in_channels"],
                                out_channels=model_info["out_channels"]))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _write_compare_csv(path: Path, rows: list[dict]) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COMPARE_COLUMNS))
    w.writeheader()
    w.writerows([{k: r.get(k) for k in COMPARE_COLUMNS} for r in rows])
    text = buf.getvalue()
    return write_text(path, text)


def plot_compare(rows: list[dict], png: str | Path) -> Path:
    """Bar chart of each configuration's validation Dice and IoU (left) and training time (right), as a PNG."""
    plt = _pyplot()
    names = [r["name"] for r in rows]
    x = np.arange(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(6.0, 1.3 * len(rows) + 4), 3.4))
    dice = [r["val_dice"] or 0.0 for r in rows]
    iou = [r["val_iou"] or 0.0 for r in rows]
    bars = a.bar(x - 0.2, dice, 0.4, label="Dice")
    a.bar(x + 0.2, iou, 0.4, label="IoU")
    for bar, v in zip(bars, dice):
        a.text(bar.get_x() + bar.get_width() / 2, v + 0.01, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    a.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    a.set_ylim(0, 1.3)
    a.set_yticks(np.linspace(0, 1, 6))
    a.set_title("validation (best epoch)")
    a.legend(loc="upper left", fontsize=8, ncol=2)
    secs = [r["train_seconds"] for r in rows]
    b.bar(x, secs, 0.5, color="C2")
    for xi, v in zip(x, secs):
        b.text(xi, v, f"{v:.0f} s" if v >= 10 else f"{v:.1f} s", ha="center", va="bottom", fontsize=7)
    b.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    b.set_ylabel("seconds")
    b.set_title("training time")
    fig.tight_layout()
    data = _png_bytes(fig)
    return write_bytes(Path(png), data)


__all__ = ["LRFindResult", "lr_find", "plot_lr_find", "smooth_losses", "suggest_lr", "overfit_check", "compare",
           "plot_compare", "format_table", "COMPARE_COLUMNS"]
