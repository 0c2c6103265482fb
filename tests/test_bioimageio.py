"""BioImage.IO export: the package validates with bioimageio.spec, passes bioimageio.core's model test with both
weight formats, reproduces PyTorch and unetlab's own prediction, describes unetlab's normalisation, works as a
folder and a zip, and never replaces an existing output unasked. Nothing is trained and nothing is downloaded:
the run folders are built from freshly initialised tiny U-Nets, and every network connection is refused.
"""

from __future__ import annotations

import shutil
import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("bioimageio.spec", reason="BioImage.IO export needs the bioimageio extra")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from unetlab.config import RunConfig  # noqa: E402
from unetlab.data.io import normalize, write_image  # noqa: E402
from unetlab.data.synthetic import make_synthetic_cells  # noqa: E402
from unetlab.errors import UnetlabError  # noqa: E402
from unetlab.inference.bioimageio import export_bioimageio  # noqa: E402
from unetlab.inference.export import load_onnx, load_torchscript  # noqa: E402
from unetlab.models import build_model  # noqa: E402
from unetlab.runfolder import checkpoint_path, load_run, save_checkpoint, write_json  # noqa: E402

# bioimageio.core loads the package's TorchScript weights (a format BioImage.IO requires) with torch.jit.load,
# which torch 2.13 deprecates; the warning is theirs, not ours (our own loader, export.load_torchscript, handles it)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

PACKAGE_FILES = {"rdf.yaml", "README.md", "cover.png", "test_input.npy", "test_output.npy", "sample_input.tif",
                 "sample_output.tif", "weights_torchscript.pt", "weights.onnx"}
OUTPUT_CHANNELS = {"binary": 1, "distance": 2, "boundary": 3, "flow": 3}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Refuse every connection: the export and the bioimageio checks must work offline."""
    attempts: list = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield
    assert attempts == [], f"tried to reach the network: {attempts}"


def make_run(root: Path, *, target: str = "binary", padding: str = "same", channels: int = 1,
             low: float = 1.0, high: float = 99.8, image_channels: int | None = None,
             channel_select: list[int] | None = None) -> Path:
    """A run folder as `unetlab train` writes it (config.yaml, model.json, best.pt) for an untrained tiny U-Net
    (depth 2, base width 4). Its batch-norm statistics are measured on a normalised synthetic image (weights
    untouched), so that, unlike a freshly initialised network, its output depends clearly on its input."""
    cfg = RunConfig()
    cfg.model.preset, cfg.model.depth, cfg.model.base_width, cfg.model.padding = "unet", 2, 4, padding
    cfg.data.norm_low, cfg.data.norm_high, cfg.data.target = low, high, target
    cfg.data.channels = channel_select
    cfg.model.in_channels, cfg.model.out_channels = channels, OUTPUT_CHANNELS[target]
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
    planes = [make_synthetic_cells((96, 96), seed=10 + i)[0] for i in range(channels)]
    x = normalize(np.stack(planes).astype(np.float32), "percentile", low, high)
    with torch.no_grad():
        model(torch.from_numpy(x[None]))
    root.mkdir(parents=True)
    cfg.save(root / "config.yaml")
    write_json(root / "model.json", {"in_channels": channels, "out_channels": OUTPUT_CHANNELS[target],
                                     "image_channels": image_channels or channels, "task": "binary",
                                     "classes": [], "target": target, "layout": "paired", "diameter": 14.2})
    save_checkpoint(checkpoint_path(root, "best"), {"model": model.state_dict()})
    return root


def unetlab_prediction(run_dir: Path, raw: np.ndarray) -> np.ndarray:
    """unetlab's own pipeline on a raw (1, C, H, W) input: normalise -> model -> sigmoid/softmax."""
    run = load_run(run_dir)
    d = run.config.data
    x = torch.from_numpy(normalize(raw[0], d.normalization, d.norm_low, d.norm_high)[None])
    with torch.no_grad():
        logits = run.model(x)
    return (torch.sigmoid(logits) if run.activation == "sigmoid" else torch.softmax(logits, 1)).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """One run exported twice: as a folder and as a zip."""
    root = tmp_path_factory.mktemp("bioimageio")
    run = make_run(root / "run")
    return {"run": run, "folder": export_bioimageio(run, root / "pkg"),
            "zip": export_bioimageio(run, root / "pkg.zip", name="tiny test model", authors=["A. Person"])}


def rdf(folder: Path) -> dict:
    return yaml.safe_load((folder / "rdf.yaml").read_text())


