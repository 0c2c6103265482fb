"""Dataset layouts: each module turns a folder into a :class:`DatasetInfo`; a small registry picks one.

A layout module registers a ``detect(root) -> bool`` and a ``load(root, **options) -> DatasetInfo``.
Detection tries layouts in registration order (most specific first): timelapse, kaggle_dsb, pennfudan,
multiclass, paired, rle_csv. Loaders take keyword options (``invert_mask``, ``mask_dir``, ``classes``, ...) and
ignore the ones they do not use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import UnetlabError
from ..sample import DatasetInfo
from .registry import LAYOUTS, Layout, register_layout

if TYPE_CHECKING:
    from ...config import DataConfig

__all__ = ["LAYOUTS", "Layout", "detect_layout", "filter_samples", "load_dataset", "load_from_config",
           "output_name", "register_layout"]

log = logging.getLogger(__name__)


def output_name(sample_name: str) -> str:
    """The file name (without extension) of a sample's outputs: its name with ``/`` as ``__``
    (``expA/Pos001/img_0`` -> ``expA__Pos001__img_0``); predict names its outputs so, evaluate pairs by it."""
    return sample_name.replace("/", "__")


def detect_layout(root: str | Path) -> str:
    """Name of the first registered layout that recognises ``root``; raises a one-line error if none does."""
    root = Path(root)
    if not root.exists():
        raise UnetlabError("data folder not found", root)
    if not root.is_dir():
        raise UnetlabError("expected a folder of images and masks", root,
                           f"give the folder that holds it, {root.parent}" if root.suffix.lower() == ".csv" else None)
    for layout in LAYOUTS.values():
        if layout.detect(root):
            return layout.name
    if not any(not p.name.startswith(".") for p in root.iterdir()):
        raise UnetlabError("the data folder is empty", root, "put images/ and masks/ subfolders in it")
    raise UnetlabError(
        "no known dataset layout found",
        root,
        "expected e.g. images/ and masks/ subfolders; known layouts: "
        + "; ".join(f"{lay.name} ({lay.description})" for lay in LAYOUTS.values()),
    )


def load_dataset(root: str | Path, layout: str | None = None, **options) -> DatasetInfo:
    """Read ``root`` with the named layout (auto-detected when None) into a DatasetInfo."""
    root = Path(root)
    if layout is None and options.get("mask_dir") and (root / str(options["mask_dir"])).is_dir():
        layout = "multiclass" if LAYOUTS["multiclass"].detect(root) else "paired"
    name = layout or detect_layout(root)
    if name not in LAYOUTS:
        raise UnetlabError(f"unknown layout '{name}' (known: {', '.join(LAYOUTS)})")
    if not root.is_dir():
        raise UnetlabError("data folder not found", root)
    return LAYOUTS[name].load(root, **options)


def load_from_config(cfg: DataConfig) -> DatasetInfo:
    """Read the dataset a :class:`DataConfig` describes (root, layout, invert_mask, mask_dir, classes)."""
    if not cfg.root:
        raise UnetlabError("no data folder given", hint="pass DATA or set data.root")
    info = load_dataset(cfg.root, cfg.layout, invert_mask=cfg.invert_mask, mask_dir=cfg.mask_dir,
                        classes=cfg.classes)
    if cfg.include:
        info.samples = filter_samples(info.samples, cfg.include)
    return info


def filter_samples(samples: list, include: str) -> list:
    """Keep the samples named in a text file (one name or group per line), or matching a glob / 're:<regex>'."""
    from ..split import name_matcher

    path = Path(include)
    if path.suffix in (".txt", ".csv", ".lst") or path.is_file():
        if not path.is_file():
            raise UnetlabError("include list not found", path)
        names = {ln.strip().split(",")[0] for ln in path.read_text().splitlines() if ln.strip()}
        kept = [s for s in samples if s.name in names or s.group in names]
        unknown = sorted(names - {s.name for s in samples} - {s.group for s in samples})
    else:
        match = name_matcher(include, "--include")
        kept = [s for s in samples if match(s.name)]
        unknown = []
    example = f"sample names look like {samples[0].name!r}" if samples else None
    if not kept:
        raise UnetlabError(f"--include {include} keeps none of the {len(samples)} samples", hint=example)
    if unknown:
        log.warning("--include %s: %d of its %d names match no sample or group (%s%s); %s", include, len(unknown),
                    len(names), ", ".join(unknown[:3]), ", ..." if len(unknown) > 3 else "", example)
    return kept


# Registration order is detection order: most specific first.
from . import timelapse  # noqa: E402,F401,I001
from . import kaggle_dsb  # noqa: E402,F401
from . import pennfudan  # noqa: E402,F401
from . import multiclass  # noqa: E402,F401
from . import paired  # noqa: E402,F401
from . import rle_csv  # noqa: E402,F401

_ORDER = ("timelapse", "kaggle_dsb", "pennfudan", "multiclass", "paired", "rle_csv")
_registered = dict(LAYOUTS)
LAYOUTS.clear()
LAYOUTS.update({n: _registered[n] for n in _ORDER})
LAYOUTS.update({n: lay for n, lay in _registered.items() if n not in LAYOUTS})
