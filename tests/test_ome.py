"""OME-TIFF and OME-Zarr / Zarr images: read by their axes, predicted to the same labels as the equivalent TIFF,
streamed band by band, and labels written as OME-Zarr that NGFF readers open."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

pytest.importorskip("zarr", reason="the zarr extra is not installed (pip install 'unetlab[zarr]')")
pytest.importorskip("ome_zarr", reason="the zarr extra is not installed (pip install 'unetlab[zarr]')")
import zarr  # noqa: E402
from ome_zarr.format import FormatV04  # noqa: E402
from ome_zarr.writer import write_image  # noqa: E402

from unetlab.cli import main  # noqa: E402
from unetlab.data.io import image_stem, list_images, read_image  # noqa: E402
from unetlab.data.ome import open_zarr_image, read_metadata  # noqa: E402
from unetlab.errors import UnetlabError  # noqa: E402
from unetlab.inference.predict import collect_inputs, predict  # noqa: E402
from unetlab.inference.streaming import open_tiff_rows, should_stream  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_pretrained import nuclei_image  # noqa: E402

PIXEL_UM = 0.65


def write_ome_zarr(path: Path, image: np.ndarray, axes: str = "cyx", version: str = "0.4") -> Path:
    """``image`` as an NGFF image (with a 2-level pyramid and a pixel size) at ``path``."""
    fmt = FormatV04() if version == "0.4" else None
    group = zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)
    scale = {a: PIXEL_UM if a in "yx" else 1.0 for a in axes}
    write_image(image, group, axes=axes, scale_factors=(2,), fmt=fmt, scale=scale,
                axes_units={"y": "micrometer", "x": "micrometer"},
                storage_options={"chunks": tuple(min(64, s) for s in image.shape)})
    return path


def bare_zarr(path: Path, array: np.ndarray, zarr_format: int = 2, chunks: tuple[int, ...] | None = None) -> Path:
    """``array`` as a plain Zarr array (no NGFF metadata) at ``path``."""
    zarr.create_array(str(path), data=array, zarr_format=zarr_format, chunks=chunks or "auto")
    return path


def same_image_four_ways(folder: Path, image: np.ndarray) -> dict[str, Path]:
    """The 2-D ``image`` as a plain TIFF, an OME-TIFF (CYX, pixel size), an OME-Zarr and a bare Zarr array."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"tiff": folder / "plain.tif", "ome_tiff": folder / "ome.ome.tif", "ome_zarr": folder / "ngff.ome.zarr",
             "zarr": folder / "bare.zarr"}
    tifffile.imwrite(paths["tiff"], image)
    tifffile.imwrite(paths["ome_tiff"], image[None], ome=True, compression="zlib", tile=(64, 64),
                     metadata={"axes": "CYX", "PhysicalSizeX": PIXEL_UM, "PhysicalSizeY": PIXEL_UM,
                               "Channel": {"Name": ["DAPI"]}})
    write_ome_zarr(paths["ome_zarr"], image[None])
    bare_zarr(paths["zarr"], image, chunks=(64, 64))
    return paths


