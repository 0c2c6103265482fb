"""Named networks: a registry ``name -> (builder, description)`` and :func:`build_model` that looks names up.

Every builder takes a :class:`~unetlab.config.ModelConfig` and honours ``in_channels``/``out_channels``
(and ``padding`` where the preset allows a choice).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import UnetlabError
from .geometry import model_geometry
from .unet import UNet

Builder = Callable[[ModelConfig], nn.Module]


@dataclass(frozen=True)
class Preset:
    """One registry entry: how to build the network and a one-line description."""

    builder: Builder
    description: str
    takes: tuple[str, ...] = ()  # the MODEL_KEYS it reads from the config (it fixes the others itself)


PRESETS: dict[str, Preset] = {}
MODEL_KEYS = ("depth", "base_width", "widths", "norm", "padding", "dropout", "upsample")


def register(name: str, description: str, takes: tuple[str, ...] = ()) -> Callable[[Builder], Builder]:
    """Decorator adding ``builder(cfg) -> nn.Module`` to the registry under ``name``; ``takes``: the model
    settings it reads."""

    def deco(fn: Builder) -> Builder:
        PRESETS[name] = Preset(fn, description, takes)
        return fn

    return deco


def ignored_settings(preset: str, is_set: Callable[[str], bool]) -> list[str]:
    """The model settings a user set (``is_set(key)``) that ``preset`` does not read: it fixes them itself."""
    entry = PRESETS.get(preset)
    return [] if entry is None else [k for k in MODEL_KEYS if k not in entry.takes and is_set(k)]


def _channels(cfg: ModelConfig) -> tuple[int, int]:
    cin = 1 if cfg.in_channels is None else int(cfg.in_channels)
    cout = 1 if cfg.out_channels is None else int(cfg.out_channels)
    if cin < 1 or cout < 1:
        raise UnetlabError(f"model channels must be positive (in_channels={cin}, out_channels={cout})")
    return cin, cout


def _check_choice(key: str, value: str, known: tuple[str, ...]) -> None:
    if value not in known:
        raise UnetlabError(f"unknown model.{key} {value!r} (known: {', '.join(known)})")


@register("unet", "generic U-Net from the config (default: depth 4, widths 32-512, batch norm, bilinear, same)",
          takes=MODEL_KEYS)
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


@register("unet-paper", "Ronneberger 2015: 64-1024, valid 3x3 convs, 2x2 up-convs, crop+concat, no norm (31.0M)",
          takes=("dropout",))
def build_unet_paper(cfg: ModelConfig) -> nn.Module:
    """The published U-Net (valid padding; 31,030,658 parameters for 1 in / 2 out); dropout from the config."""
    cin, cout = _channels(replace(cfg, out_channels=cfg.out_channels or 2))
    return UNet(cin, cout, PAPER_WIDTHS, "none", "valid", cfg.dropout, "transpose")


@register("unet-paper-same", "unet-paper with same padding: output size = input size, any size accepted",
          takes=("dropout",))
def build_unet_paper_same(cfg: ModelConfig) -> nn.Module:
    """The published U-Net with zero/reflect 'same' padding instead of valid convolutions."""
    cin, cout = _channels(replace(cfg, out_channels=cfg.out_channels or 2))
    return UNet(cin, cout, PAPER_WIDTHS, "none", "same", cfg.dropout, "transpose")


@register("unet-slim", "24-384 U-Net, batch norm, bilinear up, same padding (4.42M); padding from the config",
          takes=("padding", "dropout"))
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


@register("resnet34-unet", "ResNet-34 encoder (any input channels) + pixel-shuffle ICNR decoder, same padding (24.4M)",
          takes=("padding",))
def build_resnet34_unet(cfg: ModelConfig) -> nn.Module:
    """ResNet-34 U-Net (24,351,921 parameters for 3 in / 1 out); same padding only."""
    from .resnet_unet import ResNetUNet

    if cfg.padding != "same":
        raise UnetlabError(f"preset resnet34-unet only supports padding 'same' (got {cfg.padding!r})")
    cin, cout = _channels(cfg)
    return ResNetUNet(cin, cout)


CANONICAL_CHANNELS = {"unet-paper": (1, 2), "unet-paper-same": (1, 2), "resnet34-unet": (3, 1)}


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the network named by ``cfg.preset``; unknown names are a UnetlabError listing the known ones."""
    preset = PRESETS.get(cfg.preset)
    if preset is None:
        raise UnetlabError(f"unknown model preset {cfg.preset!r} (known: {', '.join(sorted(PRESETS))})")
    return preset.builder(cfg)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def narrow_copy(model: nn.Module) -> nn.Module:
    """A model with the same topology (so the same receptive field) but one channel per layer and no norm."""
    from .resnet_unet import ResNetUNet
    from .unet import UNet

    if isinstance(model, UNet):
        return UNet(model.in_channels, 1, [1] * len(model.widths), "none", model.padding, 0.0, model.upsample)
    if isinstance(model, ResNetUNet):
        return ResNetUNet(model.in_channels, 1, model.blocks, (1, 1, 1, 1), (1, 1, 1, 1, 1))
    raise TypeError(f"no narrow copy for {type(model).__name__}")


