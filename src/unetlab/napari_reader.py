"""napari reader (npe2): a ``unetlab predict`` output folder, or one of its label TIFFs, opens as layers.

Each predicted image becomes an image layer (the source image, found through ``predictions.json``) with its
instance labels (``labels/``) and its mask (``masks/`` or ``classes/``) as labels layers. Nothing here imports
napari: the reader returns napari's plain ``(data, metadata, layer_type)`` tuples. Anything that is not a
unetlab output gives ``None``, so napari falls back to its other readers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

LayerData = tuple[Any, dict, str]
PREDICTIONS_JSON = "predictions.json"  # as written by unetlab.inference.predict
_OUTPUT_DIRS = ("labels", "masks", "classes")


def _prediction_folder(path: Path) -> Path | None:
    """The prediction output folder that ``path`` is, or holds ``path`` as one of its label/mask files."""
    if path.is_dir() and (path / PREDICTIONS_JSON).is_file():
        return path
    if path.is_file() and path.parent.name in _OUTPUT_DIRS and (path.parent.parent / PREDICTIONS_JSON).is_file():
        return path.parent.parent
    return None


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2 reader contribution: a reader for unetlab prediction folders and their label/mask files, else None."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths or any(_prediction_folder(Path(p)) is None for p in paths):
        return None
    return read_predictions


def _names_in(folder: Path, path: Path, images: dict[str, str]) -> list[str]:
    if path.is_file():
        return [path.stem]
    return list(images) or sorted({p.stem for d in _OUTPUT_DIRS for p in (folder / d).glob("*.*")})


def _find(folder: Path, sub: str, name: str) -> Path | None:
    for suffix in (".tif", ".png"):
        p = folder / sub / f"{name}{suffix}"
        if p.is_file():
            return p
    return None


def _image_layer(source: Path, name: str) -> LayerData | None:
    from .data.io import read_image
    from .errors import UnetlabError

    try:
        image = read_image(source)
    except UnetlabError as exc:
        log.warning("%s; showing its outputs without it", exc)
        return None
    meta: dict = {"name": name}
    if image.shape[0] == 1:
        return image[0], meta, "image"
    if image.shape[0] == 3:  # RGB as one colour image
        return np.moveaxis(image, 0, -1), {**meta, "rgb": True}, "image"
    return image, {**meta, "channel_axis": 0, "name": [f"{name} ch{c}" for c in range(image.shape[0])]}, "image"


def read_predictions(path: str | list[str]) -> list[LayerData]:
    """Layers for every image of a prediction folder (or the given label/mask files): source, labels, mask."""
    from .data.io import read_label

    layers: list[LayerData] = []
    for p in [path] if isinstance(path, str) else path:
        p = Path(p)
        folder = _prediction_folder(p)
        if folder is None:
            continue
        info = json.loads((folder / PREDICTIONS_JSON).read_text())
        images: dict[str, str] = info.get("images", {})
        for name in _names_in(folder, p, images):
            source = Path(images[name]) if name in images else None
            if source is not None and source.exists():
                layer = _image_layer(source, name)
                if layer is not None:
                    layers.append(layer)
            labels = _find(folder, "labels", name)
            if labels is not None:
                layers.append((read_label(labels), {"name": f"{name} labels"}, "labels"))
            mask_dir = "classes" if info.get("multiclass") else "masks"
            mask = _find(folder, mask_dir, name)
            if mask is not None:
                m = read_label(mask)
                data = m if info.get("multiclass") else (m > 0).astype(np.uint8)
                layers.append((data, {"name": f"{name} mask", "visible": labels is None, "opacity": 0.5},
                               "labels"))
    return layers


__all__ = ["get_reader", "read_predictions"]