def test_ome_tiff_and_zarr_read_as_the_same_channels_first_image(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 4000, (3, 90, 120), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", rgb, photometric="minisblack")
    tifffile.imwrite(tmp_path / "b.ome.tif", np.moveaxis(rgb, 0, -1)[None, None],  # TZYXC order on disk
                     ome=True, metadata={"axes": "TZYXC", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.25})
    write_ome_zarr(tmp_path / "c.ome.zarr", rgb[:, None], axes="czyx")
    write_ome_zarr(tmp_path / "d.ome.zarr", rgb, version="0.5")
    bare_zarr(tmp_path / "e.zarr", np.moveaxis(rgb, 0, -1), zarr_format=3)  # YXC, axes guessed
    want = read_image(tmp_path / "a.tif")
    for name in ("b.ome.tif", "c.ome.zarr", "d.ome.zarr", "e.zarr"):
        np.testing.assert_array_equal(read_image(tmp_path / name), want, err_msg=name)
    meta = read_metadata(tmp_path / "b.ome.tif")
    assert meta.pixel_size_um == pytest.approx((0.25, 0.5))
    assert read_metadata(tmp_path / "c.ome.zarr").pixel_size_um == pytest.approx((PIXEL_UM, PIXEL_UM))
    assert read_metadata(tmp_path / "d.ome.zarr").pixel_size_um == pytest.approx((PIXEL_UM, PIXEL_UM))
    # a Zarr image is one image in a folder listing, its chunks are not images
    assert [p.name for p in list_images(tmp_path)] == ["a.tif", "b.ome.tif", "c.ome.zarr", "d.ome.zarr", "e.zarr"]
    assert [image_stem(p) for p in list_images(tmp_path)] == ["a", "b", "c", "d", "e"]


def test_ome_tiff_channel_names_and_lazy_rows(tmp_path):
    img = np.arange(2 * 300 * 200, dtype=np.uint16).reshape(2, 300, 200)
    tifffile.imwrite(tmp_path / "x.ome.tif", img, ome=True, compression="zlib", tile=(64, 64),
                     metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "GFP"]}})
    assert read_metadata(tmp_path / "x.ome.tif").channel_names == ["DAPI", "GFP"]
    with open_tiff_rows(tmp_path / "x.ome.tif") as view:  # compressed tiles through tifffile's zarr store
        assert view.shape == (2, 300, 200)
        np.testing.assert_array_equal(view[:, 130:190, 10:50], img[:, 130:190, 10:50])
    bare_zarr(tmp_path / "z.zarr", img, chunks=(1, 64, 64))
    view = open_tiff_rows(tmp_path / "z.zarr")
    np.testing.assert_array_equal(view[:, 250:300, :], img[:, 250:300, :])


def test_ome_zarr_and_ome_tiff_predict_the_same_labels_as_the_tiff(tmp_path):
    image, _truth = nuclei_image(seed=3, size=160, n=10)
    paths = same_image_four_ways(tmp_path / "in", image)
    out = tmp_path / "out"
    summary = predict("nuclei", tmp_path / "in", out, instances=True, ome_zarr=True, progress=False,
                      diameter="none")
    assert summary["predicted"] == 4
    labels = {k: tifffile.imread(out / "labels" / f"{image_stem(p)}.tif") for k, p in paths.items()}
    assert 8 <= labels["tiff"].max() <= 12  # the model found the nuclei, not noise
    for k in ("ome_tiff", "ome_zarr", "zarr"):
        np.testing.assert_array_equal(labels[k], labels["tiff"], err_msg=k)
    # the labels as OME-Zarr: the same array, a labels image to NGFF readers, the input's pixel size kept
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    zpath = out / "labels" / "ngff.ome.zarr"
    nodes = list(Reader(parse_url(str(zpath)))())
    assert any(isinstance(s, Label) for s in nodes[0].specs)
    np.testing.assert_array_equal(np.asarray(nodes[0].data[0]), labels["tiff"])
    assert read_metadata(zpath).pixel_size_um == pytest.approx((PIXEL_UM, PIXEL_UM))
    assert read_metadata(out / "labels" / "plain.ome.zarr").pixel_size_um == pytest.approx((1.0, 1.0))
    # the label TIFF of the OME-TIFF input carries its pixel size too (resolution tags, pixels per centimetre)
    with tifffile.TiffFile(out / "labels" / "ome.tif") as tif:
        page = tif.pages[0]
        x_res = page.tags["XResolution"].value
        assert x_res[0] / x_res[1] == pytest.approx(1e4 / PIXEL_UM, rel=1e-6)
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
    assert not list(out.rglob(".*tmp*"))  # no temporary directories left
    # the inputs were not written to
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == sorted(p.name for p in paths.values())


