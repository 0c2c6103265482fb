"""What a run tells: epoch log lines, metrics.csv, curves.png, TensorBoard scalars and summary.json."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from .._version import __version__
from ..files import write_bytes, write_text
from ..runfolder import write_json

log = logging.getLogger(__name__)


def tensorboard_writer(out: Path, enabled: bool) -> Any | None:
    """A TensorBoard ``SummaryWriter`` on ``out/tensorboard``, or None when off or unavailable (with a warning)."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        log.warning("TensorBoard logging skipped: %s (pip install \"unetlab[tensorboard]\", or --tensorboard "
                    "false to silence this); metrics.csv and curves.png are written as usual", exc)
        return None
    try:
        return SummaryWriter(log_dir=str(out / "tensorboard"))
    except OSError as exc:
        log.warning("TensorBoard logging skipped: cannot write %s (%s)", out / "tensorboard", exc)
        return None


BASELINE_EVALUATIONS = 3  # evaluations after which a model still at the baseline is warned about
BASELINE_MARGIN = 0.01  # val Dice this close to the baseline has not beaten it


def baseline_label(row: dict) -> str:
    """What the baseline of an evaluated ``row`` predicts: 'all-foreground', 'all-background' or 'one-class'."""
    base, all_fg = row.get("baseline_dice"), row.get("all_foreground_dice")
    if base is None or (all_fg is not None and abs(base - all_fg) < 1e-12):
        return "all-foreground"
    return "all-background" if all_fg == 0.0 and base == 1.0 else "one-class"


def _baseline(row: dict) -> float | None:
    """The val Dice of a model that learnt nothing (the best constant prediction), when ``row`` has it."""
    return row.get("baseline_dice", row.get("all_foreground_dice"))


def epoch_line(row: dict, epochs: int) -> str:
    """The one log line of an epoch: epoch, training loss, validation Dice (when evaluated) beside the Dice of a
    constant prediction, rate, seconds."""
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['train_loss']:.4f}"]
    if "val_dice" in row:
        base = _baseline(row)
        parts.append(f"val Dice {row['val_dice']:.4f}"
                     + (f" ({baseline_label(row)} {base:.4f})" if base is not None else ""))
    parts += [f"lr {row['lr']:.2e}", f"{row['seconds']:.1f}s"]
    return "  ".join(parts)


def log_epoch(row: dict, epochs: int, tb: Any | None = None, history: list[dict] | None = None,
              max_minutes: float | None = None) -> None:
    """Log an epoch's line and, with a TensorBoard writer ``tb``, add its numbers as scalars; after the first
    epoch the time estimate (with the run's time budget ``max_minutes``), and with the run's ``history`` (ending
    in ``row``) the warning when the model has not beaten the baseline."""
    log.info(epoch_line(row, epochs))
    if tb is not None:
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)):
                tb.add_scalar(k, v, row["epoch"])
    if row["epoch"] == 1 and epochs > 1:
        log.info("%s", time_estimate(row, epochs, max_minutes))
    if history is not None:
        warning = baseline_warning(history)
        if warning:
            log.warning("%s", warning)


