"""The flow target (Cellpose-style vectors towards object centres): target, loss, post-processing, TTA, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unetlab.config import PostprocessConfig
from unetlab.data.targets import centre_flows, make_target, target_channels
from unetlab.errors import UnetlabError
from unetlab.evaluation.metrics import match_objects
from unetlab.inference.postprocess import follow_flows, probabilities_to_labels
from unetlab.inference.predictor import _dihedral, dihedral_vectors, make_predict_fn
from unetlab.training.losses import flow_loss


def disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def crowd(shape=(64, 80)) -> np.ndarray:
    """Five discs, three of them overlapping (each drawn under the earlier ones), one non-convex C shape."""
    lab = np.zeros(shape, np.int32)
    for i, (cy, cx, r) in enumerate([(16, 16, 9), (16, 31, 8), (30, 22, 8), (46, 60, 11)], start=1):
        lab[disc(shape, cy, cx, r) & (lab == 0)] = i
    c = disc(shape, 48, 20, 10) & ~disc(shape, 48, 26, 6)
    lab[c & (lab == 0)] = 5
    return lab


def encode(target: np.ndarray) -> np.ndarray:
    """A perfect prediction of a flow target: foreground, and the flows as (v + 1) / 2."""
    return np.concatenate([target[:1], (target[1:] + 1) / 2]).astype(np.float32)


def test_flow_target_points_every_pixel_at_its_own_centre():
    lab = crowd()
    t = make_target(lab, "flow")
    assert t.shape == (3, *lab.shape) and t.dtype == np.float32 and target_channels("flow") == 3
    assert np.array_equal(t[0] > 0, lab > 0)
    norm = np.hypot(t[1], t[2])
    assert (norm[lab == 0] == 0).all() and np.allclose(norm[(lab > 0) & (norm > 0.99)], 1, atol=1e-5)
    # one sink per object, inside it (also in the C shape, whose centroid lies outside)
    for i in range(1, 6):
        assert ((lab == i) & (norm == 0)).sum() == 1
    # across the contact of objects 1 and 2 the flows point apart
    ys, xs = np.nonzero((lab[:, :-1] == 1) & (lab[:, 1:] == 2))
    assert len(ys) and (t[2, ys, xs] < 0).all() and (t[2, ys, xs + 1] > 0).all()


def test_following_perfect_flows_recovers_touching_and_non_convex_objects():
    lab = crowd()
    out = probabilities_to_labels(encode(make_target(lab, "flow")), "flow", PostprocessConfig(min_size=10))
    m = match_objects(out, lab, thresholds=[0.9])
    assert m["tp"] == [5] and out.max() == 5
    # paths are straight: the C's tips, whose way to its centre crosses the gap, end at its edge as fragments
    # (dropped as small objects); the touching discs lose nothing
    raw = probabilities_to_labels(encode(make_target(lab, "flow")), "flow", PostprocessConfig(min_size=0))
    assert raw.max() > 5 and all(np.array_equal(raw == raw[lab == i][0], lab == i) for i in range(1, 5))
    # the foreground alone merges the touching ones
    merged = probabilities_to_labels(encode(make_target(lab, "flow")), "flow",
                                     PostprocessConfig(min_size=0, markers="none"))
    assert merged.max() <= 3


def test_follow_flows_moves_pixels_to_the_sink_and_stays_inside_the_image():
    fg = np.ones((20, 30), bool)
    flow = np.zeros((2, 20, 30), np.float32)
    flow[1] = 1.0  # everything flows right, off the image edge
    ends = follow_flows(flow, fg, steps=50)
    assert ends.shape == (600, 2)
    assert np.allclose(ends[:, 1], 29) and np.allclose(ends[:, 0], np.nonzero(fg)[0])


def test_flow_markers_only_for_the_flow_target():
    lab = crowd()
    with pytest.raises(UnetlabError, match="do not apply"):
        probabilities_to_labels(encode(make_target(lab, "flow")), "flow", PostprocessConfig(markers="distance"))
    d = make_target(lab, "distance")
    with pytest.raises(UnetlabError, match="do not apply"):
        probabilities_to_labels(np.stack([d > 0, d]).astype(np.float32), "distance", PostprocessConfig(markers="flow"))
    with pytest.raises(UnetlabError, match="3 channel"):
        probabilities_to_labels(np.zeros((2, 8, 8), np.float32), "flow")


def test_dihedral_vectors_match_the_flows_of_the_transformed_labels():
    # objects with pixel-centred, symmetric shapes: their centres move exactly with the image
    shape = (48, 48)
    lab = np.zeros(shape, np.int32)
    lab[disc(shape, 12, 14, 7)] = 1
    lab[30:39, 20:45] = 2
    lab[disc(shape, 34, 8, 4)] = 3
    flows = torch.from_numpy(centre_flows(lab))
    moved_only = 0
    for k in range(8):
        turned = torch.from_numpy(centre_flows(_dihedral(torch.from_numpy(lab), k).numpy()))
        assert torch.allclose(dihedral_vectors(flows, k), turned, atol=1e-6), k
        assert torch.allclose(dihedral_vectors(turned, k, inverse=True), flows, atol=1e-6), k
        moved_only += not torch.allclose(_dihedral(flows, k), turned, atol=1e-6)
    assert moved_only == 7  # moving the pixels without turning the vectors is wrong for all but the identity


class FlowOracle(torch.nn.Module):
    """A 'network' that predicts the perfect flow target of the label image it is given, as logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [encode(make_target(np.rint(im[0].numpy()).astype(np.int32), "flow")) for im in x.float()]
        return torch.logit(torch.from_numpy(np.stack(outs)).clamp(1e-4, 1 - 1e-4))