def test_zarr_image_given_directly_and_streamed(tmp_path):
    image, _ = nuclei_image(seed=4, size=192, n=12)
    paths = same_image_four_ways(tmp_path / "in", image)
    assert collect_inputs(paths["ome_zarr"]) == [("ngff", paths["ome_zarr"])]
    assert should_stream(paths["ome_zarr"], 10_000) and not should_stream(paths["ome_zarr"], None)
    kw = dict(tile=128, diameter="none", progress=False)
    predict("nuclei", paths["tiff"], tmp_path / "mem", stream_threshold=None, **kw)
    want = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "mem" / "masks" / "plain.png"))
    assert 0.02 < (want > 0).mean() < 0.5
    for key in ("ome_zarr", "ome_tiff", "zarr"):
        out = tmp_path / f"stream_{key}"
        predict("nuclei", paths[key], out, stream_threshold=10_000, **kw)
        got = tifffile.imread(out / "masks" / f"{image_stem(paths[key])}.tif")  # streamed: a tiled TIFF mask
        np.testing.assert_array_equal(got, want, err_msg=key)


def test_a_streamed_image_says_it_is_not_rescaled(tmp_path, caplog):
    """Streaming predicts band by band at the image's own size: a --diameter (auto here) that would rescale it
    is named as not applied, once, instead of being dropped silently."""
    image, _ = nuclei_image(seed=4, size=192, n=12)
    paths = same_image_four_ways(tmp_path / "in", image)
    with caplog.at_level("WARNING"):
        predict("nuclei", paths["tiff"], tmp_path / "s", stream_threshold=10_000, tile=128, progress=False)
        predict("nuclei", paths["tiff"], tmp_path / "n", stream_threshold=10_000, tile=128, progress=False,
                diameter="none")
    said = [r.getMessage() for r in caplog.records if "is streamed band by band" in r.getMessage()]
    assert len(said) == 1 and "--diameter auto is not applied" in said[0]


