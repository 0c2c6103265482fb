"""Reading and writing images: bit depths, channel layouts, normalisation and clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from unetlab.data.io import normalize_percentile, read_image, read_label, write_image
from unetlab.errors import UnetlabError
from unetlab.labels import mask_to_labels


def test_png_8_and_16_bit_grayscale(tmp_path):
    a8 = (np.arange(20 * 30) % 251).reshape(20, 30).astype(np.uint8)
    a16 = (np.arange(20 * 30) * 97 % 65535).reshape(20, 30).astype(np.uint16)
    Image.fromarray(a8).save(tmp_path / "a8.png")
    Image.fromarray(a16).save(tmp_path / "a16.png")
    r8, r16 = read_image(tmp_path / "a8.png"), read_image(tmp_path / "a16.png")
    assert r8.shape == (1, 20, 30) and r8.dtype == np.float32
    np.testing.assert_array_equal(r8[0], a8)
    np.testing.assert_array_equal(r16[0], a16)  # 16-bit values survive, not scaled to 8 bits


def test_rgb_and_rgba_become_channels_first(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.dstack([rgb, np.full((16, 24), 255, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    r = read_image(tmp_path / "rgb.png")
    assert r.shape == (3, 16, 24)
    np.testing.assert_array_equal(r[1], rgb[..., 1])
    assert read_image(tmp_path / "rgba.png").shape == (3, 16, 24)  # alpha dropped


def test_multichannel_tiff_both_axis_orders(tmp_path):
    chw = np.random.default_rng(1).integers(0, 65535, (5, 32, 40), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "chw.tif", chw)
    tifffile.imwrite(tmp_path / "hwc.tif", np.moveaxis(chw[:3], 0, -1), photometric="rgb")
    r = read_image(tmp_path / "chw.tif")
    assert r.shape == (5, 32, 40)
    np.testing.assert_array_equal(r[4], chw[4])
    assert read_image(tmp_path / "hwc.tif").shape == (3, 32, 40)


def test_write_then_read_keeps_dtype_and_is_atomic(tmp_path):
    labels = np.zeros((30, 30), np.uint16)
    labels[5:10, 5:10] = 700
    write_image(tmp_path / "l.tif", labels)
    back = read_label(tmp_path / "l.tif")
    assert back.max() == 700
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_atomic_outputs_get_umask_permissions_not_private_temp_ones(tmp_path):
    old = os.umask(0o022)
    try:
        write_image(tmp_path / "m.png", np.zeros((8, 8), np.uint8))
    finally:
        os.umask(old)
    assert (tmp_path / "m.png").stat().st_mode & 0o777 == 0o644  # others can read results, as with open()


def test_mask_modes():
    binary255 = np.array([[0, 255], [255, 0]])
    np.testing.assert_array_equal(mask_to_labels(binary255), [[0, 1], [1, 0]])
    inst = np.array([[0, 3], [7, 7]])
    np.testing.assert_array_equal(mask_to_labels(inst), inst)


def test_percentile_normalisation_maps_percentiles_to_0_1():
    img = np.random.default_rng(2).normal(1000, 50, (2, 64, 64)).astype(np.float32)
    img[1] *= 10
    n = normalize_percentile(img, 1, 99)
    for c in range(2):
        assert np.percentile(n[c], 1) == pytest.approx(0, abs=1e-3)
        assert np.percentile(n[c], 99) == pytest.approx(1, abs=1e-3)


@pytest.mark.parametrize("content", [b"", b"this is not an image", None])
def test_unreadable_files_give_one_line_error_naming_the_file(tmp_path, content):
    p = tmp_path / "bad.tif"
    if content is None:  # a truncated TIFF
        tifffile.imwrite(p, np.ones((64, 64), np.uint16))
        p.write_bytes(p.read_bytes()[:200])
    else:
        p.write_bytes(content)
    with pytest.raises(UnetlabError) as e:
        read_image(p)
    assert "bad.tif" in str(e.value) and "\n" not in str(e.value)


def test_nan_pixels_are_refused(tmp_path):
    a = np.ones((8, 8), np.float32)
    a[2, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", a)
    with pytest.raises(UnetlabError, match="NaN"):
        read_image(tmp_path / "nan.tif")


def _old_is_palette_png(path: Path) -> bool:
    """The hand-written PNG header check that PIL's lazy ``Image.open(path).mode`` replaced (a reference)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(26)
    except OSError:
        return False
    return len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[25] == 3


