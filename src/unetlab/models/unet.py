"""The generic U-Net (Ronneberger et al. 2015) with a choice of width, depth, norm, padding and up-sampling."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import NORMS, PADDINGS, UPSAMPLES, DoubleConv, UpBlock, make_upsample, pad_to_multiple


def _valid_output_or_none(n: int, depth: int, convs_per_level: int = 2) -> int | None:
    size = n
    shrink = 2 * convs_per_level
    for _ in range(depth):
        size -= shrink
        if size <= 0 or size % 2:
            return None
        size //= 2
    size -= shrink
    for _ in range(depth):
        if size <= 0:
            return None
        size = size * 2 - shrink
    return size if size > 0 else None


def valid_output_size(n: int, depth: int, convs_per_level: int = 2) -> int:
    """Output size along one dimension of a valid-padding U-Net; ValueError if a pooling sees an odd size."""
    out = _valid_output_or_none(n, depth, convs_per_level)
    if out is None:
        up = valid_input_size_for(n, depth, convs_per_level)
        msg = f"input size {n} does not fit a valid-padding U-Net of depth {depth}; nearest valid size: {up}"
        down = next((m for m in range(n - 1, 0, -1) if _valid_output_or_none(m, depth, convs_per_level)), None)
        if down is not None:
            msg = f"{msg} (or {down} below)"
        raise ValueError(msg)
    return out


def valid_input_size_for(n: int, depth: int, convs_per_level: int = 2) -> int:
    """Smallest size >= ``n`` that a valid-padding U-Net of this depth accepts exactly."""
    m = max(int(n), 1)
    while _valid_output_or_none(m, depth, convs_per_level) is None:
        m += 1
    return m


class UNet(nn.Module):
    """U-Net: ``len(widths)-1`` poolings; two 3x3 conv-norm-ReLU per level; up-sample, concatenate, two convs.

    Contract: ``forward(N, C, H, W) -> logits (N, out_channels, H', W')``. With ``padding='same'`` any H, W work
    (padded inside to a multiple of ``2**depth`` and cropped back); with ``padding='valid'`` the output is
    smaller (see :meth:`output_size`) and skip connections are centre-cropped as in the paper.
    All convs carry a bias (also before a norm). Bilinear up-sampling keeps the deep channel count and the
    first conv after concatenation reduces it to the skip's width.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128, 256, 512),
        norm: str = "batch",
        padding: str = "same",
        dropout: float = 0.0,
        upsample: str = "bilinear",
    ) -> None:
        super().__init__()
        if len(widths) < 2:
            raise ValueError("a U-Net needs at least two widths (one pooling)")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r} (known: {', '.join(NORMS)})")
        if padding not in PADDINGS:
            raise ValueError(f"unknown padding {padding!r} (known: {', '.join(PADDINGS)})")
        if upsample not in UPSAMPLES:
            raise ValueError(f"unknown upsample {upsample!r} (known: {', '.join(UPSAMPLES)})")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.widths = [int(w) for w in widths]
        self.depth = len(self.widths) - 1
        self.norm = norm
        self.padding = padding
        self.upsample = upsample
        self.dropout_p = float(dropout)
        self.size_multiple = 2**self.depth  # sizes handled without internal padding (see models.geometry)

        self.encoders = nn.ModuleList()
        cin = self.in_channels
        for w in self.widths:
            self.encoders.append(DoubleConv(cin, w, norm, padding))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()
        self.up_blocks = nn.ModuleList()
        for level in range(self.depth - 1, -1, -1):
            skip = self.widths[level]
            up, up_channels = make_upsample(upsample, cin, skip)
            conv = DoubleConv(up_channels + skip, skip, norm, padding)
            self.up_blocks.append(UpBlock(up, conv, crop=padding == "valid"))
            cin = skip
        self.head = nn.Conv2d(cin, self.out_channels, 1)

    def output_size(self, n: int) -> int:
        """Output size along one spatial dimension for input size ``n`` (identity for same padding)."""
        if self.padding == "same":
            return int(n)
        return valid_output_size(int(n), self.depth)

    def valid_input_size(self, n: int) -> int:
        """Smallest input size >= ``n`` the network accepts exactly (identity for same padding)."""
        if self.padding == "same":
            return int(n)
        return valid_input_size_for(int(n), self.depth)

    @torch.jit.unused
    def _check_input_size(self, h: int, w: int) -> None:
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return
        self.output_size(int(h))
        self.output_size(int(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-2]
        w = x.shape[-1]
        if self.padding == "same":
            x = pad_to_multiple(x, self.size_multiple)
        elif not torch.jit.is_scripting():
            self._check_input_size(h, w)
        skips: list[torch.Tensor] = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x)
            if i < self.depth:
                skips.append(x)
                x = self.pool(x)
        x = self.dropout(x)
        for i, block in enumerate(self.up_blocks):
            x = block(x, skips[self.depth - 1 - i])
        x = self.head(x)
        if self.padding == "same":
            x = x[:, :, :h, :w]
        return x

    def encoder_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature map of every encoder level of ``x``, shallowest first (the last is the bottleneck), as
        :meth:`forward` computes them (same-padding models pad to a multiple of ``2**depth`` first)."""
        if self.padding == "same":
            x = pad_to_multiple(x, self.size_multiple)
        levels: list[torch.Tensor] = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x)
            levels.append(x)
            if i < self.depth:
                x = self.pool(x)
        return levels
