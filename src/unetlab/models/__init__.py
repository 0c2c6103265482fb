"""Networks: the generic U-Net, the published and slim U-Nets, a ResNet-34 U-Net, and BatchNorm folding.

``build_model(cfg)`` turns a :class:`~unetlab.config.ModelConfig` into an ``nn.Module`` that follows the model
contract (``forward``, ``padding``, ``size_multiple``, ``output_size``, ``valid_input_size``, ``in_channels``,
``out_channels``, ``depth``); :func:`model_geometry` reads the sizes part of it.
"""

from __future__ import annotations

from .fuse import fuse_batchnorm
from .geometry import Geometry, model_geometry
from .presets import PRESETS, build_model, count_parameters, ignored_settings, list_presets, receptive_field
from .resnet_unet import ResNetUNet
from .unet import UNet

__all__ = [
    "Geometry",
    "PRESETS",
    "ResNetUNet",
    "UNet",
    "build_model",
    "count_parameters",
    "fuse_batchnorm",
    "ignored_settings",
    "list_presets",
    "model_geometry",
    "receptive_field",
]