def _palette_files(folder: Path) -> list[Path]:
    lab = (np.arange(12 * 10) % 4).reshape(12, 10).astype(np.uint8)
    files = {}
    pal = Image.fromarray(lab, mode="L").convert("P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    files["palette.png"] = pal
    files["grey.png"] = Image.fromarray(lab * 60)
    files["rgb.png"] = Image.fromarray(np.stack([lab * 60] * 3, -1))
    files["rgba.png"] = Image.fromarray(np.stack([lab * 60] * 4, -1))
    files["grey16.png"] = Image.fromarray(lab.astype(np.uint16) * 9000)
    out = []
    for name, im in files.items():
        im.save(folder / name)
        out.append(folder / name)
    pal.save(folder / "palette_1bit.png", bits=1)
    pal.save(folder / "palette_transparent.png", transparency=0)
    pal.save(folder / "gif_named.png", format="GIF")  # a palette image, but no PNG
    files["rgb.png"].save(folder / "jpeg_named.png", format="JPEG")
    (folder / "palette_cut.png").write_bytes((folder / "palette.png").read_bytes()[:-30])  # in the pixels
    (folder / "palette_cut_header.png").write_bytes((folder / "palette.png").read_bytes()[:60])
    (folder / "head_only.png").write_bytes((folder / "palette.png").read_bytes()[:10])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    return out + [folder / n for n in ("palette_1bit.png", "palette_transparent.png", "gif_named.png",
                                       "jpeg_named.png", "palette_cut.png", "head_only.png", "empty.png",
                                       "text.png", "missing.png")]


def test_palette_png_check_by_pil_agrees_with_the_old_header_parser(tmp_path):
    from unetlab.data.layouts.common import _is_palette_png, read_mask_raw

    for path in _palette_files(tmp_path):
        assert _is_palette_png(path) == _old_is_palette_png(path), path.name
    # cut inside its header (palette chunk): the old parser saw "palette" in the first 26 bytes and the read
    # failed after a warning; PIL cannot open it, so it is no palette PNG and read_label reports it alone
    cut = tmp_path / "palette_cut_header.png"
    assert _old_is_palette_png(cut) and not _is_palette_png(cut)
    assert read_mask_raw(tmp_path / "palette.png").max() == 3  # indices, not colours
    for name in ("palette_cut.png", "palette_cut_header.png", "empty.png", "text.png"):  # read_label's error
        with pytest.raises(UnetlabError) as e:
            read_mask_raw(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)


def test_ome_xml_is_parsed_as_xml_not_by_pattern():
    """Namespace prefixes, single-quoted attributes, commas in names, a second image: what an XML parser reads."""
    from unetlab.data.ome import _ome_xml_pixels

    xml = ("<?xml version='1.0'?><ome:OME xmlns:ome='http://www.openmicroscopy.org/Schemas/OME/2016-06'>"
           "<ome:Image ID='Image:0'><ome:Pixels ID='Pixels:0' PhysicalSizeX='0.5' PhysicalSizeY='250' "
           "PhysicalSizeYUnit='nm' SizeX='8' SizeY='8' SizeC='2'>"
           "<ome:Channel ID='Channel:0:0' Name='DAPI, nuclei'/><ome:Channel ID='Channel:0:1' Name='GFP'/>"
           "</ome:Pixels></ome:Image><ome:Image ID='Image:1'><ome:Pixels ID='Pixels:1' PhysicalSizeX='9' "
           "PhysicalSizeY='9'><ome:Channel ID='Channel:1:0' Name='other image'/></ome:Pixels></ome:Image>"
           "</ome:OME>")
    size, names = _ome_xml_pixels(xml)
    assert names == ["DAPI, nuclei", "GFP"]
    assert size == pytest.approx((0.25, 0.5))


def test_writing_an_image_to_an_unknown_extension_is_one_user_error(tmp_path):
    for name in ("weights", "weights.bmpx"):
        with pytest.raises(UnetlabError, match="use .png or .tif"):
            write_image(tmp_path / name, np.zeros((4, 4), np.uint8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("axes", ["ZYX", "TYX"])
def test_an_imagej_stack_or_time_series_is_refused_not_read_as_channels(tmp_path, axes):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((5, 16, 16), np.uint16), imagej=True, metadata={"axes": axes})
    with pytest.raises(UnetlabError, match=f"{axes[0]} axis of size 5 .*predicts 2-D images"):
        read_image(path)
    tifffile.imwrite(tmp_path / "c.tif", np.zeros((3, 16, 16), np.uint16), imagej=True, metadata={"axes": "CYX"})
    assert read_image(tmp_path / "c.tif").shape == (3, 16, 16)  # channels stay channels
