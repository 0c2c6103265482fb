"""Tiled prediction equals whole-image prediction; valid-padding networks give full-size outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unetlab.config import ModelConfig
from unetlab.inference.predictor import make_predict_fn
from unetlab.inference.tiling import count_tiles, gaussian_weights, plan_axis, read_window, tile_predict
from unetlab.models import build_model, receptive_field


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    net = build_model(ModelConfig(preset="unet", in_channels=2, out_channels=1, depth=2, base_width=8)).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics so folding and eval mode matter
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net


@pytest.mark.parametrize("overlap,batch", [(0.25, 1), (0.5, 3)])
def test_tiled_equals_whole_image_away_from_border(small_net, overlap, batch):
    img = np.random.default_rng(0).random((2, 301, 263)).astype(np.float32)
    fn = make_predict_fn(small_net, "sigmoid", torch.device("cpu"), "fp32", fuse=True)
    whole = fn(img[None])[0]
    rf = receptive_field(small_net)
    margin = rf // 2 + 1
    tiled = tile_predict(fn, img, 1, tile=128, overlap=overlap, align=4, margin=margin, batch_size=batch)
    assert tiled.shape == (1, 301, 263)
    assert count_tiles((301, 263), 128, overlap, 4, margin) > 4  # really tiled
    b = margin + 8
    diff = (whole - tiled).abs()[:, b:-b, b:-b]
    assert float(diff.max()) < 1e-4


def test_tiles_smaller_than_image_cover_everything_once():
    p = plan_axis(1000, tile=256, overlap=0.25, align=16)
    assert p.step % 16 == 0 and p.padded_out >= 1000 and (p.count - 2) * p.step + p.core < 1000
    small = plan_axis(70, tile=256, overlap=0.25, align=16)
    assert small.count == 1 and small.tile_in == 80  # a small image gets a small tile


def test_gaussian_weights_peak_in_centre():
    w = gaussian_weights(33, 17)
    assert w.shape == (33, 17) and float(w.max()) == pytest.approx(1.0)
    assert w[16, 8] == w.max() and w[0, 0] < 0.01


def test_read_window_mirrors_outside():
    a = np.arange(2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6)
    win = read_window(a, -2, 9, -1, 8)
    ref = np.pad(a, ((0, 0), (2, 2), (1, 1)), mode="reflect")
    np.testing.assert_array_equal(win, ref)


def test_valid_padding_overlap_tile_gives_full_size_mask():
    torch.manual_seed(0)
    net = build_model(ModelConfig(preset="unet", in_channels=1, out_channels=1, depth=2, base_width=4,
                                  padding="valid")).eval()
    fn = make_predict_fn(net, "sigmoid", torch.device("cpu"), "fp32")
    img = np.random.default_rng(1).random((1, 150, 97)).astype(np.float32)
    out = tile_predict(fn, img, 1, tile=96, overlap=0.25, align=4, output_size=net.output_size,
                       valid_input_size=net.valid_input_size)
    assert out.shape == (1, 150, 97)
    assert torch.isfinite(out).all()
    # every output pixel had full context: equal to a single pass over the mirror-padded image
    shrink = (net.valid_input_size(200) - net.output_size(net.valid_input_size(200))) // 2
    ti = net.valid_input_size(150 + 2 * shrink)
    tj = net.valid_input_size(97 + 2 * shrink)
    padded = read_window(img, -shrink, ti, -shrink, tj)
    ref = fn(padded[None])[0][:, :150, :97]
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-4)


def test_a_valid_padding_tile_narrower_than_a_step_grows_instead_of_leaving_gaps():
    """A depth-4 valid U-Net returns 4 px for its smallest input: with a small --tile the old plan stepped 16 px
    past a 4 px core (gaps between tiles) and prediction failed; now the tile grows until its core covers a step."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(preset="unet", in_channels=1, out_channels=1, depth=4, base_width=2,
                                  padding="valid")).eval()
    geometry = dict(output_size=net.output_size, valid_input_size=net.valid_input_size)
    p = plan_axis(100, tile=64, overlap=0.25, align=16, **geometry)
    assert p.count > 1 and p.step % 16 == 0 and p.step <= p.core
    fn = make_predict_fn(net, "sigmoid", torch.device("cpu"), "fp32")
    img = np.random.default_rng(2).random((1, 100, 90)).astype(np.float32)
    small = tile_predict(fn, img, 1, tile=64, overlap=0.25, align=16, **geometry)
    one = tile_predict(fn, img, 1, tile=512, overlap=0.25, align=16, **geometry)  # one tile: the reference
    assert small.shape == one.shape == (1, 100, 90)
    np.testing.assert_allclose(small.numpy(), one.numpy(), atol=1e-5)
