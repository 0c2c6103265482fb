"""The network's pooled deepest features ("style", as Cellpose calls them): what a size regressor reads."""

from __future__ import annotations

import torch
from torch import nn


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, F) global average of the deepest encoder feature map of a (N, C, H, W) batch, each row scaled to unit
    length (so image brightness changes its size estimate less). Every preset's model has ``encode``."""
    encode = getattr(model, "encode", None)
    if encode is None:
        raise TypeError(f"{type(model).__name__} has no encode(): its pooled features are not available")
    f = encode(x).float().mean(dim=(-2, -1))
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-8)
