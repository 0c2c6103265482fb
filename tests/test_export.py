"""Export to ONNX and TorchScript: dynamic sizes, agreement with PyTorch, atomic writes, CLI errors."""

from __future__ import annotations

import pytest
import torch

from unetlab.errors import UnetlabError
from unetlab.inference.export import export_model, load_onnx, load_torchscript
from unetlab.models.resnet_unet import ResNetUNet
from unetlab.models.unet import UNet

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def tiny_unet(padding: str = "same", upsample: str = "bilinear", norm: str = "batch", cin: int = 1) -> UNet:
    torch.manual_seed(0)
    model = UNet(cin, 2, [4, 8, 16], norm, padding, 0.2, upsample)
    for m in model.modules():  # non-trivial BN statistics, so eval mode differs from train mode
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model


def tiny_resnet() -> ResNetUNet:
    torch.manual_seed(0)
    return ResNetUNet(3, 1, (1, 1, 1, 1), (8, 8, 16, 16), (8, 8, 4, 4, 4))


def _runner(fmt, path):
    return load_onnx(path) if fmt == "onnx" else load_torchscript(path)


def _assert_round_trip(model, fmt, path, sizes):
    run = _runner(fmt, path)
    model = model.eval()
    for batch, (h, w) in sizes:
        x = torch.randn(batch, model.in_channels, h, w)
        with torch.no_grad():
            expected = model(x)
            got = run(x)
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-4, rtol=0), float((got - expected).abs().max())


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize(
    "make", [lambda: tiny_unet(), lambda: tiny_unet(upsample="pixelshuffle", norm="layer"),
             lambda: tiny_unet(upsample="transpose", norm="group"), tiny_resnet],
    ids=["bilinear-batch", "pixelshuffle-layer", "transpose-group", "resnet"],
)
def test_export_round_trip_dynamic_sizes(tmp_path, fmt, make):
    model = make()
    model.train()  # export must switch to eval itself and leave the caller's model alone
    out = export_model(model, fmt, tmp_path / f"m.{fmt}", model.in_channels)
    assert out.is_file() and model.training
    assert [p.name for p in tmp_path.iterdir()] == [out.name], "no temporary files left behind"
    # Sizes other than the export example's (75x90), not multiples of 32, another batch size; one tiny.
    _assert_round_trip(model, fmt, out, [(1, (75, 90)), (3, (67, 93)), (2, (101, 45)), (1, (6, 5))])


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_valid_padding_model(tmp_path, fmt):
    model = tiny_unet(padding="valid", upsample="transpose", norm="none", cin=2)
    out = export_model(model, fmt, tmp_path / "valid", 2)
    sizes = [(1, (model.valid_input_size(75), model.valid_input_size(90))),
             (2, (model.valid_input_size(101), model.valid_input_size(60)))]
    _assert_round_trip(model, fmt, out, sizes)


def test_onnx_has_dynamic_axes_and_metadata(tmp_path):
    import onnx

    model = tiny_unet()
    out = export_model(model, "onnx", tmp_path / "m.onnx", 1, opset=17)
    proto = onnx.load(str(out))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, False, True, True]
    assert dims[1].dim_value == 1
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) == 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["padding"] == "same" and meta["depth"] == "2" and meta["producer"] == "unetlab"


def test_dynamo_exporter_also_gives_dynamic_sizes(tmp_path):
    pytest.importorskip("onnxscript")
    model = tiny_unet(upsample="pixelshuffle")
    out = export_model(model, "onnx", tmp_path / "d.onnx", 1, onnx_exporter="dynamo")
    _assert_round_trip(model, "onnx", out, [(2, (67, 93)), (1, (5, 3))])


def test_export_replaces_existing_file_atomically(tmp_path):
    target = tmp_path / "m.pt"
    target.write_text("old")
    export_model(tiny_unet(), "torchscript", target, 1)
    assert target.read_bytes()[:2] == b"PK"  # a zip archive, no longer the old text


def test_export_errors(tmp_path):
    with pytest.raises(UnetlabError, match="format"):
        export_model(tiny_unet(), "tflite", tmp_path / "m", 1)
    with pytest.raises(UnetlabError, match="input channels"):
        export_model(tiny_unet(), "onnx", tmp_path / "m.onnx", 3)
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(UnetlabError, match="not found"):
        load_onnx(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(UnetlabError, match="ONNX"):
        load_onnx(bad)


def test_load_onnx_without_onnxruntime(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("no onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(UnetlabError, match="onnxruntime is not installed"):
        load_onnx(tmp_path / "m.onnx")


def test_cli_export_refuses_to_overwrite(tmp_path):
    from unetlab.cli import main

    out = tmp_path / "exists.onnx"
    out.write_text("keep me")
    rc = main(["export", str(tmp_path), "--format", "onnx", "--out", str(out)])
    assert rc == 2 and out.read_text() == "keep me"


def test_cli_export_of_a_run_folder(tmp_path, monkeypatch):
    # Stand in for the run folder reader (unetlab.runfolder.load_run) so the CLI path is exercised end to end.
    import types

    from unetlab import runfolder
    from unetlab.cli import main
    from unetlab.config import RunConfig

    model = tiny_unet().eval()
    monkeypatch.setattr(runfolder, "load_run", lambda run_dir: types.SimpleNamespace(model=model, config=RunConfig()))
    RunConfig().save(tmp_path / "config.yaml")  # a run folder to the CLI's eyes
    out = tmp_path / "model.pt"
    assert main(["export", str(tmp_path), "--format", "torchscript", "--out", str(out)]) == 0
    _assert_round_trip(model, "torchscript", out, [(1, (33, 47))])
