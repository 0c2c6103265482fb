"""Model layer: presets and their parameter counts, the padding contract, norms/up-sampling modes."""

from __future__ import annotations

import pytest
import torch

from unetlab.config import ModelConfig
from unetlab.errors import UnetlabError
from unetlab.models import build_model, count_parameters


def small(**kw) -> ModelConfig:
    base = dict(preset="unet", in_channels=1, out_channels=1, depth=3, base_width=4)
    base.update(kw)
    return ModelConfig(**base)


def test_build_model_default_unet_contract():
    model = build_model(ModelConfig(in_channels=2, out_channels=3))
    assert model.padding == "same"
    assert (model.in_channels, model.out_channels, model.depth) == (2, 3, 4)
    assert model.output_size(77) == 77 and model.valid_input_size(77) == 77


@pytest.mark.parametrize("size", [(67, 93), (5, 3), (1, 1), (33, 64)])
def test_same_padding_keeps_any_size(size):
    model = build_model(small(in_channels=2, out_channels=3)).eval()
    y = model(torch.randn(2, 2, *size))
    assert y.shape == (2, 3, *size)
    assert torch.isfinite(y).all()


def test_same_padding_crop_does_not_shift_content():
    # The prediction for the top-left region must not depend on how much padding the image needs.
    torch.manual_seed(0)
    model = build_model(small()).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        full = model(x)
        cut = model(x[:, :, :61, :59])
    assert cut.shape == (1, 1, 61, 59)
    # Far from the cut border the two agree up to the receptive field's reach.
    assert torch.allclose(full[..., :20, :20], cut[..., :20, :20], atol=1e-5)


def test_valid_padding_sizes_and_errors():
    model = build_model(small(padding="valid", depth=4))
    assert model.padding == "valid"
    assert model.output_size(572) == 388
    assert model.valid_input_size(570) == 572
    with pytest.raises(ValueError, match="572"):
        model.output_size(570)
    model.eval()
    with torch.no_grad():
        y = model(torch.randn(1, 1, 188, 204))
    assert y.shape[-2:] == (model.output_size(188), model.output_size(204)) == (4, 20)
    with pytest.raises(ValueError, match="nearest valid size"):
        model(torch.randn(1, 1, 190, 188))


@pytest.mark.parametrize("norm", ["batch", "group", "instance", "layer", "none"])
@pytest.mark.parametrize("upsample", ["bilinear", "transpose", "pixelshuffle"])
def test_norms_and_upsampling_forward_and_backward(norm, upsample):
    model = build_model(small(norm=norm, upsample=upsample, dropout=0.2, base_width=8))
    x = torch.randn(2, 1, 21, 18)
    y = model(x)
    assert y.shape == (2, 1, 21, 18)
    y.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("upsample", ["bilinear", "transpose", "pixelshuffle"])
def test_valid_padding_with_each_upsampling(upsample):
    model = build_model(small(padding="valid", upsample=upsample, depth=2)).eval()
    n = model.valid_input_size(40)
    with torch.no_grad():
        y = model(torch.randn(1, 1, n, n))
    assert y.shape[-1] == model.output_size(n)


def test_explicit_widths_define_depth():
    model = build_model(small(widths=[4, 8, 16]))
    assert model.depth == 2
    assert model(torch.randn(1, 1, 9, 9)).shape == (1, 1, 9, 9)


def test_pixelshuffle_icnr_starts_as_nearest_upsampling():
    from unetlab.models.blocks import PixelShuffleICNR

    up = PixelShuffleICNR(3, 2)
    x = torch.randn(1, 3, 4, 5)
    y = up(x)
    # ICNR: the four sub-pixels of each 2x2 block are equal at initialisation.
    assert torch.equal(y[..., 0::2, 0::2], y[..., 1::2, 1::2])
    assert torch.equal(y[..., 0::2, 1::2], y[..., 1::2, 0::2])


def test_unknown_preset_and_bad_options_are_user_errors():
    with pytest.raises(UnetlabError, match="unet-slim"):
        build_model(ModelConfig(preset="nope", in_channels=1, out_channels=1))
    with pytest.raises(UnetlabError, match="norm"):
        build_model(small(norm="weird"))
    with pytest.raises(UnetlabError, match="upsample"):
        build_model(small(upsample="nearest"))


