"""Networks: the generic U-Net, the published and slim U-Nets, a ResNet-34 U-Net, and BatchNorm folding.

``build_model(cfg)`` turns a :class:`~unetlab.config.ModelConfig` into an ``nn.Module`` that follows the model
contract (``forward``, ``padding``, ``output_size``, ``valid_input_size``, ``in_channels``, ``out_channels``,
``depth``).
"""

from __future__ import annotations

from .presets import PRESETS, build_model, count_parameters
from .unet import UNet

__all__ = ["PRESETS", "UNet", "build_model", "count_parameters"]