def test_folder_and_zip_hold_the_package_and_pass_spec_validation(exported):
    from bioimageio.spec import load_description

    folder, zipped = exported["folder"], exported["zip"]
    assert {p.name for p in folder.iterdir()} == PACKAGE_FILES
    assert set(zipfile.ZipFile(zipped).namelist()) == PACKAGE_FILES
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == [], "temporaries left"
    for source in (folder / "rdf.yaml", folder, zipped):
        descr = load_description(source, perform_io_checks=True)  # checks every file's sha256 too
        summary = descr.validation_summary
        # format validation alone ends at 'valid-format'; 'passed' needs bioimageio.core's tests (below)
        assert summary.status == "valid-format", summary.format()
        assert summary.errors == [] and all(d.status == "passed" for d in summary.details), summary.format()
        assert descr.format_version.startswith("0.5.") and descr.type == "model"
    assert descr.name == "tiny test model" and [a.name for a in descr.authors] == ["A. Person"]
    assert rdf(folder)["name"] == "unetlab run binary" and rdf(folder)["license"] == "CC-BY-4.0"


@pytest.mark.parametrize("weight_format", ["torchscript", "onnx"])
def test_bioimageio_core_model_test_passes(exported, weight_format):
    from bioimageio.core import test_model

    summary = test_model(exported["zip"], weight_format=weight_format)
    assert summary.status == "passed", summary.format()
    assert summary.errors == []


def test_packaged_weights_reproduce_pytorch_on_the_test_input(exported):
    folder = exported["folder"]
    raw = np.load(folder / "test_input.npy")
    run = load_run(exported["run"])
    x = torch.from_numpy(normalize(raw[0], "percentile", 1.0, 99.8)[None])
    with torch.no_grad():
        expected = run.model(x)
        tested = (load_onnx(folder / "weights.onnx")(x), load_torchscript(folder / "weights_torchscript.pt")(x))
    for got in tested:
        assert got.shape == expected.shape
        assert float((got - expected).abs().max()) < 1e-4


def test_test_output_is_unetlab_prediction(exported):
    from unetlab.inference.predictor import Predictor

    folder = exported["folder"]
    raw, packaged = np.load(folder / "test_input.npy"), np.load(folder / "test_output.npy")
    assert raw.dtype == packaged.dtype == np.float32 and raw.shape == (1, 1, 128, 128)
    assert raw.std() > 100, "the test input looks like a real raw image, not normalised noise"
    ours = unetlab_prediction(exported["run"], raw)
    assert packaged.shape == ours.shape and float(np.abs(packaged - ours).max()) < 1e-4
    predictor = Predictor.from_run(load_run(exported["run"]), device="cpu", precision="fp32")
    assert float(np.abs(predictor.predict_image(raw[0]) - packaged[0]).max()) < 1e-4


def test_description_pipeline_is_unetlab_normalisation(tmp_path):
    # Non-default percentiles: a description that ignored the run's settings (or got them wrong) fails here.
    from bioimageio.core import predict, test_model
    from bioimageio.spec import load_description

    run = make_run(tmp_path / "run", low=5.0, high=95.0)
    folder = export_bioimageio(run, tmp_path / "pkg")
    [step] = rdf(folder)["inputs"][0]["preprocessing"]
    assert step == {"id": "scale_range", "kwargs": {"axes": ["y", "x"], "min_percentile": 5.0,
                                                    "max_percentile": 95.0, "eps": 1e-6}}
    assert rdf(folder)["outputs"][0]["postprocessing"] == [{"id": "sigmoid"}]
    raw = np.load(folder / "test_input.npy")
    described = predict(model=load_description(folder), inputs={"image": raw}).members["probabilities"]
    described = np.asarray(described.data)
    assert float(np.abs(described - unetlab_prediction(run, raw)).max()) < 1e-4
    default = make_run(tmp_path / "default_run")  # same weights, unetlab's default percentiles
    assert float(np.abs(described - unetlab_prediction(default, raw)).max()) > 1e-2, "percentiles must matter"
    # The same package with the percentiles of the description changed no longer reproduces its test output.
    wrong = tmp_path / "wrong"
    shutil.copytree(folder, wrong)
    text = (wrong / "rdf.yaml").read_text()
    (wrong / "rdf.yaml").write_text(text.replace("min_percentile: 5.0", "min_percentile: 1.0"))
    summary = test_model(wrong / "rdf.yaml", weight_format="onnx")
    assert summary.status != "passed"
    assert [d.status for d in summary.details if d.name.startswith("Reproduce test outputs")] == ["failed"]