def test_preset_parameter_counts():
    with torch.device("meta"):  # count without allocating/initialising 31M weights
        _check_preset_counts()


def _check_preset_counts():
    paper = build_model(ModelConfig(preset="unet-paper", in_channels=1, out_channels=2))
    assert count_parameters(paper) == 31_030_658
    assert paper.padding == "valid" and paper.output_size(572) == 388
    with_dropout = build_model(ModelConfig(preset="unet-paper", in_channels=1, out_channels=2, dropout=0.5))
    assert isinstance(with_dropout.dropout, torch.nn.Dropout) and with_dropout.dropout.p == 0.5
    same = build_model(ModelConfig(preset="unet-paper-same", in_channels=1, out_channels=2))
    assert count_parameters(same) == 31_030_658 and same.padding == "same"
    slim = build_model(ModelConfig(preset="unet-slim", in_channels=1, out_channels=1))
    assert count_parameters(slim) == 4_418_449


def test_presets_honour_channels():
    slim = build_model(ModelConfig(preset="unet-slim", in_channels=3, out_channels=4))
    assert (slim.in_channels, slim.out_channels) == (3, 4)
    base = count_parameters(build_model(ModelConfig(preset="unet-slim", in_channels=1, out_channels=1)))
    # 2 extra input channels x 24 filters x 9 weights; 3 extra outputs x (24 weights + bias).
    assert count_parameters(slim) == base + 2 * 24 * 9 + 3 * 25


def test_resnet34_unet_count_and_any_size():
    from unetlab.models.resnet_unet import ResNetUNet

    model = build_model(ModelConfig(preset="resnet34-unet", in_channels=3, out_channels=1))
    assert count_parameters(model) == 24_351_921
    encoder = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("stem", "stages")))
    assert encoder == 21_284_672  # torchvision resnet34 without its fc layer
    assert (model.depth, model.padding) == (5, "same")
    # Any number of input channels; a narrow copy keeps the forward cheap.
    narrow = ResNetUNet(5, 2, (1, 1, 1, 1), (8, 8, 8, 8), (4, 4, 4, 4, 4)).eval()
    with torch.no_grad():
        assert narrow(torch.randn(1, 5, 67, 93)).shape == (1, 2, 67, 93)
    with pytest.raises(UnetlabError, match="same"):
        build_model(ModelConfig(preset="resnet34-unet", in_channels=3, out_channels=1, padding="valid"))


def _randomise_batchnorm(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))


@pytest.mark.parametrize("kind", ["unet", "resnet"])
def test_fuse_batchnorm_matches_unfused(kind):
    from unetlab.models.fuse import fuse_batchnorm
    from unetlab.models.resnet_unet import ResNetUNet

    if kind == "unet":
        model = build_model(small(base_width=8))
    else:
        model = ResNetUNet(2, 1, (2, 1, 1, 1), (8, 8, 16, 16), (8, 8, 4, 4, 4))
    _randomise_batchnorm(model)
    model.train()
    fused = fuse_batchnorm(model)
    assert model.training, "the original must be left as it was"
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert n_bn > 0 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(2, model.in_channels, 45, 38)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5, rtol=0)


def _old_fold_conv_bn(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> torch.nn.Conv2d:
    """The hand-written fold that torch's fuse_conv_bn_eval replaced (float64 arithmetic), as a reference."""
    fused = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                            padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True)
    with torch.no_grad():
        var = bn.running_var.double()
        scale = (bn.weight.double() if bn.affine else torch.ones_like(var)) / torch.sqrt(var + bn.eps)
        shift = bn.bias.double() if bn.affine else torch.zeros_like(var)
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
        fused.weight.copy_((conv.weight.double() * scale.reshape(-1, 1, 1, 1)).float())
        fused.bias.copy_(((bias - bn.running_mean.double()) * scale + shift).float())
    return fused


@pytest.mark.parametrize("bias,affine,groups,dilation", [(False, True, 1, 1), (True, True, 2, 1),
                                                         (False, False, 1, 2), (True, False, 4, 1)])
