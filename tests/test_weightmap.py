"""The U-Net border weight map against a brute-force computation of the paper's formula."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from unetlab.labels import instance_labels
from unetlab.training.weightmap import border_weight_map, contact_weight_map, write_weight_map_png

DATA = Path(__file__).resolve().parents[1] / "../shared/data"


def brute_force(labels: np.ndarray, w0: float, sigma: float, class_balance: bool) -> np.ndarray:
    """w(x) = w_c(x) + w0 exp(-(d1 + d2)^2 / 2 sigma^2) on background, distances by exhaustive search."""
    h, w = labels.shape
    ids = [i for i in np.unique(labels) if i != 0]
    yy, xx = np.mgrid[:h, :w]
    dist = np.stack([
        np.sqrt(((yy[..., None] - np.argwhere(labels == i)[:, 0]) ** 2
                 + (xx[..., None] - np.argwhere(labels == i)[:, 1]) ** 2).min(-1))
        for i in ids
    ])
    dist.sort(axis=0)
    fg = labels > 0
    wc = np.ones((h, w))
    if class_balance:
        n = fg.size
        wc = np.where(fg, n / (2 * fg.sum()), n / (2 * (~fg).sum()))
    border = w0 * np.exp(-((dist[0] + dist[1]) ** 2) / (2 * sigma**2))
    return wc + np.where(fg, 0.0, border)


def two_objects() -> np.ndarray:
    lab = np.zeros((30, 40), np.int32)
    lab[5:15, 4:14] = 1
    lab[8:20, 17:30] = 2  # a 3-pixel gap to object 1
    return lab


def three_objects() -> np.ndarray:
    lab = two_objects()
    yy, xx = np.mgrid[:30, :40]
    lab[(yy - 23) ** 2 + (xx - 9) ** 2 < 16] = 5  # a disc below object 1, sparse id
    return lab


@pytest.mark.parametrize("make", [two_objects, three_objects])
@pytest.mark.parametrize("class_balance", [True, False])
def test_matches_brute_force(make, class_balance):
    lab = make()
    got = border_weight_map(lab, w0=10.0, sigma=3.0, class_balance=class_balance)
    want = brute_force(lab, 10.0, 3.0, class_balance)
    assert got.dtype == np.float32 and got.shape == lab.shape
    assert np.allclose(got, want, atol=1e-4)
    gap = got[10, 15]  # between objects 1 and 2: much heavier than open background
    assert gap > 5 * got[0, 39]


def test_binary_mask_is_split_into_connected_components():
    lab = three_objects()
    binary = (lab > 0).astype(np.uint8) * 255
    assert instance_labels(binary).max() == 3
    assert np.allclose(border_weight_map(binary, 10.0, 3.0), border_weight_map(lab, 10.0, 3.0), atol=1e-6)


def test_touching_instances_keep_their_ids():
    lab = np.zeros((20, 20), np.int32)
    lab[5:15, 2:10] = 1
    lab[5:15, 11:18] = 2  # one background column between them
    got = border_weight_map(lab, w0=10.0, sigma=5.0, class_balance=False)
    assert np.isclose(got[8, 10], 1 + 10 * np.exp(-4 / 50), atol=1e-5)  # d1 = d2 = 1
    assert np.all(got[lab > 0] == 1.0)


def touching_objects() -> np.ndarray:
    lab = np.zeros((24, 36), np.int32)
    lab[4:16, 3:13] = 1
    lab[4:16, 13:25] = 2  # touches object 1: no background between them
    lab[18:22, 30:34] = 7  # on its own
    return lab


def test_contact_weight_map_stresses_where_objects_touch():
    lab = touching_objects()
    got = contact_weight_map(lab, w0=10.0, sigma=2.0)
    # the paper's border term on every pixel (an object pixel's nearest object is itself, d1 = 0), no class balance
    border = brute_force(lab, 10.0, 2.0, False) - 1.0
    h, w = lab.shape
    ids = [1, 2, 7]
    yy, xx = np.mgrid[:h, :w]
    dist = np.sort(np.stack([np.sqrt(((yy[..., None] - np.argwhere(lab == i)[:, 0]) ** 2
                                      + (xx[..., None] - np.argwhere(lab == i)[:, 1]) ** 2).min(-1)) for i in ids]), 0)
    want = 1.0 + 10.0 * np.exp(-((dist[0] + dist[1]) ** 2) / (2 * 2.0**2))
    assert np.allclose(got, want, atol=1e-4)
    assert np.allclose(got[lab == 0], 1.0 + border[lab == 0], atol=1e-4)  # background: the border term as before
    assert np.isclose(got[10, 12], 1 + 10 * np.exp(-1 / 8), atol=1e-5)  # the contact line: d1 = 0, d2 = 1
    assert got[10, 4] < 1.01 and got[21, 33] < 1.01  # inside, away from the contact; the lone object
    assert np.all(border_weight_map(lab, 10.0, 2.0, class_balance=False)[lab > 0] == 1.0)  # default unchanged


def test_distance_loss_weights_both_terms():
    import torch

    from unetlab.training.losses import distance_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.4).float()  # distances of exactly 1, so a logit of 30 is exact
    ones = torch.ones(2, 8, 8)
    assert torch.isclose(distance_loss(logits, target, ones), distance_loss(logits, target))
    heavy = ones.clone()
    heavy[:, :4] = 5.0
    exact = torch.where(target[:, 0] > 0, 30.0, -30.0)
    fg_only, dist_only = logits.clone(), logits.clone()
    fg_only[:, 1] = exact  # distance exact: only the foreground term is left
    dist_only[:, 0] = exact  # foreground exact: only the distance term is left
    for x in (fg_only, dist_only):
        plain, weighted = distance_loss(x, target), distance_loss(x, target, heavy)
        assert plain > 0.1 and weighted > 1.5 * plain


def test_single_object_and_empty_masks_get_class_weights_only():
    lab = np.zeros((16, 16), np.int32)
    assert np.all(border_weight_map(lab) == 1.0)
    lab[4:8, 4:8] = 1
    w = border_weight_map(lab)
    assert np.isclose(w.mean(), 1.0, atol=1e-5) and w[lab == 1].min() > w[lab == 0].max()


def test_far_away_objects_within_the_window_cutoff_are_exact():
    lab = np.zeros((20, 200), np.int32)
    lab[5:10, 0:5] = 1
    lab[5:10, 195:200] = 2  # farther apart than the window of 6 sigma
    got = border_weight_map(lab, w0=10.0, sigma=2.0, class_balance=False)
    assert np.allclose(got, brute_force(lab, 10.0, 2.0, False), atol=1e-6)


def test_fast_on_512_with_100_objects():
    rng = np.random.default_rng(0)
    lab = np.zeros((512, 512), np.int32)
    yy, xx = np.ogrid[:512, :512]
    for i, (y, x, r) in enumerate(zip(rng.integers(10, 502, 100), rng.integers(10, 502, 100),
                                      rng.integers(4, 12, 100)), start=1):
        lab[(yy - y) ** 2 + (xx - x) ** 2 < r * r] = i
    t = time.perf_counter()
    border_weight_map(lab)
    assert time.perf_counter() - t < 1.0


def test_png_output(tmp_path):
    from PIL import Image

    from unetlab.data.io import write_image

    mask = tmp_path / "mask.png"
    write_image(mask, (three_objects() > 0).astype(np.uint8) * 255)
    stats = write_weight_map_png(mask, tmp_path / "w.png", w0=10.0, sigma=3.0)
    with Image.open(tmp_path / "w.png") as im:
        assert im.mode == "RGB" and im.size == (40, 30)
    assert stats["max"] > 3 * stats["min"] > 0


def test_weightmap_command_draws_the_contact_map(tmp_path, capsys):
    from unetlab.cli import main

    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "labels.tif", touching_objects().astype(np.uint16))
    assert main(["weightmap", str(tmp_path / "labels.tif"), "--out", str(tmp_path / "c.png"), "--contacts",
                 "--sigma", "2"]) == 0
    line = capsys.readouterr().out
    top = float(line.split("max")[1])
    assert np.isclose(top, 1 + 10 * np.exp(-1 / 8), atol=1e-3) and "min 1.000" in line


@pytest.mark.realdata
def test_isbi_mask_weight_map():
    masks = sorted((DATA / "isbi2012" / "masks").glob("*")) if (DATA / "isbi2012").is_dir() else []
    if not masks:
        pytest.skip("../shared/data/isbi2012 not available")
    from unetlab.data.io import read_label

    lab = read_label(masks[0])
    w = border_weight_map(lab, w0=10.0, sigma=5.0)
    membrane = lab == 0
    assert np.isfinite(w).all() and w.shape == lab.shape
    # thin membranes between two cells carry the border term: far heavier than cell interiors
    assert np.median(w[membrane]) > 3 * np.median(w[~membrane])


def test_weight_map_choice_from_the_config():
    from unetlab.config import RunConfig, apply_overrides
    from unetlab.errors import UnetlabError
    from unetlab.training.setup import border_weight_fn

    lab = touching_objects()
    assert border_weight_fn(RunConfig()) is None
    fn = border_weight_fn(apply_overrides(RunConfig(), {"train.contact_weight": 5.0, "train.sigma": 2.0}))
    assert np.allclose(fn(lab), contact_weight_map(lab, 5.0, 2.0))
    fn = border_weight_fn(apply_overrides(RunConfig(), {"train.border_weight": True}))
    assert np.allclose(fn(lab), border_weight_map(lab, 10.0, 5.0))
    with pytest.raises(UnetlabError, match="choose one weight map"):
        border_weight_fn(apply_overrides(RunConfig(), {"train.border_weight": True, "train.contact_weight": 5.0}))
