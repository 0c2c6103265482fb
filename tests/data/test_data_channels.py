"""Channel selection and loading codes."""

from __future__ import annotations

import numpy as np
import pytest

from unetlab.config import DataConfig
from unetlab.data.channels import apply_channels, channels_out, parse_channel_code
from unetlab.errors import UnetlabError


def _image(c: int = 5) -> np.ndarray:
    # channel k is filled with k + 1 so outputs can be traced back to their inputs
    return np.stack([np.full((4, 6), k + 1, dtype=np.float32) for k in range(c)])


def test_no_config_returns_image_unchanged():
    img = _image()
    assert apply_channels(img, DataConfig(), None) is img
    assert channels_out(5, DataConfig()) == 5


def test_selection_keeps_order_and_checks_range():
    out = apply_channels(_image(), DataConfig(channels=[3, 0]), None)
    assert out.shape == (2, 4, 6) and out[0, 0, 0] == 4 and out[1, 0, 0] == 1
    with pytest.raises(UnetlabError, match=r"img7\.tif.*3 channels"):
        apply_channels(_image(3), DataConfig(channels=[0, 4]), None, source="img7.tif")
    with pytest.raises(UnetlabError, match="out of range"):
        channels_out(3, DataConfig(channels=[5]))


def test_merges_and_inference_is_deterministic():
    cfg = DataConfig(channel_code="max(0, 2), mean(1,3), rand(0,4), 2?0.9")
    assert channels_out(5, cfg) == 4
    out = apply_channels(_image(), cfg, None)
    assert out[:, 0, 0].tolist() == [3.0, 3.0, 3.0, 3.0]  # max(1,3), mean(2,4), mean(1,5), no dropout


def test_random_channel_picks_each_member():
    cfg = DataConfig(channel_code="rand(0,1,4)")
    rng = np.random.default_rng(0)
    seen = {float(apply_channels(_image(), cfg, rng)[0, 0, 0]) for _ in range(60)}
    assert seen == {1.0, 2.0, 5.0}


def test_dropout_rates_and_zeros():
    cfg = DataConfig(channel_code="1?0.3,0")
    rng = np.random.default_rng(1)
    outs = np.stack([apply_channels(_image(), cfg, rng)[:, 0, 0] for _ in range(2000)])
    dropped = outs[:, 0] == 0
    assert 0.25 < dropped.mean() < 0.35
    assert set(outs[~dropped, 0]) == {2.0} and set(outs[:, 1]) == {1.0}


def test_merge_with_per_channel_dropout():
    cfg = DataConfig(channel_code="mean(0?0.5,2?0.5)")
    rng = np.random.default_rng(2)
    vals = {float(apply_channels(_image(), cfg, rng)[0, 0, 0]) for _ in range(200)}
    assert vals == {0.0, 1.0, 2.0, 3.0}  # none, only ch0, both (mean), only ch2
    det = apply_channels(_image(), cfg, None)
    assert det[0, 0, 0] == 2.0


def test_code_applies_after_selection_and_names_the_image():
    cfg = DataConfig(channels=[4, 1], channel_code="max(0,1)")
    assert channels_out(5, cfg) == 1
    assert apply_channels(_image(), cfg, None)[0, 0, 0] == 5.0
    with pytest.raises(UnetlabError, match=r"a\.png.*after the channels selection"):
        apply_channels(_image(), DataConfig(channels=[0], channel_code="1"), None, source="a.png")


@pytest.mark.parametrize("code", ["", "max(0,1", "foo(1)", "1?2", "rand()", "1,,2"])
def test_bad_codes_are_one_line_errors(code):
    with pytest.raises(UnetlabError):
        parse_channel_code(code)


@pytest.mark.parametrize("code", ["0 1", "1 0", " 2  1 ,0"])
def test_channels_separated_by_spaces_are_refused_not_run_together(code):
    with pytest.raises(UnetlabError, match="separate channels with commas"):
        parse_channel_code(code)
    assert len(parse_channel_code(" rand( 0 , 1 ) , 2 ? 0.2 ")) == 2  # spaces around the syntax stay harmless
