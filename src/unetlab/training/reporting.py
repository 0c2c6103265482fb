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


def epoch_line(row: dict, epochs: int) -> str:
    """The one log line of an epoch: epoch, training loss, validation Dice (when evaluated), rate, seconds."""
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['train_loss']:.4f}"]
    if "val_dice" in row:
        parts.append(f"val Dice {row['val_dice']:.4f}")
    parts += [f"lr {row['lr']:.2e}", f"{row['seconds']:.1f}s"]
    return "  ".join(parts)


def log_epoch(row: dict, epochs: int, tb: Any | None = None) -> None:
    """Log an epoch's line and, with a TensorBoard writer ``tb``, add its numbers as scalars."""
    log.info(epoch_line(row, epochs))
    if tb is not None:
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)):
                tb.add_scalar(k, v, row["epoch"])


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
                  postprocess: dict | None, left_out: list[str], test: dict | None = None) -> Path:
    """Write the run's ``summary.json``: best score, stop reason, recoveries, the last evaluation, the tuned
    post-processing, the files left out and the scores on the held-out test split (None: no test split)."""
    return write_json(path, {
        "best_metric": best_metric, "monitor": monitor, "best_epoch": best_epoch, "epochs_run": epochs_run,
        "stop_reason": stop_reason, "recoveries": recoveries, "seconds_this_session": seconds,
        "last": history[-1] if history else {}, "postprocess": postprocess, "left_out": list(left_out),
        "test": test, "unetlab_version": __version__,
    })


def plot_curves(history: list[dict], path: Path) -> Path:
    """Training loss and validation metrics against epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        best = max(vals, key=lambda v: v[1])
        b.axvline(best[0], color="gray", ls=":", lw=1)
        b.set_title(f"best Dice {best[1]:.4f} at epoch {best[0]}")
    b.set_xlabel("epoch")
    b.set_ylim(0, 1)
    b.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    data = buf.getvalue()
    return write_bytes(path, data)


def draw_curves(history: list[dict], path: Path) -> None:
    """:func:`plot_curves`, with a failure logged as a warning: a plot must never lose a run."""
    try:
        plot_curves(history, path)
    except Exception as exc:
        log.warning("could not draw curves.png: %s", exc)


__all__ = ["draw_curves", "epoch_line", "log_epoch", "plot_curves", "tensorboard_writer", "write_metrics",
           "write_summary"]
