"""What `unetlab predict` says and records: the precision it used, one scale summary, the channels it takes from a
multichannel image, a corrupt file's error naming --skip-bad and the skipped files listed once; and the ONNX backend
honouring --tta and --device, refusing what onnxruntime cannot do."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from corpus.make_corpus import good_dataset, tiny_run
from unetlab.cli import main
from unetlab.errors import UnetlabError
from unetlab.inference import predictor as P
from unetlab.inference.predict import predict

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny trained run (1-channel, binary), shared by the tests of this file; never written to."""
    return tiny_run(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two small 1-channel images."""
    return good_dataset(tmp_path_factory.mktemp("data"), n=2) / "images"


def _messages(caplog, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


# --- precision (issue 26.1) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_predict_logs_and_records_the_precision_it_used(tmp_path, run_dir, images, caplog, precision):
    caplog.set_level(logging.INFO, logger="unetlab")
    s = predict(run_dir, images, tmp_path / "pred", precision=precision, progress=False, tile=64)
    record = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert record["precision"] == precision and s["precision"] == precision
    lines = [m for m in _messages(caplog) if m.startswith("predict: device")]
    assert len(lines) == 1 and f"precision {precision}" in lines[0] and "thread" in lines[0]


@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_is_recorded_as_the_precision_it_resolved_to(tmp_path, run_dir, images, monkeypatch, native):
    """'auto' is bf16 on a CPU with native bf16 (AVX512-BF16/AMX; it costs no AP@0.5 on the DSB test split,
    benchmarks/README.md), fp32 on others: predictions.json says which, never 'auto'."""
    monkeypatch.setattr(P, "cpu_supports_bf16", lambda: native)
    predict(run_dir, images, tmp_path / "pred", device="cpu", progress=False, tile=64)
    record = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert record["precision"] == ("bf16" if native else "fp32")


# --- one scale line (issue 26.6) -----------------------------------------------------------------------------


def test_one_scale_summary_line_instead_of_one_per_image(tmp_path, run_dir, images, caplog):
    diameter = json.loads((run_dir / "model.json").read_text()).get("diameter")
    if not diameter:
        pytest.skip("the tiny run records no object diameter")
    caplog.set_level(logging.INFO, logger="unetlab")
    predict(run_dir, images, tmp_path / "pred", instances=True, diameter=2 * diameter, precision="fp32",
            progress=False, tile=64)
    info = _messages(caplog)
    assert not [m for m in info if "predicted at scale" in m]
    summary = [m for m in info if "rescaled" in m and "median" in m]
    assert len(summary) == 1 and "2 image(s)" in summary[0] and "2 rescaled" in summary[0]
    counts = (tmp_path / "pred" / "counts.csv").read_text()
    assert "0.5" in counts  # the per-image scale stays in counts.csv


# --- channels (issue 26.6) -----------------------------------------------------------------------------------


def _rgb(folder: Path, name: str = "rgb") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def test_rgb_input_to_a_model_trained_on_channel_0_says_so_once(tmp_path, caplog):
    folder = _rgb(tmp_path / "in")
    _rgb(folder, "rgb2")
    caplog.set_level(logging.INFO, logger="unetlab")
    predict("nuclei", folder, tmp_path / "pred", precision="fp32", diameter="none", progress=False, tile=64)
    said = [m for m in _messages(caplog) if "using channel" in m]
    assert len(said) == 1
    assert "model expects 1 channel" in said[0] and "channel(s) 0 of RGB image rgb.png" in said[0]
    assert "--channels" in said[0]


def test_channels_option_picks_the_channel_of_a_multichannel_image(tmp_path, run_dir, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    plane = tifffile.imread(next((good_dataset(tmp_path / "d", n=1) / "images").glob("*.tif")))
    tifffile.imwrite(folder / "three.tif", np.stack([np.zeros_like(plane), plane, np.zeros_like(plane)]),
                     photometric="minisblack")
    with pytest.raises(UnetlabError, match="this image has 3"):  # the 1-channel model cannot take 3 channels as they are
        predict(run_dir, folder, tmp_path / "refused", precision="fp32", progress=False, tile=64)
    caplog.set_level(logging.INFO, logger="unetlab")
    rc = main(["predict", "--model", str(run_dir), "--input", str(folder), "--out", str(tmp_path / "pred"),
               "--channels", "1", "--precision", "fp32", "--tile", "64", "--no-progress"])
    assert rc == 0
    single = tmp_path / "single"
    single.mkdir()
    tifffile.imwrite(single / "three.tif", plane)
    predict(run_dir, single, tmp_path / "pred1", precision="fp32", progress=False, tile=64)
    picked = np.asarray(Image.open(tmp_path / "pred" / "masks" / "three.png"))
    alone = np.asarray(Image.open(tmp_path / "pred1" / "masks" / "three.png"))
    assert np.array_equal(picked, alone)  # channel 1 of the stack is the single plane
    assert any("as --channels asked" in m for m in _messages(caplog))


# --- bad files (issue 26.6) ----------------------------------------------------------------------------------


def _with_a_corrupt_file(tmp_path: Path, images: Path) -> Path:
    folder = tmp_path / "in"
    shutil.copytree(images, folder)
    (folder / "broken.tif").write_bytes(b"II*\x00 not really a tiff")
    return folder


def test_a_corrupt_file_error_names_skip_bad(tmp_path, run_dir, images, capsys):
    folder = _with_a_corrupt_file(tmp_path, images)
    rc = main(["-q", "predict", "--model", str(run_dir), "--input", str(folder), "--out", str(tmp_path / "pred"),
               "--precision", "fp32", "--tile", "64", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "broken.tif" in err[0] and "--skip-bad" in err[0]


def test_skip_bad_lists_the_skipped_file_once(tmp_path, run_dir, images, capsys, caplog):
    folder = _with_a_corrupt_file(tmp_path, images)
    caplog.set_level(logging.INFO, logger="unetlab")  # the lines a user sees by default
    rc = main(["predict", "--model", str(run_dir), "--input", str(folder), "--out", str(tmp_path / "pred"),
               "--precision", "fp32", "--tile", "64", "--no-progress", "--skip-bad"])
    out = capsys.readouterr()
    assert rc == 0
    shown = out.out + out.err + "\n".join(_messages(caplog))
    assert shown.count("broken.tif") == 1, shown


# --- ONNX backend (issue 27.6) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_run(run_dir, tmp_path_factory) -> Path:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from unetlab.inference.export import export_run

    run = tmp_path_factory.mktemp("onnx") / "run"
    shutil.copytree(run_dir, run)
    export_run(run, "onnx")
    return run


def _probabilities(out: Path) -> np.ndarray:
    return np.stack([tifffile.imread(p) for p in sorted((out / "probabilities").glob("*.tif"))])


def test_onnx_backend_averages_the_same_flips_as_torch(tmp_path, onnx_run, images):
    kw = dict(probabilities=True, precision="fp32", device="cpu", progress=False, tile=64)
    predict(onnx_run, images, tmp_path / "onnx", backend="onnx", **kw)
    predict(onnx_run, images, tmp_path / "onnx_tta", backend="onnx", tta=True, **kw)
    predict(onnx_run, images, tmp_path / "torch_tta", backend="torch", tta=True, **kw)
    plain, onnx_tta, torch_tta = (_probabilities(tmp_path / n) for n in ("onnx", "onnx_tta", "torch_tta"))
    assert np.abs(onnx_tta - torch_tta).max() < 1e-4  # one TTA rule: the same average whichever backend
    assert np.abs(onnx_tta - plain).max() > 1e-3  # --tta is not ignored


def test_onnx_backend_takes_an_export_kept_outside_the_model_folder(tmp_path, onnx_run, run_dir, images):
    """A pretrained model's folder is not written to: its export lives elsewhere and --onnx FILE names it."""
    kw = dict(probabilities=True, precision="fp32", device="cpu", progress=False, tile=64, backend="onnx")
    assert not (run_dir / "model.onnx").exists()
    with pytest.raises(UnetlabError, match="--onnx FILE"):
        predict(run_dir, images, tmp_path / "missing", **kw)
    predict(run_dir, images, tmp_path / "elsewhere", onnx=onnx_run / "model.onnx", **kw)
    predict(onnx_run, images, tmp_path / "inside", **kw)
    assert np.array_equal(_probabilities(tmp_path / "elsewhere"), _probabilities(tmp_path / "inside"))


def test_onnx_backend_refuses_what_onnxruntime_cannot_do(tmp_path, onnx_run, images):
    for flags, fix in (({"precision": "bf16"}, "--precision fp32"), ({"precision": "fp16"}, "--backend torch"),
                       ({"compile": True}, "leave out --compile")):
        with pytest.raises(UnetlabError) as err:
            predict(onnx_run, images, tmp_path / "x", backend="onnx", progress=False, **flags)
        assert fix in str(err.value) and "\n" not in str(err.value)


def test_onnx_backend_on_cuda_uses_the_cuda_provider_or_says_how(tmp_path, onnx_run, images, monkeypatch):
    import onnxruntime as ort

    from unetlab.inference.export import load_onnx

    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        s = predict(onnx_run, images, tmp_path / "cuda", backend="onnx", device="cuda", progress=False)
        assert s["predicted"] == 2
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU, but an onnxruntime without CUDA
    assert P.onnx_device("auto").type == "cpu"  # auto: the CPU provider, where onnxruntime has no CUDA
    with pytest.raises(UnetlabError, match="onnxruntime-gpu") as err:  # asked for explicitly: say how
        load_onnx(onnx_run / "model.onnx", "cuda")
    assert "--device cpu" in str(err.value)



def test_counts_csv_has_the_same_columns_with_and_without_rescaling(tmp_path, images):
    """Scripts read Scale / Diameter / DiameterFrom from counts.csv: --diameter none keeps them (Scale 1)."""
    import csv

    kw = dict(instances=True, precision="fp32", progress=False, tile=64)
    predict("nuclei", images, tmp_path / "auto", **kw)
    predict("nuclei", images, tmp_path / "none", diameter="none", **kw)
    auto, none = (list(csv.DictReader((tmp_path / k / "counts.csv").open())) for k in ("auto", "none"))
    assert list(auto[0]) == list(none[0]) and {"Scale", "Diameter", "DiameterFrom"} <= set(none[0])
    assert {(r["Scale"], r["Diameter"], r["DiameterFrom"]) for r in none} == {("1", "", "none")}
