"""Data in: reading images, dataset layouts, splits, patches and the torch Dataset."""

from .io import normalize, read_image, read_label, write_image
from .layouts import detect_layout, load_dataset
from .sample import DatasetInfo, Sample

__all__ = ["DatasetInfo", "Sample", "detect_layout", "load_dataset", "normalize", "read_image", "read_label",
           "write_image"]