def test_tta_turns_flow_vectors_back():
    shape = (48, 48)
    lab = np.zeros(shape, np.int32)
    lab[disc(shape, 12, 14, 7)] = 1
    lab[30:39, 20:45] = 2
    x = lab[None, None].astype(np.float32)
    kw = dict(activation="sigmoid", device=torch.device("cpu"), precision="fp32", channels_last=False, fuse=False)
    plain = make_predict_fn(FlowOracle(), **kw)(x)
    tta = make_predict_fn(FlowOracle(), tta=True, vectors=(1, 2), **kw)(x)
    assert torch.allclose(tta, plain, atol=1e-4)
    wrong = make_predict_fn(FlowOracle(), tta=True, **kw)(x)  # without turning the vectors they cancel out
    assert not torch.allclose(wrong, plain, atol=0.1)


def test_flow_loss_is_lowest_for_the_right_flows_and_takes_weights():
    t = torch.from_numpy(make_target(crowd(), "flow"))[None]
    right = torch.logit(torch.from_numpy(encode(t[0].numpy())).clamp(0.02, 0.98))[None]
    flipped = right.clone()
    flipped[:, 1:] = -flipped[:, 1:]  # flows pointing away from the centres
    zero = torch.zeros_like(right)
    lr, lf, lz = (float(flow_loss(z, t)) for z in (right, flipped, zero))
    assert lr < lz < lf
    w = torch.zeros(1, *t.shape[-2:])
    assert float(flow_loss(flipped, t, w)) == 0.0
    z = zero.clone().requires_grad_(True)
    flow_loss(z, t).backward()
    assert torch.isfinite(z.grad).all() and z.grad[:, 1:].abs().sum() > 0


@pytest.mark.usefixtures("one_thread")
def test_flow_model_learns_to_separate_synthetic_cells(cells, tmp_path):
    """A short run with the flow target: loss falls, validation picks the run's flow post-processing, and the
    labels it predicts match the true cells far better than chance."""
    import csv
    import json

    from unetlab import evaluate, predict
    from unetlab.cli import main

    run = tmp_path / "run"
    rc = main(["-q", "train", "--data", str(cells), "--out", str(run), "--target", "flow", "--epochs", "12",
               "--base-width", "8", "--depth", "3", "--patch-size", "64", "--batch-size", "4",
               "--samples-per-epoch", "32", "--val-every", "12", "--lr", "3e-3", "--seed", "0",
               "--tensorboard", "false", "--no-progress", "--aug-zoom", "0"])
    assert rc == 0
    losses = [float(r["train_loss"]) for r in csv.DictReader((run / "metrics.csv").open())]
    assert losses[-1] < 0.6 * losses[0]
    assert json.loads((run / "model.json").read_text())["target"] == "flow"
    pred = tmp_path / "pred"
    predict(run, cells / "images", pred, instances=True, progress=False, diameter="none")
    rep = evaluate(pred / "labels", cells / "masks", instances=True)
    assert rep["objects"]["ap"][0] > 0.5
