"""From predicted probabilities to masks and instance labels: threshold, markers, watershed, cleanup.

Probability layouts by target kind (see :mod:`unetlab.data.targets`):
``binary`` (H, W) or (1, H, W) foreground; ``boundary`` (3, H, W) background/interior/boundary softmax;
``distance`` (2, H, W) foreground probability and normalised distance; ``flow`` (3, H, W) foreground probability
and the flows towards object centres encoded as ``(v + 1) / 2``.

Markers (``PostprocessConfig.markers``) seed a watershed that splits touching objects:

- ``distance``: one marker per peak of a distance map that stands at least ``prominence`` above the saddle to
  any higher neighbour (the h-maxima of the map smoothed with sigma 1). The map is the predicted normalised
  distance (distance target), or the Euclidean distance transform of the predicted interior (boundary target)
  or of the mask (binary target). The watershed floods the negated map. Prominence, not a minimum peak
  spacing, decides, so small and large nuclei in one image are split alike.
- ``interior``: one marker per connected component of the interior class (or of distance > 0.5).
- ``none``: plain connected components of the foreground.
- ``auto``: ``distance`` for the boundary and distance targets, ``none`` for the binary target, ``flow`` for the
  flow target: every foreground pixel follows the predicted flows for :data:`FLOW_STEPS` steps, and pixels whose
  paths end together (within :data:`FLOW_MERGE` pixels) form one object, as in Cellpose.

On the DSB 2018 fluorescence validation images distance markers found far more of the touching nuclei than
interior components (object AP@0.5 0.80 against 0.71 for one boundary model; see README).
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage as ndi

from ..config import PostprocessConfig
from ..errors import UnetlabError

log = logging.getLogger(__name__)

KINDS = ("binary", "boundary", "distance", "flow")
MARKERS = ("auto", "interior", "distance", "none", "flow")
FLOW_STEPS = 200  # Euler steps of 1 pixel along the flows: reaches the centre of objects up to ~400 px across
FLOW_MERGE = 2  # path ends closer than this (pixels) meet in one object


def _channels(prob: np.ndarray, kind: str) -> np.ndarray:
    p = np.asarray(prob, dtype=np.float32)
    want = {"binary": 1, "boundary": 3, "distance": 2, "flow": 3}.get(kind)
    if want is None:
        raise UnetlabError(f"unknown target '{kind}' (choose {', '.join(KINDS)})")
    if p.ndim == 2:
        p = p[None]
    if p.ndim != 3 or p.shape[0] != want:
        raise UnetlabError(f"a '{kind}' prediction needs {want} channel(s) (C, H, W); got shape {p.shape}")
    return p


def foreground_mask(prob: np.ndarray, kind: str, threshold: float = 0.5) -> np.ndarray:
    """The one foreground rule of predictions (masks, streamed masks, labels): foreground probability above
    ``threshold``, i.e. p (binary), p(interior) + p(boundary) (boundary), the foreground channel (distance)."""
    p = _channels(prob, kind)
    if kind == "boundary":
        return p[1:].sum(0) > threshold
    return p[0] > threshold


def resolve_markers(kind: str, markers: str) -> str:
    """The marker mode actually used for ``kind`` when asked for ``markers`` (resolves ``auto``)."""
    if markers not in MARKERS:
        raise UnetlabError(f"unknown markers '{markers}' (choose {', '.join(MARKERS)})")
    if markers == "auto":
        return {"binary": "none", "boundary": "distance", "distance": "distance", "flow": "flow"}[kind]
    if (markers == "flow") != (kind == "flow") and markers != "none":
        raise UnetlabError(f"markers '{markers}' do not apply to a '{kind}' target",
                           hint="use --markers auto or none")
    if markers == "interior" and kind == "binary":
        raise UnetlabError(
            "markers 'interior' need a boundary or distance target", hint="use --markers distance or none"
        )
    return markers


def default_prominence(kind: str) -> float:
    """Default marker prominence: 0.05 of the normalised distance (distance target), else 1 pixel."""
    return 0.05 if kind == "distance" else 1.0


def distance_markers(height: np.ndarray, fg: np.ndarray, prominence: float) -> np.ndarray:
    """Markers (int32 labels) at the peaks of ``height`` inside ``fg`` that rise at least ``prominence`` above
    the saddle to any higher peak: the regional maxima of the h-maxima transform (peaks closer in height
    than that merge into one plateau, which is one marker)."""
    from skimage.morphology import local_maxima, reconstruction

    h = np.float32(max(float(prominence), 1e-6))
    peaks = np.zeros(fg.shape, bool)
    comps, _ = ndi.label(fg)
    # each foreground component on its own (padded) bounding box: separate components never share a saddle
    # above the background, so this equals the whole-image transform at a fraction of the work
    for i, sl in enumerate(ndi.find_objects(comps), start=1):
        if sl is None:
            continue
        inside = np.pad(comps[sl] == i, 1)
        img = np.where(inside, np.pad(height[sl], 1), 0).astype(np.float32)
        hmax = reconstruction(img - h, img, method="dilation")
        tops = local_maxima(hmax, connectivity=2, allow_borders=True) & inside
        peaks[sl] |= tops[1:-1, 1:-1]
    markers, _ = ndi.label(peaks, structure=np.ones((3, 3), bool))
    return markers


def follow_flows(flow: np.ndarray, fg: np.ndarray, steps: int = FLOW_STEPS) -> np.ndarray:
    """Where each foreground pixel ends after ``steps`` Euler steps along ``flow`` (2, H, W; dy, dx in pixels
    per step, bilinear between pixels, 0 outside ``fg``): float (N, 2) positions (y, x), in ``nonzero`` order."""
    import torch
    import torch.nn.functional as F

    h, w = fg.shape
    ys, xs = np.nonzero(fg)
    field = torch.from_numpy(np.where(fg, flow, 0).astype(np.float32))[None]  # (1, 2, H, W)
    pos = torch.from_numpy(np.stack([ys, xs], 1).astype(np.float32))  # (N, 2)
    scale = torch.tensor([2.0 / max(h - 1, 1), 2.0 / max(w - 1, 1)])
    hi = torch.tensor([h - 1.0, w - 1.0])
    for _ in range(int(steps)):
        grid = (pos * scale - 1.0).flip(1)[None, None]  # (1, 1, N, 2) as (x, y) in [-1, 1]
        v = F.grid_sample(field, grid, mode="bilinear", align_corners=True)[0, :, 0].T  # (N, 2)
        pos = torch.minimum(torch.maximum(pos + v, torch.zeros(2)), hi)
    return pos.numpy()


def flow_labels(flow: np.ndarray, fg: np.ndarray, steps: int = FLOW_STEPS, merge: int = FLOW_MERGE) -> np.ndarray:
    """Instance labels from flows: pixels whose paths (:func:`follow_flows`) end within ``merge`` pixels of
    each other's ends are one object (connected components of the dilated path ends)."""
    labels = np.zeros(fg.shape, np.int32)
    if not fg.any():
        return labels
    ends = np.rint(follow_flows(flow, fg, steps)).astype(np.intp)
    sinks = np.zeros(fg.shape, bool)
    sinks[ends[:, 0], ends[:, 1]] = True
    if merge > 0:
        sinks = ndi.binary_dilation(sinks, iterations=int(merge))
    basins, _ = ndi.label(sinks, structure=np.ones((3, 3), bool))
    ys, xs = np.nonzero(fg)
    labels[ys, xs] = basins[ends[:, 0], ends[:, 1]]
    return labels


