"""The torch Dataset over Samples: decoded-image cache, on-the-fly patch sampling, augmentation and targets.

Patch ``k`` of the run is drawn from an RNG seeded by ``(seed, k)``, so a run is reproducible whatever the number
of worker processes or ranks; :class:`EpochSampler` hands out the indices ``epoch * length + i``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..config import DataConfig
from ..errors import UnetlabError
from .augment import build_augment, draw_zoom, resize_patch, zoom_probability, zoom_window
from .channels import apply_channels
from .io import normalize, read_image
from .sample import Sample
from .sizes import object_diameters, size_factor
from .targets import make_target

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A decoded sample: normalised image (C, H, W) float32 and label image (H, W) int32."""

    image: np.ndarray
    labels: np.ndarray


def load_image(sample: Sample, cfg: DataConfig) -> np.ndarray:
    """Read and normalise the image of ``sample`` (channel selection/codes are applied later, per draw)."""
    img = read_image(sample.image)
    return normalize(img, cfg.normalization, cfg.norm_low, cfg.norm_high)


def load_sample(sample: Sample, cfg: DataConfig) -> Loaded:
    """Read image and label image of ``sample`` and check that their sizes agree."""
    image = load_image(sample, cfg)
    labels = sample.load_mask()
    if labels.shape != image.shape[1:]:
        raise UnetlabError(
            f"mask size {labels.shape[0]}x{labels.shape[1]} does not match image size "
            f"{image.shape[1]}x{image.shape[2]}",
            sample.mask_paths[0] if sample.mask_paths else sample.image,
            "re-export the mask at the size of its image",
        )
    return Loaded(image, labels.astype(np.int32, copy=False))


def readable_samples(samples: list[Sample], cfg: DataConfig) -> tuple[list[Sample], list[str]]:
    """The samples whose image and mask read, agree in size and have the most common channel count, and one
    line per sample left out (for ``--skip-bad``). Reads every sample once; nothing is kept in memory."""
    good: list[tuple[Sample, int]] = []
    bad: list[str] = []
    for s in samples:
        try:
            item = load_sample(s, cfg)
        except UnetlabError as exc:
            bad.append(str(exc))
            continue
        good.append((s, int(item.image.shape[0])))
    if good:
        channels = Counter(c for _s, c in good).most_common(1)[0][0]
        bad += [f"{s.image}: image has {c} channel(s), most images have {channels}" for s, c in good if c != channels]
        good = [(s, c) for s, c in good if c == channels]
    return [s for s, _c in good], bad


class SampleCache:
    """Decoded samples, kept in memory when ``cfg.cache`` (per process; each worker fills its own copy)."""

    def __init__(self, samples: list[Sample], cfg: DataConfig) -> None:
        self.samples = samples
        self.cfg = cfg
        self._items: dict[int, Loaded] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Loaded:
        item = self._items.get(i)
        if item is None:
            item = load_sample(self.samples[i], self.cfg)
            if self.cfg.cache:
                self._items[i] = item
        return item

    def preload(self) -> None:
        """Decode every sample now (before worker processes fork, so they share the pages)."""
        for i in range(len(self)):
            self[i]


def target_tensor(labels: np.ndarray, kind: str, multiclass: bool) -> torch.Tensor:
    """The training target for a label patch: float (1, H, W) for binary/distance, float (3, H, W) for flow,
    long (H, W) for classes and boundary."""
    if multiclass:
        return torch.from_numpy(labels.astype(np.int64))
    t = make_target(labels, kind)
    if kind == "boundary":
        return torch.from_numpy(t.astype(np.int64))
    t = torch.from_numpy(t.astype(np.float32))
    return t if t.dim() == 3 else t[None]


def _crop_with_padding(arr: np.ndarray, y: int, x: int, size: int) -> np.ndarray:
    """Crop ``arr[..., y:y+size, x:x+size]``, mirror-padding where the window leaves the array."""
    h, w = arr.shape[-2:]
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + size, h), min(x + size, w)
    out = arr[..., y0:y1, x0:x1]
    pads = ((y0 - y, y + size - y1), (x0 - x, x + size - x1))
    if any(p for pair in pads for p in pair):
        mode = "reflect" if min(out.shape[-2:]) > 1 else "edge"
        out = np.pad(out, ((0, 0),) * (arr.ndim - 2) + pads, mode=mode)
    return out


