"""Training targets made from label images, including targets that separate touching cells.

Three kinds, each a (H, W) array made by :func:`make_target` and predicted with :func:`target_channels` outputs:

- ``binary``: {0, 1} foreground; 1 output channel (sigmoid).
- ``boundary``: 3 classes, 0 background, 1 object interior, 2 object boundary (every object pixel that touches
  the background or another object, so touching cells are separated by boundary pixels); 3 output channels
  (softmax). Post-processing seeds a watershed with the peaks of the interior's distance transform.
- ``distance``: float32, each object's Euclidean distance to its outside (background or another object),
  divided by the object's maximum, so 0 outside and (0, 1] inside. It is predicted with 2 output channels:
  channel 0 is the foreground logit (trained against ``target > 0``), channel 1 the distance logit (sigmoid,
  trained against ``target`` on foreground pixels). Post-processing seeds a watershed with the distance peaks.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ..errors import UnetlabError
from ..labels import instance_labels

TARGET_KINDS = ("binary", "boundary", "distance")


def target_channels(kind: str) -> int:
    """Number of network output channels that predict the target ``kind`` (binary 1, boundary 3, distance 2)."""
    try:
        return {"binary": 1, "boundary": 3, "distance": 2}[kind]
    except KeyError:
        raise UnetlabError(f"unknown target '{kind}' (choose {', '.join(TARGET_KINDS)})") from None


def normalized_distance(labels: np.ndarray) -> np.ndarray:
    """Per-object distance to the object's outside, divided by the object's maximum: float32 in [0, 1]."""
    lab = np.asarray(labels)
    out = np.zeros(lab.shape, np.float32)
    h, w = lab.shape
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        crop = lab[sl] == i
        ch, cw = crop.shape
        # an object cut by the image border continues beyond it: mirror it there instead of ending it
        refl = (
            (ch if sl[0].start == 0 else 0, ch if sl[0].stop == h else 0),
            (cw if sl[1].start == 0 else 0, cw if sl[1].stop == w else 0),
        )
        big = np.pad(crop, refl, mode="symmetric") if any(a or b for a, b in refl) else crop
        big = np.pad(big, 1)  # the outside of the crop is outside the object
        dist = ndi.distance_transform_edt(big)[1 + refl[0][0] : 1 + refl[0][0] + ch, 1 + refl[1][0] : 1 + refl[1][0] + cw]
        m = dist[crop].max()
        if m > 0:
            obj = lab[sl] == i
            out[sl][obj] = (dist[obj] / m).astype(np.float32)
    return out


def make_target(labels: np.ndarray, kind: str) -> np.ndarray:
    """The training target of ``kind`` (binary | boundary | distance) for a label image (H, W); see module doc."""
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise UnetlabError(f"expected a 2-D label image, got shape {lab.shape}")
    if kind == "binary":
        return (lab > 0).astype(np.uint8)
    if kind == "boundary":
        from skimage.segmentation import find_boundaries

        inst = instance_labels(lab)
        target = (inst > 0).astype(np.uint8)
        # object pixels with a 4-neighbour of another label (image borders do not count): skimage's inner mode
        target[find_boundaries(inst, connectivity=1, mode="inner")] = 2
        return target
    if kind == "distance":
        return normalized_distance(instance_labels(lab))
    raise UnetlabError(f"unknown target '{kind}' (choose {', '.join(TARGET_KINDS)})")