def test_bad_zarr_and_3d_images_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(UnetlabError, match="not a Zarr image"):
        collect_inputs(tmp_path / "empty.zarr")
    group = zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    group.create_array("raw", shape=(32, 32), dtype="uint8")
    with pytest.raises(UnetlabError, match="not an OME-Zarr image") as e:
        read_image(tmp_path / "group.zarr")
    assert "raw" in str(e.value)  # the hint names the arrays inside
    tifffile.imwrite(tmp_path / "stack.ome.tif", np.zeros((5, 32, 32), np.uint8), ome=True, metadata={"axes": "ZYX"})
    with pytest.raises(UnetlabError, match="Z axis of size 5"):
        read_image(tmp_path / "stack.ome.tif")
    write_ome_zarr(tmp_path / "t.ome.zarr", np.zeros((3, 1, 32, 32), np.uint8), axes="tcyx")
    with pytest.raises(UnetlabError, match="T axis of size 3"):
        open_zarr_image(tmp_path / "t.ome.zarr")
    rc = main(["-q", "predict", "--model", "nuclei", "--input", str(tmp_path / "stack.ome.tif"),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc != 0 and "stack.ome.tif" in err and "Z axis" in err and "Traceback" not in err
    assert len([ln for ln in err.strip().splitlines() if not ln.startswith("  ")]) == 1


def test_two_images_with_one_output_name_are_one_line_error(tmp_path):
    image, _ = nuclei_image(seed=6, size=64, n=2)
    tifffile.imwrite(tmp_path / "a.tif", image)
    write_ome_zarr(tmp_path / "a.ome.zarr", image[None])
    with pytest.raises(UnetlabError, match="two images give the output name 'a': a.ome.zarr and a.tif"):
        collect_inputs(tmp_path)


def test_ome_zarr_output_replaces_atomically_and_cli_flag(tmp_path, capsys):
    from unetlab.inference.writers import write_labels_ome_zarr

    lab = np.zeros((40, 50), np.uint16)
    lab[5:15, 5:20] = 1
    write_labels_ome_zarr(tmp_path / "l.ome.zarr", lab, note={"Scale": 1.0})
    lab[20:30, 30:45] = 2
    write_labels_ome_zarr(tmp_path / "l.ome.zarr", lab)  # replaces the old one, leaves nothing behind
    np.testing.assert_array_equal(read_image(tmp_path / "l.ome.zarr")[0], lab)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.ome.zarr"]
    big = np.zeros((2100, 1500), np.uint16)
    big[1000:1200, 700:900] = 7
    write_labels_ome_zarr(tmp_path / "big.ome.zarr", big, pixel_size_um=(0.5, 0.4))
    attrs = json.loads((tmp_path / "big.ome.zarr" / ".zattrs").read_text())["multiscales"][0]
    assert [d["coordinateTransformations"][0]["scale"] for d in attrs["datasets"]] == [[0.5, 0.4], [1.0, 0.8]]
    level1 = np.asarray(zarr.open_array(str(tmp_path / "big.ome.zarr" / attrs["datasets"][1]["path"])))
    np.testing.assert_array_equal(level1, big[::2, ::2])  # nearest neighbour: still labels
    assert read_metadata(tmp_path / "big.ome.zarr").pixel_size_um == pytest.approx((0.5, 0.4))
    (tmp_path / "big.ome.zarr").rename(tmp_path.parent / f"{tmp_path.name}_big.ome.zarr")
    with pytest.raises(UnetlabError, match="refusing to overwrite an input"):
        write_labels_ome_zarr(tmp_path / "l.ome.zarr", lab, protect=[tmp_path / "l.ome.zarr"])
    image, _ = nuclei_image(seed=5, size=128, n=6)
    tifffile.imwrite(tmp_path / "n.tif", image)
    rc = main(["-q", "predict", "--model", "nuclei", "--input", str(tmp_path / "n.tif"), "--out",
               str(tmp_path / "o"), "--instances", "--ome-zarr", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rc = main(["-q", "predict", "--model", "nuclei", "--input", str(tmp_path / "n.tif"), "--out",
               str(tmp_path / "o2"), "--ome-zarr", "--no-progress"])
    assert rc == 2 and "add --instances" in capsys.readouterr().err
    attrs = json.loads((tmp_path / "o" / "labels" / "n.ome.zarr" / ".zattrs").read_text())
    assert attrs["multiscales"][0]["version"] == "0.4" and "image-label" in attrs


def test_training_datasets_pair_ome_images_with_their_masks(tmp_path):
    from unetlab.data.inspect import inspect_dataset
    from unetlab.data.layouts import load_dataset

    (tmp_path / "ds" / "images").mkdir(parents=True)
    (tmp_path / "ds" / "masks").mkdir()
    truth = {}
    for i in range(2):
        image, labels = nuclei_image(seed=i, size=96, n=4)
        write_ome_zarr(tmp_path / "ds" / "images" / f"z{i}.ome.zarr", image[None])
        tifffile.imwrite(tmp_path / "ds" / "images" / f"t{i}.ome.tif", image[None], ome=True, metadata={"axes": "CYX"})
        for stem in (f"z{i}", f"t{i}"):
            tifffile.imwrite(tmp_path / "ds" / "masks" / f"{stem}.tif", labels)
            truth[stem] = (image, labels)
    info = load_dataset(tmp_path / "ds")
    assert sorted(s.name for s in info.samples) == ["t0", "t1", "z0", "z1"] and not info.problems
    for s in info.samples:
        image, labels = truth[s.name]
        np.testing.assert_array_equal(np.squeeze(read_image(s.image)), image)
        assert (s.load_mask() > 0).sum() == (labels > 0).sum()
    report = inspect_dataset(tmp_path / "ds", progress=False)
    assert not report["problems"] and report["n_pairs"] == 4 and report["n_objects"] == 16