class PatchDataset(Dataset):
    """Random training patches with augmentation; item ``k`` is a deterministic function of ``(seed, k)``."""

    def __init__(
        self,
        samples: list[Sample],
        cfg: DataConfig,
        patch_size: int,
        length: int,
        multiclass: bool = False,
        weight_fn=None,
        seed: int = 0,
    ) -> None:
        if not samples:
            raise UnetlabError("no training samples")
        self.cache = SampleCache(samples, cfg)
        self.cfg = cfg
        self.patch = int(patch_size)
        self.length = int(length)
        self.multiclass = multiclass
        self.weight_fn = weight_fn
        self.seed = seed
        self.augment = build_augment(cfg.augment)
        self.zoom_p = 0.0 if multiclass else zoom_probability(cfg.augment, cfg.target)
        self._fg: dict[int, np.ndarray] = {}
        self._weights: dict[int, np.ndarray] = {}
        self._sizes: list[float] | None = None  # per-image zoom of size normalisation

    @functools.cached_property
    def object_diameters(self) -> list[np.ndarray]:
        """Each training image's object diameters (pixels), measured once."""
        return [object_diameters(self.cache[i].labels) for i in range(len(self.cache))]

    @property
    def diameter(self) -> float | None:
        """Median object diameter over all training objects (pixels; None without objects)."""
        every = np.concatenate(self.object_diameters)
        return float(np.median(every)) if len(every) else None

    def size_factors(self) -> list[float]:
        """Each image's zoom that brings its objects to the training median (all 1 without size_normalize)."""
        if self._sizes is None:
            if self.cfg.size_normalize and not self.multiclass:
                train_d = self.diameter
                self._sizes = [size_factor(float(np.median(d)) if len(d) else None, train_d)
                               for d in self.object_diameters]
            else:
                self._sizes = [1.0] * len(self.cache)
        return self._sizes

    def __len__(self) -> int:
        return self.length

    def _foreground(self, i: int, labels: np.ndarray) -> np.ndarray:
        fg = self._fg.get(i)
        if fg is None:
            fg = np.flatnonzero(labels.ravel() > 0)
            self._fg[i] = fg
        return fg

    def _weight_map(self, i: int, labels: np.ndarray) -> np.ndarray | None:
        if self.weight_fn is None:
            return None
        wm = self._weights.get(i)
        if wm is None:  # computed once per image, not per step
            wm = self.weight_fn(labels).astype(np.float32)
            self._weights[i] = wm
        return wm

    def precompute(self) -> None:
        """Decode every image and compute its foreground index and weight map now, in this process: done
        before worker processes fork, they share these (copy-on-write) instead of each computing its own."""
        for i in range(len(self.cache)):
            item = self.cache[i]
            self._foreground(i, item.labels)
            self._weight_map(i, item.labels)
        self.size_factors()

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(k)])
        i = int(rng.integers(len(self.cache)))
        item = self.cache[i]
        h, w = item.labels.shape
        zoom = draw_zoom(self.cfg.augment, rng, self.zoom_p) * self.size_factors()[i]
        p = self.patch if zoom == 1.0 else zoom_window(self.patch, zoom)  # the source window's side
        fg = self._foreground(i, item.labels)
        if len(fg) and rng.random() < self.cfg.foreground_fraction:
            c = int(fg[rng.integers(len(fg))])
            cy, cx = divmod(c, w)
            y = cy - p // 2 + int(rng.integers(-p // 4, p // 4 + 1))
            x = cx - p // 2 + int(rng.integers(-p // 4, p // 4 + 1))
            y = min(max(y, 0), max(h - p, 0)) if h >= p else (h - p) // 2
            x = min(max(x, 0), max(w - p, 0)) if w >= p else (w - p) // 2
        else:
            y = int(rng.integers(0, h - p + 1)) if h >= p else (h - p) // 2
            x = int(rng.integers(0, w - p + 1)) if w >= p else (w - p) // 2
        image = _crop_with_padding(item.image, y, x, p)
        image = apply_channels(image, self.cfg, rng, source=self.cache.samples[i].image)
        targets = [_crop_with_padding(item.labels, y, x, p)]
        wm = self._weight_map(i, item.labels)
        if wm is not None:
            targets.append(_crop_with_padding(wm, y, x, p))
        if p != self.patch:  # zoom: the window, resized to the patch (labels by nearest neighbour)
            image = resize_patch(image, self.patch, labels=False)
            targets = [resize_patch(t, self.patch, labels=k == 0) for k, t in enumerate(targets)]
        image, targets = self.augment(image, targets, rng)
        out = {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "target": target_tensor(targets[0], self.cfg.target, self.multiclass),
        }
        if wm is not None:
            out["weight"] = torch.from_numpy(np.ascontiguousarray(targets[1], dtype=np.float32))
        return out


class EpochSampler(Sampler[int]):
    """Indices ``epoch * length + i`` for this rank's share of ``i`` in ``range(length)``."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.rank, self.world = length, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose indices the next iteration yields."""
        self.epoch = epoch

    def __iter__(self):
        base = self.epoch * self.length
        return iter(range(base + self.rank, base + self.length, self.world))

    def __len__(self) -> int:
        return math.ceil((self.length - self.rank) / self.world)


def resolve_num_workers(setting: int | None, device_type: str, processes: int = 1) -> int:
    """The worker count to use: ``setting`` when it is 0 or more, else :func:`default_num_workers`."""
    if setting is None or setting < 0:
        return default_num_workers(device_type, processes=processes)
    return int(setting)


def default_num_workers(device_type: str, cores: int | None = None, processes: int = 1) -> int:
    """Patch-loading worker processes for training on ``device_type`` when the config leaves it open.

    CPU training keeps the data in the main process: its network is compute-bound, a batch of patches costs
    well under 1% of a step (measured by benchmarks/bench_train.py), and a worker would take a core from the
    convolutions. A GPU trainer gets up to 4 workers from its share of the cores (``processes`` training
    processes on this machine), leaving one core to the process that drives the GPU.
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = cores // max(1, processes)
    if device_type == "cpu" or share < 2:
        return 0
    return min(4, share - 1)


def default_samples_per_epoch(cache: SampleCache, patch_size: int) -> int:
    """Enough patches to cover the (decoded) training images about once, at least 16."""
    total = sum(int(np.prod(cache[i].labels.shape)) for i in range(len(cache)))
    return max(16, int(round(total / patch_size**2)))
