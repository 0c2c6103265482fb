"""Building blocks shared by the networks: norms, conv blocks, up-sampling, padding and cropping helpers.

Everything here is written so that it traces and scripts for export: sizes come from tensor shapes at run time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "group", "instance", "layer", "none")
UPSAMPLES = ("bilinear", "transpose", "pixelshuffle")
PADDINGS = ("same", "valid")


class LayerNorm2d(nn.Module):
    """Layer norm over the channels of each pixel (as in ConvNeXt); independent of the image size."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # statistics in float32 also under bf16/fp16 autocast
        mean = xf.mean(dim=1, keepdim=True)
        var = (xf - mean).pow(2).mean(dim=1, keepdim=True)
        xf = (xf - mean) / torch.sqrt(var + self.eps)
        return (xf * self.weight[:, None, None] + self.bias[:, None, None]).to(x.dtype)


def group_count(channels: int, max_groups: int = 32, min_per_group: int = 4) -> int:
    """Number of GroupNorm groups: at most ``max_groups``, at least ``min_per_group`` channels each, a divisor."""
    g = max(1, min(max_groups, channels // min_per_group))
    while channels % g:
        g -= 1
    return g


def make_norm(kind: str, channels: int) -> nn.Module:
    """A 2-D normalisation layer by name: batch, group, instance, layer (per-pixel over channels) or none."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(group_count(channels), channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "layer":
        return LayerNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r} (known: {', '.join(NORMS)})")


def conv_norm_act(cin: int, cout: int, norm: str, padding: str, kernel: int = 3) -> nn.Sequential:
    """Conv (with bias) -> norm -> ReLU; ``padding`` 'same' keeps the size, 'valid' shrinks it by kernel-1."""
    pad = kernel // 2 if padding == "same" else 0
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=pad, bias=True), make_norm(norm, cout),
                         nn.ReLU(inplace=True))


class DoubleConv(nn.Sequential):
    """Two 3x3 conv -> norm -> ReLU layers: one U-Net level."""

    def __init__(self, cin: int, cout: int, norm: str = "batch", padding: str = "same") -> None:
        super().__init__(conv_norm_act(cin, cout, norm, padding), conv_norm_act(cout, cout, norm, padding))


def icnr_(weight: torch.Tensor, scale: int = 2, init=nn.init.kaiming_normal_) -> torch.Tensor:
    """ICNR init (Aitken et al. 2017, as fastai's ``icnr_init``): a sub-pixel conv that starts as nearest up-sampling."""
    ni, nf, h, w = weight.shape
    ni2 = ni // (scale**2)
    k = init(weight.new_zeros([ni2, nf, h, w])).transpose(0, 1)
    k = k.contiguous().view(ni2, nf, -1).repeat(1, 1, scale**2)
    with torch.no_grad():
        weight.copy_(k.contiguous().view([nf, ni, h, w]).transpose(0, 1))
    return weight


class PixelShuffleICNR(nn.Sequential):
    """x2 up-sampling by sub-pixel convolution: 1x1 conv to 4x channels (ICNR init), ReLU, pixel shuffle."""

    def __init__(self, cin: int, cout: int, scale: int = 2) -> None:
        conv = nn.Conv2d(cin, cout * scale**2, 1, bias=True)
        icnr_(conv.weight, scale)
        nn.init.zeros_(conv.bias)
        super().__init__(conv, nn.ReLU(inplace=True), nn.PixelShuffle(scale))


def make_upsample(kind: str, cin: int, cout: int) -> tuple[nn.Module, int]:
    """An x2 up-sampling layer and the channel count it outputs.

    transpose: 2x2 up-convolution to ``cout`` channels (the paper); bilinear: interpolation, channels kept;
    pixelshuffle: sub-pixel conv with ICNR init to ``cout`` channels.
    """
    if kind == "transpose":
        return nn.ConvTranspose2d(cin, cout, 2, stride=2), cout
    if kind == "bilinear":
        return nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False), cin
    if kind == "pixelshuffle":
        return PixelShuffleICNR(cin, cout), cout
    raise ValueError(f"unknown upsample {kind!r} (known: {', '.join(UPSAMPLES)})")


def center_crop_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Crop ``x`` at its centre to the spatial size of ``ref`` (the paper's crop before concatenation)."""
    dh = (x.shape[-2] - ref.shape[-2]) // 2
    dw = (x.shape[-1] - ref.shape[-1]) // 2
    return x[:, :, dh : dh + ref.shape[-2], dw : dw + ref.shape[-1]]


@torch.jit.unused
def _sym_min(a: int, b: int) -> int:
    return torch.sym_min(a, b)


def _min(a: int, b: int) -> int:
    # torch.sym_min keeps symbolic sizes symbolic under torch.export; TorchScript has the builtin min.
    if torch.jit.is_scripting():
        return min(a, b)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):  # sizes under torch.jit.trace
        return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
    return _sym_min(a, b)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom/right so H and W are multiples of ``multiple``: reflect, replicate where the image is too small.

    Written branch-free (reflect as far as the image allows, replicate for the rest) so that it exports with
    dynamic H and W (ONNX through torch.export, TorchScript through scripting).
    """
    h = x.shape[-2]
    w = x.shape[-1]
    ph = (multiple - h % multiple) % multiple
    pw = (multiple - w % multiple) % multiple
    rh = _min(ph, h - 1)
    rw = _min(pw, w - 1)
    x = F.pad(x, [0, rw, 0, rh], mode="reflect")
    return F.pad(x, [0, pw - rw, 0, ph - rh], mode="replicate")


class UpBlock(nn.Module):
    """One decoder level: x2 up-sampling, concatenation with the (centre-cropped if needed) skip, two convs."""

    def __init__(self, up: nn.Module, conv: nn.Module, crop: bool) -> None:
        super().__init__()
        self.up = up
        self.conv = conv
        self.crop = crop

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if self.crop:
            skip = center_crop_to(skip, x)
        return self.conv(torch.cat([skip, x], dim=1))