def test_valid_padding_softmax_and_channel_selection(tmp_path):
    from bioimageio.core import test_model

    run = make_run(tmp_path / "run", target="boundary", padding="valid", channels=2, image_channels=3,
                   channel_select=[2, 0])
    folder = export_bioimageio(run, tmp_path / "pkg")
    d = rdf(folder)
    x_axis = d["outputs"][0]["axes"][3]
    model = load_run(run).model
    size = d["inputs"][0]["axes"][3]["size"]
    assert model.valid_input_size(size["min"]) == size["min"] and size["step"] == 4
    assert x_axis["size"]["offset"] == model.output_size(size["min"]) - size["min"] < 0
    assert d["outputs"][0]["postprocessing"] == [{"id": "softmax", "kwargs": {"axis": "channel"}}]
    assert d["inputs"][0]["axes"][1]["channel_names"] == ["channel2", "channel0"]
    assert d["outputs"][0]["axes"][1]["channel_names"] == ["background", "interior", "boundary"]
    raw = np.load(folder / "test_input.npy")
    assert float(np.abs(np.load(folder / "test_output.npy") - unetlab_prediction(run, raw)).max()) < 1e-4
    summary = test_model(folder / "rdf.yaml", weight_format="onnx")
    assert summary.status == "passed", summary.format()


def test_sample_image_becomes_the_test_input(tmp_path):
    run = make_run(tmp_path / "run", channels=1)
    rng = np.random.default_rng(0)
    image = rng.integers(100, 4000, (90, 101)).astype(np.uint16)
    write_image(tmp_path / "sample.tif", image)
    folder = export_bioimageio(run, tmp_path / "pkg", sample=tmp_path / "sample.tif")
    raw = np.load(folder / "test_input.npy")
    assert raw.shape == (1, 1, 88, 100)  # centre crop to sizes the model takes (min 4 + n * 4)
    assert np.array_equal(raw[0, 0], image[1:89, 0:100].astype(np.float32))
    with pytest.raises(UnetlabError, match="channel"):
        export_bioimageio(run, tmp_path / "pkg2", sample=np.zeros((2, 64, 64), np.float32))


def test_existing_output_is_refused_without_overwrite(tmp_path, capsys):
    from unetlab.cli import main

    run = make_run(tmp_path / "run")
    for out in (tmp_path / "exists.zip", tmp_path / "exists"):
        out.mkdir() if out.suffix == "" else out.write_text("keep me")
        marker = out / "mine.txt" if out.is_dir() else out
        marker.write_text("keep me")
        with pytest.raises(UnetlabError, match="pass --overwrite"):
            export_bioimageio(run, out)
        capsys.readouterr()
        assert main(["-q", "export", str(run), "--format", "bioimageio", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "pass --overwrite" in err[0] and str(out) in err[0]
        assert marker.read_text() == "keep me"
        assert main(["-q", "export", str(run), "--format", "bioimageio", "--out", str(out), "--overwrite"]) == 0
        assert not (out / "mine.txt").exists() if out.is_dir() else zipfile.is_zipfile(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "exists.zip", "run"], "temporaries left"


def test_cli_default_output_is_a_zip_in_the_run_folder(tmp_path, capsys):
    from unetlab.cli import main

    run = make_run(tmp_path / "run", target="distance")
    assert main(["-q", "export", str(run), "--format", "bioimageio", "--author", "B. One", "--author", "C. Two",
                 "--tag", "nuclei"]) == 0
    out = run / "bioimageio.zip"
    assert capsys.readouterr().out.strip() == str(out)
    with zipfile.ZipFile(out) as zf:
        d = yaml.safe_load(zf.read("rdf.yaml"))
        readme = zf.read("README.md").decode()
    assert [a["name"] for a in d["authors"]] == ["B. One", "C. Two"] and "nuclei" in d["tags"]
    assert d["outputs"][0]["axes"][1]["channel_names"] == ["foreground", "distance"]
    assert "## Validation" in readme and "scale_range" in readme and "unetlab predict" in readme


def test_flow_model_names_its_flow_channels_and_passes_validation(tmp_path):
    from bioimageio.spec import load_description

    out = export_bioimageio(make_run(tmp_path / "run", target="flow"), tmp_path / "pkg")
    d = rdf(out)
    assert d["outputs"][0]["axes"][1]["channel_names"] == ["foreground", "flow_y", "flow_x"]
    assert "instance-segmentation" in d["tags"] and "centre" in (out / "README.md").read_text()
    assert load_description(out / "rdf.yaml", perform_io_checks=True).validation_summary.status == "valid-format"


def test_channel_codes_that_merge_channels_are_refused(tmp_path):
    run = make_run(tmp_path / "run", channels=1, image_channels=2)
    cfg = RunConfig.load(run / "config.yaml")
    cfg.data.channel_code = "max(0,1)"
    cfg.save(run / "config.yaml")
    with pytest.raises(UnetlabError, match="merges channels"):
        export_bioimageio(run, tmp_path / "pkg.zip")
    assert not (tmp_path / "pkg.zip").exists()
