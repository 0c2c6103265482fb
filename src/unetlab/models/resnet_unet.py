"""A U-Net with a ResNet-34 encoder and a pixel-shuffle (sub-pixel, ICNR-initialised) decoder.

The encoder is written here (no torchvision): 7x7 stride-2 stem for any number of input channels, max-pool,
BasicBlock stages of 3, 4, 6, 3 blocks (64, 128, 256, 512 channels). The decoder climbs back through the five
scales (/32 -> /16 -> /8 -> /4 -> /2 -> /1): at each step a :class:`PixelShuffleICNR` x2 up-sampling, concatenation
with the encoder feature of that scale (none at full resolution), and two 3x3 conv-BN-ReLU layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import DoubleConv, PixelShuffleICNR, UpBlock, pad_to_multiple

RESNET34_BLOCKS = (3, 4, 6, 3)
RESNET34_WIDTHS = (64, 128, 256, 512)
DECODER_WIDTHS = (256, 128, 64, 32, 16)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs (no bias) with BN; a 1x1 projection when the shape changes.

    Conv/BN pairs sit next to each other in ``nn.Sequential`` containers so that :func:`fuse_batchnorm` finds them.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        bn_last = nn.BatchNorm2d(cout)
        nn.init.zeros_(bn_last.weight)  # each residual branch starts as the identity
        self.branch = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            bn_last,
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.branch(x) + self.shortcut(x))


def resnet_stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    """One ResNet stage: ``blocks`` BasicBlocks, the first with ``stride``."""
    layers = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNetUNet(nn.Module):
    """ResNet encoder + pixel-shuffle decoder; same padding, any input size (padded to a multiple of 32).

    Defaults give the ResNet-34 U-Net: 24,351,921 parameters for 3 input channels and 1 output (the encoder
    alone has 21,284,672, as torchvision's resnet34 without its classifier).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        blocks: Sequence[int] = RESNET34_BLOCKS,
        encoder_widths: Sequence[int] = RESNET34_WIDTHS,
        decoder_widths: Sequence[int] = DECODER_WIDTHS,
    ) -> None:
        super().__init__()
        if len(blocks) != 4 or len(encoder_widths) != 4 or len(decoder_widths) != 5:
            raise ValueError("ResNetUNet needs 4 encoder stages and 5 decoder widths")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.padding = "same"
        self.depth = 5
        self.size_multiple = 2**self.depth  # five stride-2 steps: stem, max-pool, stages 2-4
        self.blocks = [int(n) for n in blocks]
        ew = [int(w) for w in encoder_widths]
        dw = [int(w) for w in decoder_widths]
        self.stem = nn.Sequential(
            nn.Conv2d(self.in_channels, ew[0], 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(ew[0]),
            nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.stages = nn.ModuleList()
        cin = ew[0]
        for i, (n, w) in enumerate(zip(self.blocks, ew)):
            self.stages.append(resnet_stage(cin, w, n, 1 if i == 0 else 2))
            cin = w
        # Skips from the deepest to the shallowest: stage3 (/16), stage2 (/8), stage1 (/4), stem (/2).
        skip_channels = [ew[2], ew[1], ew[0], ew[0]]
        self.up_blocks = nn.ModuleList()
        for skip, w in zip(skip_channels, dw[:-1]):
            self.up_blocks.append(UpBlock(PixelShuffleICNR(cin, w), DoubleConv(w + skip, w, "batch", "same"), False))
            cin = w
        # Full resolution: no skip.
        self.final_up = nn.Sequential(PixelShuffleICNR(cin, dw[-1]), DoubleConv(dw[-1], dw[-1], "batch", "same"))
        self.head = nn.Conv2d(dw[-1], self.out_channels, 1)

    def output_size(self, n: int) -> int:
        """Same padding: the output has the input's size."""
        return int(n)

    def valid_input_size(self, n: int) -> int:
        """Same padding: every size is accepted."""
        return int(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-2]
        w = x.shape[-1]
        x = pad_to_multiple(x, self.size_multiple)
        stem = self.stem(x)
        s1 = self.stages[0](self.maxpool(stem))
        s2 = self.stages[1](s1)
        s3 = self.stages[2](s2)
        x = self.stages[3](s3)
        skips = [s3, s2, s1, stem]
        for i, block in enumerate(self.up_blocks):
            x = block(x, skips[i])
        x = self.final_up(x)
        return self.head(x)[:, :, :h, :w]

    def encoder_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature map of every encoder scale of ``x`` (stem /2, stages /4 to /32), shallowest first, as
        :meth:`forward` computes them."""
        x = self.stem(pad_to_multiple(x, self.size_multiple))
        levels = [x]
        x = self.maxpool(x)
        for stage in self.stages:
            x = stage(x)
            levels.append(x)
        return levels
