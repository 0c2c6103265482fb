"""One model geometry for tiling, validation and export: each preset declares sizes it really has, and
validation predicts a whole image exactly as `unetlab predict` does (one model, one score)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from unetlab.config import ModelConfig
from unetlab.data.io import normalize
from unetlab.data.synthetic import make_synthetic_cells
from unetlab.errors import UnetlabError
from unetlab.inference.bioimageio import axis_geometry
from unetlab.inference.predictor import Predictor
from unetlab.models import PRESETS, build_model, model_geometry
from unetlab.models.presets import CANONICAL_CHANNELS
from unetlab.runfolder import load_run
from unetlab.training.validation import predict_prepared_val

pytestmark = pytest.mark.usefixtures("one_thread")

# Every preset, and the padding choices the configurable ones allow.
CASES = [(name, "same") for name in PRESETS] + [("unet", "valid"), ("unet-slim", "valid")]


def _build(name: str, padding: str) -> nn.Module:
    cin, cout = CANONICAL_CHANNELS.get(name, (1, 1))
    return build_model(ModelConfig(preset=name, in_channels=cin, out_channels=cout, padding=padding)).eval()


def _smallest_feature_map(model: nn.Module, size: int) -> int:
    """The smallest spatial size any layer produces for a ``size`` x ``size`` input (the deepest scale)."""
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(min(out.shape[-2:])))
             for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(torch.zeros(1, int(model.in_channels), size, size))
    finally:
        for h in hooks:
            h.remove()
    return min(sizes)


@pytest.mark.parametrize("name,padding", CASES)
def test_each_preset_declares_the_geometry_it_has(name, padding):
    model = _build(name, padding)
    g = model_geometry(model)
    padding = "valid" if name == "unet-paper" else padding  # the published U-Net is valid-padding only
    assert g.padding == padding
    m = g.size_multiple
    if padding == "same":
        # an input of two multiples reaches the deepest scale with exactly 2 pixels: no padding inside, and the
        # multiple is the network's whole down-sampling factor
        assert _smallest_feature_map(model, 2 * m) == 2
        assert g.min_input == m and g.halo == 0
    else:
        # accepted sizes step by exactly the multiple, and the output loses the same halo at each of them
        low = g.min_input
        assert [g.valid_input_size(low + j) for j in (1, m - 1, m)] == [low + m] * 3
        assert g.output_size(low + m) == low + m - 2 * g.halo > 0
    n = g.valid_input_size(3 * m)
    with torch.no_grad():
        y = model(torch.zeros(1, int(model.in_channels), n, n + m))
    assert tuple(y.shape[-2:]) == (g.output_size(n), g.output_size(n + m))


def test_export_describes_the_same_geometry():
    g = model_geometry(_build("unet-paper", "valid"))
    low, step, offset = axis_geometry(_build("unet-paper", "valid"))
    assert (low, step, offset) == (g.min_input, g.size_multiple, -2 * g.halo)
    assert axis_geometry(_build("resnet34-unet", "same")) == (32, 32, 0)


def test_a_network_that_does_not_declare_its_geometry_is_one_error():
    with pytest.raises(UnetlabError, match="does not declare its input geometry"):
        model_geometry(nn.Conv2d(1, 1, 3))


def test_validation_predicts_exactly_as_predict_does():
    """The same image through `predict`'s Predictor and through validation: the same probabilities, so a model's
    validation score and its score from `unetlab predict` + `evaluate` agree. The image is larger than the
    validation tiles used to be (max(patch_size, 256)) and than predict's, so both tile it."""
    run = load_run("nuclei")
    run.config.train.precision = "fp32"  # both sides in fp32: nothing here depends on the CPU's bf16 support
    image = normalize(make_synthetic_cells((600, 300), seed=5)[0][None].astype(np.float32))
    predictor = Predictor.from_run(run, device="cpu", precision="fp32")
    ours = predictor.predict_prepared(image)
    val = predict_prepared_val(run.model, image, run.config, run.info, torch.device("cpu")).numpy()
    assert ours.shape == val.shape == (run.out_channels, 600, 300)
    np.testing.assert_array_equal(val, ours)
    assert 0.01 < float((ours[0] > 0.5).mean()) < 0.99  # a real prediction, not a constant
