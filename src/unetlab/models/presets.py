"""Named networks: a registry ``name -> (builder, description)`` and :func:`build_model` that looks names up.

Every builder takes a :class:`~unetlab.config.ModelConfig` and honours ``in_channels``/``out_channels``
(and ``padding`` where the preset allows a choice).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import UnetlabError
from .unet import UNet

Builder = Callable[[ModelConfig], nn.Module]


@dataclass(frozen=True)
class Preset:
    """One registry entry: how to build the network and a one-line description."""

    builder: Builder
    description: str


PRESETS: dict[str, Preset] = {}


def register(name: str, description: str) -> Callable[[Builder], Builder]:
    """Decorator adding ``builder(cfg) -> nn.Module`` to the registry under ``name``."""

    def deco(fn: Builder) -> Builder:
        PRESETS[name] = Preset(fn, description)
        return fn

    return deco


def _channels(cfg: ModelConfig) -> tuple[int, int]:
    cin = 1 if cfg.in_channels is None else int(cfg.in_channels)
    cout = 1 if cfg.out_channels is None else int(cfg.out_channels)
    if cin < 1 or cout < 1:
        raise UnetlabError(f"model channels must be positive (in_channels={cin}, out_channels={cout})")
    return cin, cout


def _check_choice(key: str, value: str, known: tuple[str, ...]) -> None:
    if value not in known:
        raise UnetlabError(f"unknown model.{key} {value!r} (known: {', '.join(known)})")


@register("unet", "generic U-Net: depth, base width or widths, norm, padding, dropout, upsample from the config")
def build_unet(cfg: ModelConfig) -> nn.Module:
    """The generic U-Net with every option taken from the config."""
    from .blocks import NORMS, PADDINGS, UPSAMPLES

    _check_choice("norm", cfg.norm, NORMS)
    _check_choice("padding", cfg.padding, PADDINGS)
    _check_choice("upsample", cfg.upsample, UPSAMPLES)
    if cfg.widths:
        widths = [int(w) for w in cfg.widths]
    else:
        if cfg.depth < 1:
            raise UnetlabError(f"model.depth must be at least 1 (got {cfg.depth})")
        widths = [int(cfg.base_width) * 2**i for i in range(int(cfg.depth) + 1)]
    if len(widths) < 2 or min(widths) < 1:
        raise UnetlabError(f"model.widths must list at least two positive widths (got {widths})")
    if not 0.0 <= cfg.dropout < 1.0:
        raise UnetlabError(f"model.dropout must be in [0, 1) (got {cfg.dropout})")
    cin, cout = _channels(cfg)
    return UNet(cin, cout, widths, cfg.norm, cfg.padding, cfg.dropout, cfg.upsample)


PAPER_WIDTHS = (64, 128, 256, 512, 1024)
SLIM_WIDTHS = (24, 48, 96, 192, 384)


@register("unet-paper", "Ronneberger 2015: 64-1024, valid 3x3 convs, 2x2 up-convs, crop+concat, no norm (31.0M)")
def build_unet_paper(cfg: ModelConfig) -> nn.Module:
    """The published U-Net (valid padding; 31,030,658 parameters for 1 in / 2 out); dropout from the config."""
    cin, cout = _channels(replace(cfg, out_channels=cfg.out_channels or 2))
    return UNet(cin, cout, PAPER_WIDTHS, "none", "valid", cfg.dropout, "transpose")


@register("unet-paper-same", "unet-paper with same padding: output size = input size, any size accepted")
def build_unet_paper_same(cfg: ModelConfig) -> nn.Module:
    """The published U-Net with zero/reflect 'same' padding instead of valid convolutions."""
    cin, cout = _channels(replace(cfg, out_channels=cfg.out_channels or 2))
    return UNet(cin, cout, PAPER_WIDTHS, "none", "same", cfg.dropout, "transpose")


@register("unet-slim", "24-384 U-Net, batch norm, bilinear up, same padding (4.42M); padding from the config")
def build_unet_slim(cfg: ModelConfig) -> nn.Module:
    """Slim U-Net: widths 24-48-96-192-384, conv(bias)+BN+ReLU x2 per level, max-pool, bilinear x2 up.

    After up-sampling the deep map (channels kept) is concatenated with the skip and two convs bring it to the
    skip's width; a 1x1 head. Every conv has a bias even before BatchNorm: that arrangement gives exactly
    4,418,449 parameters for 1 input channel and 1 output.
    """
    from .blocks import PADDINGS

    _check_choice("padding", cfg.padding, PADDINGS)
    cin, cout = _channels(cfg)
    return UNet(cin, cout, SLIM_WIDTHS, "batch", cfg.padding, cfg.dropout, "bilinear")


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the network named by ``cfg.preset``; unknown names are a UnetlabError listing the known ones."""
    preset = PRESETS.get(cfg.preset)
    if preset is None:
        raise UnetlabError(f"unknown model preset {cfg.preset!r} (known: {', '.join(sorted(PRESETS))})")
    return preset.builder(cfg)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def receptive_field(model: nn.Module, max_size: int = 4096) -> int:
    """Receptive field in pixels (rows) of the model's centre output pixel, by NaN propagation.

    A row of NaNs is placed in the input and the affected output rows are counted (max over 2**depth phases).
    The model runs in eval mode on a thin strip; call it on a narrow copy (same topology, small widths).
    """
    was_training = model.training
    model.eval()
    depth = int(getattr(model, "depth", 0))
    step = 2**depth
    size = 64 * step
    best = 0
    with torch.no_grad():
        while size <= max_size:
            width = model.valid_input_size(step) if hasattr(model, "valid_input_size") else step
            height = model.valid_input_size(size) if hasattr(model, "valid_input_size") else size
            phases = step
            x = torch.zeros(phases, int(getattr(model, "in_channels", 1)), height, width)
            centre = height // 2
            for k in range(phases):
                x[k, :, centre + k, :] = math.nan
            y = model(x)
            offset = (height - y.shape[-2]) // 2
            best = 0
            touches_border = False
            for k in range(phases):
                rows = torch.isnan(y[k]).any(dim=0).any(dim=-1).nonzero().flatten()
                if len(rows):
                    best = max(best, int(rows.max() - rows.min()) + 1)
                    if int(rows.min()) == 0 or int(rows.max()) == y.shape[-2] - 1:
                        touches_border = True
            del offset
            if not touches_border:
                break
            size *= 2
    model.train(was_training)
    return best
