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
- ``flow``: float32 (3, H, W), the foreground and each object pixel's unit vector (dy, dx) towards its object's
  centre (Cellpose-style flows; 0 at the centre and outside), predicted with 3 sigmoid channels: channel 0 the
  foreground, channels 1-2 the flow as ``(v + 1) / 2``. Touching objects meet where their flows point apart, so
  post-processing follows the flows and every pixel joins the object whose centre it reaches. The flows point
  straight at the centre, as StarDist's rays leave it: made for objects star-shaped about their centre (nuclei),
  where Cellpose's diffused flows also bend around the bays of irregular cells.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ..errors import UnetlabError
from ..labels import instance_labels

TARGET_KINDS = ("binary", "boundary", "distance", "flow")
INSTANCE_KINDS = ("boundary", "distance", "flow")  # targets that separate touching objects


def target_channels(kind: str) -> int:
    """Number of network output channels that predict the target ``kind`` (binary 1, boundary 3, distance 2,
    flow 3)."""
    try:
        return {"binary": 1, "boundary": 3, "distance": 2, "flow": 3}[kind]
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


def _object_centre(obj: np.ndarray) -> tuple[int, int]:
    """The centre of one object mask: its pixel nearest the centroid among those at least half its maximum
    distance from the outside (so inside the object even when it is not convex)."""
    dist = ndi.distance_transform_edt(np.pad(obj, 1))[1:-1, 1:-1]
    ys, xs = np.nonzero(obj)
    d = dist[ys, xs]
    far = np.where(d >= 0.5 * d.max(), (ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2, np.inf)
    k = int(np.argmin(far))
    return int(ys[k]), int(xs[k])


def centre_flows(labels: np.ndarray) -> np.ndarray:
    """Flows (2, H, W) float32: each object pixel's vector (dy, dx) towards its object's centre, of length 1
    beyond one pixel from it (shorter within, 0 at the centre); 0 outside objects."""
    lab = np.asarray(labels)
    flow = np.zeros((2, *lab.shape), np.float32)
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        obj = lab[sl] == i
        cy, cx = _object_centre(obj)
        ys, xs = np.nonzero(obj)
        dy, dx = (cy - ys).astype(np.float32), (cx - xs).astype(np.float32)
        norm = np.maximum(np.hypot(dy, dx), 1.0)
        flow[0][sl][obj] = dy / norm
        flow[1][sl][obj] = dx / norm
    return flow


def make_target(labels: np.ndarray, kind: str) -> np.ndarray:
    """The training target of ``kind`` (binary | boundary | distance | flow) for a label image (H, W): (H, W),
    or (3, H, W) for flow; see the module doc."""
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
    if kind == "flow":
        inst = instance_labels(lab)
        return np.concatenate([(inst > 0)[None].astype(np.float32), centre_flows(inst)])
    raise UnetlabError(f"unknown target '{kind}' (choose {', '.join(TARGET_KINDS)})")
