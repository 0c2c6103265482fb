"""Output writers: labels, masks, probabilities, overlays, measurements, Kaggle RLE CSVs and ImageJ ROIs."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
from skimage.segmentation import relabel_sequential

from unetlab.data.io import read_image, read_label, write_image
from unetlab.data.rle import rles_to_labels
from unetlab.errors import UnetlabError
from unetlab.inference.writers import (
    measure_objects,
    outline_overlay,
    read_rle_csv,
    read_rle_table,
    rle_csv_labels,
    write_imagej_rois,
    write_labels,
    write_mask,
    write_objects_csv,
    write_overlay,
    write_probabilities,
    write_rle_csv,
    write_summary_csv,
)

STARDIST = Path(__file__).resolve().parents[1] / "../shared/data/stardist_nuclei"


def sample_labels():
    lab = np.zeros((20, 24), np.int32)
    lab[2:8, 3:9] = 4  # 6x6 square
    lab[10:18, 12:16] = 9  # 8x4 rectangle
    lab[10:18, 16:20] = 2  # touching the rectangle
    return lab


def test_label_mask_probability_round_trips(tmp_path):
    lab = sample_labels()
    for name in ("l.tif", "l.png"):
        p = write_labels(tmp_path / name, lab)
        back = read_label(p)
        assert np.array_equal(back, lab)
    big = np.zeros((4, 4), np.int64)
    big[0, 0] = 70000
    with pytest.raises(UnetlabError, match="16-bit"):
        write_labels(tmp_path / "big.png", big)
    assert read_label(write_labels(tmp_path / "big.tif", big))[0, 0] == 70000
    m = read_label(write_mask(tmp_path / "m.png", lab))
    assert set(np.unique(m)) == {0, 255} and np.array_equal(m > 0, lab > 0)
    prob = np.random.default_rng(0).random((2, 20, 24)).astype(np.float32)
    assert np.allclose(read_image(write_probabilities(tmp_path / "p.tif", prob)), prob)
    with pytest.raises(UnetlabError, match="TIFF"):
        write_probabilities(tmp_path / "p.png", prob)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_writers_never_overwrite_inputs(tmp_path):
    src = tmp_path / "img.png"
    write_image(src, np.full((5, 5), 7, np.uint8))
    before = src.read_bytes()
    with pytest.raises(UnetlabError, match="input"):
        write_mask(src, np.ones((5, 5)), protect=[tmp_path / "." / "img.png"])
    with pytest.raises(UnetlabError, match="input"):
        write_overlay(src, np.zeros((5, 5)), np.zeros((5, 5), int), protect=[src])
    assert src.read_bytes() == before


def test_overlay_draws_coloured_outlines(tmp_path):
    lab = sample_labels()
    image = np.linspace(0, 1000, lab.size, dtype=np.float32).reshape(1, *lab.shape)
    rgb = outline_overlay(image, lab)
    assert rgb.shape == (20, 24, 3) and rgb.dtype == np.uint8
    # interior pixels stay grey, outline pixels are coloured, touching objects get different colours
    assert rgb[4, 5, 0] == rgb[4, 5, 1] == rgb[4, 5, 2]
    edge_a, edge_b = rgb[12, 15], rgb[12, 16]
    assert len(set(edge_a.tolist())) > 1 and not np.array_equal(edge_a, edge_b)
    assert (rgb[lab == 0] == rgb[lab == 0][:, :1]).all()  # background untouched (grey)
    red = outline_overlay(np.stack([image[0], image[0]]), lab, color=(255, 0, 0))
    assert red[2, 3].tolist() == [255, 0, 0]
    p = write_overlay(tmp_path / "o.png", image, lab)
    assert read_image(p).shape == (3, 20, 24)


def _old_to_rgb8(image):
    """writers.to_rgb8 before it moved to data.io (a reference): per-channel 1/99.8 percentiles, then RGB."""
    from unetlab.data.io import normalize_percentile

    img = np.asarray(image, dtype=np.float32)
    img = img[None] if img.ndim == 2 else img
    norm = np.clip(normalize_percentile(img, 1.0, 99.8), 0, 1)
    if norm.shape[0] == 1:
        rgb = np.repeat(norm, 3, axis=0)
    elif norm.shape[0] == 2:
        rgb = np.concatenate([norm, np.zeros_like(norm[:1])], axis=0)
    else:
        rgb = norm[:3]
    return np.round(np.moveaxis(rgb, 0, -1) * 255).astype(np.uint8)


def _old_display_rgb(image):
    """data.augment's preview renderer (a reference): joint 0.5/99.5 percentiles of the RGB planes."""
    c = image.shape[0]
    if c == 1:
        rgb = np.repeat(image[0][..., None], 3, axis=-1)
    elif c == 2:
        rgb = np.stack([image[0], image[1], np.zeros_like(image[0])], axis=-1)
    else:
        rgb = np.moveaxis(image[:3], 0, -1)
    lo, hi = np.percentile(rgb, 0.5), np.percentile(rgb, 99.5)
    return np.clip((rgb - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def _old_outline_overlay(image, labels, color=None):
    """outline_overlay before find_boundaries / skimage's relabel_sequential (a reference)."""
    from unetlab.inference.writers import label_colors

    rgb = _old_to_rgb8(image)
    lab = np.asarray(labels)
    edge = np.zeros(lab.shape, bool)
    d = lab[1:, :] != lab[:-1, :]
    edge[1:, :] |= d
    edge[:-1, :] |= d
    d = lab[:, 1:] != lab[:, :-1]
    edge[:, 1:] |= d
    edge[:, :-1] |= d
    edge &= lab > 0
    if color is not None:
        rgb[edge] = np.asarray(color, np.uint8)
    else:
        values = np.unique(lab[lab > 0])
        seq = np.searchsorted(values, lab) + 1
        seq[lab == 0] = 0
        rgb[edge] = label_colors(len(values))[seq[edge]]
    return rgb


@pytest.mark.parametrize("shape", [(20, 24), (1, 20, 24), (2, 20, 24), (3, 20, 24), (4, 20, 24), (1, 1001, 1003)])
def test_one_renderer_gives_the_old_pictures(shape):
    from unetlab.data.io import to_rgb8

    rng = np.random.default_rng(len(shape))
    image = (rng.gamma(2.0, 100.0, shape) * np.linspace(1, 3, shape[-1])).astype(np.float32)
    assert np.array_equal(to_rgb8(image), _old_to_rgb8(image))  # the writers' overlays: unchanged
    if len(shape) == 3 and shape[1] < 1000:  # augment's preview (per_channel=False): the same but for rounding
        joint = to_rgb8(image, 0.5, 99.5, per_channel=False).astype(int)
        assert np.abs(joint - (_old_display_rgb(image) * 255 + 0.5).astype(int)).max() <= 1


def test_overlays_are_the_old_pictures():
    lab = sample_labels()
    lab[0, :3] = 7  # on the image border
    lab[19, 23] = 11  # one pixel in a corner
    image = np.linspace(0, 1000, lab.size, dtype=np.float32).reshape(1, *lab.shape)
    assert np.array_equal(outline_overlay(image, lab), _old_outline_overlay(image, lab))
    assert np.array_equal(outline_overlay(image, lab, (255, 0, 0)), _old_outline_overlay(image, lab, (255, 0, 0)))
    empty = np.zeros_like(lab)
    assert np.array_equal(outline_overlay(image, empty), _old_outline_overlay(image, empty))


def test_measure_objects_known_shapes():
    lab = sample_labels()
    image = np.stack([np.ones(lab.shape, np.float32), np.zeros(lab.shape, np.float32)])
    image[1][lab == 9] = np.arange(32)
    rows = measure_objects(lab, image)
    assert [r["ObjectNumber"] for r in rows] == [2, 4, 9]
    sq = rows[1]
    assert sq["AreaShape_Area"] == 36
    assert (sq["AreaShape_Center_X"], sq["AreaShape_Center_Y"]) == pytest.approx((5.5, 4.5))
    assert (sq["AreaShape_BoundingBoxMinimum_X"], sq["AreaShape_BoundingBoxMinimum_Y"]) == (3, 2)
    assert (sq["AreaShape_BoundingBoxMaximum_X"], sq["AreaShape_BoundingBoxMaximum_Y"]) == (9, 8)
    assert sq["AreaShape_Solidity"] == pytest.approx(1.0) and sq["AreaShape_Eccentricity"] == pytest.approx(0.0)
    rect = rows[2]
    assert rect["AreaShape_Eccentricity"] > 0.5
    assert rect["Intensity_MeanIntensity_ch1"] == pytest.approx(15.5) and rect["Intensity_MaxIntensity_ch1"] == 31
    assert rect["Intensity_MeanIntensity_ch0"] == pytest.approx(1.0)
    assert "Intensity_MeanIntensity_ch0" not in measure_objects(lab)[0]
    assert measure_objects(np.zeros((5, 5), int)) == []


def test_object_and_summary_csv(tmp_path):
    lab = sample_labels()
    meas = {"a": measure_objects(lab, lab[None].astype(np.float32)), "empty": []}
    p = write_objects_csv(tmp_path / "objects.csv", meas)
    rows = list(csv.DictReader(p.open()))
    assert len(rows) == 3 and rows[0]["ImageName"] == "a" and rows[1]["AreaShape_Area"] == "36"
    s = write_summary_csv(tmp_path / "summary.csv", meas)
    summ = {r["ImageName"]: r for r in csv.DictReader(s.open())}
    assert summ["a"]["Count"] == "3" and summ["empty"]["Count"] == "0"
    assert float(summ["a"]["AreaShape_Area_Total"]) == np.count_nonzero(lab)


@pytest.mark.parametrize("style,header,order", [("dsb", "ImageId,EncodedPixels", "F"),
                                                ("sartorius", "id,predicted", "C")])
def test_rle_csv_round_trip(tmp_path, style, header, order):
    lab = sample_labels()
    empty = np.zeros((6, 7), np.int32)
    p = write_rle_csv(tmp_path / "sub.csv", [("img1", lab), ("blank", empty)], style=style)
    lines = p.read_text().splitlines()
    assert lines[0] == header and lines[-1] == "blank,"
    assert len(lines) == 1 + 3 + 1
    rles = read_rle_csv(p)
    assert list(rles) == ["img1", "blank"] and rles["blank"] == [] and len(rles["img1"]) == 3
    assert read_rle_table(p)[2] == order
    back = rles_to_labels(rles["img1"], lab.shape, order=order)
    assert np.array_equal(back, relabel_sequential(lab)[0])
    decoded = rle_csv_labels(p, {"img1": lab.shape, "blank": empty.shape})
    assert decoded["blank"].shape == (6, 7) and not decoded["blank"].any()


def test_rle_pixel_order_of_styles(tmp_path):
    lab = np.zeros((4, 5), np.int32)
    lab[0, 1:4] = 1  # a horizontal run of three pixels in the first row
    write_rle_csv(tmp_path / "d.csv", [("a", lab)], style="dsb")
    write_rle_csv(tmp_path / "s.csv", [("a", lab)], style="sartorius")
    assert read_rle_csv(tmp_path / "s.csv")["a"] == ["2 3"]  # row-major: one run
    assert read_rle_csv(tmp_path / "d.csv")["a"] == ["5 1 9 1 13 1"]  # column-major: three runs
    with pytest.raises(UnetlabError):
        write_rle_csv(tmp_path / "x.csv", [("a", lab)], style="coco")
    (tmp_path / "bad.csv").write_text("name,mask\na,1 2\n")
    with pytest.raises(UnetlabError, match="run-length"):
        read_rle_csv(tmp_path / "bad.csv")


@pytest.mark.realdata
@pytest.mark.skipif(not STARDIST.is_dir(), reason="../shared/data/stardist_nuclei not available")
def test_rle_round_trip_real_labels(tmp_path):
    lab = read_label(STARDIST / "masks" / "img2d.tif")
    p = write_rle_csv(tmp_path / "s.csv", [("img2d", lab)])
    back = rle_csv_labels(p, {"img2d": lab.shape})["img2d"]
    assert np.array_equal(back, relabel_sequential(lab)[0])


def test_imagej_rois(tmp_path):
    roifile = pytest.importorskip("roifile")
    from skimage.draw import polygon2mask

    lab = sample_labels()
    yy, xx = np.mgrid[:20, :24]
    lab[(yy - 14) ** 2 + (xx - 5) ** 2 <= 9] = 6  # a small disc
    p = write_imagej_rois(tmp_path / "rois.zip", lab)
    rois = roifile.roiread(p)
    assert [r.name for r in rois] == ["00002", "00004", "00006", "00009"]
    for r, value in zip(rois, (2, 4, 6, 9)):
        xy = r.coordinates()
        # rasterise the polygon at pixel centres (ImageJ: pixel x spans [x, x + 1))
        filled = polygon2mask(lab.shape, np.stack([xy[:, 1] - 0.5, xy[:, 0] - 0.5], axis=1))
        obj = lab == value
        iou = np.count_nonzero(filled & obj) / np.count_nonzero(filled | obj)
        assert iou >= 0.95, (value, iou)
        assert np.count_nonzero(filled & ~ndi_dilate(obj)) == 0
    with pytest.raises(UnetlabError, match="zip"):
        write_imagej_rois(tmp_path / "rois.roi", lab)


def ndi_dilate(mask):
    from scipy import ndimage as ndi

    return ndi.binary_dilation(mask)


def test_imagej_rois_missing_dependency(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "roifile", None)
    with pytest.raises(UnetlabError, match="roifile"):
        write_imagej_rois(tmp_path / "rois.zip", sample_labels())