def _interior(p: np.ndarray, kind: str, fg: np.ndarray, threshold: float) -> np.ndarray:
    """Predicted object interiors inside ``fg``: interior class above ``threshold`` (boundary target) or
    normalised distance above 0.5 (distance target)."""
    return fg & (p[1] > (threshold if kind == "boundary" else 0.5))


def _watershed(elevation: np.ndarray, markers: np.ndarray, fg: np.ndarray) -> np.ndarray:
    from skimage.segmentation import watershed

    labels = watershed(elevation, markers=markers, mask=fg)
    # foreground components that received no marker become objects of their own
    orphan = fg & (labels == 0)
    if orphan.any():
        extra, n = ndi.label(orphan)
        labels = np.where(orphan, extra + labels.max(), labels)
    return labels


def _fill_object_holes(labels: np.ndarray) -> np.ndarray:
    """Fill holes inside each object (pixels of the background enclosed by that one object)."""
    out = labels
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        obj = labels[sl] == i
        filled = ndi.binary_fill_holes(obj)
        add = filled & ~obj & (labels[sl] == 0)
        if add.any():
            out[sl][add] = i
    return out


def remove_small_objects(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Labels (int32) with objects smaller than ``min_size`` pixels removed and the rest renumbered 1..n."""
    import inspect
    import warnings

    from skimage import morphology
    from skimage.segmentation import relabel_sequential

    lab = np.asarray(labels)
    if lab.dtype == bool:  # one object, as label 1 (skimage would split a bool mask into components)
        lab = lab.view(np.uint8)
    if lab.size == 0:
        return lab.astype(np.int32)
    if min_size > 1:
        # skimage >= 0.26 removes sizes <= max_size (min_size, deprecated there, removes sizes < min_size);
        # an integer array is taken as labels (no new connected components)
        new_api = "max_size" in inspect.signature(morphology.remove_small_objects).parameters
        size = {"max_size": min_size - 1} if new_api else {"min_size": min_size}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Only one label", UserWarning)  # one object is fine here
            lab = morphology.remove_small_objects(lab, **size)
    return relabel_sequential(lab)[0].astype(np.int32, copy=False)


def probabilities_to_labels(
    prob: np.ndarray, kind: str = "binary", cfg: PostprocessConfig | None = None
) -> np.ndarray:
    """Instance labels (int32, 0 background, objects 1..n) from a prediction: threshold, seeded watershed,
    hole filling and small-object removal, as set by ``cfg`` (see the module doc for ``markers``)."""
    cfg = cfg or PostprocessConfig()
    p = _channels(prob, kind)
    mode = resolve_markers(kind, cfg.markers)
    fg = foreground_mask(p, kind, cfg.threshold)
    if not fg.any():
        return np.zeros(fg.shape, np.int32)
    if mode == "none":
        labels, _ = ndi.label(fg)
    elif mode == "flow":
        labels = flow_labels(2.0 * p[1:3] - 1.0, fg)
    elif mode == "interior":
        markers, _ = ndi.label(_interior(p, kind, fg, cfg.threshold))
        labels = _watershed(1.0 - p[1], markers, fg)
    else:  # distance
        if kind == "distance":
            dist = np.where(fg, p[1], 0.0)
        else:
            dist = ndi.distance_transform_edt(_interior(p, kind, fg, cfg.threshold) if kind == "boundary" else fg)
        height = ndi.gaussian_filter(dist.astype(np.float32), 1.0)
        prominence = default_prominence(kind) if cfg.prominence is None else cfg.prominence
        markers = distance_markers(height, fg, prominence)
        labels = _watershed(-height, markers, fg)
    labels = labels.astype(np.int32, copy=False)
    if cfg.fill_holes:
        labels = _fill_object_holes(labels)
    return remove_small_objects(labels, cfg.min_size)


def probabilities_to_classes(prob: np.ndarray) -> np.ndarray:
    """Class-index image (uint8/uint16) from multiclass probabilities (K, H, W) by argmax."""
    p = np.asarray(prob)
    if p.ndim != 3:
        raise UnetlabError(f"multiclass probabilities must be (K, H, W); got shape {p.shape}")
    idx = p.argmax(axis=0)
    return idx.astype(np.uint8 if p.shape[0] <= 256 else np.uint16)