def test_torch_conv_bn_fusion_equals_the_old_fold(bias, affine, groups, dilation):
    from unetlab.models.fuse import fold_conv_bn

    gen = torch.Generator().manual_seed(groups + dilation)
    conv = torch.nn.Conv2d(8, 12, 3, padding=dilation, dilation=dilation, groups=groups, bias=bias)
    bn = torch.nn.BatchNorm2d(12, eps=1e-3, affine=affine)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        if bias:
            conv.bias.copy_(torch.randn(12, generator=gen))
        bn.running_mean.copy_(torch.randn(12, generator=gen))
        bn.running_var.copy_(torch.rand(12, generator=gen) * 2 + 0.05)
        if affine:
            bn.weight.copy_(torch.randn(12, generator=gen))
            bn.bias.copy_(torch.randn(12, generator=gen))
    conv.eval(), bn.eval()
    new, old = fold_conv_bn(conv, bn), _old_fold_conv_bn(conv, bn)
    # both fold in float64 and round once to float32: equal to the last bit but for rare one-ulp ties
    assert torch.allclose(new.weight, old.weight, atol=0, rtol=2 ** -23)
    assert torch.allclose(new.bias, old.bias, atol=0, rtol=2 ** -23)
    assert new.weight.dtype == torch.float32 and new.bias is not None
    x = torch.randn(2, 8, 11, 9, generator=gen)
    with torch.no_grad():
        assert torch.allclose(new(x), old(x), atol=1e-5, rtol=1e-6)
        assert torch.allclose(new(x), bn(conv(x)), atol=1e-5, rtol=1e-6)


def test_receptive_field_probe():
    from unetlab.models.presets import receptive_field
    from unetlab.models.unet import UNet

    # A single 3x3 level: two valid convs, pool, two convs, up-conv, two convs: 5 + 1 + 8 + 4 = 18.
    assert receptive_field(UNet(1, 1, [1, 1], "none", "valid", 0.0, "transpose")) == 18
    # The field grows with depth and does not depend on padding mode for the same topology.
    fields = [receptive_field(UNet(1, 1, [1] * (d + 1), "none", "same", 0.0, "transpose")) for d in (1, 2, 3)]
    assert fields[0] == 18 and fields[0] < fields[1] < fields[2]


def test_list_presets_and_table():
    from unetlab.models.presets import PRESETS, format_presets_table, list_presets

    rows = list_presets()
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == set(PRESETS)
    assert by_name["unet-paper"]["parameters"] == 31_030_658
    assert by_name["unet-slim"]["parameters"] == 4_418_449
    assert by_name["resnet34-unet"]["parameters"] == 24_351_921
    # The published U-Net needs 572 px of input for 388 px of output: its field is at least 572 - 388 + 1.
    assert by_name["unet-paper"]["receptive_field"] >= 185
    assert by_name["resnet34-unet"]["receptive_field"] > by_name["unet-slim"]["receptive_field"]
    table = format_presets_table(rows)
    assert "31,030,658" in table and "resnet34-unet" in table


def test_settings_a_preset_fixes_itself_are_named_as_ignored():
    """--preset resnet34-unet builds its own network: --upsample or --depth given with it change nothing, and
    training warns about them (training/setup.py) instead of recording them silently."""
    from unetlab.models import PRESETS, ignored_settings

    given = {"upsample", "depth", "padding"}
    assert ignored_settings("resnet34-unet", given.__contains__) == ["depth", "upsample"]
    assert ignored_settings("unet", given.__contains__) == []
    assert ignored_settings("unet-slim", given.__contains__) == ["depth", "upsample"]
    # every preset says what it reads: building one with each other setting changed gives the same network
    for name, preset in PRESETS.items():
        base = ModelConfig(preset=name, in_channels=1, out_channels=1)
        ref = count_parameters(build_model(base))
        for key, value in (("depth", 2), ("base_width", 8), ("norm", "group"), ("upsample", "transpose")):
            if key not in preset.takes:
                assert count_parameters(build_model(ModelConfig(**{**base.__dict__, key: value}))) == ref, (name, key)
