"""The training workbench: learning-rate finder, one-batch overfit check and side-by-side comparison of configs.

* :func:`lr_find` sweeps the learning rate exponentially over training batches and suggests one
  (``unetlab lr-find``; also what ``--lr auto`` runs);
* :func:`overfit_check` trains on one fixed batch for each rate of a grid: a pipeline that cannot memorise one
  batch has a bug (``unetlab overfit``);
* :func:`compare` trains several configurations on the same split and seed and tabulates them
  (``unetlab compare``).

All three build the data, model and loss exactly as the trainer does (:func:`setup.build_setup`); the
learning-rate finder itself lives in :mod:`unetlab.training.lrfind` (the trainer runs it for ``--lr auto``).
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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .._runtime import seed_everything
from ..config import RunConfig, apply_overrides
from ..errors import UnetlabError
from ..files import write_bytes, write_text
from .bench import batch_loss, make_bench, png_bytes, pyplot, train_step
from .lrfind import DIVERGENCE_FACTOR, LRFindResult, lr_find, plot_lr_find, smooth_losses, suggest_lr
from .schedules import build_optimizer
from .trainer import train

log = logging.getLogger(__name__)

DEFAULT_OVERFIT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def format_table(rows: list[dict], columns: Sequence[str] | None = None) -> str:
    """A plain fixed-width text table of ``rows`` (floats to 4 significant digits) for the command line."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        """One table cell as text."""
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


# --- overfit check -------------------------------------------------------------------------------------------


def overfit_check(cfg: RunConfig, lrs: Sequence[float] = DEFAULT_OVERFIT_LRS, steps: int = 200,
                  tolerance: float = 0.1) -> list[dict]:
    """Train a fresh model on one fixed batch for up to ``steps`` steps per learning rate; one row per rate.

    Row keys: lr, start_loss, best_loss, final_loss, steps_to_tolerance (None if never), passed, diverged (the
    loss became non-finite or ended above its start), seconds. A healthy pipeline passes at some rate; none
    passing points to a bug in data, targets or loss.
    """
    if not lrs:
        raise UnetlabError("overfit check needs at least one learning rate")
    if steps < 1:
        raise UnetlabError(f"steps must be at least 1, got {steps}")
    rows = []
    with torch.random.fork_rng(devices=[]):
        seed_everything(cfg.train.seed)
        b = make_bench(cfg, cfg.train.batch_size, augment=False)
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
                loss = batch_loss(b, batch)
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
                train_step(b, optimizer, loss, cfg.train.grad_clip)
            diverged = diverged or (reached is None and final > start)  # ended above where it started
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
    """One configuration of a comparison: its table name, config and where it came from."""

    name: str
    cfg: RunConfig
    source: str = ""
    extra: dict = field(default_factory=dict)


def _entries(configs: Sequence[str | Path | RunConfig], overrides: dict[str, Any]) -> list[_Entry]:
    """The comparison's configurations with ``overrides`` applied, under unique names (file stems)."""
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
        if e.cfg.train.seed != seed:
            log.warning("compare: %s sets seed %d; it trains with the first config's seed %d, as every run does",
                        e.name, e.cfg.train.seed, seed)
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
    """Trainable parameters of the model ``cfg`` builds with the run's channels."""
    from ..models import build_model

    model = build_model(replace(cfg.model, in_channels=model_info["in_channels"],
                                out_channels=model_info["out_channels"]))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _write_compare_csv(path: Path, rows: list[dict]) -> Path:
    """Write the comparison table (:data:`COMPARE_COLUMNS`) as CSV."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COMPARE_COLUMNS))
    w.writeheader()
    w.writerows([{k: r.get(k) for k in COMPARE_COLUMNS} for r in rows])
    text = buf.getvalue()
    return write_text(path, text)


def plot_compare(rows: list[dict], png: str | Path) -> Path:
    """Bar chart of each configuration's validation Dice and IoU (left) and training time (right), as a PNG."""
    plt = pyplot()
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
    data = png_bytes(fig)
    return write_bytes(Path(png), data)


__all__ = ["DIVERGENCE_FACTOR", "LRFindResult", "lr_find", "plot_lr_find", "smooth_losses", "suggest_lr", "overfit_check", "compare",
           "plot_compare", "format_table", "COMPARE_COLUMNS"]
