"""napari: the npe2 manifest is valid and a prediction folder opens as image + labels layers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from unetlab.inference.predict import predict
from unetlab.napari_reader import get_reader, read_predictions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_pretrained import nuclei_image  # noqa: E402

MANIFEST = Path(__file__).resolve().parents[1] / "src" / "unetlab" / "napari.yaml"


def test_manifest_is_valid_and_points_at_the_reader():
    npe2 = pytest.importorskip("npe2", reason="the napari extra is not installed (pip install 'unetlab[napari]')")
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert manifest.name == "unetlab"
    (command,) = manifest.contributions.commands
    assert command.python_name == "unetlab.napari_reader:get_reader"
    assert manifest.contributions.readers[0].accepts_directories
    import importlib

    module, attr = command.python_name.split(":")
    assert callable(getattr(importlib.import_module(module), attr))


@pytest.fixture(scope="module")
def prediction(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("napari")
    (root / "in").mkdir()
    image, _ = nuclei_image(seed=1, size=128, n=6)
    tifffile.imwrite(root / "in" / "nuc.tif", image)
    rgb = np.stack([image // 256] * 3, axis=-1).astype(np.uint8)
    tifffile.imwrite(root / "in" / "colour.tif", rgb, photometric="rgb")
    predict("nuclei", root / "in", root / "out", instances=True, progress=False, diameter="none")
    return root / "in", root / "out"


def test_prediction_folder_opens_as_image_and_labels_layers(prediction):
    src, out = prediction
    reader = get_reader(str(out))
    assert reader is read_predictions
    layers = reader(str(out))
    kinds = [(meta["name"], kind) for _data, meta, kind in layers]
    assert kinds == [("colour", "image"), ("colour labels", "labels"), ("colour mask", "labels"),
                     ("nuc", "image"), ("nuc labels", "labels"), ("nuc mask", "labels")]
    data = {meta["name"]: d for d, meta, _k in layers}
    np.testing.assert_array_equal(data["nuc"], tifffile.imread(src / "nuc.tif"))  # the source, not a copy
    assert data["colour"].shape == (128, 128, 3) and layers[0][1]["rgb"]
    np.testing.assert_array_equal(data["nuc labels"], tifffile.imread(out / "labels" / "nuc.tif"))
    assert 4 <= data["nuc labels"].max() <= 8
    assert set(np.unique(data["nuc mask"])) == {0, 1}
    assert ((data["nuc labels"] > 0) == (data["nuc mask"] > 0)).mean() > 0.98


def test_one_label_file_opens_with_its_image_and_other_files_are_left_to_napari(prediction, tmp_path):
    src, out = prediction
    layers = get_reader(str(out / "labels" / "nuc.tif"))(str(out / "labels" / "nuc.tif"))
    assert [meta["name"] for _d, meta, _k in layers] == ["nuc", "nuc labels", "nuc mask"]
    assert get_reader(str(src / "nuc.tif")) is None  # an ordinary TIFF: napari's own readers take it
    assert get_reader(str(src)) is None
    assert get_reader([str(out), str(src / "nuc.tif")]) is None
    (tmp_path / "labels").mkdir()
    tifffile.imwrite(tmp_path / "labels" / "x.tif", np.zeros((8, 8), np.uint16))
    assert get_reader(str(tmp_path / "labels" / "x.tif")) is None  # a labels/ folder not written by unetlab


def test_napari_opens_a_prediction_folder_through_the_plugin(prediction):
    """napari itself (its viewer model, no window) finds the plugin by its entry point and adds the layers."""
    pytest.importorskip("napari", reason="napari is not installed (pip install 'unetlab[napari]')")
    import npe2
    from napari.components import ViewerModel

    if "unetlab" not in {m.name for m in npe2.PluginManager.instance().iter_manifests()}:
        npe2.PluginManager.instance().discover()
    if "unetlab" not in {m.name for m in npe2.PluginManager.instance().iter_manifests()}:
        pytest.skip("unetlab is not installed as a package (pip install -e .): napari cannot find its manifest")
    _src, out = prediction
    viewer = ViewerModel()
    viewer.open(str(out), plugin="unetlab")
    layers = {layer.name: type(layer).__name__ for layer in viewer.layers}
    assert layers == {"colour": "Image", "colour labels": "Labels", "colour mask": "Labels", "nuc": "Image",
                      "nuc labels": "Labels", "nuc mask": "Labels"}
    assert viewer.layers["colour"].rgb
    np.testing.assert_array_equal(viewer.layers["nuc labels"].data, tifffile.imread(out / "labels" / "nuc.tif"))
