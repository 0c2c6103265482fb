"""Folding BatchNorm into the preceding convolution for fast inference."""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv computing ``bn(conv(x))`` with the BN's running statistics: torch's ``fuse_conv_bn_eval``, done in
    float64 and cast back, so folding adds no float32 rounding of its own (masks match the unfolded model)."""
    dtype = conv.weight.dtype
    fused = fuse_conv_bn_eval(copy.deepcopy(conv).double(), copy.deepcopy(bn).double())
    return fused.to(dtype)


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` where every Conv2d directly followed by BatchNorm2d inside an
    ``nn.Sequential`` is replaced by one conv (the BN becomes Identity); the original is untouched."""
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
                    and bn.running_mean is not None and conv.out_channels == bn.num_features):
                module._modules[a] = fold_conv_bn(conv, bn)
                module._modules[b] = nn.Identity()
    return fused