def _duration(seconds: float) -> str:
    """``seconds`` as a person says it: '45 s', '76 min', '2 h 05 min'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h {minutes % 60:02d} min"


def time_estimate(row: dict, epochs: int, max_minutes: float | None = None) -> str:
    """The line after the first epoch ``row``: what it took and about how long all ``epochs`` take, and whether
    ``max_minutes`` stops the run sooner. A validated first epoch means every epoch is validated (val_every 1)."""
    seconds = float(row["seconds"])
    total = seconds * epochs
    note = "validation included" if "val_dice" in row else "validation not included"
    line = f"epoch 1 took {seconds:.0f} s; about {_duration(total)} for {epochs} epochs ({note})"
    if max_minutes is not None and total > max_minutes * 60:
        line += f"; its time budget of {max_minutes:g} min stops it sooner"
    return line


def time_budget_reached(elapsed: float, last_epoch_seconds: float, max_minutes: float | None) -> bool:
    """Whether a run limited to ``max_minutes`` should stop: another epoch as long as the last one would pass it."""
    return max_minutes is not None and elapsed + last_epoch_seconds > max_minutes * 60


def baseline_warning(history: list[dict]) -> str | None:
    """The warning, once, at the ``BASELINE_EVALUATIONS``-th evaluation of a run none of whose evaluations beat
    the Dice of a constant prediction (a model that learnt nothing); None otherwise."""
    evals = [h for h in history if "val_dice" in h and _baseline(h) is not None]
    if len(evals) != BASELINE_EVALUATIONS or not history or evals[-1] is not history[-1]:
        return None
    if any(h["val_dice"] > _baseline(h) + BASELINE_MARGIN for h in evals):
        return None
    best = max(evals, key=lambda h: h["val_dice"])
    what = {"all-foreground": "foreground", "all-background": "background"}.get(baseline_label(best), "one class")
    return (f"after {len(evals)} evaluations the best val Dice {best['val_dice']:.4f} (epoch {best['epoch']}) has not "
            f"beaten {_baseline(best):.4f}, the Dice of calling every pixel {what}: the model has not "
            "learnt to tell the objects from the rest yet. Try another --lr (or --lr auto), more --epochs or "
            "--samples-per-epoch, check that the masks fit the images (unetlab inspect; --invert-mask when the "
            "objects are dark in the masks)")


def write_metrics(history: list[dict], path: Path) -> Path:
    """Write ``history`` as a CSV table (columns in order of first appearance) atomically to ``path``."""
    keys: list[str] = []
    for r in history:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    text = buf.getvalue()
    return write_text(path, text)


def write_summary(path: Path, *, best_metric: float, monitor: str, best_epoch: int, epochs_run: int,
                  stop_reason: str, recoveries: list[dict], seconds: float, history: list[dict],
                  postprocess: dict | None, left_out: list[str], test: dict | None = None,
                  precision: str | None = None) -> Path:
    """Write the run's ``summary.json``: best score, stop reason, recoveries, the last evaluation, the tuned
    post-processing, the files left out, the scores on the held-out test split (None: no test split) and the
    precision training and validation ran in (fp32, bf16 or fp16: what ``auto`` resolved to)."""
    return write_json(path, {
        "best_metric": best_metric, "monitor": monitor, "best_epoch": best_epoch, "epochs_run": epochs_run,
        "stop_reason": stop_reason, "recoveries": recoveries, "seconds_this_session": seconds,
        "last": history[-1] if history else {}, "postprocess": postprocess, "left_out": list(left_out),
        "test": test, "precision": precision, "unetlab_version": __version__,
    })


def curves_figure(history: list[dict]) -> Any:
    """The matplotlib figure of :func:`plot_curves`: training loss (left) and validation Dice and IoU beside the
    Dice of a constant prediction (right), against whole epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(ep, [h["train_loss"] for h in history], "-o", ms=3, label="training loss")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.set_yscale("log")
    a.legend()
    vals = [(h["epoch"], h["val_dice"], h.get("val_iou")) for h in history if "val_dice" in h]
    if vals:
        b.plot([v[0] for v in vals], [v[1] for v in vals], "-o", ms=3, label="validation Dice")
        b.plot([v[0] for v in vals], [v[2] for v in vals], "-s", ms=3, label="validation IoU")
        last = [h for h in history if "val_dice" in h][-1]
        if _baseline(last) is not None:
            b.axhline(_baseline(last), color="tab:red", ls="--", lw=1,
                      label=f"{baseline_label(last)} baseline ({_baseline(last):.3f})")
        best = max(vals, key=lambda v: v[1])
        b.axvline(best[0], color="gray", ls=":", lw=1)
        b.set_title(f"best Dice {best[1]:.4f} at epoch {best[0]}")
        b.legend(loc="best")
    else:
        b.set_title("no validation images")
    b.set_xlabel("epoch")
    b.set_ylim(0, 1)
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    fig.tight_layout()
    return fig


def plot_curves(history: list[dict], path: Path) -> Path:
    """Training loss and validation metrics against epoch, as a PNG."""
    import matplotlib.pyplot as plt

    fig = curves_figure(history)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return write_bytes(path, buf.getvalue())


def draw_curves(history: list[dict], path: Path) -> None:
    """:func:`plot_curves`, with a failure logged as a warning: a plot must never lose a run."""
    try:
        plot_curves(history, path)
    except Exception as exc:
        log.warning("could not draw curves.png: %s", exc)


__all__ = ["BASELINE_EVALUATIONS", "BASELINE_MARGIN", "baseline_label", "baseline_warning", "curves_figure",
           "draw_curves", "epoch_line", "log_epoch", "plot_curves", "tensorboard_writer",
           "time_budget_reached", "time_estimate", "write_metrics", "write_summary"]