def receptive_field(model: nn.Module, max_size: int = 8192) -> int:
    """Receptive field in pixels along one axis: how many input rows can change one output pixel.

    Gradient probe on a copy whose convs average their inputs (positive weights, so no ReLU blocks a
    path) and whose max-pools are average-pools of the same window; the widest band of input rows with a
    non-zero gradient over ``2**depth`` output rows (every pooling phase) is the field. Pass a narrow copy
    (:func:`narrow_copy`): the field depends on the topology only, and norms are left out of it.
    """
    probe = copy.deepcopy(model).float().eval()
    for parent in list(probe.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
    with torch.no_grad():
        for m in probe.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                m.weight.fill_(m.weight.shape[0] / m.weight.numel())
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
    step = model_geometry(model).size_multiple
    size = 64 * step
    while True:
        height = model.valid_input_size(size)
        x = torch.ones(step, int(model.in_channels), height, model.valid_input_size(step), dtype=torch.float32,
                       requires_grad=True)
        y = probe(x)
        centre = y.shape[-2] // 2
        torch.stack([y[k, :, centre + k, :].sum() for k in range(step)]).sum().backward()
        best, touches = 0, False
        for k in range(step):
            rows = (x.grad[k] != 0).any(dim=0).any(dim=-1).nonzero().flatten()
            if len(rows):
                best = max(best, int(rows.max() - rows.min()) + 1)
                touches = touches or int(rows.min()) == 0 or int(rows.max()) == height - 1
        if not touches or size * 2 > max_size:
            return best
        size *= 2


_RF_CACHE: dict[str, int] = {}


def _preset_receptive_field(name: str, model: nn.Module) -> int:
    if name not in _RF_CACHE:
        _RF_CACHE[name] = receptive_field(narrow_copy(model))
    return _RF_CACHE[name]


# (parameters, receptive field in px) of each preset at its canonical channels, as count_parameters and
# receptive_field measure them (tests/test_cli_models.py checks that they still do): `unetlab models` then builds
# and probes no network (seconds each); a preset missing here is measured
PRESET_FACTS = {"unet": (7_851_969, 236), "unet-paper": (31_030_658, 204), "unet-paper-same": (31_030_658, 204),
                "unet-slim": (4_418_449, 236), "resnet34-unet": (24_351_921, 1027)}


def measure_preset(name: str) -> tuple[int, int]:
    """(parameters, receptive field) of preset ``name`` at its canonical channels, measured."""
    cin, cout = CANONICAL_CHANNELS.get(name, (1, 1))
    with torch.device("meta"):  # count without allocating or initialising the weights
        model = PRESETS[name].builder(ModelConfig(preset=name, in_channels=cin, out_channels=cout))
    return count_parameters(model), _preset_receptive_field(name, model)


def list_presets() -> list[dict]:
    """One dict per preset: name, in/out channels counted, parameter count, receptive field, description."""
    out = []
    for name, preset in PRESETS.items():
        cin, cout = CANONICAL_CHANNELS.get(name, (1, 1))
        parameters, field = PRESET_FACTS.get(name) or measure_preset(name)
        out.append({"name": name, "in_channels": cin, "out_channels": cout, "parameters": parameters,
                    "receptive_field": field, "description": preset.description})
    return out


def format_presets_table(rows: list[dict]) -> str:
    """The presets as an aligned text table (``unetlab models``)."""
    header = ("preset", "in/out", "parameters", "receptive field", "description")
    lines = [(r["name"], f"{r['in_channels']}/{r['out_channels']}", f"{r['parameters']:,}",
              f"{r['receptive_field']} px", r["description"]) for r in rows]
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(4)]
    out = []
    for row in [header, *lines]:
        out.append("  ".join([str(row[0]).ljust(widths[0]), str(row[1]).rjust(widths[1]),
                              str(row[2]).rjust(widths[2]), str(row[3]).rjust(widths[3]), str(row[4])]))
    return "\n".join(out)
