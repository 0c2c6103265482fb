"""Folding BatchNorm into the preceding convolution for fast inference."""

from __future__ import annotations

import copy

import torch
from torch import nn


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new conv (with bias) computing ``bn(conv(x))`` with the BN's running statistics."""
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        var = bn.running_var.to(torch.float64)
        scale = (bn.weight.to(torch.float64) if bn.affine else torch.ones_like(var)) / torch.sqrt(var + bn.eps)
        shift = bn.bias.to(torch.float64) if bn.affine else torch.zeros_like(var)
        bias = conv.bias.to(torch.float64) if conv.bias is not None else torch.zeros_like(var)
        w = conv.weight.to(torch.float64) * scale.reshape(-1, 1, 1, 1)
        fused.weight.copy_(w.to(conv.weight.dtype))
        fused.bias.copy_(((bias - bn.running_mean.to(torch.float64)) * scale + shift).to(conv.weight.dtype))
    return fused


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
