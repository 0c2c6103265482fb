"""The workbench's shared pieces: model, loss and patches built exactly as the trainer builds them, one batch's
loss and step, and PNG output for the workbench plots (:mod:`unetlab.training.lrfind`, :mod:`.tools`)."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .. import distributed as D
from .._runtime import resolve_device, use_channels_last
from ..config import RunConfig
from ..data.dataset import PatchDataset
from ..inference.predictor import resolve_precision
from .setup import Setup, border_weight_fn, build_setup, center_crop, make_loss_fn

log = logging.getLogger(__name__)


@dataclass
class Bench:
    """Model, loss and patch dataset built as the trainer builds them, in one process."""

    setup: Setup
    model: nn.Module
    loss_fn: Any
    dataset: PatchDataset
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool  # the model's memory format, which each batch then takes too


def make_bench(cfg: RunConfig, length: int, augment: bool = True) -> Bench:
    """Model, loss and ``length`` training patches (augmented unless ``augment`` is False) as the trainer
    builds them, on the configured device."""
    device = resolve_device(cfg.train.device)
    setup = build_setup(cfg, None, False, D.DistInfo())
    model = setup.model.to(device)
    channels_last = use_channels_last(cfg.train.channels_last, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    weight_fn = border_weight_fn(cfg)
    data_cfg = cfg.data
    if not augment:
        from ..config import AugmentConfig

        off = {k: 0.0 for k in ("flip", "rotate90", "affine", "elastic", "brightness", "contrast", "gamma",
                                "noise", "blur")}
        data_cfg = replace(cfg.data, augment=replace(AugmentConfig(), **off))
    dataset = PatchDataset(setup.train_samples, data_cfg, setup.patch_in, length,
                           multiclass=setup.info["task"] == "multiclass", weight_fn=weight_fn, seed=cfg.train.seed)
    return Bench(setup, model, make_loss_fn(cfg, setup.info), dataset, device,
                 resolve_precision(cfg.train.precision, device), channels_last)


def batch_loss(b: Bench, batch: dict) -> torch.Tensor:
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


def train_step(b: Bench, optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float | None) -> None:
    """One optimiser step on ``loss`` (gradients clipped to ``grad_clip`` when set)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(b.model.parameters(), grad_clip)
    optimizer.step()


def png_bytes(fig: Any) -> bytes:
    """The matplotlib figure ``fig`` as PNG bytes (80 dpi); the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


__all__ = ["Bench", "batch_loss", "make_bench", "png_bytes", "pyplot", "train_step"]
