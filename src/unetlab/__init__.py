"""unetlab: train U-Nets on folders of microscopy images and masks; predict masks, instance labels and counts."""

from __future__ import annotations

__version__ = "0.1.0"

from .config import RunConfig
from .errors import UnetlabError

__all__ = ["RunConfig", "UnetlabError", "__version__"]
